"""Evaluation during training: zero-shot and retrieval every N steps, split across ranks.

Each rank embeds every ``world``-th sample of a set (shares may differ by one, or be empty), padded
with copies of the first sample to the longest share, so every rank runs the same number of forward
passes (each a collective call when FSDP shards the model). The ranks then combine fixed-size
results (prediction counts are summed; retrieval features are padded to a common length and
gathered), so every rank makes the same collective calls in the same order and an unequal split can
never deadlock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lipkit.data.labelled import Subset, open_labelled
from lipkit.data.spec import open_mixture
from lipkit.eval.embed import embed_pairs
from lipkit.eval.features import image_features, text_classifier
from lipkit.eval.metrics import ClassificationCounts, count_predictions, metrics_from_counts
from lipkit.eval.results import describe_model, make_result, split_metrics, write_results
from lipkit.eval.retrieval import retrieval_metrics
from lipkit.eval.templates import default_templates
from lipkit.models import DualEncoder
from lipkit.train.distributed import DistEnv


def _sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(x)
    return x


def gather_rows(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate every rank's rows (N_r, D), whatever each N_r is (zero included)."""
    if not env.distributed:
        return x
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _share(n: int, env: DistEnv) -> tuple[list[int], int]:
    """This rank's sample indices, padded with sample 0 to ``ceil(n / world)``, and how many are its own."""
    own = list(range(env.rank, n, env.world_size))
    return own + [0] * (-(-n // env.world_size) - len(own)), len(own)


def _interleave(rows: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Undo the rank::world split: row i of the result is sample i of the set."""
    order = torch.cat([torch.arange(r, n, world) for r in range(world)])
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def zeroshot_during_training(model: DualEncoder, spec: str, max_samples: int | None, env: DistEnv, device) -> dict:
    """Zero-shot metrics on a labelled set; prediction counts summed over ranks."""
    data = open_labelled(spec, max_samples=max_samples)
    templates, _ = default_templates(getattr(data, "name", None), getattr(data, "templates", None))
    weights = text_classifier(model, data.classnames, templates, device=device)
    indices, own = _share(len(data), env)
    counts = ClassificationCounts.zeros(len(data.classnames))
    if indices:
        feats, labels = image_features(model, Subset(data, indices), device=device, progress=False)
        counts = count_predictions(feats[:own] @ weights.T, labels[:own], len(data.classnames))
    counts = counts.apply(lambda x: _sum(x, env))
    return {**metrics_from_counts(counts), "classnames": list(data.classnames)}


def retrieval_during_training(model: DualEncoder, spec: str, env: DistEnv, device) -> dict[str, Any]:
    """Retrieval Recall@k on a pair source; each rank embeds a share, features are gathered."""
    source = open_mixture(spec).as_source()
    indices, own = _share(len(source), env)
    images = torch.zeros(0, model.cfg.embed_dim)
    texts = torch.zeros(0, model.cfg.embed_dim)
    if indices:
        images, texts = embed_pairs(model, Subset(source, indices), device=device, progress=False)
    images = _interleave(gather_rows(images[:own], env), len(source), env.world_size)
    texts = _interleave(gather_rows(texts[:own], env), len(source), env.world_size)
    return {**retrieval_metrics(images, texts), "n": len(source)}


def evaluate_now(model: DualEncoder, eval_cfg: Any, step: int, run_dir: Path, env: DistEnv, device) -> dict[str, float]:
    """Run every configured evaluation; the main rank writes ``RUN/eval/*_stepN.json``; returns log scalars."""
    was_training = model.training
    model.eval()
    scalars: dict[str, float] = {}
    jobs = [("zeroshot", s) for s in eval_cfg.zeroshot] + [("retrieval", s) for s in eval_cfg.retrieval]
    for task, spec in jobs:
        if task == "zeroshot":
            values = zeroshot_during_training(model, spec, eval_cfg.max_samples, env, device)
            scalars[f"zeroshot/{spec}/top1"] = values["top1"]
        else:
            values = retrieval_during_training(model, spec, env, device)
            scalars[f"retrieval/{spec}/mean_R@1"] = (values["image_to_text_R@1"] + values["text_to_image_R@1"]) / 2
        if env.is_main:
            metrics, details = split_metrics({**values, "step": step})
            result = make_result(task, describe_model(model), None, spec, metrics, details)
            write_results(run_dir / "eval" / f"{task}_{spec.replace(':', '_')}_step{step:08d}.json", result)
    model.train(was_training)
    return scalars
