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

Images are shrunk to 128-pixel thumbnails and at most 60 examples per file are shown; nothing is drawn
when no result has examples.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lipkit import __version__
from lipkit.errors import LipkitError
from lipkit.eval.results import RESULT_KEYS
from lipkit.utils import atomic_write, atomic_write_text

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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
            bad += 1
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records, bad


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


# ---------------------------------------------------------------------------------------------- html


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _missing(text: str) -> str:
    return f'<p class="missing">{text}</p>'


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _guarded(what: str, render: Callable[[], str]) -> str:
    """Render one piece; a malformed input shows as a note instead of stopping the report."""
    try:
        return render()
    except Exception as exc:  # a bad results file must not cost the whole page
        return _missing(f"could not draw {_e(what)}: {_e(type(exc).__name__)}: {_e(exc)}")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table from already escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "\u2013" if value is None else _e(value)
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
    return [f"{_e(name)} {_number(value)}" for name, value in _headline(result).items()]


def _header(run_dir: Path, config_text: str | None, config: dict[str, Any], found: list[FoundResult]) -> str:
    names = {r.result["model"].get("name") for r in found if isinstance(r.result["model"], dict)} - {None}
    model = config.get("model") or ", ".join(sorted(map(str, names))) or "unknown"
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    title = f"<h1>lipkit report: {_e(config.get('name') or run_dir.name)}</h1>"
    facts = f'<p class="facts">model <b>{_e(model)}</b> &middot; run <code>{_e(run_dir.resolve())}</code> &middot; '
    facts += f"written {_e(created)} by lipkit {_e(__version__)}</p>"
    if config_text is None:
        return title + facts + _missing("No config.yaml in this run directory.")
    return title + facts + f"<details><summary>config.yaml</summary><pre>{_e(config_text)}</pre></details>"


def _summary_section(found: list[FoundResult], skipped: list[str]) -> str:
    rows = []
    for r in sorted(found, key=lambda r: (r.task, r.data, r.recency)):
        metrics = _guarded("its headline", lambda r=r: " &middot; ".join(_headline_cells(r.result)) or "\u2013")
        rows.append([f"<code>{_e(r.name)}</code>", _e(r.task), _e(r.data), _number(r.step), metrics])
    hint = "write them with <code>lipkit eval TASK RUN_DIR ... --out RUN_DIR/eval/NAME.json</code>"
    body = _table(["file", "task", "data", "step", "headline metrics"], rows) if rows else ""
    body = body or _missing(f"No eval results yet: {hint}.")
    if skipped:
        body += _missing("Skipped unreadable JSON files:") + "<ul>" + "".join(f"<li>{_e(s)}</li>" for s in skipped)
        body += "</ul>"
    return _section("results", "Results", body)


def _training_section(records: list[dict[str, Any]] | None, bad_lines: int, plots: _Plots) -> str:
    if records is None:
        return _section("training", "Training", _missing("No metrics.jsonl yet: no training has been logged here."))
    if not records:
        return _section("training", "Training", _missing("metrics.jsonl holds no records yet."))
    last = records[-1]
    body = f"<p>{len(records)} records up to step {_number(last['step'])}"
    loss = next((r["loss"] for r in reversed(records) if isinstance(r.get("loss"), (int, float))), None)
    body += f", last loss {loss:.4g}.</p>" if isinstance(loss, (int, float)) else ".</p>"
    if bad_lines:
        body += _missing(f"{bad_lines} unreadable lines of metrics.jsonl were skipped.")
    figures = []
    for key, plot in TRAINING_PLOTS.items():
        if not _series(records, key)[0]:
            if key != "logit_bias":  # only SigLIP-style models have one
                figures.append(_missing(f"No {_e(key)} in metrics.jsonl."))
            continue
        figures.append(_guarded(key, lambda plot=plot, key=key: _img(plots.add(plot(records), key), key)))
    return _section("training", "Training", body + '<div class="grid">' + "".join(figures) + "</div>")


def _zeroshot_training_section(found: list[FoundResult], plots: _Plots) -> str:
    points = _zeroshot_points(found)
    if not points:
        hint = "evaluate checkpoints, e.g. <code>lipkit eval zeroshot RUN_DIR/checkpoints/step_00000500.pt --out "
        hint += "RUN_DIR/eval/step500/zeroshot.json</code>"
        body = _missing(f"No zero-shot results with a training step yet: {hint}.")
    else:
        plot = plot_zeroshot_over_training
        body = _guarded("zero-shot over training", lambda: _img(plots.add(plot(points), "zeroshot_over_training"), ""))
    return _section("zeroshot-training", "Zero-shot accuracy over training", body)


def _confusion_section(found: list[FoundResult], plots: _Plots) -> str:
    latest = latest_per_data(found, "zeroshot")
    figures = []
    for r in latest:
        if "confusion_matrix" not in (r.result["details"] or {}):
            figures.append(_missing(f"{_e(r.name)} has no confusion matrix."))
            continue
        render = lambda r=r: _img(plots.add(plot_confusion(r), f"confusion_{r.short_data}"), r.data)  # noqa: E731
        figures.append(f"<figure>{_guarded(r.name, render)}<figcaption>{_e(r.name)}</figcaption></figure>")
    body = '<div class="flow">' + "".join(figures) + "</div>" if figures else _missing("No zero-shot results yet.")
    return _section("confusion", "Zero-shot confusion matrices (latest per dataset)", body)


def _fewshot_section(found: list[FoundResult], plots: _Plots) -> str:
    figures = []
    for r in latest_per_data(found, "fewshot"):
        render = lambda r=r: _img(plots.add(plot_fewshot(r), f"fewshot_{r.short_data}"), r.data)  # noqa: E731
        caption = f"{_e(r.name)}: {_e(r.data)}"
        figures.append(f"<figure>{_guarded(r.name, render)}<figcaption>{caption}</figcaption></figure>")
    body = '<div class="grid">' + "".join(figures) + "</div>" if figures else _missing("No few-shot results yet.")
    return _section("fewshot", "Few-shot accuracy (latest per dataset)", body)


def _retrieval_section(found: list[FoundResult]) -> str:
    rows = [
        [f"<code>{_e(r.name)}</code>", _e(r.data), _number(r.step)]
        + [_number(r.result["metrics"].get(key)) for key in RETRIEVAL_COLUMNS]
        for r in found
        if r.task == "retrieval"
    ]
    if not rows:
        return _section("retrieval", "Retrieval", _missing("No retrieval results yet."))
    header = ["file", "data", "step"] + [f"{d} R@{k}" for d in ("I\u2192T", "T\u2192I") for k in (1, 5, 10)]
    header += ["I\u2192T median rank", "T\u2192I median rank"]
    return _section("retrieval", "Retrieval (Recall@k, %)", _table(header, rows))


# ---------------------------------------------------------------------------------------------- examples


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
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _example_card(example: Any, base_dir: Path) -> str:
    if not isinstance(example, dict):
        return ""
    uri = _thumbnail_uri(_example_bytes(example, base_dir))
    image = _img(uri, "query image") if uri else '<div class="noimg">no image</div>'
    captions = example.get("captions") if isinstance(example.get("captions"), list) else []
    captions = [c for c in captions if isinstance(c, str)][:MAX_CAPTIONS]
    items = "".join(f"<li>{_e(c)}</li>" for c in captions)
    correct = example.get("correct")
    status = {True: ("ok", "\u2713 correct"), False: ("miss", "\u2717 wrong")}.get(correct, ("", ""))
    truth = f'<p class="truth">truth: {_e(example["truth"])}</p>' if example.get("truth") else ""
    mark = f'<span class="mark">{status[1]}</span>' if status[1] else ""
    return f'<figure class="example {status[0]}">{image}<figcaption>{mark}<ol>{items}</ol>{truth}</figcaption></figure>'


def _examples_section(found: list[FoundResult]) -> str:
    """Retrieval examples of every result that has some; empty (no section) when none has."""
    blocks = []
    for r in found:
        examples = (r.result["details"] or {}).get("examples")
        if not isinstance(examples, list) or not examples:
            continue
        cards = "".join(_example_card(x, r.path.parent) for x in examples[:MAX_EXAMPLES])
        more = f" (first {MAX_EXAMPLES} of {len(examples)})" if len(examples) > MAX_EXAMPLES else ""
        blocks.append(f'<h3>{_e(r.name)}: {_e(r.data)}{more}</h3><div class="examples">{cards}</div>')
    return _section("examples", "Retrieval examples", "".join(blocks)) if blocks else ""


# ---------------------------------------------------------------------------------------------- page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.facts { color: #555; } code { font-size: 0.92em; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.missing { color: #8a6d00; background: #fff8e1; padding: 0.4em 0.7em; border-radius: 4px; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; }
th { background: #f2f2f2; text-align: left; } td { vertical-align: top; }
img { max-width: 100%; } figure { margin: 0.5em 0; } figcaption { color: #666; font-size: 0.85em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 0.8em; }
.flow { display: flex; flex-wrap: wrap; gap: 0.8em; } .flow figure { max-width: 100%; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 0.6em; }
.example { border: 3px solid #ccc; border-radius: 6px; padding: 0.4em; margin: 0; }
.example.ok { border-color: #2e7d32; } .example.miss { border-color: #c62828; }
.example ol { padding-left: 1.4em; margin: 0.3em 0; } .mark { font-weight: bold; }
.noimg { width: 128px; height: 128px; background: #eee; display: flex; align-items: center; justify-content: center; }
nav a { margin-right: 1em; }
"""

NAV = [
    ("results", "Results"),
    ("training", "Training"),
    ("zeroshot-training", "Zero-shot over training"),
    ("confusion", "Confusion"),
    ("fewshot", "Few-shot"),
    ("retrieval", "Retrieval"),
]


def _page(title: str, body: str) -> str:
    nav = "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in NAV) + "</nav>"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{nav}\n{body}\n</body></html>\n"
    )


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
    parts = [
        _header(run_dir, config_text, config, found),
        _summary_section(found, skipped),
        _training_section(records, bad_lines, plots),
        _zeroshot_training_section(found, plots),
        _confusion_section(found, plots),
        _fewshot_section(found, plots),
        _retrieval_section(found),
        _examples_section(found),
    ]
    path = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(path, _page(f"lipkit report: {config.get('name') or run_dir.name}", "\n".join(parts)))
    return path
