"""The HTML run report: sections, embedded plots, escaping, discovery of results and missing pieces."""

from __future__ import annotations

import base64
import io
import json
import sys

import pytest
from PIL import Image

from lipkit.cli.main import main
from lipkit.errors import LipkitError
from lipkit.eval import report
from lipkit.eval.report import find_results, latest_per_data, read_training_log, result_step, write_report

CLASSNAMES = ["cat", "<b>x</b>", "dog"]


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def _result(task: str, checkpoint: str | None, data, metrics: dict, details: dict, created: str = "2026-01-01") -> str:
    return json.dumps(
        {
            "task": task,
            "model": {"name": "micro", "config": {}},
            "checkpoint": checkpoint,
            "data": data,
            "metrics": metrics,
            "details": details,
            "lipkit_version": "0.1.0",
            "created": created,
        }
    )


def _zeroshot(step: int, top1: float) -> str:
    confusion = [[5, 1, 0], [2, 3, 1], [0, 0, 0]]
    details = {"confusion_matrix": confusion, "classnames": CLASSNAMES, "per_class_recall": [83.3, 50.0, None]}
    return _result("zeroshot", f"runs/r/checkpoints/step_{step:08d}.pt", "toy:test", {"top1": top1}, details)


def _fewshot() -> str:
    methods = {
        m: {str(k): {"top1": 10.0 * k + i, "top1_std": 1.5, "top1_per_seed": [0, 0]} for k in (1, 2, 4)}
        for i, m in enumerate(["zeroshot", "gda"])
    }
    details = {"fewshot": {"ks": [1, 2, 4], "seeds": [0, 1], "methods": methods}}
    return _result(
        "fewshot", "runs/r/checkpoints/step_00000020.pt", {"train": "toy:train", "test": "toy:test"}, {}, details
    )


def _retrieval() -> str:
    metrics = {f"{d}_R@{k}": 10.0 * k for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    examples = [
        {"image_path": "frog.png", "captions": ["A frog.", "A <i>toad</i>."], "correct": True, "truth": "A frog."},
        {"thumbnail": base64.b64encode(_png("blue")).decode(), "captions": ["A cat."], "correct": False},
        {"image_path": "missing.png", "captions": ["gone"]},
    ]
    return _result("retrieval", None, "toy:val", metrics, {"n": 3, "step": 20, "examples": examples})


def _make_run(root):
    run = root / "run"
    (run / "eval" / "step10").mkdir(parents=True)
    (run / "config.yaml").write_text("name: toy-run\nmodel: micro\nnote: <script>alert(1)</script>\n")
    records = [
        {"step": s, "loss": 3.0 / s, "grad_norm": 1.0, "lr": 1e-3, "logit_scale": 10.0 + s, "samples_per_s": 100.0}
        for s in range(5, 25, 5)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 25, "lo')
    (run / "eval" / "step10" / "zeroshot.json").write_text(_zeroshot(10, 40.0))
    (run / "eval" / "latest_zeroshot.json").write_text(_zeroshot(20, 55.0))
    (run / "eval" / "fewshot.json").write_text(_fewshot())
    (run / "eval" / "retrieval.json").write_text(_retrieval())
    (run / "eval" / "frog.png").write_bytes(_png("green"))
    (run / "eval" / "corrupt.json").write_text("{not json")
    (run / "summary.json").write_text('{"step": 20, "loss": 0.1}')
    return run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A fake run directory and its report, rendered once for the tests that only read it."""
    run = _make_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    return run, path, path.read_text(encoding="utf-8")


def test_report_has_every_section_and_embeds_plots(full):
    run, path, page = full
    assert path == run / "report.html"
    for anchor in ("results", "training", "zeroshot-training", "confusion", "fewshot", "retrieval", "examples"):
        assert f'<section id="{anchor}">' in page
    assert "<details><summary>config.yaml</summary>" in page and "toy-run" in page and "micro" in page
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert plots == [
        "confusion_toy_test.png",
        "fewshot_toy_test.png",
        "grad_norm.png",
        "logit_scale.png",
        "loss.png",
        "lr.png",
        "samples_per_s.png",
        "zeroshot_over_training.png",
    ]
    embedded = [base64.b64decode(chunk.split('"')[0]) for chunk in page.split('src="data:image/png;base64,')[1:]]
    assert (run / "plots" / "loss.png").read_bytes() in embedded
    assert len(embedded) == len(plots) + 2  # and two example thumbnails (one example has no image)
    assert "no image" in page and "1 unreadable lines of metrics.jsonl" in page and "corrupt.json" in page


def test_report_escapes_strings_from_files(full):
    _, _, page = full
    assert "<b>x</b>" not in page and "<script>" not in page and "<i>toad</i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "A &lt;i&gt;toad&lt;/i&gt;." in page


def test_report_tables(full):
    _, _, page = full
    assert "toy:val" in page and "<td>50.0</td>" in page and "<td>100.0</td>" in page  # retrieval R@5, R@10
    assert "zeroshot K=4 40.0" in page and "gda K=4 41.0" in page  # few-shot headline: top-1 at the largest K
    assert page.index("eval/step10/zeroshot.json") < page.index("eval/latest_zeroshot.json")  # summary sorted by step


def test_discovery_rules(full):
    run, _, _ = full
    found, skipped = find_results(run)
    assert sorted(r.name for r in found) == sorted(
        ["eval/fewshot.json", "eval/step10/zeroshot.json", "eval/retrieval.json", "eval/latest_zeroshot.json"]
    )
    assert [s.split(":")[0] for s in skipped] == ["eval/corrupt.json"]
    assert {r.name: r.step for r in found}["eval/retrieval.json"] == 20  # from details.step
    assert [r.name for r in latest_per_data(found, "zeroshot")] == ["eval/latest_zeroshot.json"]
    assert result_step({"checkpoint": "/a/step_00000300.pt", "details": {"step": 7}}) == 300
    assert result_step({"checkpoint": "/a/model.pt", "details": {}}) is None
    records, bad = read_training_log(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20] and bad == 1


def test_empty_run_dir_says_what_is_missing(tmp_path):
    page = write_report(tmp_path).read_text()
    for note in (
        "No config.yaml",
        "No eval results yet",
        "No metrics.jsonl yet",
        "No zero-shot results with a training step yet",
        "No zero-shot results yet",
        "No few-shot results yet",
        "No retrieval results yet",
    ):
        assert note in page
    assert "Retrieval examples" not in page and "data:image" not in page


def test_malformed_result_is_a_note_not_a_crash(tmp_path):
    (tmp_path / "bad.json").write_text(_result("zeroshot", None, "toy:test", {"top1": 1.0}, {"confusion_matrix": "x"}))
    (tmp_path / "few.json").write_text(_result("fewshot", None, "toy:test", {}, {"fewshot": {"methods": {"gda": {}}}}))
    (tmp_path / "odd.json").write_text(_result("zeroshot", None, "toy:test", [1.0], {}))  # not the schema: ignored
    page = write_report(tmp_path, out=tmp_path / "elsewhere" / "r.html").read_text()
    assert "could not draw bad.json" in page and "could not draw its headline" in page and "odd.json" not in page
    assert not (tmp_path / "report.html").exists()


def test_page_is_written_atomically(tmp_path, monkeypatch):
    (tmp_path / "report.html").write_text("old report")

    def fail(found):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "_examples_section", fail)
    with pytest.raises(RuntimeError):
        write_report(tmp_path)
    assert (tmp_path / "report.html").read_text() == "old report"
    written = []
    monkeypatch.undo()
    monkeypatch.setattr(report, "atomic_write_text", lambda path, text: written.append(path))
    write_report(tmp_path)
    assert written == [tmp_path / "report.html"] and (tmp_path / "report.html").read_text() == "old report"


def test_missing_matplotlib_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LipkitError, match="pip install matplotlib"):
        write_report(tmp_path)


def test_cli_report(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert main(["eval", "report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    assert f"report written to {tmp_path / 'r.html'}" in capsys.readouterr().out
    assert (tmp_path / "r.html").is_file() and (tmp_path / "plots" / "loss.png").is_file()
    assert main(["eval", "report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "run directory" in err and "not found" in err and len(err.strip().splitlines()) == 1


def test_run_names_and_captions_are_escaped(tmp_path):
    (tmp_path / "config.yaml").write_text("name: <script>alert('run')</script>\n")
    examples = [{"thumbnail": base64.b64encode(_png("red")).decode(), "captions": ["<script>alert(2)</script>"]}]
    metrics = {f"{d}_R@{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    (tmp_path / "r.json").write_text(_result("retrieval", None, "<b>pairs</b>", metrics, {"examples": examples}))
    page = write_report(tmp_path).read_text()
    assert "<script>" not in page and "<b>pairs</b>" not in page
    assert "<title>lipkit report: &lt;script&gt;alert(&#39;run&#39;)&lt;/script&gt;</title>" in page
    assert "<li>&lt;script&gt;alert(2)&lt;/script&gt;</li>" in page and "&lt;b&gt;pairs&lt;/b&gt;" in page


def test_one_reader_for_metrics_jsonl_tolerates_a_cut_off_line(tmp_path):
    from lipkit.train.metrics import MetricLogger, read_metrics, read_metrics_log

    lines = ['{"step": 1, "loss": 2.5}', "", '{"note": "no step"}', '{"step": 2, "loss": 2.0}', '{"step": 3, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert read_metrics_log(tmp_path) == ([{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}], 1)
    assert read_training_log(tmp_path) == read_metrics_log(tmp_path)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    MetricLogger(tmp_path, tensorboard=False, resume_step=1).close()  # resuming drops later and cut-off lines
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
    assert read_training_log(tmp_path / "none") == (None, 0)


def test_thumbnails_fit_the_box_and_show_transparency_on_white():
    image = Image.new("RGBA", (400, 200), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 200, 200))
    with Image.open(io.BytesIO(report.thumbnail_png(image))) as thumb:
        assert thumb.mode == "RGB" and thumb.size == (128, 64)
        assert thumb.getpixel((10, 10)) == (255, 0, 0) and thumb.getpixel((120, 10)) == (255, 255, 255)
    assert image.size == (400, 200)  # the image given is left as it was
