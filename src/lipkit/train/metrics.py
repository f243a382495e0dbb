"""Metric logging: JSON lines (always) and TensorBoard (when installed)."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any

from lipkit.errors import storage_error
from lipkit.metrics_log import read_metrics, read_metrics_log
from lipkit.utils import atomic_write_text, strict_json

__all__ = ["MetricLogger", "read_metrics", "read_metrics_log", "recorded_value"]


class MetricLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Given the step the run starts from (``resume_step``), records after it are dropped first, and so is a
    cut-off last line, so the file never holds a step twice; TensorBoard is told to drop its events from
    the next step on (``purge_step``). Non-finite values are recorded as ``null`` (strict JSON).
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
        try:
            self.file = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise storage_error(exc, self.path) from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to metrics.jsonl only", stacklevel=2)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path.parent) if record["step"] <= step]
        atomic_write_text(self.path, "".join(strict_json(record) + "\n" for record in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at ``step``.

        Raises:
            StorageError: The record cannot be written (a full disk...), naming the file. A line cut off
                by the failure is dropped when the run resumes.
        """
        if self.file is None:
            return
        try:
            self.file.write(strict_json({"step": step, **metrics}) + "\n")
            self.file.flush()
        except OSError as exc:
            self._abandon()
            raise storage_error(exc, self.path) from None
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def _abandon(self) -> None:
        """Close the file without flushing again what the disk refused once."""
        file, self.file = self.file, None
        with contextlib.suppress(OSError):
            file.close()

    def close(self) -> None:
        """Flush and close the outputs."""
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def recorded_value(run_dir: Path, step: int, key: str) -> float:
    """The number recorded for ``key`` at ``step`` in a run's ``metrics.jsonl``; NaN when there is none."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return math.nan
    values = [r[key] for r in read_metrics(run_dir) if r["step"] == step and isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else math.nan
