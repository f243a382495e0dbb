"""The embedding job: the model's own vectors, resume after a crash, incremental folders, clear errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lipkit.cli.main import main
from lipkit.config import to_dict
from lipkit.data.embeddings import open_embeddings, read_manifest, vectors_path
from lipkit.data.spec import open_source
from lipkit.errors import LipkitError
from lipkit.index import stages
from lipkit.index.embed import EmbedOptions, embed_collection
from lipkit.index.encoder import QueryEncoder
from lipkit.models import create_model, get_tokenizer, image_transform
from lipkit.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return QueryEncoder(create_model("micro"))


def _options(data, out, **kw):
    return EmbedOptions(data, out, **{"batch_size": 8, "part_size": 16, "progress": False, **kw})


def _direct(model, source, indexes):
    """The model's vectors for some pairs of a source, computed without the job."""
    transform, tokenize = image_transform(model.cfg), get_tokenizer(model.cfg)
    with torch.no_grad():
        images = model.encode_image(torch.stack([transform(source.image(i)) for i in indexes]), normalize=True)
        texts = model.encode_text(tokenize([source.caption(i) for i in indexes]), normalize=True)
    return images.numpy(), texts.numpy()


def _all(out):
    """Keys -> (image vector, text vector, metadata) over every part of a folder."""
    rows = {}
    for part in open_embeddings(out).iter_parts():
        for i, key in enumerate(part.keys):
            rows[key] = (part.vectors["image"][i], part.vectors["text"][i], part.metadata[i])
    return rows


def test_vectors_and_metadata_equal_the_model(encoder, tmp_path):
    summary = embed_collection(encoder, _options("tuxpaint:all", tmp_path, limit=40))
    assert (summary.items, summary.embedded, summary.kept, summary.parts) == (40, 40, 0, 3)
    source = open_source("tuxpaint:all")
    images, texts = _direct(encoder.model, source, range(40))
    emb = open_embeddings(tmp_path)
    assert emb.record == encoder.record and emb.parts == ["part-00000", "part-00001", "part-00002"]
    parts = list(emb.iter_parts())
    assert [len(p) for p in parts] == [16, 16, 8]
    assert [k for p in parts for k in p.keys] == [source.key(i) for i in range(40)]
    np.testing.assert_allclose(np.concatenate([p.vectors["image"] for p in parts]), images, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([p.vectors["text"] for p in parts]), texts, atol=1e-5)
    meta = parts[0].metadata[3]
    assert meta["caption"] == source.caption(3) and meta["source"] == "tuxpaint"
    assert meta["path"] == str(source.pairs[3].image_path)
    original = source.image(3)
    assert (meta["width"], meta["height"]) == original.size
    thumb = Image.open(io.BytesIO(meta["thumbnail"]))
    assert thumb.format == "JPEG" and max(thumb.size) == min(160, max(original.size))


def test_text_only_without_thumbnails(encoder, tmp_path):
    embed_collection(encoder, _options("tuxpaint:all", tmp_path, limit=10, modalities=("text",), thumbnails=False))
    part = next(open_embeddings(tmp_path).iter_parts())
    assert set(part.vectors) == {"text"} and part.metadata[0]["thumbnail"] is None
    assert "width" not in part.metadata[0] and part.metadata[0]["source"] == "tuxpaint"
    _, texts = _direct(encoder.model, open_source("tuxpaint:all"), range(10))
    np.testing.assert_allclose(part.vectors["text"], texts, atol=1e-5)


def test_a_rerun_skips_finished_parts_and_redoes_a_cut_off_one(encoder, tmp_path):
    options = _options("tuxpaint:all", tmp_path, limit=40)
    embed_collection(encoder, options)
    before = _all(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("part-*")}
    again = embed_collection(encoder, options)
    assert (again.embedded, again.kept) == (0, 40)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("part-*")} == mtimes
    cut = vectors_path(tmp_path, "part-00001", "image")
    cut.write_bytes(cut.read_bytes()[:200])  # a part cut off mid-write
    redone = embed_collection(encoder, options)
    assert (redone.embedded, redone.kept, redone.items) == (16, 24, 40)
    assert open_embeddings(tmp_path).parts == ["part-00000", "part-00002", "part-00003"]
    after = _all(tmp_path)
    assert after.keys() == before.keys()
    for key, (image, text, meta) in after.items():
        np.testing.assert_allclose(image, before[key][0], atol=1e-6)
        np.testing.assert_allclose(text, before[key][1], atol=1e-6)
        assert meta == before[key][2]


def test_a_crash_loses_only_the_part_in_flight(encoder, tmp_path, monkeypatch):
    calls, crash = [], [True]
    forward = stages.Embedder.__call__

    def crash_on_third(self, batch):
        calls.append(len(batch["index"]))
        if len(calls) == 3 and crash:
            crash.pop()
            raise RuntimeError("killed")
        return forward(self, batch)

    monkeypatch.setattr(stages.Embedder, "__call__", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        embed_collection(encoder, _options("tuxpaint:all", tmp_path, limit=40))
    assert list(read_manifest(tmp_path)["parts"]) == ["part-00000"]
    calls.clear()
    summary = embed_collection(encoder, _options("tuxpaint:all", tmp_path, limit=40))
    assert sum(calls) == 24 and (summary.embedded, summary.kept) == (24, 16)


def _picture(path, seed, caption):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24 + seed, 30, 3), dtype=np.uint8)).save(path)
    path.with_suffix(".txt").write_text(caption)


def test_a_folder_rerun_embeds_new_and_changed_files_and_drops_removed_ones(encoder, tmp_path):
    root, out = tmp_path / "photos", tmp_path / "emb"
    root.mkdir()
    for i in range(5):
        _picture(root / f"p{i}.png", i, f"picture number {i}")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("a broken picture")
    first = embed_collection(encoder, _options(str(root), out, part_size=4))
    assert (first.items, first.skipped) == (5, {"undecodable_image": 1})
    assert read_manifest(out)["skipped"] == {"undecodable_image": 1}
    before = _all(out)
    _picture(root / "p5.png", 5, "a new picture")  # added
    _picture(root / "p2.png", 9, "a changed picture")  # changed
    os.utime(root / "p2.png", ns=(1, 1))
    (root / "p4.png").unlink()  # removed
    (root / "p4.txt").unlink()
    summary = embed_collection(encoder, _options(str(root), out, part_size=4))
    assert (summary.items, summary.embedded, summary.kept, summary.removed) == (5, 2, 3, 2)
    assert summary.skipped == {"undecodable_image": 1}  # still counted, not tried again
    after = _all(out)
    assert sorted(after) == ["p0.png", "p1.png", "p2.png", "p3.png", "p5.png"]
    for key in ("p0.png", "p1.png", "p3.png"):
        np.testing.assert_array_equal(after[key][0], before[key][0])
    source = open_source(str(root))
    changed = [source.key(i) for i in range(len(source))].index("p2.png")
    image, text = _direct(encoder.model, source, [changed])
    np.testing.assert_allclose(after["p2.png"][0], image[0], atol=1e-5)
    np.testing.assert_allclose(after["p2.png"][1], text[0], atol=1e-5)
    assert after["p2.png"][2]["caption"] == "a changed picture"


def test_a_table_keeps_its_extra_columns(encoder, tmp_path):
    for i in range(3):
        _picture(tmp_path / f"t{i}.png", i, "unused")
    rows = "\n".join(f"t{i}.png,caption {i},{10 * i},{'ab'[i % 2]}" for i in range(3))
    (tmp_path / "pairs.csv").write_text("image,caption,score,lang\n" + rows + "\n")
    embed_collection(encoder, _options(str(tmp_path / "pairs.csv"), tmp_path / "emb"))
    meta = [m for _, _, m in _all(tmp_path / "emb").values()]
    assert [(m["caption"], m["score"], m["lang"], m["source"]) for m in meta] == [
        ("caption 0", 0, "a", "pairs"),
        ("caption 1", 10, "b", "pairs"),
        ("caption 2", 20, "a", "pairs"),
    ]


def test_another_model_in_the_same_folder_is_refused(encoder, tmp_path):
    embed_collection(encoder, _options("tuxpaint:all", tmp_path, limit=4))
    other = QueryEncoder(create_model("micro", embed_dim=32))
    with pytest.raises(LipkitError, match="holds embeddings of another model"):
        embed_collection(other, _options("tuxpaint:all", tmp_path, limit=4))


@pytest.fixture(scope="module")
def checkpoint(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "model.pt"
    model = encoder.model
    save_checkpoint(path, {"model": model.state_dict(), "step": 1, "model_config": to_dict(model.cfg)})
    return path


def test_cli_embeds_and_reports(checkpoint, tmp_path, capsys):
    argv = ["embed", str(checkpoint), "--data", "tuxpaint:all", "--limit", "12", "--out-dir", str(tmp_path)]
    assert main([*argv, "--workers", "1", "--batch-size", "5", "-q"]) == 0
    assert capsys.readouterr().out.startswith(f"12 items in 1 parts in {tmp_path}: 12 embedded, 0 kept")
    again = ["embed", str(checkpoint), "--data", "tuxpaint:all", "--limit", "12", "--out", str(tmp_path), "-q"]
    assert main(again) == 0
    captured = capsys.readouterr()
    assert "12 items in 1 parts" in captured.out and "0 embedded, 12 kept" in captured.out
    assert "--out is deprecated, use --out-dir" in captured.err


@pytest.mark.parametrize(
    ("data", "out", "message"),
    [
        ("nosuchcorpus", "emb", "unknown data source 'nosuchcorpus'"),
        ("tuxpaint:all", "file/emb", "file"),
        ("tuxpaint:all,tuxpaint:all", "emb", "appears twice"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, data, out, message):
    (tmp_path / "file").write_text("not a folder")
    argv = ["embed", str(checkpoint), "--data", data, "--out-dir", str(tmp_path / out), "--limit", "2000", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lipkit embed: error:") and message in err and "\n" not in err


def test_a_key_list_keeps_the_files_and_stamps_of_its_pairs(tmp_path):
    from lipkit.index.items import file_stamp, list_items

    for i in range(3):
        _picture(tmp_path / f"k{i}.png", i, f"caption {i}")
    (tmp_path / "keys.txt").write_text("k0.png\nk2.png\n")
    listing = list_items([{"source": str(tmp_path), "keys": str(tmp_path / "keys.txt")}])
    assert listing.keys == ["k0.png", "k2.png"]
    assert listing.paths == [str(tmp_path / "k0.png"), str(tmp_path / "k2.png")]
    assert listing.stamps[1].startswith(file_stamp(tmp_path / "k2.png") + ":")
