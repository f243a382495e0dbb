"""The data card of a curation (``card.html``): counts removed per stage, the metadata entry distribution
before and after on log-log axes, and examples of kept and dropped pairs with thumbnails.

The page is one self-contained file (the plot and thumbnails are PNG data URIs), rendered from the
Jinja2 template ``pages/card.html`` with every value escaped.
"""

from __future__ import annotations

import base64
import datetime
import functools
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.curation.provenance import KEPT, STAGES

if TYPE_CHECKING:
    from lipkit.data.curation.config import CurateConfig, CurateResult, Rows
    from lipkit.data.curation.metadata import Metadata
    from lipkit.data.pairs import PairSource

KEPT_EXAMPLES = 12
DROPPED_PER_STAGE = 4
THUMBNAIL_SIDE = 128
HEAD_ROWS = 15

STAGE_CHECKS = {
    "unreadable": "the caption or image cannot be read or decoded",
    "no_embedding": "the embeddings folder has no vectors for the sample",
    "caption": "caption length in words and characters",
    "image_size": "shorter side of the image",
    "aspect": "aspect ratio of the image",
    "score": "image-text cosine similarity",
    "exact_dup": "same image bytes (SHA-256) as a kept sample",
    "near_dup": "perceptual hash within the Hamming distance of a kept sample",
    "caption_dup": "same normalised caption as a kept sample",
    "semantic_dup": "image embedding within the cosine threshold of a kept sample (SemDeDup)",
    "balance": "MetaCLIP sampling: no matched entry's coin came up",
}


@functools.cache
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("lipkit.data.curation", "pages"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def entry_counts(matches: list[list[int]], rows: np.ndarray, n_entries: int) -> np.ndarray:
    """How many of the given rows matched each entry."""
    counts = np.zeros(n_entries, np.int64)
    for i in rows.tolist():
        counts[matches[i]] += 1
    return counts


def plot_entries(before: np.ndarray, after: np.ndarray, t: float | None) -> str:
    """A log-log plot of entry counts, largest first, before and after (a PNG data URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for counts, label in ((before, "before"), (after, "after")):
        ranked = np.sort(counts[counts > 0])[::-1]
        if len(ranked):
            ax.loglog(np.arange(1, len(ranked) + 1), ranked, label=f"{label} ({len(ranked)} entries)")
    if t is not None:
        ax.axhline(t, color="grey", linestyle=":", label=f"t = {t:g}")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("matched samples")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_uri(source: PairSource, index: int) -> str | None:
    """A PNG data URI of a pair's image, longest side :data:`THUMBNAIL_SIDE`; None when unreadable."""
    from lipkit.data.curation.samples import image_bytes
    from lipkit.data.decode import BadSample, flatten, open_image

    try:
        image = flatten(open_image(image_bytes(source, index)))
    except BadSample:
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _examples(source: PairSource, rows: Rows) -> tuple[list[dict], list[dict]]:
    """The first kept pairs, and the first few dropped by each stage (input order)."""
    stage = rows.ledger.stage

    def card(i: int, kind: str) -> dict[str, Any]:
        why = rows.ledger.reason[i] if kind == "dropped" else "kept"
        return {
            "key": rows.keys[i],
            "caption": str(rows.read["caption"][i]),
            "why": f"{stage[i]}: {why}" if kind == "dropped" else why,
            "uri": thumbnail_uri(source, i),
            "kind": kind,
        }

    kept = [card(i, "kept") for i in np.flatnonzero(stage == KEPT)[:KEPT_EXAMPLES].tolist()]
    dropped = [card(i, "dropped") for s in STAGES for i in np.flatnonzero(stage == s)[:DROPPED_PER_STAGE].tolist()]
    return kept, dropped


def _entry_section(rows: Rows, metadata: Metadata | None, balance: float | None) -> dict[str, Any]:
    if metadata is None or rows.matches is None:
        return {"plot": None}
    readable = np.flatnonzero(rows.ledger.stage != "unreadable")
    before = entry_counts(rows.matches, readable, len(metadata))
    after = entry_counts(rows.matches, rows.ledger.alive(), len(metadata))
    top = np.argsort(-before, kind="stable")[:HEAD_ROWS]
    return {
        "plot": plot_entries(before, after, balance),
        "head": [(metadata.entries[j], int(before[j]), int(after[j])) for j in top.tolist() if before[j]],
        "entries": len(metadata),
        "origins": ", ".join(f"{n} {o}" for o, n in metadata.by_origin().items()),
        "matched_before": int((before > 0).sum()),
        "matched_after": int((after > 0).sum()),
    }


def write_card(
    path: str | Path,
    source: PairSource,
    rows: Rows,
    metadata: Metadata | None,
    config: CurateConfig,
    result: CurateResult,
) -> None:
    """Render and write the data card (atomically)."""
    import lipkit
    from lipkit.data.curation.config import config_dict
    from lipkit.utils import atomic_write_text

    kept_examples, dropped_examples = _examples(source, rows)
    total = max(result.total, 1)
    notes = []
    if result.caption_fallbacks:
        notes.append(f"{result.caption_fallbacks} captions were not UTF-8 and were read as Windows-1252 (kept).")
    if result.source_skipped and any(result.source_skipped.values()):
        lost = ", ".join(f"{k} {v}" for k, v in result.source_skipped.items() if v)
        notes.append(f"The sources left out samples when opened: {lost}.")
    page = (
        _environment()
        .get_template("card.html")
        .render(
            data=config.data,
            total=result.total,
            kept=result.kept,
            kept_share=f"{result.kept / total:.1%}",
            seed=config.seed,
            seconds=result.seconds,
            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            version=getattr(lipkit, "__version__", "?"),
            notes=notes,
            stages=[
                {"stage": s, "count": n, "share": f"{n / total:.1%}", "what": STAGE_CHECKS[s]}
                for s, n in result.dropped.items()
            ],
            kept_examples=kept_examples,
            dropped_examples=dropped_examples,
            settings=[(k, "" if v is None else str(v)) for k, v in config_dict(config).items()],
            **{
                "head": [],
                "entries": 0,
                "origins": "",
                "matched_before": 0,
                "matched_after": 0,
                **_entry_section(rows, metadata, config.balance),
            },
        )
    )
    atomic_write_text(Path(path), page)
