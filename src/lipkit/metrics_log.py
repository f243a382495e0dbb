"""Reading a run's ``metrics.jsonl``: the one reader that training (resume) and the report share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics_log(run_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a run's ``metrics.jsonl`` and the number of lines that are not JSON.

    A record is a JSON object with a numeric ``step``. Blank lines and JSON values that are not records are
    skipped; lines that do not parse, such as the half-written last line of a run in progress or of a
    killed one, are skipped and counted.

    Raises:
        FileNotFoundError: The run has no ``metrics.jsonl``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    records, unreadable = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records, unreadable


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The readable records of a run's ``metrics.jsonl`` (see :func:`read_metrics_log`)."""
    return read_metrics_log(run_dir)[0]
