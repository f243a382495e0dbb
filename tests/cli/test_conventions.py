"""The command-line conventions (docs/guide.md): one spelling per option, old spellings with a notice, a light start."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from lipkit.cli.main import build_parser, main
from lipkit.cli.quickstart import run_overrides
from lipkit.errors import ConfigError

# Runs the CLI, then reports on stderr which heavy modules it imported.
PROBE = """
import sys
from lipkit.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "lipkit.train", "lipkit.eval", "lipkit.data") if m in sys.modules)
print("heavy modules:", heavy, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["--help"], 0), (["train", "--help"], 0), (["eval", "fewshot", "--help"], 0), (["train", "--bogus"], 2),
     (["data", "pack", "folder"], 2), (["models"], 0), (["models", "ViT-B-32"], 0)],
)  # fmt: skip
def test_help_argument_errors_and_models_do_not_import_torch(argv, code):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines()[-1] == "heavy modules: []"


def test_the_package_api_still_loads_on_first_use():
    code = "import sys, lipkit; m = lipkit.create_model('micro'); print(type(m).__name__, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["DualEncoder", "True"], done.stderr
    import lipkit.models

    assert lipkit.models.DualEncoder.__name__ == "DualEncoder" and "create_model" in dir(lipkit.models)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = lipkit.models.nothing


def parsed(argv: list[str]) -> dict:
    return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "run"}


@pytest.mark.parametrize(
    ("old", "new", "notice"),
    [
        (["data", "pack", "src", "--out", "d"], ["data", "pack", "src", "--out-dir", "d"],
         "lipkit data pack: --out is deprecated, use --out-dir"),
        (["data", "builtin", "emoji", "--out-dir", "d", "--no-progress"],
         ["data", "builtin", "emoji", "--out-dir", "d", "-q"],
         "lipkit data builtin: --no-progress is deprecated, use --quiet"),
        (["eval", "zeroshot", "run", "--max-samples", "64"], ["eval", "zeroshot", "run", "--limit", "64"],
         "lipkit eval zeroshot: --max-samples is deprecated, use --limit"),
        (["eval", "linear-probe", "run", "--train", "a", "--test", "b", "--max-samples", "9"],
         ["eval", "linear-probe", "run", "--train", "a", "--test", "b", "--limit", "9"],
         "lipkit eval linear-probe: --max-samples is deprecated, use --limit"),
        (["eval", "fewshot", "run", "--train", "a", "--test", "b", "--max-test", "60"],
         ["eval", "fewshot", "run", "--train", "a", "--test", "b", "--limit", "60"],
         "lipkit eval fewshot: --max-test is deprecated, use --limit"),
        (["quickstart", "--out", "runs/q"], ["quickstart", "--out-dir", "runs/q"],
         "lipkit quickstart: --out is deprecated, use --out-dir"),
        (["quickstart", "--max-eval-images", "40"], ["quickstart", "--limit", "40"],
         "lipkit quickstart: --max-eval-images is deprecated, use --limit"),
    ],
)  # fmt: skip
def test_old_spellings_mean_the_new_ones_and_say_so_in_one_line(old, new, notice, capsys):
    assert parsed(old) == parsed(new)
    assert capsys.readouterr().err.splitlines() == [notice]


def options_of(parser: argparse.ArgumentParser, prog: str = "lipkit") -> dict[str, argparse.Action]:
    """Every shown option of every (sub)command, as ``"lipkit data pack --out-dir"`` -> its action."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= options_of(sub, f"{prog} {name}")
        elif action.help != argparse.SUPPRESS:
            found |= {f"{prog} {option}": action for option in action.option_strings}
    return found


def test_every_command_spells_shared_options_alike():
    options = options_of(build_parser())
    outs = {name: a.metavar for name, a in options.items() if name.endswith((" --out", " --out-dir"))}
    assert outs and all(metavar == ("FILE" if name.endswith("--out") else "DIR") for name, metavar in outs.items())
    assert not [name for name in options if name.rsplit(" ", 1)[1] in ("--max-samples", "--max-test", "--no-progress")]
    quiet = [name for name in options if name.endswith(" --quiet")]
    assert {q.rsplit(" ", 1)[0] for q in quiet} == {
        "lipkit train", "lipkit quickstart", "lipkit data pack", "lipkit data builtin", "lipkit eval retrieval",
        "lipkit eval zeroshot", "lipkit eval linear-probe", "lipkit eval fewshot", "lipkit embed", "lipkit data curate",
        "lipkit caption", "lipkit data download",
    }  # fmt: skip
    assert all(options[q].help == options["lipkit train --quiet"].help for q in quiet)


def test_train_set_and_shortcuts_are_the_same_overrides(tmp_path, capsys):
    argv = ["train", "tiny-synthetic", "--set", "steps=7", "optim.lr=0.01", "--seed", "3", "--out-dir", str(tmp_path)]
    assert main([*argv, "--quiet", "--print-config"]) == 0
    with_set = yaml.safe_load(capsys.readouterr().out)
    bare = ["train", "tiny-synthetic", "steps=7", "optim.lr=0.01", "seed=3", f"out_dir={tmp_path}", "progress=false"]
    assert main([*bare, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == with_set
    assert (with_set["steps"], with_set["optim"]["lr"], with_set["seed"]) == (7, 0.01, 3)
    assert (with_set["out_dir"], with_set["progress"]) == (str(tmp_path), False)


def test_quickstart_set_names_the_run_in_the_key(capsys):
    new = run_overrides(["lit.steps=300", "tiny.optim.lr=5e-4", "lit.data.train=a/{0..1}.tar"], ("lit", "tiny"))
    assert new == [("lit", "steps=300"), ("tiny", "optim.lr=5e-4"), ("lit", "data.train=a/{0..1}.tar")]
    assert capsys.readouterr().err == ""
    old = run_overrides(
        ["lit", "steps=300", "tiny", "optim.lr=5e-4", "lit", "data.train=a/{0..1}.tar"], ("lit", "tiny")
    )
    assert old == new
    notice = "lipkit quickstart: --set {0} KEY=VALUE is deprecated, use --set {0}.KEY=VALUE"
    assert capsys.readouterr().err.splitlines() == [notice.format(run) for run in ("lit", "tiny", "lit")]


@pytest.mark.parametrize(
    ("items", "message"),
    [(["steps=3"], "--set takes RUN.KEY=VALUE with RUN one of lit, tiny; got 'steps=3'"),
     (["lt", "steps=3"], "--set names a run 'lt'; the runs are lit, tiny. Did you mean: lit?")],
)  # fmt: skip
def test_quickstart_set_errors_name_the_runs(items, message):
    with pytest.raises(ConfigError) as exc:
        run_overrides(items, ("lit", "tiny"))
    assert str(exc.value) == message
