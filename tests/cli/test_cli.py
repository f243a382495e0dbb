from __future__ import annotations

import subprocess
import sys

import pytest

from lipkit import __version__
from lipkit.cli.main import SUBCOMMANDS, main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"lipkit {command}" in out and len(out) > 200


def test_models_lists_configs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32" in out and "ViT-B-16-SigLIP" in out and "tiny" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "ViT-B-3"], "Did you mean: ViT-B-32"),
        (["train", "tiny-synthetic", "optim.lrr=1"], "optim.lr"),
        (["train", "tiny-synthetc"], "Did you mean: tiny-synthetic"),
        (["train", "tiny-synthetic", "steps=abc"], "expected int"),
        (["train", "--config", "/nonexistent.yaml"], "not found"),
        (["export", "/nonexistent.pt", "--model", "micro", "--out", "x.pt"], "not found"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_prints_resolved_config(capsys):
    assert main(["train", "tiny-synthetic", "steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "model: micro" in out
    assert main(["train", "--list-presets"]) == 0
    assert "tiny-tuxpaint" in capsys.readouterr().out


@pytest.mark.slow
def test_train_end_to_end_from_the_console_script(tmp_path):
    cmd = [sys.executable, "-m", "lipkit.cli.main", "train", "tiny-synthetic", "steps=3", f"out_dir={tmp_path}"]
    proc = subprocess.run([*cmd, "tensorboard=false"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps" in proc.stdout
    assert (tmp_path / "tiny-synthetic" / "checkpoints" / "step_00000003.pt").is_file()


def test_tokenize_prints_ids(capsys):
    assert main(["tokenize", "a cat"]) == 0
    assert "49406" in capsys.readouterr().out


def test_eval_retrieval_on_a_trained_run(tmp_path, capsys):
    argv = ["train", "tiny-synthetic", "steps=20", f"out_dir={tmp_path}", "tensorboard=false", "progress=false"]
    assert main(argv) == 0
    out_file = tmp_path / "r.json"
    assert (
        main(["eval", "retrieval", str(tmp_path / "tiny-synthetic"), "--data", "synthetic:val", "--out", str(out_file)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "R@1" in printed and "median rank" in printed
    import json

    result = json.loads(out_file.read_text())
    assert result["task"] == "retrieval" and result["details"]["n"] == 512
    metrics, sides = result["metrics"], ("image_to_text", "text_to_image")
    hits = [metrics[f"{side}_R@{k}"] * 512 / 100 for side in sides for k in (1, 5, 10)]
    assert hits == pytest.approx([round(h) for h in hits])  # each recall is a count of the 512 queries
    assert all(metrics[f"{side}_R@1"] <= metrics[f"{side}_R@5"] <= metrics[f"{side}_R@10"] for side in sides)
    assert metrics["text_to_image_R@10"] > 5 * 1000 / 512  # five times chance (10 of 512): the trained model learned


@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Fashion-MNIST"
)
def test_eval_fewshot_prints_a_table_per_method_and_k(tmp_path, capsys):
    import json

    import torch

    import lipkit

    torch.manual_seed(0)
    torch.save(lipkit.create_model("micro").state_dict(), tmp_path / "w.pt")
    argv = ["eval", "fewshot", str(tmp_path / "w.pt"), "--model", "micro", "--train", "fashion-mnist:train"]
    argv += ["--test", "fashion-mnist:test", "--limit", "60", "--shots", "1", "2", "--device", "cpu"]
    argv += ["--methods", "zeroshot", "tip_adapter", "gda", "--out", str(tmp_path / "f.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "K=1" in out and "K=2" in out and "tip_adapter" in out and "gda" in out
    result = json.loads((tmp_path / "f.json").read_text())
    methods = result["details"]["fewshot"]["methods"]
    assert set(methods) == {"zeroshot", "tip_adapter", "gda"} and set(methods["gda"]) == {"1", "2"}


def test_eval_fewshot_rejects_too_many_shots(tmp_path, capsys):
    import torch

    import lipkit
    from lipkit.data.corpora import SyntheticPairs

    torch.save(lipkit.create_model("micro").state_dict(), tmp_path / "w.pt")
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3 if cls == "cat" else 1):
            SyntheticPairs(size=4).image(i).save(root / cls / f"{i}.png")
    argv = ["eval", "fewshot", str(tmp_path / "w.pt"), "--model", "micro", "--train", f"folder:{root}"]
    argv += ["--test", f"folder:{root}", "--shots", "2", "--methods", "zeroshot", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dog" in err and "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_the_cli_turns_on_huge_pages_for_large_tensors_unless_the_user_chose(monkeypatch, capsys):
    import os

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["models"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main(["models"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
