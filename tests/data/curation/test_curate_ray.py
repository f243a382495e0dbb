from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lipkit.data.corpora import tuxpaint_captions, tuxpaint_stamps
from lipkit.data.curation.curate import CurateConfig, curate
from lipkit.data.curation.runner import RayRunner


def write_pairs(folder: Path) -> None:
    """40 Tux Paint stamps with their captions, plus two exact copies."""
    folder.mkdir()
    stamps = [p for p in tuxpaint_stamps() if "en" in tuxpaint_captions(p.with_suffix(".txt"))[0]][::19][:40]
    for p in stamps:
        shutil.copyfile(p, folder / f"{p.stem}.png")
        (folder / f"{p.stem}.txt").write_text(tuxpaint_captions(p.with_suffix(".txt"))[0]["en"])
    for p in stamps[:2]:
        shutil.copyfile(p, folder / f"{p.stem}_copy.png")
        (folder / f"{p.stem}_copy.txt").write_text("a copy")


@pytest.mark.xdist_group("ray")  # one worker, one Ray instance (ray_local), under `pytest -n 2 --dist loadgroup`
def test_ray_gives_the_same_kept_keys_and_provenance_as_one_process(ray_local, tmp_path):
    write_pairs(tmp_path / "pairs")
    (tmp_path / "entries.txt").write_text("a\nan\nthe\nof\nletter\nsign\n")
    settings = dict(metadata=(str(tmp_path / "entries.txt"),), min_words=0, min_chars=0, min_side=0, balance=3.0)
    settings.update(seed=11, batch_size=14, dedup=("exact", "near", "caption"))
    local = curate(CurateConfig(str(tmp_path / "pairs"), str(tmp_path / "local"), **settings))
    with RayRunner("local") as runner:  # joins the instance the fixture started, and leaves it running
        on_ray = curate(CurateConfig(str(tmp_path / "pairs"), str(tmp_path / "ray"), **settings), runner)
        assert runner.description == "Ray (local)"
    assert ray_local.is_initialized()
    keys = (tmp_path / "local" / "keys.txt").read_text()
    assert (tmp_path / "ray" / "keys.txt").read_text() == keys
    assert on_ray.dropped == local.dropped and on_ray.dropped["exact_dup"] == 2 and on_ray.dropped["balance"] > 0
    columns = ["key", "stage", "reason", "duplicate_of", "entries", "keep_probability", "width", "height"]
    assert pq.read_table(tmp_path / "ray" / "provenance.parquet", columns=columns).equals(
        pq.read_table(tmp_path / "local" / "provenance.parquet", columns=columns)
    )
