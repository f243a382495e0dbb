"""Classifier prototypes: training pairs made from a frozen image tower's own classifier head.

A pretrained image tower often ships with its classifier: one weight row per class, a direction in
the very feature space that a locked-tower (LiT) model projects. Each class gives pairs whose caption
is a template filled with the class name (``"a photo of a jean."``, one pair per synonym or only the
first) and whose image side is not an image but a point in the tower's feature space, placed along
that row:

* ``norm``: the row scaled to the mean norm of the training images' features;
* ``mean+Kstd`` (e.g. ``mean+3std``): the mean training feature plus ``K`` standard deviations of the
  training features projected on the row's direction, along that direction.

The statistics come from the features of the training images the source is mixed with (their
evaluation view); the rows come from the tower (:meth:`lipkit.models.timm_tower.TimmTower.classifier_head`).
The source is registered as ``prototypes``; a data spec mixes it like any other source::

    data:
      train:
        - tuxpaint:train::0.3
        - emoji:train::0.5
        - {source: prototypes, weight: 0.2, options: {placement: mean+3std, classnames: imagenet-1k}}

With cached features (``cache_features=true``) the placed rows are served where cached image features
would be. Without, the image tower must still be locked (the rows are points in its frozen feature
space): each prototype reaches the model as a :class:`FeaturePoint`, the batch as
:class:`lipkit.models.image_inputs.MixedImages`, and the trunk runs on the image rows only. Either way
the captions go through the text tower as usual.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lipkit.data.pairs import PairSource
from lipkit.errors import ConfigError, LipkitError
from lipkit.registry import Registry
from lipkit.utils import package_path

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_TEMPLATES = ("a photo of a {c}.",)
REFERENCE_IMAGES = 4096  # training images whose features place the rows, in full (not cached) training
CAPTIONS = ("each", "first")  # one pair per synonym, or per class (its first name)
# how a class's WordNet hypernyms caption its further pairs: "a photo of a {hypernym}." or
# "a photo of a {name}, a kind of {hypernym}."
HYPERNYM_FORMS = ("name", "kind")

LABEL_SETS: Registry[Callable[[], list[list[str]]]] = Registry("class name set")
# the registered sets whose classes are ImageNet-1k's, in its order (they share WordNet's definitions)
IMAGENET_SETS = ("imagenet-1k", "imagenet-1k-clip", "imagenet-1k-both")


def _timm_label_set(subset: str) -> list[list[str]]:
    """timm's offline descriptions of an ImageNet subset: WordNet lemmas, synonyms comma-separated."""
    from timm.data import ImageNetInfo

    return [split_synonyms(d) for d in ImageNetInfo(subset).label_descriptions()]


def _clip_benchmark_names(dataset: str) -> list[str]:
    path = package_path("clip_benchmark", "datasets/en_classnames.json", "pip install --no-deps clip-benchmark")
    return list(json.loads(path.read_text())[dataset])


@LABEL_SETS.register("imagenet-1k")
def _imagenet_wordnet() -> list[list[str]]:
    return _timm_label_set("imagenet-1k")


@LABEL_SETS.register("imagenet-1k-clip")
def _imagenet_clip() -> list[list[str]]:
    return [[name] for name in _clip_benchmark_names("imagenet1k")]


@LABEL_SETS.register("imagenet-1k-both")
def _imagenet_both() -> list[list[str]]:
    """CLIP's cleaned name first, then the WordNet synonyms it does not repeat."""
    merged = []
    for names, wordnet in zip(_imagenet_clip(), _imagenet_wordnet()):
        for name in wordnet:
            if name.lower() not in {n.lower() for n in names}:
                names.append(name)
        merged.append(names)
    return merged


def imagenet_definitions() -> list[str]:
    """WordNet's definition (gloss) of each ImageNet-1k class, in head-row order, from timm's offline files:
    ``"sweatshirt"`` -> ``"cotton knit pullover with long sleeves worn during athletic activity"``."""
    from timm.data import ImageNetInfo

    detailed = ImageNetInfo("imagenet-1k").label_descriptions(detailed=True)  # "lemmas: definition"
    return [line.split(": ", 1)[1].strip() if ": " in line else "" for line in detailed]


def imagenet_hypernyms() -> list[list[str]]:
    """WordNet's direct hypernyms of each ImageNet-1k class, in head-row order, by their first lemma
    (``"jean"`` -> ``["trouser", "workwear"]``, ``"sweatshirt"`` -> ``["pullover"]``). The synset ids come
    from timm's offline files, the hierarchy from WordNet's (Debian ``wordnet-base``)."""
    from timm.data import ImageNetInfo

    from lipkit.data.wordnet import noun_hypernyms

    info = ImageNetInfo("imagenet-1k")
    return noun_hypernyms([info.index_to_label_name(i) for i in range(info.num_classes())])


def read_hypernyms(spec: str) -> list[list[str]]:
    """The hypernyms of a registered ImageNet class name set (see :func:`imagenet_hypernyms`).

    Raises:
        ConfigError: A set without WordNet synsets (a class name file, or a set not of ImageNet-1k).
        LipkitError: WordNet is not installed.
    """
    if spec not in IMAGENET_SETS:
        raise ConfigError(
            f"hypernyms: class names {spec!r} have no WordNet synsets; hypernyms come with {', '.join(IMAGENET_SETS)}"
        )
    return imagenet_hypernyms()


def check_hypernym_form(form: object, what: str) -> str:
    """``form`` if it is ``""`` (off) or one of :data:`HYPERNYM_FORMS`; ``what`` names the setting.

    Raises:
        ConfigError: Any other value.
    """
    if form is False or form == "":
        return ""
    if form not in HYPERNYM_FORMS:
        raise ConfigError(f"{what} must be one of {', '.join(HYPERNYM_FORMS)} (or empty: off), got {form!r}")
    return str(form)


def read_definitions(spec: str) -> list[str]:
    """The definitions of a registered ImageNet class name set (see :func:`imagenet_definitions`).

    Raises:
        ConfigError: A set without definitions (a class name file, or a set not of ImageNet-1k).
    """
    if spec not in IMAGENET_SETS:
        raise ConfigError(
            f"definitions: class names {spec!r} have none; definitions come with "
            f"{', '.join(IMAGENET_SETS)} (WordNet's, from timm)"
        )
    return imagenet_definitions()


def class_captions(
    classnames: Sequence[Sequence[str]],
    templates: Sequence[str],
    captions: str = "each",
    definitions: Sequence[str] = (),
    hypernyms: Sequence[Sequence[str]] = (),
    hypernym_form: str = "kind",
) -> list[tuple[int, str]]:
    """(class, caption) pairs: every template filled with each of a class's names (``each``) or its first
    (``first``); then, for every class with a definition, every template filled with its first name and
    the definition (``"a photo of a {name}, {definition}."``); then, for each hypernym of a class, every
    template filled with the hypernym (``name``: ``"a photo of a trouser."``) or with the first name and
    the hypernym (``kind``, or any other ``hypernym_form``: ``"a photo of a jean, a kind of trouser."``)."""
    named = [
        (c, t.format(c=name))
        for c, names in enumerate(classnames)
        for name in (names if captions == "each" else names[:1])
        for t in templates
    ]
    return (
        named
        + [
            (c, t.format(c=f"{classnames[c][0]}, {gloss.strip().rstrip('.')}"))
            for c, gloss in enumerate(definitions)
            if gloss.strip()
            for t in templates
        ]
        + [
            (c, t.format(c=h if hypernym_form == "name" else f"{classnames[c][0]}, a kind of {h}"))
            for c, names in enumerate(hypernyms)
            for h in names
            for t in templates
        ]
    )


def split_synonyms(line: str) -> list[str]:
    """``"jean, blue jean, denim"`` -> ``["jean", "blue jean", "denim"]``."""
    return [name.strip() for name in line.split(",") if name.strip()]


def read_classnames(spec: str) -> list[list[str]]:
    """The class names of a head, each with its synonyms, in head-row order.

    Args:
        spec: A registered set (``imagenet-1k``: timm's WordNet lemmas; ``imagenet-1k-clip``: CLIP's
            names from clip-benchmark; ``imagenet-1k-both``), or a text file with one class per line,
            synonyms separated by commas.

    Raises:
        LipkitError: An unknown set or missing file, or a class without a name.
    """
    if spec in LABEL_SETS:
        names = LABEL_SETS.get(spec)()
    else:
        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            if "/" in spec or path.suffix:
                raise LipkitError(f"class name file {spec!r} does not exist")
            LABEL_SETS.get(spec)  # raises, suggesting the closest registered set
        names = [split_synonyms(line) for line in path.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:
            names.pop()
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise LipkitError(f"class names {spec!r}: class {empty[0]} has no name")
    return names


@dataclass(frozen=True)
class Placement:
    """Where a head row goes in feature space: ``norm``, or ``mean+std`` with ``k`` standard deviations."""

    kind: str
    k: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Placement:
        """``"norm"`` or ``"mean+Kstd"`` (``"mean+3std"``, ``"mean+2.5std"``).

        Raises:
            ConfigError: Any other text.
        """
        match = re.fullmatch(r"mean\+(\d+(?:\.\d*)?)std", text.strip())
        if match:
            return cls("mean+std", float(match.group(1)))
        if text.strip() == "norm":
            return cls("norm")
        raise ConfigError(f"prototype placement {text!r}: use norm or mean+Kstd (e.g. mean+3std)")

    def __str__(self) -> str:
        return self.kind if self.kind == "norm" else f"mean+{self.k:g}std"


def place(head: torch.Tensor, features: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Head rows (C, F) placed in the space of ``features`` (N, F), the training images' features.

    ``norm``: ``u_c * mean_i |f_i|``; ``mean+std``: ``mean_i f_i + k * std_i(f_i . u_c) * u_c``, where
    ``u_c`` is row ``c`` scaled to unit length and the standard deviation is the population one.
    """
    import torch.nn.functional as F

    features = features.float()
    unit = F.normalize(head.float(), dim=-1)  # (C, F)
    if placement.kind == "norm":
        return unit * features.norm(dim=-1).mean()
    spread = (features @ unit.T).std(dim=0, correction=0)  # (C,): spread of the features along each row
    return features.mean(dim=0) + placement.k * spread[:, None] * unit


def tower_head(tower: nn.Module) -> torch.Tensor:
    """The classifier rows (C, F) of an image tower.

    Raises:
        LipkitError: The tower has no classifier head (towers trained here, ViTs built from a config...).
    """
    head = getattr(tower, "classifier_head", None)
    if head is None:
        raise LipkitError(
            f"image tower {type(tower).__name__} has no classifier head: prototypes need a pretrained tower "
            "that ships its classifier (a timm tower with its weights file)"
        )
    return head()


@dataclass(frozen=True)
class FeaturePoint:
    """A pair's image side given as a point in the image trunk's feature space (a placed head row)."""

    features: torch.Tensor


class PrototypePairs(PairSource):
    """One pair per class (or per synonym) of a classifier head; the image side is a placed head row.

    Args:
        classnames: Each class's names (synonyms), in head-row order.
        templates: Caption templates with a ``{c}`` placeholder; every template gives a pair.
        captions: ``each`` (a pair per synonym) or ``first`` (only the first name).
        placement: ``norm`` or ``mean+Kstd`` (see :func:`place`).
        label_set: The name of the class names, for the keys.
        definitions: Each class's definition (``""``: none), in head-row order. Every class that has one
            gets a further pair per template, captioned with its first name and the definition
            (``"a photo of a sweatshirt, cotton knit pullover with long sleeves worn during athletic
            activity."``): the text side learns what the name means from words the evaluation's
            class names may share.
        hypernyms: Each class's hypernyms (``[]``: none), in head-row order; each gives a further pair
            per template, captioned as ``hypernym_form`` says (see :func:`class_captions`): the text side
            learns the broader names (trouser, shoe, bag) that the fine-grained classes (jean, running
            shoe, purse) fall under.
        hypernym_form: ``name`` or ``kind`` (:data:`HYPERNYM_FORMS`).

    Raises:
        ConfigError: An unknown ``captions`` choice or placement, a template without ``{c}``, or
            definitions for another number of classes.
    """

    def __init__(
        self,
        classnames: Sequence[Sequence[str]],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        captions: str = "each",
        placement: str = "mean+3std",
        label_set: str = "classes",
        definitions: Sequence[str] | None = None,
        hypernyms: Sequence[Sequence[str]] | None = None,
        hypernym_form: str = "kind",
    ) -> None:
        if captions not in CAPTIONS:
            raise ConfigError(f"prototype captions {captions!r}: use one of {', '.join(CAPTIONS)}")
        bad = [t for t in templates if "{c}" not in t]
        if bad or not templates:
            raise ConfigError(f"prototype templates need a {{c}} placeholder: {bad or 'none given'}")
        self.placement = Placement.parse(placement)
        self.placed: torch.Tensor | None = None  # every pair's image side, once :meth:`place_rows` ran
        self.num_classes = len(classnames)
        self.label_set = label_set
        if definitions is not None and len(definitions) != len(classnames):
            raise ConfigError(
                f"prototype definitions: {len(definitions)} given for {len(classnames)} classes ({label_set!r})"
            )
        if hypernyms is not None and len(hypernyms) != len(classnames):
            raise ConfigError(
                f"prototype hypernyms: {len(hypernyms)} given for {len(classnames)} classes ({label_set!r})"
            )
        form = check_hypernym_form(hypernym_form, "prototype hypernym form")
        self.rows = class_captions(classnames, templates, captions, definitions or (), hypernyms or (), form)

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        c, _ = self.rows[index]
        return f"prototypes/{self.label_set}/{c:05d}/{index}"

    def caption(self, index: int) -> str:
        return self.rows[index][1]

    def image(self, index: int, draft: tuple[int, int] | None = None) -> FeaturePoint:  # type: ignore[override]
        """The pair's placed head row (after :meth:`place_rows`).

        Raises:
            LipkitError: The rows are not placed yet (the source is read outside training).
        """
        if self.placed is None:
            raise LipkitError(
                "prototype pairs have no images (their image side is a point in the tower's feature space): "
                "train on them, and evaluate on other sources"
            )
        return FeaturePoint(self.placed[index])

    def place_rows(self, head: torch.Tensor, reference: torch.Tensor) -> None:
        """Place the head rows by the training features ``reference`` (see :meth:`features`), for :meth:`image`."""
        self.placed = self.features(head, reference)

    def classes(self) -> list[int]:
        """The head row of every pair."""
        return [c for c, _ in self.rows]

    def features(self, head: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Every pair's image side (len, F): its head row placed by the training features ``reference``.

        Raises:
            LipkitError: The head's rows do not match the class names or the features.
        """
        if head.shape[0] != self.num_classes:
            raise LipkitError(
                f"prototypes: the classifier head has {head.shape[0]} classes, the class names "
                f"{self.label_set!r} {self.num_classes}; name the head's classes (options.classnames)"
            )
        if head.shape[1] != reference.shape[-1]:
            raise LipkitError(f"prototypes: head rows are {head.shape[1]}-wide, features {reference.shape[-1]}")
        return place(head, reference, self.placement)[self.classes()]


def open_prototypes(
    split: str = "train",
    classnames: str = "imagenet-1k",
    templates: Sequence[str] | None = None,
    captions: str = "each",
    placement: str = "mean+3std",
    definitions: bool = False,
    hypernyms: str | bool = "",
) -> PrototypePairs:
    """The ``prototypes`` data source (options as :class:`PrototypePairs` and :func:`read_classnames` take;
    ``definitions: true`` adds a pair per class captioned with its WordNet definition, :func:`read_definitions`;
    ``hypernyms: name`` or ``kind`` a pair per WordNet hypernym, :func:`read_hypernyms`).

    Raises:
        LipkitError: A ``val`` or ``test`` split (prototypes are for training), or bad options.
    """
    if split not in ("train", "all"):
        raise LipkitError(f"prototypes:{split}: prototypes have no held-out split; use prototypes (training only)")
    given = [t if "{c}" in t else t.replace("{}", "{c}") for t in templates] if templates else DEFAULT_TEMPLATES
    if not isinstance(definitions, bool):
        raise ConfigError(f"prototype option definitions must be true or false, got {definitions!r}")
    glosses = read_definitions(classnames) if definitions else None
    form = check_hypernym_form(hypernyms, "prototype option hypernyms")
    broader = read_hypernyms(classnames) if form else None
    names = read_classnames(classnames)
    return PrototypePairs(names, given, captions, placement, classnames, glosses, broader, form)


def check_images(sources: Sequence[PairSource], lock_image: bool) -> None:
    """Refuse prototype sources in training through an image trunk that is not locked.

    Raises:
        ConfigError: A prototype source, and the image tower trains.
    """
    if not lock_image and any(isinstance(s, PrototypePairs) for s in sources):
        raise ConfigError(
            "prototype sources need a locked image tower (model_overrides.lock_image=true): the prototypes are "
            "points in the frozen trunk's feature space, which moves when the trunk trains"
        )
