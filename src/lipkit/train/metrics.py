"""Metric logging: JSON lines (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any


class MetricLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, records after the resumed step are dropped first, so the file never holds a step twice.
    """

    def __init__(
        self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.file = None
        self.writer = None
        if not enabled:  # ranks other than the main one record nothing
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to metrics.jsonl only", stacklevel=2)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path.parent) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at ``step``."""
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close the outputs."""
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


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
