"""Checkpoints: written atomically, found by step, loaded without running code and with clear errors."""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lipkit.config import to_dict
from lipkit.errors import CheckpointError, ConfigError
from lipkit.utils import atomic_temporaries, atomic_write, strict_json

if TYPE_CHECKING:
    from lipkit.train.config import TrainConfig

STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # the files of a run directory written atomically
RUN_IDENTITY = ("model", "model_overrides")  # the keys of a run's config that decide its weights' shapes
SHOWN_DIFFERENCES = 4  # a refused resume names at most this many differences


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
    """The state of every random generator that training uses, as tensors and plain Python values.

    NumPy's key is kept as a list of ints, not an array, so that a checkpoint holds nothing that
    ``torch.load(weights_only=True)`` refuses.
    """
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (NumPy's key as a list, or as the array older checkpoints hold)."""
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoints intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files that interrupted writes of checkpoints and run files left in ``run_dir``.

    Only names that :func:`lipkit.utils.atomic_write` gives its temporary files for these files are touched.
    Call it only while holding the run's lock: a running writer's temporary file looks just the same.

    Returns:
        The files deleted.
    """
    stale = atomic_temporaries(run_dir / "checkpoints", "step_*.pt")
    for name in RUN_FILES:
        stale += atomic_temporaries(run_dir, name)
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_checkpoint`, without running code from the file.

    A file that names Python objects other than tensors, plain values and the NumPy array types of the random
    state that older checkpoints hold is refused before it is read; the rest is read with
    ``torch.load(weights_only=True)``, which enforces the same allowlist.

    Args:
        path: The checkpoint file.

    Returns:
        The saved state: ``model``, ``step`` and the other entries :func:`lipkit.train.loop.save` writes.

    Raises:
        CheckpointError: The file is missing, unreadable, names other Python objects, or is no training checkpoint.
    """
    from lipkit.models.convert import numpy_array_globals

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    allowed = numpy_array_globals()
    foreign = _foreign_globals(path, allowed)
    if foreign:
        raise CheckpointError(
            f"refusing to load {path}: it names Python objects ({', '.join(foreign)}) besides tensors and plain "
            "values, which a lipkit training checkpoint never does; unpickling them could run arbitrary code"
        )
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: not advice to pass on
        raise CheckpointError(
            f"cannot read {path} safely: it is not a file of tensors and plain values as torch.save writes them"
        ) from None
    except Exception as exc:  # any unreadable file is a user-facing error
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a lipkit training checkpoint (no 'model'/'step' entries)")
    return state


def _foreign_globals(path: Path, allowed: list[Any]) -> list[str]:
    """The Python objects a checkpoint's pickle names beyond torch's safe set and ``allowed``, found without loading it.

    Args:
        path: A file written by ``torch.save``.
        allowed: The extra globals the load allows.

    Returns:
        Qualified names; empty for a file that is not a ``torch.save`` archive (``torch.load`` then refuses it).
    """
    known = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive: torch.load's weights-only unpickler is the only check
        return []
    return [name for name in names if name not in known]


def _first_line(exc: Exception) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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


def load_trained(checkpoint: str | Path, model: Any = None) -> tuple[Any, Path]:
    """The model a run directory (its newest checkpoint) or a weights file holds, and the weights file.

    Args:
        checkpoint: A run directory, a lipkit checkpoint, or OpenCLIP/OpenAI weights.
        model: The model config (a name, a dict or a ModelConfig); by default the one the checkpoint records.

    Raises:
        CheckpointError: No checkpoint there, it records no config and none is given, or its weights do not fit.
    """
    from lipkit.config import from_dict
    from lipkit.models import create_model
    from lipkit.models.config import ModelConfig

    weights = resolve_weights(checkpoint)
    cfg = model if model else recorded_model_config(weights)
    if isinstance(cfg, dict):
        cfg = from_dict(ModelConfig, cfg)
    return create_model(cfg, pretrained=str(weights)), weights


def resolve_weights(path: str | Path) -> Path:
    """A run directory resolves to its newest checkpoint; a file stays as it is."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} is a directory without checkpoints (expected a run directory or a file)")
        return found[-1]
    return path


def check_resume(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume ``cfg`` from a checkpoint of another model or seed, or one past the run's last step.

    Args:
        saved: The checkpoint (:func:`load_checkpoint`).
        cfg: The run that would resume from it.
        path: The checkpoint's file, for the messages.

    Raises:
        ConfigError: The checkpoint is past ``cfg.steps``.
        CheckpointError: It was trained with another model (name, overrides or resolved config) or seed, and
            ``cfg.resume_force`` is false; one line naming the differences.
    """
    step = int(saved["step"])
    if step > cfg.steps:
        raise ConfigError(f"resume: {path} is at step {step}, past steps={cfg.steps}; set steps to {step} or more")
    differences = run_differences(saved, cfg)
    if not differences or cfg.resume_force:
        return
    shown = differences[:SHOWN_DIFFERENCES]
    more = f" and {len(differences) - len(shown)} more" if len(differences) > len(shown) else ""
    was = ", ".join(f"{key}={_shown(old)}" for key, old, _ in shown)
    now = ", ".join(f"{key}={_shown(new)}" for key, _, new in shown)
    raise CheckpointError(
        f"resume: {path} was trained with {was}{more}; this run has {now}; pass resume_force=true to resume anyway"
    )


def run_differences(saved: Mapping[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """What a checkpoint's run and ``cfg`` disagree on: the model (name, overrides, resolved config) and the seed.

    The resolved model configs are compared key by key (``model_config.vision.width``) when the names and
    overrides agree, so a changed config file is found too. Entries an older checkpoint lacks are not compared.

    Returns:
        ``(key, the checkpoint's value, this run's value)`` for each difference.
    """
    from lipkit.models.config import get_model_config

    old, new = saved.get("config", {}), to_dict(cfg)
    differences = [(key, old[key], new[key]) for key in RUN_IDENTITY if key in old and old[key] != new[key]]
    if not differences and "model_config" in saved:
        current = _flat(to_dict(get_model_config(cfg.model, **cfg.model_overrides)), "model_config.")
        recorded = _flat(saved["model_config"], "model_config.")
        differences = [(k, recorded[k], current[k]) for k in recorded if k in current and recorded[k] != current[k]]
    if "seed" in old and old["seed"] != cfg.seed:
        differences.append(("seed", old["seed"], cfg.seed))
    return differences


def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A nested mapping as one mapping with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any) -> str:
    """A config value as a ``key=value`` override spells it."""
    return value if isinstance(value, str) else strict_json(to_dict(value))
