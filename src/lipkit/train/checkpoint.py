"""Checkpoints: written atomically, found by step, loaded with clear errors."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipkit.errors import CheckpointError
from lipkit.utils import atomic_write

STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The file name of the checkpoint taken after ``step`` optimizer steps."""
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_FILE.match(p.name))


def rng_state() -> dict[str, Any]:
    """The state of every random generator that training uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoints intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_checkpoint`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a lipkit training checkpoint (no 'model'/'step' entries)")
    return state


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` -> the run's newest checkpoint; anything else is a path."""
    if resume != "latest":
        return Path(resume)
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"resume=latest but {run_dir / 'checkpoints'} holds no checkpoint")
    return found[-1]


def recorded_model_config(path: str | Path) -> Any:
    """The :class:`ModelConfig` that a lipkit training checkpoint records (for tools given only the file)."""
    from lipkit.config import from_dict
    from lipkit.models.config import ModelConfig

    state = load_checkpoint(Path(path))
    if "model_config" not in state:
        raise CheckpointError(f"{path} records no model config; name the model with --model")
    return from_dict(ModelConfig, state["model_config"])


def resolve_weights(path: str | Path) -> Path:
    """A run directory resolves to its newest checkpoint; a file stays as it is."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} is a directory without checkpoints (expected a run directory or a file)")
        return found[-1]
    return path
