"""An HTML report of a run: training curves, results over training, confusion matrices, few-shot curves,
retrieval tables and examples, in one self-contained file (plots embedded as PNG data URIs).

**What is read.** ``RUN_DIR/config.yaml`` (shown collapsed; its ``name`` and ``model`` head the page),
``RUN_DIR/metrics.jsonl`` (one JSON record per logged step; unreadable lines, such as the half-written
last line of a run in progress, are skipped and counted) and every results file under ``RUN_DIR``:

- a results file is any ``*.json`` file under ``RUN_DIR``, searched recursively (``RUN_DIR/eval/*.json``,
  ``RUN_DIR/retrieval.json``...), holding a JSON object with every key of the results schema
  (:data:`lipkit.eval.results.RESULT_KEYS`); other JSON files (``summary.json``...) are ignored, files
  that cannot be parsed are listed on the page as skipped;
- a result's training step is taken from its checkpoint's file name when that is ``step_NNNNNNNN.pt``,
  else from an integer ``details.step``; otherwise it has none;
- zero-shot top-1 over training plots every zero-shot result with a step, one line per dataset (when
  a dataset has two results at the same step, the newer ``created`` wins);
- confusion matrices and few-shot curves are drawn for the latest result per dataset: the highest step,
  results without a step counting as older than any step, then the newest ``created``.

**Retrieval examples** (optional). A results file may carry ``details.examples``, a list of queries to
show as a grid of thumbnails, each with its top retrieved texts:

.. code-block:: json

    {"examples": [
      {"image_path": "examples/0003.png",
       "captions": ["A frog.", "A toad.", "A lizard."],
       "correct": true,
       "truth": "A frog."},
      {"thumbnail": "iVBORw0KGgo...", "captions": ["A cat."], "correct": false}
    ]}

- ``image_path``: the image file, relative to the results file's folder or absolute; or instead
- ``thumbnail``: the image bytes in base64 (PNG, JPEG...; a ``data:image/...;base64,`` prefix is allowed);
- ``captions``: the top retrieved texts, best first (the first five are shown);
- ``correct``: whether the top caption is a true one (a green or red frame);
- ``truth`` (optional): the true caption, shown under the list.

Images are shrunk to 128-pixel thumbnails (transparent parts shown on white) and at most 60 examples per
file are shown; nothing is drawn when no result has examples.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lipkit import __version__
from lipkit.errors import LipkitError
from lipkit.eval.results import RESULT_KEYS
from lipkit.metrics_log import read_metrics_log
from lipkit.utils import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
MAX_EXAMPLES = 60
MAX_CAPTIONS = 5
THUMBNAIL_PX = 128
PLOT_DPI = 110
RETRIEVAL_COLUMNS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)] + [
    "image_to_text_median_rank",
    "text_to_image_median_rank",
]


@dataclass
class FoundResult:
    """A results file found under a run directory.

    Attributes:
        path: The file.
        name: Its path relative to the run directory, for display.
        result: Its content, in the results schema.
        step: The training step evaluated, when known (see :func:`result_step`).
    """

    path: Path
    name: str
    result: dict[str, Any]
    step: int | None

    @property
    def task(self) -> str:
        return str(self.result["task"])

    @property
    def data(self) -> str:
        """The dataset spec as one line (``train: a, test: b`` for tasks with several)."""
        data = self.result["data"]
        if isinstance(data, dict):
            return ", ".join(f"{role}: {spec}" for role, spec in data.items())
        return str(data)

    @property
    def short_data(self) -> str:
        """The test set of a task with several datasets, else the dataset."""
        data = self.result["data"]
        return str(data.get("test", self.data)) if isinstance(data, dict) else str(data)

    @property
    def recency(self) -> tuple[int, str]:
        return (-1 if self.step is None else self.step, str(self.result.get("created") or ""))


# ---------------------------------------------------------------------------------------------- inputs


def result_step(result: dict[str, Any]) -> int | None:
    """The training step a result evaluated: from a ``step_NNNNNNNN.pt`` checkpoint name, else ``details.step``."""
    match = STEP_FILE.match(Path(str(result.get("checkpoint") or "")).name)
    if match:
        return int(match.group(1))
    step = (result.get("details") or {}).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def find_results(run_dir: Path) -> tuple[list[FoundResult], list[str]]:
    """Every results file under ``run_dir`` (recursively, sorted by path), and the JSON files that could not be read."""
    found, skipped = [], []
    for path in sorted(Path(run_dir).rglob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append(f"{path.relative_to(run_dir)}: {exc}")
            continue
        if _is_result(result):
            found.append(FoundResult(path, str(path.relative_to(run_dir)), result, result_step(result)))
    return found, skipped


def _is_result(result: Any) -> bool:
    """Whether parsed JSON is a result in the schema (every key, with mappings for metrics and details)."""
    if not isinstance(result, dict) or any(key not in result for key in RESULT_KEYS):
        return False
    return isinstance(result["metrics"], dict) and isinstance(result["details"], dict)


def read_training_log(run_dir: Path) -> tuple[list[dict[str, Any]] | None, int]:
    """The records of ``metrics.jsonl`` (None when the file is absent) and the number of unreadable lines."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return None, 0
    return read_metrics_log(run_dir)


def latest_per_data(found: Iterable[FoundResult], task: str) -> list[FoundResult]:
    """The latest result of ``task`` for each dataset (highest step, then newest), sorted by dataset."""
    best: dict[str, FoundResult] = {}
    for r in found:
        if r.task == task and (r.data not in best or r.recency > best[r.data].recency):
            best[r.data] = r
    return [best[data] for data in sorted(best)]


def _read_config(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """The text of ``config.yaml`` (None when absent) and its parsed mapping ({} when unreadable)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, {}
    text = path.read_text(encoding="utf-8", errors="replace")
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    return text, config if isinstance(config, dict) else {}


# ---------------------------------------------------------------------------------------------- plots


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LipkitError("the report draws its plots with matplotlib: pip install matplotlib") from None


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas (no pyplot, no global state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _label(text: Any, width: int = 24) -> str:
    """Text safe for matplotlib (no mathtext from ``$``), cut to ``width`` characters."""
    text = str(text)
    text = text if len(text) <= width else text[: width - 1] + "\u2026"
    return text.replace("$", r"\$")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _line(ax: Any, records: list[dict[str, Any]], key: str, title: str, ylabel: str) -> None:
    steps, values = _series(records, key)
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)


def plot_loss(records: list[dict[str, Any]]) -> Any:
    """Training loss against step."""
    fig, ax = _figure(5, 3.2)
    _line(ax, records, "loss", "loss", "loss")
    steps, values = _series(records, "loss")
    if len(values) >= 50:  # long runs: the raw curve faint, a running mean on top
        import numpy as np

        window = len(values) // 25
        ax.lines[0].set(alpha=0.3, label="logged")
        ax.plot(steps[window - 1 :], np.convolve(values, np.ones(window) / window, "valid"), label=f"mean of {window}")
        ax.legend(fontsize=8)
    return fig


def plot_temperature(records: list[dict[str, Any]]) -> Any:
    """The learned logit scale (1 / temperature) against step."""
    fig, ax = _figure(5, 3.2)
    _line(ax, records, "logit_scale", "temperature", "logit scale (1 / T)")
    return fig


def plot_logit_bias(records: list[dict[str, Any]]) -> Any:
    """The learned logit bias (SigLIP) against step."""
    fig, ax = _figure(5, 3.2)
    _line(ax, records, "logit_bias", "logit bias", "logit bias")
    return fig


def plot_lr(records: list[dict[str, Any]]) -> Any:
    """Learning rate against step."""
    fig, ax = _figure(5, 3.2)
    _line(ax, records, "lr", "learning rate", "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def plot_throughput(records: list[dict[str, Any]]) -> Any:
    """Training throughput (samples/s) against step."""
    fig, ax = _figure(5, 3.2)
    _line(ax, records, "samples_per_s", "throughput", "samples / s")
    ax.set_ylim(bottom=0)
    return fig


def plot_grad_norm(records: list[dict[str, Any]]) -> Any:
    """Gradient norm (before clipping) against step."""
    fig, ax = _figure(5, 3.2)
    _line(ax, records, "grad_norm", "gradient norm", "global L2 norm")
    return fig


def _zeroshot_points(found: Iterable[FoundResult]) -> dict[str, dict[int, FoundResult]]:
    """Zero-shot results with a step and a top-1, by dataset then step (the newest at a repeated step)."""
    points: dict[str, dict[int, FoundResult]] = {}
    for r in found:
        if r.task == "zeroshot" and r.step is not None and isinstance(r.result["metrics"].get("top1"), (int, float)):
            at = points.setdefault(r.data, {})
            if r.step not in at or r.recency > at[r.step].recency:
                at[r.step] = r
    return points


def plot_zeroshot_over_training(points: dict[str, dict[int, FoundResult]]) -> Any:
    """Zero-shot top-1 against training step, one line per dataset, with each dataset's chance level."""
    fig, ax = _figure(6.5, 3.6)
    for data in sorted(points):
        steps = sorted(points[data])
        top1 = [points[data][s].result["metrics"]["top1"] for s in steps]
        ax.plot(steps, top1, marker="o", label=_label(data, 40))
        for s, value in zip(steps, top1) if len(steps) <= 12 else ():
            ax.annotate(f"{value:.1f}", (s, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    for n_classes in sorted({_n_classes(at[max(at)]) for at in points.values()} - {0}):
        ax.axhline(100 / n_classes, color="grey", linestyle=":", linewidth=1, label=f"chance, {n_classes} classes")
    ax.set(title="zero-shot top-1 over training", xlabel="step", ylabel="top-1 (%)")
    ax.set_ylim(0, min(100, ax.get_ylim()[1] * 1.1 + 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _n_classes(found: FoundResult) -> int:
    return len((found.result["details"] or {}).get("classnames") or [])


def plot_confusion(found: FoundResult) -> Any:
    """The row-normalised confusion matrix of a zero-shot result, with class names."""
    import numpy as np

    counts = np.asarray(found.result["details"]["confusion_matrix"], dtype=float)  # (true, predicted)
    n = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    names = list(found.result["details"].get("classnames") or range(n))
    size = min(9.0, max(5.0, 2.5 + 0.38 * n))  # at most ~1000 px: the page shows it unscaled
    fig, ax = _figure(size + 1.0, size)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, cax=ax.inset_axes([1.03, 0.0, 0.035, 1.0]), label="share of the true class")
    _class_ticks(ax, names, n)
    if n <= 15:
        for i, j in np.ndindex(share.shape):
            if counts[i, j]:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
    step = "" if found.step is None else f", step {found.step}"
    top1 = found.result["metrics"].get("top1")
    title = f"{_label(found.data, 40)}{step}" + ("" if top1 is None else f": top-1 {top1:.1f}%")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return fig


def _class_ticks(ax: Any, names: list[Any], n: int) -> None:
    """Class names on both axes (every k-th when there are too many to read)."""
    every = math.ceil(n / 100)
    ticks = list(range(0, n, every))
    labels = [_label(names[i]) if i < len(names) else str(i) for i in ticks]
    fontsize = 9 if n <= 20 else 7 if n <= 50 else 5.5
    if n > 20:
        ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    elif max(map(len, labels), default=0) > 3:
        ax.set_xticks(ticks, labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    else:
        ax.set_xticks(ticks, labels, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)


def plot_fewshot(found: FoundResult) -> Any:
    """Few-shot top-1 against K (log2 axis) for each method, with std error bars over several seeds."""
    fewshot = found.result["details"]["fewshot"]
    fig, ax = _figure(6, 3.8)
    all_ks: set[int] = set()
    methods = fewshot["methods"]
    for i, (method, per_k) in enumerate(methods.items()):
        ks = sorted(int(k) for k in per_k if int(k) > 0)
        top1 = [per_k[str(k)]["top1"] for k in ks]
        std = [per_k[str(k)].get("top1_std") or 0.0 for k in ks] if _n_seeds(fewshot, per_k) > 1 else None
        dodge = 2 ** (0.04 * (i - (len(methods) - 1) / 2)) if std else 1.0  # keep error bars apart
        ax.errorbar([k * dodge for k in ks], top1, yerr=std, marker="o", capsize=3, label=_label(method))
        all_ks.update(ks)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    seeds = _n_seeds(fewshot, {})
    bars = f", mean \u00b1 std over {seeds} seeds" if seeds > 1 else ""
    step = "" if found.step is None else f", step {found.step}"
    title = f"few-shot on {_label(found.short_data, 40)}{step}"
    ax.set(title=title, xlabel=f"shots per class (K){bars}", ylabel="top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _n_seeds(fewshot: dict[str, Any], per_k: dict[str, Any]) -> int:
    """The number of seeds averaged: the recorded list, else the per-seed values of any K."""
    if isinstance(fewshot.get("seeds"), list):
        return len(fewshot["seeds"])
    return max((len(v.get("top1_per_seed") or []) for v in per_k.values()), default=1)


TRAINING_PLOTS = {
    "loss": plot_loss,
    "logit_scale": plot_temperature,
    "logit_bias": plot_logit_bias,
    "lr": plot_lr,
    "samples_per_s": plot_throughput,
    "grad_norm": plot_grad_norm,
}


class _Plots:
    """Saves figures as PNGs in a folder and returns them as data URIs for the page."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: set[str] = set()

    def add(self, fig: Any, name: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight", pad_inches=0.1)
        png = buf.getvalue()
        atomic_write(self.folder / f"{self._unique(name)}.png", lambda f: f.write(png))
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    def _unique(self, name: str) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "plot"
        base, i = name, 2
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name


# ---------------------------------------------------------------------------------------------- page content


@dataclass
class Note:
    """A line shown instead of a missing or broken piece of the page."""

    text: str


@dataclass
class Shown:
    """A picture on the page (a PNG data URI), or the note shown in its place; in a figure when captioned."""

    uri: str | None = None
    alt: str = ""
    note: str | None = None
    caption: str | None = None


def _guarded(what: str, render: Callable[[], T]) -> T | Note:
    """Compute one piece; a malformed input shows as a note instead of stopping the report."""
    try:
        return render()
    except Exception as exc:  # a bad results file must not cost the whole page
        return Note(f"could not draw {what}: {type(exc).__name__}: {exc}")


def _picture(what: str, draw: Callable[[], str], alt: str, caption: str | None = None) -> Shown:
    """A plot drawn by ``draw`` (returning its data URI), or a note when drawing fails."""
    uri = _guarded(what, draw)
    if isinstance(uri, Note):
        return Shown(note=uri.text, caption=caption)
    return Shown(uri=uri, alt=alt, caption=caption)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "\u2013" if value is None else str(value)
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a result: its metrics, or for few-shot each method's top-1 at the largest K."""
    if result["metrics"] or result["task"] != "fewshot":
        return dict(result["metrics"])
    methods = ((result["details"] or {}).get("fewshot") or {}).get("methods") or {}
    out = {}
    for method, per_k in methods.items():
        k = max(per_k, key=int)
        out[f"{method} K={k}"] = per_k[k].get("top1")
    return out


def _headline_cells(result: dict[str, Any]) -> list[str]:
    return [f"{name} {_number(value)}" for name, value in _headline(result).items()]


def _header(run_dir: Path, config_text: str | None, config: dict[str, Any], found: list[FoundResult]) -> dict:
    names = {r.result["model"].get("name") for r in found if isinstance(r.result["model"], dict)} - {None}
    return {
        "name": config.get("name") or run_dir.name,
        "model": config.get("model") or ", ".join(sorted(map(str, names))) or "unknown",
        "run": str(run_dir.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "config_text": config_text,
    }


def _summary_section(found: list[FoundResult], skipped: list[str]) -> dict:
    rows = []
    for r in sorted(found, key=lambda r: (r.task, r.data, r.recency)):
        headline = _guarded("its headline", lambda r=r: _headline_cells(r.result))
        rows.append({"name": r.name, "task": r.task, "data": r.data, "step": _number(r.step), "headline": headline})
    return {"rows": rows, "skipped": skipped}


def _training_section(records: list[dict[str, Any]] | None, bad_lines: int, plots: _Plots) -> dict | None:
    """None when there is no ``metrics.jsonl``."""
    if records is None:
        return None
    if not records:
        return {"records": 0}
    loss = next((r["loss"] for r in reversed(records) if isinstance(r.get("loss"), (int, float))), None)
    figures = []
    for key, plot in TRAINING_PLOTS.items():
        if not _series(records, key)[0]:
            if key != "logit_bias":  # only SigLIP-style models have one
                figures.append(Shown(note=f"No {key} in metrics.jsonl."))
            continue
        figures.append(_picture(key, lambda plot=plot, key=key: plots.add(plot(records), key), key))
    return {
        "records": len(records),
        "last_step": _number(records[-1]["step"]),
        "last_loss": f"{loss:.4g}" if isinstance(loss, (int, float)) else None,
        "bad_lines": bad_lines,
        "figures": figures,
    }


def _zeroshot_training_section(found: list[FoundResult], plots: _Plots) -> Shown | None:
    """None when no zero-shot result has a training step."""
    points = _zeroshot_points(found)
    if not points:
        return None
    plot = plot_zeroshot_over_training
    return _picture("zero-shot over training", lambda: plots.add(plot(points), "zeroshot_over_training"), "")


def _confusion_section(found: list[FoundResult], plots: _Plots) -> list[Shown]:
    figures = []
    for r in latest_per_data(found, "zeroshot"):
        if "confusion_matrix" not in (r.result["details"] or {}):
            figures.append(Shown(note=f"{r.name} has no confusion matrix."))
            continue
        draw = lambda r=r: plots.add(plot_confusion(r), f"confusion_{r.short_data}")  # noqa: E731
        figures.append(_picture(r.name, draw, r.data, caption=r.name))
    return figures


def _fewshot_section(found: list[FoundResult], plots: _Plots) -> list[Shown]:
    figures = []
    for r in latest_per_data(found, "fewshot"):
        draw = lambda r=r: plots.add(plot_fewshot(r), f"fewshot_{r.short_data}")  # noqa: E731
        figures.append(_picture(r.name, draw, r.data, caption=f"{r.name}: {r.data}"))
    return figures


def _retrieval_section(found: list[FoundResult]) -> list[list[str]]:
    """Table rows: file, data, step and the :data:`RETRIEVAL_COLUMNS` of every retrieval result."""
    return [
        [r.name, r.data, _number(r.step)] + [_number(r.result["metrics"].get(key)) for key in RETRIEVAL_COLUMNS]
        for r in found
        if r.task == "retrieval"
    ]


# ---------------------------------------------------------------------------------------------- examples


def thumbnail_png(image: Image.Image) -> bytes:
    """``image`` as a PNG thumbnail: at most :data:`THUMBNAIL_PX` pixels a side, transparency shown on white."""
    from lipkit.models.transforms import ToRGB

    thumb = ToRGB()(image).copy()
    thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return buf.getvalue()


def _example_bytes(example: dict[str, Any], base_dir: Path) -> bytes | None:
    """The image bytes of an example: its base64 ``thumbnail``, else the file at ``image_path``."""
    if isinstance(example.get("thumbnail"), str):
        data = example["thumbnail"]
        data = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            return base64.b64decode(data)
        except (binascii.Error, ValueError):
            return None
    if isinstance(example.get("image_path"), str):
        try:
            return (base_dir / example["image_path"]).read_bytes()
        except OSError:
            return None
    return None


def _thumbnail_uri(raw: bytes | None) -> str | None:
    """A PNG data URI of the image shrunk to a thumbnail; None when it is not a readable image."""
    from PIL import Image

    if not raw:
        return None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            png = thumbnail_png(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _example_card(example: dict[str, Any], base_dir: Path) -> dict:
    captions = example.get("captions") if isinstance(example.get("captions"), list) else []
    status = {True: ("ok", "\u2713 correct"), False: ("miss", "\u2717 wrong")}.get(example.get("correct"), ("", ""))
    return {
        "uri": _thumbnail_uri(_example_bytes(example, base_dir)),
        "captions": [c for c in captions if isinstance(c, str)][:MAX_CAPTIONS],
        "status": status[0],
        "mark": status[1],
        "truth": example.get("truth") or None,
    }


def _examples_section(found: list[FoundResult]) -> list[dict]:
    """Retrieval examples of every result that has some, one block per result (none: no section)."""
    blocks = []
    for r in found:
        examples = (r.result["details"] or {}).get("examples")
        if not isinstance(examples, list) or not examples:
            continue
        cards = [_example_card(x, r.path.parent) for x in examples[:MAX_EXAMPLES] if isinstance(x, dict)]
        more = f" (first {MAX_EXAMPLES} of {len(examples)})" if len(examples) > MAX_EXAMPLES else ""
        blocks.append({"title": f"{r.name}: {r.data}{more}", "cards": cards})
    return blocks


# ---------------------------------------------------------------------------------------------- page


@functools.cache
def _environment() -> Any:
    """The Jinja2 environment of lipkit's pages (templates in ``lipkit/eval/pages/``, autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lipkit.eval", "pages"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.tests["note"] = lambda value: isinstance(value, Note)
    return env


def render_page(template: str, **context: Any) -> str:
    """Render one of lipkit's HTML page templates; every value put into the page is HTML-escaped.

    Args:
        template: The template's file name in ``lipkit/eval/pages/``, e.g. ``report.html``.
        **context: The template's variables.
    """
    return _environment().get_template(template).render(**context)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run (default ``RUN_DIR/report.html``) and its PNG plots (``RUN_DIR/plots/``).

    Args:
        run_dir: The run directory: ``config.yaml``, ``metrics.jsonl`` and results files under it are used,
            whichever exist.
        out: Where to write the page.

    Returns:
        The path of the page.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LipkitError(
            f"run directory {run_dir} not found" if not run_dir.exists() else f"{run_dir} is not a folder"
        )
    _require_matplotlib()
    config_text, config = _read_config(run_dir)
    records, bad_lines = read_training_log(run_dir)
    found, skipped = find_results(run_dir)
    plots = _Plots(run_dir / "plots")
    page = render_page(
        "report.html",
        header=_header(run_dir, config_text, config, found),
        summary=_summary_section(found, skipped),
        training=_training_section(records, bad_lines, plots),
        zeroshot_training=_zeroshot_training_section(found, plots),
        confusion=_confusion_section(found, plots),
        fewshot=_fewshot_section(found, plots),
        retrieval=_retrieval_section(found),
        examples=_examples_section(found),
    )
    path = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(path, page)
    return path
