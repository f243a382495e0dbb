from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipkit.quickstart import QuickstartConfig, run_quickstart

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is not installed"
)


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
    assert 0 <= saved["results"]["small"][0]["metrics"]["top1"] <= 100
    report = (tmp_path / "qs" / "small" / "report.html").read_text()
    assert "data:image/png;base64" in report
    assert "small" in (tmp_path / "qs" / "index.html").read_text()
    assert len(list((tmp_path / "qs" / "small" / "eval").glob("*.json"))) == 3

    run_quickstart(cfg)  # a re-run reuses the finished training run
    assert "reusing the finished run" in capsys.readouterr().out
