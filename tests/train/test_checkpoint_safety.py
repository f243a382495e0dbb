"""Training checkpoints load without running code: only tensors and plain values are unpickled."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lipkit.cli.main import main
from lipkit.errors import CheckpointError
from lipkit.train import checkpoint as ckpt
from lipkit.train import loop
from lipkit.train.config import resolve_config


class _TouchOnLoad:
    """Unpickles as a call that creates ``marker``: any code in a pickle runs like this."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a training checkpoint that runs code when unpickled without restrictions."""
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "payload": _TouchOnLoad(marker)}, path)
    return path


def test_the_malicious_checkpoint_runs_code_when_loaded_without_restrictions(tmp_path: Path) -> None:
    path = _malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").is_file()  # so the tests below would notice a load that runs it


def test_a_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}: it names Python objects (builtins.exec) besides tensors")
    assert "\n" not in message
    assert not marker.exists()


def test_resume_from_a_malicious_checkpoint_prints_one_line_and_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    overrides = [f"out_dir={tmp_path}", "progress=false", "tensorboard=false", "device=cpu", f"resume={path}"]
    assert main(["train", "tiny-synthetic", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lipkit train: error: refusing to load {path}: it names Python objects (builtins.exec)")
    assert err.count("\n") == 1
    assert not marker.exists()


def test_a_new_checkpoint_holds_only_tensors_and_plain_values(run_overrides: list[str]) -> None:
    cfg = resolve_config("tiny-synthetic", overrides=[*run_overrides, "steps=2", "checkpoint_every=2"])
    path = loop.train(cfg).checkpoint
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # no allowlist needed
    assert state["step"] == 2 and isinstance(state["rng"]["numpy"][1], list)


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random_sample()), float(torch.rand(()))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    ckpt.save_checkpoint(tmp_path / "c.pt", {"model": {}, "step": 0, "rng": ckpt.rng_state()})
    expected = _draws()
    _draws()
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draws() == expected


def test_an_older_checkpoint_with_numpy_arrays_still_loads_and_restores(tmp_path: Path) -> None:
    np.random.seed(5)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    ckpt.save_checkpoint(tmp_path / "old.pt", {"model": {}, "step": 4, "rng": rng})
    expected = np.random.random_sample(3)
    np.random.seed(6)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.random_sample(3), expected)


def test_unreadable_and_foreign_files_give_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^cannot read .*junk\.pt safely: it is not a file of tensors"):
        ckpt.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "other.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*cut\.pt: RuntimeError: [^\n]*$"):
        ckpt.load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="is not a lipkit training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
