"""Provenance: what became of every sample, and why (``provenance.parquet``).

One row per sample of the input, in input order:

=================== ==========================================================================
``key``             the sample key
``caption``         the caption (empty when it could not be read)
``stage``           ``kept``, or the stage that dropped the sample (:data:`STAGES`)
``reason``          why, in words (``2 words < 3``, ``near duplicate of K (distance 3)``...)
``duplicate_of``    for a duplicate, the key kept in its place
``entries``         the metadata entries the caption matched
``keep_probability`` balancing's chance of keeping the sample, ``1 - prod(1 - p)`` (null: not balanced)
``score``           image-text cosine similarity (null without embeddings)
``width, height``   the image size (0 when the image could not be read)
``caption_fallback`` the caption was not UTF-8 and was read as Windows-1252
=================== ==========================================================================

A sample is dropped by the first stage that rejects it; later stages never see it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.utils import atomic_write

KEPT = "kept"
# The stages in the order they run; a sample's ``stage`` is the first that dropped it.
STAGES = (
    "unreadable",
    "no_embedding",
    "caption",
    "image_size",
    "aspect",
    "score",
    "exact_dup",
    "near_dup",
    "caption_dup",
    "semantic_dup",
    "balance",
)


class Ledger:
    """The fate of each row as the stages run: who is still in, and what dropped the others.

    Args:
        keys: The row keys, in input order.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        n = len(self.keys)
        self.stage = np.full(n, KEPT, object)
        self.reason = np.full(n, "", object)
        self.duplicate_of: list[str | None] = [None] * n

    def alive(self) -> np.ndarray:
        """Indexes of the rows no stage has dropped, ascending."""
        return np.flatnonzero(self.stage == KEPT)

    def drop(self, rows: np.ndarray | Sequence[int], stage: str, reasons: Sequence[str] | str) -> None:
        """Record that ``stage`` dropped ``rows`` (indexes of rows still in), with a reason for each or for all."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        rows = np.asarray(rows, np.int64)
        if np.any(self.stage[rows] != KEPT):
            raise ValueError(f"stage {stage} drops rows that an earlier stage dropped")
        self.stage[rows] = stage
        self.reason[rows] = reasons if isinstance(reasons, str) else np.asarray(list(reasons), object)

    def drop_duplicates(self, rows: np.ndarray, stage: str, kept_for: dict[str, str], detail: dict[str, str]) -> None:
        """Drop the rows (of ``rows``) whose key ``kept_for`` maps to another key, naming that key."""
        index = {self.keys[i]: i for i in rows.tolist()}
        dropped = [index[k] for k in sorted(kept_for, key=index.__getitem__)]
        self.drop(
            dropped, stage, [f"duplicate of {kept_for[self.keys[i]]}{detail.get(self.keys[i], '')}" for i in dropped]
        )
        for i in dropped:
            self.duplicate_of[i] = kept_for[self.keys[i]]

    def counts(self) -> dict[str, int]:
        """Rows per stage that dropped them, in stage order, and ``kept``."""
        found = Counter(self.stage.tolist())
        return {**{s: found[s] for s in STAGES if found[s]}, KEPT: found[KEPT]}


def write_provenance(path: str | Path, ledger: Ledger, columns: dict[str, Sequence[Any]]) -> None:
    """Write the provenance table (see the module docstring) atomically.

    Args:
        path: The Parquet file.
        ledger: The stages' verdicts.
        columns: The other columns (``caption``, ``entries``, ``keep_probability``, ``score``...), one value
            per row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array(ledger.keys, pa.string()),
            "stage": pa.array(ledger.stage.tolist(), pa.string()),
            "reason": pa.array(ledger.reason.tolist(), pa.string()),
            "duplicate_of": pa.array(ledger.duplicate_of, pa.string()),
            **{name: _column(values) for name, values in columns.items()},
        }
    )
    atomic_write(Path(path), lambda f: pq.write_table(table, f))


def _column(values: Sequence[Any]) -> Any:
    import pyarrow as pa

    return pa.array(values.tolist() if isinstance(values, np.ndarray) else list(values))


def read_provenance(path: str | Path) -> dict[str, list]:
    """The provenance table's columns by name."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()
