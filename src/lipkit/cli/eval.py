"""``lipkit eval``: evaluate a model (retrieval, zero-shot classification, linear probe)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lipkit.cli.options import add_limit, add_quiet, add_seed
from lipkit.errors import LipkitError

DATASETS_HELP = (
    "labelled dataset spec: fashion-mnist[:train|test], mnist[:train|test|all], folder:/path/to/root "
    "(one sub-folder per class), wds:/path/to/root[:split] (CLIP_benchmark webdataset export)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model",
        description="Evaluate a model. Tasks: `retrieval` (image->text and text->image Recall@k), `zeroshot` "
        "(zero-shot classification from prompts), `linear-probe` (logistic regression on frozen image "
        "features) and `fewshot` (adapters at K shots per class); `report` turns a run directory into an HTML "
        "page with plots. Every task can write its results as JSON in one schema (--out).",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    _add_retrieval(tasks)
    _add_zeroshot(tasks)
    _add_linear_probe(tasks)
    _add_fewshot(tasks)
    _add_report(tasks)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a run directory (its newest checkpoint is used), a lipkit checkpoint, or OpenCLIP/OpenAI "
        "weights together with --model",
    )
    p.add_argument("--model", help="model config name (default: the one recorded in the checkpoint)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    p.add_argument("--workers", type=int, default=0, help="image loading processes (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda... (default: auto)")
    p.add_argument("--out", metavar="FILE", help="also write the results to this JSON file")
    add_quiet(p)


def _add_retrieval(tasks: argparse._SubParsersAction) -> None:
    r = tasks.add_parser(
        "retrieval",
        help="image-text retrieval Recall@k",
        description="Image->text and text->image Recall@1/5/10 and median rank of a model on held-out pairs.",
    )
    _add_model_args(r)
    r.add_argument("--data", default="tuxpaint:test", help="pair source spec (default: tuxpaint:test)")
    r.set_defaults(run=run_retrieval)


def _add_zeroshot(tasks: argparse._SubParsersAction) -> None:
    z = tasks.add_parser(
        "zeroshot",
        help="zero-shot classification top-1/top-5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Zero-shot classification: each image gets the class whose prompt embedding (the
class name put into every template, averaged) is most similar. Reports top-1,
top-5, mean per-class recall and per-class recall. Class embeddings are cached
per model and prompt set in --cache-dir.""",
        epilog="""\
examples:
  lipkit eval zeroshot runs/tiny-tuxpaint --data fashion-mnist:test --limit 2000
  lipkit eval zeroshot model.pt --model ViT-B-32 --data folder:/data/pets --templates my_templates.txt
  lipkit eval zeroshot runs/x --data wds:/data/wds_cifar10:test --out cifar10.json""",
    )
    _add_model_args(z)
    z.add_argument("--data", default="fashion-mnist:test", help=DATASETS_HELP + " (default: fashion-mnist:test)")
    z.add_argument(
        "--templates",
        help="prompt templates with a {c} placeholder: a JSON list or text file (one per line), `generic`, or a "
        "dataset name looked up in CLIP_benchmark's table (e.g. imagenet1k) or lipkit's (fashion-mnist, mnist). "
        "Default: the dataset's own, else those for its name, else `generic`",
    )
    z.add_argument("--classnames", help="class names in label order: a JSON list or text file (one per line)")
    z.add_argument(
        "--cache-dir",
        help="class embedding cache folder (default: $LIPKIT_CACHE_DIR/classifiers, else ~/.cache/lipkit/classifiers)",
    )
    z.add_argument("--no-cache", action="store_true", help="neither read nor write cached class embeddings")
    _add_subset_args(z)
    z.set_defaults(run=run_zeroshot)


def _add_linear_probe(tasks: argparse._SubParsersAction) -> None:
    lp = tasks.add_parser(
        "linear-probe",
        help="logistic regression on frozen image features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Linear probe: embed the training and test images, fit a logistic regression on
the training features (its L2 strength chosen on a validation split carved out
of the training features, then refitted on all of them) and score the test set:
top-1, top-5 and mean per-class recall.""",
        epilog="""\
example:
  lipkit eval linear-probe runs/tiny-tuxpaint --train fashion-mnist:train --test fashion-mnist:test""",
    )
    _add_model_args(lp)
    lp.add_argument("--train", required=True, help="training set: " + DATASETS_HELP)
    lp.add_argument("--test", required=True, help="test set (same specs)")
    lp.add_argument("--val-fraction", type=float, default=0.2, help="share of training samples to choose L2 on")
    _add_subset_args(lp)
    lp.set_defaults(run=run_linear_probe)


def _add_fewshot(tasks: argparse._SubParsersAction) -> None:
    f = tasks.add_parser(
        "fewshot",
        help="few-shot adaptation at K shots per class",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Few-shot adaptation on frozen features at K shots per class: zero-shot baseline,
linear probe, Tip-Adapter, Tip-Adapter-F, Gaussian discriminant analysis (GDA)
and CoOp (learned prompt context). Hyper-parameters are chosen on folds of the
K-shot training data only, never on the test set. Reports top-1 per method and K.""",
        epilog="""\
example:
  lipkit eval fewshot runs/tiny-tuxpaint --train fashion-mnist:train --test fashion-mnist:test \\
      --shots 1 2 4 8 16 --methods zeroshot linear_probe tip_adapter gda --limit 2000""",
    )
    _add_model_args(f)
    f.add_argument("--train", required=True, help="set the shots are drawn from: " + DATASETS_HELP)
    f.add_argument("--test", required=True, help="test set (same specs)")
    f.add_argument("--shots", type=int, nargs="+", help="K values (default: 1 2 4 8 16)")
    f.add_argument("--methods", nargs="+", help="methods (default: all)")
    f.add_argument("--seeds", type=int, nargs="+", default=[0], help="shot-sampling seeds to average (default: 0)")
    f.add_argument("--templates", help="prompt templates for the zero-shot classifier (as in `lipkit eval zeroshot`)")
    add_limit(f, "test images (evenly spaced)", old="--max-test")
    f.add_argument(
        "--no-invert",
        action="store_true",
        help="fashion-mnist and mnist: keep white-on-black images (default: dark objects on white)",
    )
    f.set_defaults(run=run_fewshot, classnames=None)


def _add_report(tasks: argparse._SubParsersAction) -> None:
    r = tasks.add_parser(
        "report",
        help="an HTML report of a run: training curves, results, plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write one self-contained HTML page about a run (PNG plots embedded, and also
saved in RUN_DIR/plots/): its config, training curves from metrics.jsonl (loss,
temperature, learning rate, throughput), and every results file found under
RUN_DIR (*.json in the results schema, e.g. written with --out RUN_DIR/eval/...):
a summary table, zero-shot top-1 over training (results of step_NNNNNNNN.pt
checkpoints), confusion matrices, few-shot curves against K and retrieval
Recall@k. Missing pieces are named on the page.""",
        epilog="""\
examples:
  lipkit eval zeroshot runs/x/checkpoints/step_00000500.pt --out runs/x/eval/step500/zeroshot.json
  lipkit eval report runs/x
  lipkit eval report runs/x --out /tmp/x.html""",
    )
    r.add_argument("run_dir", help="the run directory (config.yaml, metrics.jsonl, results files under it)")
    r.add_argument("--out", metavar="FILE", help="the HTML file to write (default: RUN_DIR/report.html)")
    r.set_defaults(run=run_report)


def _add_subset_args(p: argparse.ArgumentParser) -> None:
    add_limit(p, "images of each set (a fixed random subset)", old="--max-samples")
    add_seed(p, "the --limit subset", default=0)
    p.add_argument(
        "--no-invert",
        action="store_true",
        help="fashion-mnist and mnist: keep white-on-black images (default: dark objects on white)",
    )


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from lipkit.train.checkpoint import load_trained

    return load_trained(args.checkpoint, args.model)


def _open(spec: str, args: argparse.Namespace, limit: int | None = None, seed: int = 0) -> Any:
    from lipkit.data.labelled import open_labelled

    options = {"invert": False} if args.no_invert else {}
    return open_labelled(spec, max_samples=limit, seed=seed, **options)


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` file that cannot be written before any work, rather than after printing the results."""
    from lipkit.utils import check_writable

    if args.out:
        check_writable(Path(args.out))


def _save(args: argparse.Namespace, task: str, model: Any, weights: Any, data: Any, values: dict) -> None:
    from lipkit.eval.results import task_result, write_results

    if args.out:
        write_results(args.out, task_result(task, model, args.model, weights, data, values))
        print(f"results written to {args.out}")


def run_retrieval(args: argparse.Namespace) -> int:
    from lipkit.data.spec import open_source
    from lipkit.eval.embed import embed_pairs
    from lipkit.eval.retrieval import retrieval_metrics
    from lipkit.utils import resolve_device

    _check_out(args)
    model, weights = _load_model(args)
    source = open_source(args.data)
    device = resolve_device(args.device)
    images, texts = embed_pairs(model, source, args.batch_size, args.workers, device=device, progress=not args.quiet)
    metrics = retrieval_metrics(images, texts)
    print(f"retrieval on {args.data}: {len(source)} pairs (chance R@1 {100.0 / len(source):.1f}%)")
    for direction in ("image_to_text", "text_to_image"):
        recalls = "  ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:5.1f}" for k in (1, 5, 10))
        print(f"  {direction.replace('_', ' '):<14} {recalls}  median rank {metrics[f'{direction}_median_rank']:.0f}")
    _save(args, "retrieval", model, weights, args.data, {**metrics, "n": len(source)})
    return 0


def _prompts(args: argparse.Namespace, data: Any) -> tuple[list[str], list[str], str]:
    from lipkit.eval.templates import default_templates, load_classnames, load_templates

    classnames = load_classnames(args.classnames) if args.classnames else list(data.classnames)
    if args.templates:
        templates, source = load_templates(args.templates)
    else:
        templates, source = default_templates(getattr(data, "name", None), getattr(data, "templates", None))
    return classnames, templates, source


def run_zeroshot(args: argparse.Namespace) -> int:
    from lipkit.eval.zeroshot import zeroshot_classify
    from lipkit.utils import resolve_device

    _check_out(args)
    model, weights = _load_model(args)
    data = _open(args.data, args, args.limit, args.seed)
    classnames, templates, source = _prompts(args, data)
    counts = f"{len(data)} images, {len(classnames)} classes, {len(templates)} templates"
    print(f"zero-shot on {args.data}: {counts} ({source})")
    values = zeroshot_classify(
        model,
        data,
        classnames,
        templates,
        batch_size=args.batch_size,
        workers=args.workers,
        device=resolve_device(args.device),
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    _print_classification(values, classnames)
    values.update(classnames=classnames, templates=templates, template_source=source)
    _save(args, "zeroshot", model, weights, args.data, values)
    return 0


def run_linear_probe(args: argparse.Namespace) -> int:
    from lipkit.eval.features import image_features
    from lipkit.eval.linear_probe import linear_probe
    from lipkit.utils import resolve_device

    _check_out(args)
    model, weights = _load_model(args)
    train, test = _open(args.train, args, args.limit, args.seed), _open(args.test, args, args.limit, args.seed)
    if list(train.classnames) != list(test.classnames):
        raise LipkitError(f"{args.train} and {args.test} have different classes")
    device = resolve_device(args.device)
    print(f"linear probe: train {args.train} ({len(train)} images), test {args.test} ({len(test)} images)")
    progress = not args.quiet
    train_x, train_y = image_features(model, train, args.batch_size, args.workers, device, progress=progress)
    test_x, test_y = image_features(model, test, args.batch_size, args.workers, device, progress=progress)
    num_classes = len(train.classnames)
    values = linear_probe(
        train_x, train_y, test_x, test_y, num_classes, val_fraction=args.val_fraction, device=device, progress=progress
    )
    _print_probe(values, list(train.classnames))
    values["classnames"] = list(train.classnames)
    _save(args, "linear-probe", model, weights, {"train": args.train, "test": args.test}, values)
    return 0


def _print_probe(values: dict, classnames: list[str]) -> None:
    from lipkit.eval.linear_probe import DEFAULT_L2_GRID

    edge = " (at the edge of the grid)" if values["l2"] in (min(DEFAULT_L2_GRID), max(DEFAULT_L2_GRID)) else ""
    print(f"  L2 {values['l2']:g}{edge}: val top-1 {values['val_top1']:.1f} on a split of the training set")
    _print_classification(values, classnames)


def _print_classification(values: dict, classnames: list[str]) -> None:
    tops = "  ".join(f"{k} {v:5.1f}" for k, v in values.items() if k.startswith("top"))
    chance = 100.0 / len(classnames)
    print(f"  {tops}  mean per-class recall {values['mean_per_class_recall']:5.1f}  (chance {chance:.1f})")
    if len(classnames) <= 20:
        width = max(len(c) for c in classnames)
        for name, recall in zip(classnames, values["per_class_recall"]):
            print(f"    {name:<{width}}  {'-' if recall is None else f'{recall:5.1f}'}")


def run_fewshot(args: argparse.Namespace) -> int:
    from lipkit.eval.fewshot import DEFAULT_KS, DEFAULT_METHODS, fewshot_report
    from lipkit.utils import resolve_device

    shots, methods = args.shots or list(DEFAULT_KS), args.methods or list(DEFAULT_METHODS)
    _check_out(args)
    model, weights = _load_model(args)
    train, test = _open(args.train, args), _open(args.test, args)
    if list(train.classnames) != list(test.classnames):
        raise LipkitError(f"{args.train} and {args.test} have different classes")
    classnames, templates, _ = _prompts(args, test)
    print(f"few-shot: shots from {args.train}, test on {args.test}, K = {' '.join(map(str, shots))}")
    values = fewshot_report(
        model,
        train,
        test,
        classnames,
        templates,
        ks=shots,
        methods=methods,
        device=resolve_device(args.device),
        max_test=args.limit,
        seeds=args.seeds,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
    )
    _print_fewshot(values, shots)
    _save(args, "fewshot", model, weights, {"train": args.train, "test": args.test}, {"fewshot": values})
    return 0


def _print_fewshot(values: dict, ks: list[int]) -> None:
    print(f"  {'method':<16}" + "".join(f"{'K=' + str(k):>9}" for k in ks))
    for method, per_k in values["methods"].items():
        cells = "".join(f"{per_k[str(k)]['top1']:9.1f}" if str(k) in per_k else f"{'-':>9}" for k in ks)
        print(f"  {method:<16}{cells}")


def run_report(args: argparse.Namespace) -> int:
    from lipkit.eval.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report written to {path} (plots in {Path(args.run_dir) / 'plots'})")
    return 0
