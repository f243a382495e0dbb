"""Prompt templates and class names for zero-shot classification.

Templates hold a ``{c}`` placeholder for the class name (CLIP_benchmark's convention). They come from,
in this order of preference when none is named:

1. the dataset itself (a CLIP_benchmark webdataset folder ships its own);
2. CLIP_benchmark's ``en_zeroshot_classification_templates.json``, looked up by dataset name, when the
   ``clip-benchmark`` package is installed (``pip install --no-deps clip-benchmark==1.6.2``; its files
   are read directly, the package is never imported);
3. lipkit's own sets: per dataset (``fashion-mnist``, ``mnist``) and a short ``generic`` one.

A user file is a JSON list of strings or a text file with one template per line; ``{}`` (OpenAI's
placeholder) is read as ``{c}``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from lipkit.errors import LipkitError, suggest
from lipkit.utils import package_path

CLIP_BENCHMARK_INSTALL = "pip install --no-deps clip-benchmark==1.6.2"

BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "generic": (
        "a photo of a {c}.",
        "a picture of a {c}.",
        "an image of a {c}.",
        "a close-up photo of a {c}.",
        "a photo of the {c}.",
        "a drawing of a {c}.",
    ),
    "fashion-mnist": (
        "a photo of a {c}.",
        "a product photo of a {c}.",
        "a black and white photo of a {c}.",
        "a low resolution photo of a {c}.",
        "a photo of a {c}, a type of clothing.",
        "a picture of a {c}, a fashion item.",
    ),
    "mnist": (
        'a photo of the number: "{c}".',
        "a handwritten digit {c}.",
        "a black and white image of the digit {c}.",
        "the number {c}, written by hand.",
    ),
}


def dataset_key(name: str) -> str:
    """CLIP_benchmark's spelling of a dataset name: lower case, underscores (``fashion-mnist`` -> ``fashion_mnist``)."""
    return name.lower().replace("-", "_")


@functools.lru_cache(maxsize=4)
def clip_benchmark_table(kind: str) -> dict[str, list[str]]:
    """CLIP_benchmark's English ``templates`` or ``classnames`` per dataset; empty when it is not installed."""
    relative = {"templates": "en_zeroshot_classification_templates.json", "classnames": "en_classnames.json"}[kind]
    try:
        path = package_path("clip_benchmark", f"datasets/{relative}", CLIP_BENCHMARK_INSTALL)
    except LipkitError:
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def read_list_file(path: str | Path) -> list[str]:
    """Strings from a JSON list, or from a text file with one per line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LipkitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LipkitError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise LipkitError(f"{path} must hold a JSON list of strings")
        return [s.strip() for s in items if s.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _looks_like_file(spec: str) -> bool:
    return Path(spec).is_file() or "/" in spec or spec.lower().endswith((".json", ".txt"))


def load_templates(spec: str) -> tuple[list[str], str]:
    """Templates from a file, a built-in set or a CLIP_benchmark dataset name, and where they came from.

    Args:
        spec: A file path, ``generic``, a dataset with built-in templates (``fashion-mnist``, ``mnist``),
            or any dataset in CLIP_benchmark's table (``imagenet1k`` gives CLIP's 80 templates).

    Returns:
        The templates and a short description of their source, e.g. ``clip-benchmark:mnist``.
    """
    if _looks_like_file(spec):
        templates = [t if "{c}" in t else t.replace("{}", "{c}") for t in read_list_file(spec)]
        if not templates:
            raise LipkitError(f"template file {spec} holds no templates")
        return templates, f"file:{spec}"
    found = named_templates(spec)
    if found is None:
        known = sorted({*BUILTIN_TEMPLATES, *clip_benchmark_table("templates")})
        hint = "" if clip_benchmark_table("templates") else f" (more with `{CLIP_BENCHMARK_INSTALL}`)"
        raise LipkitError(f"no prompt templates named {spec!r}.{suggest(spec, known)} Known: {', '.join(known)}{hint}")
    return found


def named_templates(name: str) -> tuple[list[str], str] | None:
    """CLIP_benchmark's templates for dataset ``name`` if installed, else lipkit's built-in ones, else ``None``."""
    table = clip_benchmark_table("templates")
    if dataset_key(name) in table:
        return list(table[dataset_key(name)]), f"clip-benchmark:{dataset_key(name)}"
    if name in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[name]), f"lipkit:{name}"
    return None


def default_templates(dataset: str | None, own: Sequence[str] | None = None) -> tuple[list[str], str]:
    """The templates to use when none is named: the dataset's own, then by dataset name, then ``generic``."""
    if own:
        return list(own), "dataset"
    return (named_templates(dataset) if dataset else None) or named_templates("generic")


def load_classnames(spec: str) -> list[str]:
    """Class names from a file (JSON list or one per line) or CLIP_benchmark's table by dataset name."""
    if _looks_like_file(spec):
        names = read_list_file(spec)
        if not names:
            raise LipkitError(f"class name file {spec} holds no names")
        return names
    table = clip_benchmark_table("classnames")
    if dataset_key(spec) in table:
        return list(table[dataset_key(spec)])
    hint = f"{suggest(spec, table)} Known: {', '.join(sorted(table))}" if table else f" ({CLIP_BENCHMARK_INSTALL})"
    raise LipkitError(f"{spec!r} is neither a class name file nor a CLIP_benchmark dataset.{hint}")
