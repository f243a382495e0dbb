"""Few-shot adaptation on frozen features: K-shot sampling, the benchmark driver and a model-level report.

Methods (see :mod:`lipkit.eval.adapters` and :mod:`lipkit.eval.coop`): ``zeroshot``, ``linear_probe``,
``tip_adapter``, ``tip_adapter_f``, ``gda`` and ``coop``.

Validation rule (the same for every method): hyper-parameters are chosen only on folds cut from the K-shot
training set, never on the test set. With K >= 2 shots per class, ``min(K, 4)`` folds are used; fold ``j``
holds out, in every class, the shots at positions ``j, j + F, j + 2F, ...`` of the (randomly drawn) shot order,
so K = 2 gives 2 folds of 1 + 1 shots, K = 4 gives 4 folds of 3 + 1, K = 8 gives 4 folds of 6 + 2 and K = 16
gives 4 folds of 12 + 4. The candidate with the best accuracy pooled over the folds wins (ties go to the lower
validation cross-entropy, then to the first candidate), and the method is then refitted on all K shots. With
K = 1 nothing can be held out (every class has one shot, and leaving a class's only shot out removes that
class), so each method falls back to fixed defaults, reported in its ``params``. CoOp trains for a fixed
number of epochs (the paper's schedule) and uses no validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from lipkit.data.labelled import Subset
from lipkit.errors import LipkitError
from lipkit.eval.adapters import ADAPTERS, cv_folds, top1
from lipkit.eval.adapters.base import Fold, shot_positions
from lipkit.eval.coop import CoopConfig, coop_hook
from lipkit.eval.features import LabelledImages, check_prompts, image_features, text_classifier
from lipkit.models import DualEncoder

DEFAULT_KS = (1, 2, 4, 8, 16)
DEFAULT_METHODS = ("zeroshot", "linear_probe", "tip_adapter", "tip_adapter_f", "gda")
COOP = "coop"
# K-shot indices into the training set -> test logits (N_test, C); CoOp needs the model, so it comes as a hook
CoopFn = Callable[[torch.Tensor], torch.Tensor]


def sample_k_shot(labels: torch.Tensor, k: int, seed: int, classnames: Sequence[str] | None = None) -> torch.Tensor:
    """Draw ``k`` examples of every class, deterministically.

    Each class's examples are put in a random order that depends only on ``seed`` and ``labels``, and the first
    ``k`` are kept, so the K-shot sets of one seed are nested (the 1-shot set is inside the 2-shot set...).

    Args:
        labels: Labels of the pool to draw from (N,).
        k: Shots per class.
        seed: Random seed.
        classnames: One name per class, for error messages and the number of classes; by default the classes
            are ``0 .. labels.max()``.

    Returns:
        Indices into ``labels`` (C * k,), class by class, each class's shots in their drawn order.

    Raises:
        LipkitError: ``k`` is not positive, a label is out of range, or a class has fewer than ``k`` examples.
    """
    if k < 1:
        raise LipkitError(f"the number of shots must be at least 1, got {k}")
    labels = torch.as_tensor(labels).long().cpu()
    if len(labels) == 0:
        raise LipkitError("cannot draw shots from an empty set")
    names = list(classnames) if classnames is not None else [str(c) for c in range(int(labels.max()) + 1)]
    if int(labels.min()) < 0 or int(labels.max()) >= len(names):
        raise LipkitError(f"labels must lie in 0..{len(names) - 1} (one per class name), got {int(labels.max())}")
    counts = torch.bincount(labels, minlength=len(names))
    short = (counts < k).nonzero().flatten().tolist()
    if short:
        c = short[0]
        more = f" ({len(short) - 1} more classes are short too)" if len(short) > 1 else ""
        raise LipkitError(
            f"class {names[c]!r} (label {c}) has {int(counts[c])} example(s), fewer than the {k} shots asked for{more}"
        )
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(labels[perm], stable=True)]  # class by class, random within a class
    return order[shot_positions(labels[order]) < k]


def _check_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
) -> None:
    """Raise a clear error for features, labels and class embeddings that do not fit together."""
    dim, n_classes = zeroshot_weights.shape[-1], zeroshot_weights.shape[0]
    for name, feats, labels in (("train", train_feats, train_labels), ("test", test_feats, test_labels)):
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise LipkitError(f"{name} features must be (N, {dim}) like the class embeddings, got {tuple(feats.shape)}")
        if labels.shape != (len(feats),):
            raise LipkitError(f"{name} labels must be ({len(feats)},), got {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise LipkitError(f"{name} labels must lie in 0..{n_classes - 1} ({n_classes} classes)")
    if len(test_labels) == 0:
        raise LipkitError("the test set is empty")


def _check_methods(
    methods: Sequence[str], have_coop_fn: bool, options: Mapping[str, Any] | None = None, ks: Sequence[int] = (1,)
) -> None:
    """Raise a clear error for unknown methods, options for methods not run, or bad numbers of shots."""
    if not methods:
        raise LipkitError("no few-shot method given")
    if not ks or min(ks) < 1:
        raise LipkitError(f"numbers of shots must be positive, got {list(ks)}")
    for name in options or {}:
        if name == COOP:
            raise LipkitError("CoOp's settings go into its hook (a CoopConfig), not into options")
        if name not in methods:
            raise LipkitError(f"options given for method {name!r}, which is not run (methods: {', '.join(methods)})")
    for method in methods:
        if method == COOP:
            if not have_coop_fn:
                raise LipkitError("method 'coop' needs the model: pass coop_fn (see lipkit.eval.coop.coop_hook)")
        else:
            ADAPTERS.get(method)  # unknown names raise with suggestions


@dataclass
class _Task:
    """Features on one device: the training pool, the test set and the zero-shot class embeddings."""

    train_feats: torch.Tensor  # (N, D)
    train_labels: torch.Tensor  # (N,)
    test_feats: torch.Tensor  # (M, D)
    test_labels: torch.Tensor  # (M,)
    zeroshot_weights: torch.Tensor  # (C, D)


@torch.no_grad()
def _predict(predict: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Logits of ``feats`` in chunks of rows, so large caches and test sets fit in memory."""
    return torch.cat([predict(feats[i : i + chunk]) for i in range(0, len(feats), chunk)])  # (M, C)


def _run_method(
    method: str,
    task: _Task,
    shots: torch.Tensor,
    folds: Sequence[Fold],
    seed: int,
    options: Mapping[str, Any],
    coop_fn: CoopFn | None,
) -> tuple[float, dict[str, float]]:
    """Fit one method on the shots and score it on the test set: (top-1 %, its hyper-parameters)."""
    if method == COOP:
        assert coop_fn is not None  # checked by _check_methods
        logits, params = coop_fn(shots.cpu()), {}
    else:
        fit = ADAPTERS.get(method)
        feats, labels = task.train_feats[shots], task.train_labels[shots]
        adapted = fit(feats, labels, task.zeroshot_weights, folds, seed=seed, **options)
        logits, params = _predict(adapted.predict, task.test_feats), adapted.params
    if logits.shape != (len(task.test_labels), len(task.zeroshot_weights)):
        raise LipkitError(f"{method} returned test logits of shape {tuple(logits.shape)}, expected (N_test, C)")
    return top1(logits.to(task.test_labels.device), task.test_labels), params


def _summary(records: list[tuple[float, dict[str, float], int]]) -> dict[str, Any]:
    """Mean and spread over seeds of (accuracy, hyper-parameters, number of folds) records."""
    accs = torch.tensor([acc for acc, _, _ in records], dtype=torch.float64)
    return {
        "top1": accs.mean().item(),
        "top1_std": accs.std(unbiased=False).item(),
        "top1_per_seed": accs.tolist(),
        "params": [params for _, params, _ in records],
        "val_folds": records[0][2],
    }


def run_fewshot(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0,),
    coop_fn: CoopFn | None = None,
    *,
    classnames: Sequence[str] | None = None,
    n_folds: int = 4,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Few-shot top-1 accuracy of each method at each K, averaged over seeds, on precomputed features.

    For every seed and K, one K-shot set is drawn from the training pool (:func:`sample_k_shot`), validation
    folds are cut from it (:func:`~lipkit.eval.adapters.cv_folds`, the rule in this module's docstring), and
    every method is fitted on the shots alone and scored on the whole test set.

    Args:
        train_feats: L2-normalised image features of the training pool (N, D).
        train_labels: Its labels (N,).
        test_feats: L2-normalised image features of the test set (M, D).
        test_labels: Its labels (M,); used only for scoring.
        zeroshot_weights: Zero-shot class embeddings (C, D), e.g. from :func:`text_classifier`.
        ks: Shots per class.
        methods: Names in :data:`~lipkit.eval.adapters.ADAPTERS`, plus ``coop`` (needs ``coop_fn``).
        seeds: One K-shot draw per seed.
        coop_fn: Maps K-shot indices into the pool to CoOp's test logits (M, C).
        classnames: Class names for error messages.
        n_folds: The most validation folds.
        options: Per-method keyword options, e.g. ``{"tip_adapter_f": {"epochs": 10}}``.
        device: Where to fit the adapters.
        progress: Show a progress bar.

    Returns:
        ``{"ks", "seeds", "n_classes", "n_train", "n_test", "methods": {method: {str(K): {"top1", "top1_std",
        "top1_per_seed", "params" (one dict per seed), "val_folds"}}}}``; accuracies in percent.
    """
    _check_features(train_feats, train_labels, test_feats, test_labels, zeroshot_weights)
    _check_methods(methods, coop_fn is not None, options, ks)
    n_classes = len(zeroshot_weights)
    names = list(classnames) if classnames is not None else [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise LipkitError(f"{len(names)} class names for {n_classes} zero-shot class embeddings")
    task = _Task(
        train_feats.to(device).float(), train_labels.to(device).long(), test_feats.to(device).float(),
        test_labels.to(device).long(), zeroshot_weights.to(device).float(),
    )  # fmt: skip
    records: dict[str, dict[int, list]] = {m: {k: [] for k in ks} for m in methods}
    bar = tqdm(total=len(seeds) * len(ks) * len(methods), desc="few-shot", unit="fit", disable=not progress)
    for seed in seeds:
        for k in ks:
            shots = sample_k_shot(task.train_labels, k, seed, names).to(device)
            folds = cv_folds(task.train_labels[shots], n_folds)
            for method in methods:
                acc, params = _run_method(method, task, shots, folds, seed, (options or {}).get(method, {}), coop_fn)
                records[method][k].append((acc, params, len(folds)))
                bar.update()
    bar.close()
    return {
        "ks": list(ks),
        "seeds": list(seeds),
        "n_classes": n_classes,
        "n_train": len(train_labels),
        "n_test": len(test_labels),
        "methods": {m: {str(k): _summary(records[m][k]) for k in ks} for m in methods},
    }


def spread_indices(n: int, limit: int | None) -> torch.Tensor:
    """``limit`` evenly spaced indices of ``range(n)`` (all of them when ``limit`` is None or >= n).

    Even spacing keeps class-sorted sets balanced, and needs no seed.
    """
    if limit is not None and limit < 1:
        raise LipkitError(f"the number of images to use must be positive, got {limit}")
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.arange(limit) * n // limit


def fewshot_report(
    model: DualEncoder,
    train_data: LabelledImages,
    test_data: LabelledImages,
    classnames: Sequence[str],
    templates: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    methods: Sequence[str] = DEFAULT_METHODS,
    device: torch.device | str = "cpu",
    max_train: int | None = None,
    max_test: int | None = None,
    *,
    seeds: Sequence[int] = (0,),
    batch_size: int = 256,
    workers: int = 0,
    coop: CoopConfig | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Few-shot results of a model on a labelled image set: features, zero-shot classifier, then every method.

    Only the images that can be drawn as shots are embedded: the largest K-shot set of every seed is drawn
    from the training pool's labels, and their union is embedded. :func:`run_fewshot` then draws each seed's
    K-shot sets from that union (with one seed, the union is exactly its largest K-shot set).

    Args:
        model: The dual encoder.
        train_data: The set the shots come from.
        test_data: The set accuracy is measured on.
        classnames: One name per class (label order).
        templates: Prompt templates with a ``{c}`` placeholder, for the zero-shot classifier.
        ks: Shots per class.
        methods: Method names (see :func:`run_fewshot`); ``coop`` trains prompts through the text tower.
        device: Where to run the model and the adapters.
        max_train: Use at most this many training images (evenly spaced) as the pool for shots.
        max_test: Use at most this many test images (evenly spaced).
        seeds: One K-shot draw per seed.
        batch_size: Images per forward pass.
        workers: Data-loading worker processes.
        coop: CoOp settings.
        options: Per-method keyword options for the adapters.
        progress: Show progress bars.

    Returns:
        :func:`run_fewshot`'s results, plus ``n_train_pool`` (images shots were drawn from) and ``n_templates``.
    """
    check_prompts(classnames, templates)
    _check_methods(methods, True, options, ks)  # fail before embedding anything
    for name, data in (("training", train_data), ("test", test_data)):
        if len(data.classnames) != len(classnames):
            raise LipkitError(f"{len(classnames)} class names given, but the {name} set has {len(data.classnames)}")
    zeroshot_weights = text_classifier(model, classnames, templates, device=device, batch_size=batch_size)
    embed = {"batch_size": batch_size, "workers": workers, "device": device, "progress": progress}
    test_set = Subset(test_data, spread_indices(len(test_data), max_test))
    test_feats, test_labels = image_features(model, test_set, **embed)
    pool = spread_indices(len(train_data), max_train)
    pool_labels = torch.tensor([train_data.label(int(i)) for i in pool], dtype=torch.long)
    shots = torch.unique(torch.cat([sample_k_shot(pool_labels, max(ks), seed, classnames) for seed in seeds]))
    train_feats, train_labels = image_features(model, Subset(train_data, pool[shots]), **embed)
    coop_fn = None
    if COOP in methods:
        coop_fn = coop_hook(model, classnames, train_feats, train_labels, test_feats, coop, device)
    result = run_fewshot(
        train_feats, train_labels, test_feats, test_labels, zeroshot_weights, ks, methods, seeds, coop_fn,
        classnames=classnames, options=options, device=device, progress=progress,
    )  # fmt: skip
    return {**result, "n_train_pool": len(pool), "n_templates": len(templates)}
