"""One JSON schema for the results of every evaluation task.

.. code-block:: json

    {"task": "zeroshot", "model": {"name": "tiny", "config": {...}}, "checkpoint": "runs/x/checkpoints/...pt",
     "data": "fashion-mnist:test", "metrics": {"top1": 71.2, ...}, "details": {...},
     "lipkit_version": "0.1.0", "created": "2026-11-23T17:15:00+00:00"}

``metrics`` holds the headline numbers (floats: accuracies and recalls in percent, ranks...);
``details`` everything else (sample counts, per-class recall, the confusion matrix, the templates used...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lipkit import __version__
from lipkit.errors import LipkitError
from lipkit.utils import atomic_write_text, strict_json

RESULT_KEYS = ("task", "model", "checkpoint", "data", "metrics", "details", "lipkit_version", "created")


def split_metrics(values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Split a task's output into headline numbers (floats) and details (counts, lists, flags, text)."""
    metrics, details = {}, {}
    for key, value in values.items():
        (metrics if isinstance(value, float) else details)[key] = value
    return metrics, details


def describe_model(model: Any, name: str | None = None) -> dict[str, Any]:
    """The ``model`` entry of a result: the config name when known, and the full config."""
    return {"name": name, "config": dataclasses.asdict(model.cfg)}


def make_result(
    task: str,
    model: Any,
    checkpoint: str | Path | None,
    data: str | Mapping[str, str],
    metrics: Mapping[str, float],
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A result in the common schema, stamped with the lipkit version and the time (UTC, ISO 8601).

    Args:
        task: ``retrieval``, ``zeroshot``, ``linear-probe``...
        model: A description of the model (see :func:`describe_model`).
        checkpoint: The weights evaluated.
        data: The dataset spec, or a mapping of role to spec (``{"train": ..., "test": ...}``).
        metrics: Headline numbers.
        details: Anything else worth keeping.
    """
    return {
        "task": task,
        "model": model,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "data": data if isinstance(data, str) else dict(data),
        "metrics": dict(metrics),
        "details": dict(details or {}),
        "lipkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def task_result(
    task: str,
    model: Any,
    name: str | None,
    checkpoint: str | Path | None,
    data: str | Mapping[str, str],
    values: Mapping[str, Any],
) -> dict[str, Any]:
    """A task's output as a result: its floats are the headline ``metrics``, everything else ``details``.

    Args:
        task: ``retrieval``, ``zeroshot``, ``linear-probe``...
        model: The model evaluated.
        name: The model's config name, when known.
        checkpoint: The weights evaluated.
        data: The dataset spec, or a mapping of role to spec.
        values: What the task returned.
    """
    metrics, details = split_metrics(values)
    return make_result(task, describe_model(model, name), checkpoint, data, metrics, details)


def write_results(path: str | Path, result: Mapping[str, Any]) -> None:
    """Write a result as indented JSON, atomically; it must follow the schema and hold finite numbers."""
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ValueError(f"result lacks {', '.join(missing)}")
    bad = [k for k, v in result["metrics"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise LipkitError(f"metrics {', '.join(bad)} are not finite numbers")
    atomic_write_text(Path(path), strict_json(result, indent=2) + "\n")


def read_results(path: str | Path) -> dict[str, Any]:
    """Read a result written by :func:`write_results`."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LipkitError(f"cannot read results {path}: {exc}") from None
    if not isinstance(result, dict) or any(k not in result for k in RESULT_KEYS):
        raise LipkitError(f"{path} is not a lipkit results file")
    return result
