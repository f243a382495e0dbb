"""Metric logging: JSON lines (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lipkit.metrics_log import read_metrics, read_metrics_log

__all__ = ["MetricLogger", "read_metrics", "read_metrics_log"]


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
