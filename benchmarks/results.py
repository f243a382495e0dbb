"""The benchmarks' results file: one JSON object per line, which benchmarks/suite_table.py turns into tables."""

from __future__ import annotations

import json
from typing import Any


def append_result(path: str | None, benchmark: str, row: dict[str, Any]) -> None:
    """Append ``row``, tagged with its ``benchmark`` name, to ``path`` as one JSON line (nothing if no path)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"benchmark": benchmark, **row}) + "\n")
