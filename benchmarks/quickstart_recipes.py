"""Recipe variants of the quickstart's LiT run, trained and evaluated side by side.

Each variant is a list of ``key=value`` training overrides on the ``lit-quickstart`` preset, applied
after ``BASE``, which returns the preset to where the study started (one cached view, text tower locked,
256-d; the preset has since taken the winning recipe, ``views4-grey0.5-unlock1-embed512``). Every
variant is trained with the Python API into ``OUT_DIR/NAME`` (a finished run with the same config is
reused, as the quickstart does; the frozen trunk features are cached, so a run takes seconds after
the first) and evaluated with the quickstart's own functions (``zeroshot_result``,
``retrieval_result``) on:

* validation, used to choose: zero-shot Fashion-MNIST and MNIST on fixed subsets of their *train*
  splits (the models never train on them; they are images disjoint from the test sets), and
  retrieval on ``tuxpaint:val`` and ``emoji:val``;
* test, reported only: zero-shot Fashion-MNIST (2,000 test images) and MNIST (test), retrieval on
  ``tuxpaint:test`` and ``emoji:test``, exactly as ``lipkit quickstart`` measures them.

The ``score`` column is the validation criterion: the mean of zero-shot Fashion-MNIST (val) and the
mean of the four validation retrieval R@1 (image->text and text->image, Tux Paint and emoji).

Zero-shot accuracy moves by ~3 points between training seeds, more than most recipe changes, so
compare variants over several seeds (``--seeds 0 1 2 3 4``: one row per run, then the mean and
standard deviation per variant); runs with seed ``s > 0`` are named ``NAME-sS``. Every result is kept
in ``OUT_DIR/results.json``; ``--show`` prints them all.

Both towers are locked, so their trunk outputs do not depend on the variant: the script memoises
them in-process (and in ``OUT_DIR/trunk_memo.pt``), keyed by the trunk weights and the exact input
batch. The numbers are the same as without the memo (``--no-memo`` checks it); only the repeated
trunk forwards are skipped, so evaluating a variant takes ~13 s instead of minutes.

    python benchmarks/quickstart_recipes.py                              # every variant, seed 0
    python benchmarks/quickstart_recipes.py --variants baseline mlp --seeds 0 1 2 3 4
    python benchmarks/quickstart_recipes.py --list                       # names and overrides
    python benchmarks/quickstart_recipes.py --show                       # every result so far

The ``cur-*`` variants (curation) add OpenClipart to ``views4-grey0.5-proto-norm``, raw or through the key
lists of ``lipkit data curate`` under ``--curated`` (``basic``, ``t10``, ``t30``; the commands are in
docs/quickstart_recipes.md). Each source is a feature-cache entry of its own and a key list is cut from
its whole source's cached features, so after ``cur-raw`` the curated variants compute no trunk pass.

The ``occ*`` variants need OpenClipart shards, built once with
``lipkit data builtin openclipart --out-dir /tmp/occ --max-side 256`` (``--occ`` names the folder); the
``emoji-tpl*`` variants write the emoji splits with templated captions as CSV tables under
``--templated-emoji`` on first use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from lipkit.models import DualEncoder, create_model
from lipkit.quickstart import QuickstartConfig, retrieval_result, train_or_reuse, zeroshot_result
from lipkit.train import checkpoint as ckpt
from lipkit.utils import update_digest

PRESET = "lit-quickstart"
MIX = "tuxpaint:train,emoji:train"
OCC = "{occ}/train"  # replaced by --occ
TPL = "{tpl}/train.csv"  # replaced by --templated-emoji
EMOJI_TEMPLATE = "an emoji of {c}."

# Every variant starts from the preset as the study began (heads only on one cached view, text tower
# locked, 256-d, Tux Paint and emoji only); the preset has since taken the winners,
# views4-grey0.5-unlock1-embed512, then proto-norm(-both), then the class bridge, then the hypernyms,
# so these undo them.
BASE = [
    "data.train=tuxpaint:train,emoji:train",
    "feature_views=1",
    "model_overrides.unlock_text_layers=0",
    "model_overrides.preprocess.train_grayscale=0.0",
    "model_overrides.embed_dim=256",
    "model_overrides.class_bridge=",
    "bridge_every=10",
    "model_overrides.preprocess.train_lowres=0.0",
    "model_overrides.preprocess.train_invert=0.0",
    "model_overrides.class_bridge_hypernyms=",
]

# the recipe adopted on 2026-12-01 (the preset's, as overrides on BASE)
ADOPTED = [
    "feature_views=4",
    "model_overrides.preprocess.train_grayscale=0.5",
    "model_overrides.unlock_text_layers=1",
    "model_overrides.embed_dim=512",
]

VIEWS = ["feature_views=4", "model_overrides.preprocess.train_grayscale=0.5"]  # views4-grey0.5


def proto_mix(weight: float, **options: str) -> str:
    """Tux Paint and emoji (in their unweighted 36:64 ratio) with classifier prototypes at ``weight``."""
    rest = 1 - weight
    opts = ", ".join(f"{k}: {v}" for k, v in options.items())
    proto = f"{{source: prototypes, weight: {weight}" + (f", options: {{{opts}}}}}" if opts else "}")
    return f"[tuxpaint:train::{0.36 * rest:.3g}, emoji:train::{0.64 * rest:.3g}, {proto}]"


# the prototypes as the preset mixes them since 2026-12-03 (proto-norm-both)
PROTO_BOTH = f"data.train={proto_mix(0.3, placement='norm', classnames='imagenet-1k-both')}"

# the same with a further pair per class captioned with its WordNet definition
PROTO_DEFS = f"data.train={proto_mix(0.3, placement='norm', classnames='imagenet-1k-both', definitions='true')}"

# the same with a further pair per WordNet hypernym of each class ("a photo of a trouser." for jean; "kind":
# "a photo of a jean, a kind of trouser.")
PROTO_HYP = {
    form: f"data.train={proto_mix(0.3, placement='norm', classnames='imagenet-1k-both', hypernyms=form)}"
    for form in ("name", "kind")
}

# hypernym names and definitions together
PROTO_HYP_DEFS = "data.train=" + proto_mix(
    0.3, placement="norm", classnames="imagenet-1k-both", definitions="true", hypernyms="name"
)

# lipkit's generic zero-shot templates (lipkit.eval.templates, "generic"), as a YAML flow list for the
# prototype captions: six pairs per class name instead of one, none of them Fashion-MNIST's own templates
GENERIC_TEMPLATES = (
    "['a photo of a {c}.', 'a picture of a {c}.', 'an image of a {c}.', 'a close-up photo of a {c}.', "
    "'a photo of the {c}.', 'a drawing of a {c}.']"
)

CURATED = "{cur}"  # replaced by --curated: lipkit data curate outputs (keys.txt) per setting


def occ_mix(occ: str, keys: str | None = None) -> str:
    """The views4-grey0.5-proto-norm mixture with OpenClipart at 0.2 (Tux Paint and emoji 36:64 in 0.5,
    prototypes 0.3): all of its train split, or the pairs a curated key list keeps."""
    entry = f"source: {occ}, weight: 0.2" + (f", keys: {keys}" if keys else "")
    proto = "{source: prototypes, weight: 0.3, options: {placement: norm}}"
    return f"[tuxpaint:train::0.18, emoji:train::0.32, {{{entry}}}, {proto}]"


# name -> overrides on BASE
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    # heads
    "mlp": ["model_overrides.vision.proj=mlp", "model_overrides.text.proj=mlp"],
    "mlp-vision": ["model_overrides.vision.proj=mlp"],
    # length of training
    "steps50": ["steps=50", "checkpoint_every=50", "optim.warmup_steps=10"],
    "steps100": ["steps=100", "checkpoint_every=100"],
    "steps300": ["steps=300", "checkpoint_every=300"],
    # optimiser
    "lr3e-4": ["optim.lr=3e-4"],
    "lr3e-3": ["optim.lr=3e-3"],
    "wd0": ["optim.weight_decay=0.0"],
    "wd0.5": ["optim.weight_decay=0.5"],
    # batch
    "bs128": ["data.batch_size=128"],
    "bs512": ["data.batch_size=512"],
    # mixture weights (unweighted, the train splits are ~37% Tux Paint, ~63% emoji by count)
    "mix-tux0.5": ["data.train=tuxpaint:train::0.5,emoji:train::0.5"],
    "mix-tux0.25": ["data.train=tuxpaint:train::0.25,emoji:train::0.75"],
    # initial temperature (the config's is ln 10; CLIP's is ln(1/0.07))
    "scale-clip": ["model_overrides.init_logit_scale=2.6593"],
    "scale30": ["model_overrides.init_logit_scale=3.4012"],
    "scale5": ["model_overrides.init_logit_scale=1.6094"],
    # OpenClipart added to the mixture (needs --occ)
    "occ": [f"data.train={MIX},{OCC}"],
    "occ-0.3": [f"data.train=tuxpaint:train::0.25,emoji:train::0.45,{OCC}::0.3"],
    "occ-0.5": [f"data.train=tuxpaint:train::0.2,emoji:train::0.3,{OCC}::0.5"],
    "occ-steps600": [f"data.train={MIX},{OCC}", "steps=600", "checkpoint_every=600"],
    "occ-0.3-steps300": [
        f"data.train=tuxpaint:train::0.25,emoji:train::0.45,{OCC}::0.3",
        "steps=300",
        "checkpoint_every=300",
    ],
    # width of the shared space (the config's is 256)
    "embed128": ["model_overrides.embed_dim=128"],
    "embed512": ["model_overrides.embed_dim=512"],
    # SigLIP's sigmoid loss (scale ln 10, bias -10 as in the paper)
    "siglip": ["loss=siglip", "model_overrides.init_logit_bias=-10"],
    # emoji captions wrapped in a template ("an emoji of dog face.") instead of the bare name; the
    # evaluation still uses the bare names of emoji:val / emoji:test, as the quickstart does
    "emoji-tpl": [f"data.train=tuxpaint:train,{TPL}"],
    "emoji-tpl-both": [f"data.train=tuxpaint:train,{TPL},emoji:train"],
    # augmented views of the training images in the feature cache (feature_views), greyscale draws
    "views4": ["feature_views=4"],
    "views4-grey0.5": ["feature_views=4", "model_overrides.preprocess.train_grayscale=0.5"],
    "views8-grey0.5": ["feature_views=8", "model_overrides.preprocess.train_grayscale=0.5"],
    "views4-grey1": ["feature_views=4", "model_overrides.preprocess.train_grayscale=1.0"],
    "views4-grey0.5-crop0.5": [
        "feature_views=4",
        "model_overrides.preprocess.train_grayscale=0.5",
        "model_overrides.preprocess.train_scale=[0.5,1.0]",
    ],
    "views4-grey0.5-steps300": [
        "feature_views=4",
        "model_overrides.preprocess.train_grayscale=0.5",
        "steps=300",
        "checkpoint_every=300",
    ],
    # the top MiniLM layers trained (LiT's partly unlocked text tower), on cached text states
    "unlock1": ["model_overrides.unlock_text_layers=1"],
    "unlock2": ["model_overrides.unlock_text_layers=2"],
    "views4-grey0.5-unlock2": [
        "feature_views=4",
        "model_overrides.preprocess.train_grayscale=0.5",
        "model_overrides.unlock_text_layers=2",
    ],
    "views4-grey0.5-unlock1-embed512": [
        "feature_views=4",
        "model_overrides.preprocess.train_grayscale=0.5",
        "model_overrides.unlock_text_layers=1",
        "model_overrides.embed_dim=512",
    ],
    "views4-grey1-unlock1": [
        "feature_views=4",
        "model_overrides.preprocess.train_grayscale=1.0",
        "model_overrides.unlock_text_layers=1",
    ],
    "views4-grey0.5-unlock1": [
        "feature_views=4",
        "model_overrides.preprocess.train_grayscale=0.5",
        "model_overrides.unlock_text_layers=1",
    ],
    # classifier prototypes (lipkit.data.prototypes) mixed in, on the 2026-12-01 preset
    # (views4-grey0.5-unlock1-embed512): ImageNet head rows of the image tower with "a photo of a {c}."
    "proto-mean3": [*ADOPTED, f"data.train={proto_mix(0.3)}"],
    "proto-norm": [*ADOPTED, f"data.train={proto_mix(0.3, placement='norm')}"],
    "proto-mean3-w0.5": [*ADOPTED, f"data.train={proto_mix(0.5)}"],
    "proto-mean3-first": [*ADOPTED, f"data.train={proto_mix(0.3, captions='first')}"],
    "proto-mean3-both": [*ADOPTED, f"data.train={proto_mix(0.3, classnames='imagenet-1k-both')}"],
    "proto-mean2": [*ADOPTED, f"data.train={proto_mix(0.3, placement='mean+2std')}"],
    # 2026-12-03: more captions per class (lipkit's generic templates) and a larger prototype share
    "proto-norm-tpl6": [*ADOPTED, f"data.train={proto_mix(0.3, placement='norm', templates=GENERIC_TEMPLATES)}"],
    "proto-norm-w0.5": [*ADOPTED, f"data.train={proto_mix(0.5, placement='norm')}"],
    "proto-norm-both": [*ADOPTED, PROTO_BOTH],
    "proto-norm-tpl6-w0.5": [
        *ADOPTED,
        f"data.train={proto_mix(0.5, placement='norm', templates=GENERIC_TEMPLATES)}",
    ],
    # 2026-12-03 (later): a larger share for the adopted proto-norm-both captions
    "proto-norm-both-w0.4": [
        *ADOPTED,
        f"data.train={proto_mix(0.4, placement='norm', classnames='imagenet-1k-both')}",
    ],
    "proto-norm-both-w0.5": [
        *ADOPTED,
        f"data.train={proto_mix(0.5, placement='norm', classnames='imagenet-1k-both')}",
    ],
    # 2026-12-03 (fourth session): the adopted recipe with two text layers unlocked instead of one
    "proto-norm-both-unlock2": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.unlock_text_layers=2",
    ],
    # 2026-12-03 (fifth session): a class bridge (the tower's classifier probabilities weight the text
    # embeddings of its class names, added to each image embedding), with and without the prototypes
    "proto-norm-both-bridge": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
    ],
    "proto-norm-both-bridge50": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
        "bridge_every=50",
    ],
    # 2026-12-03 (sixth session): low-resolution views (a 28-px round trip) beside the grey ones
    "views4-grey0.5-lowres0.3": [*VIEWS, "model_overrides.preprocess.train_lowres=0.3"],
    "proto-norm-both-bridge50-lowres0.3": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
        "bridge_every=50",
        "model_overrides.preprocess.train_lowres=0.3",
    ],
    # 2026-12-03 (seventh session): the prototypes with a further pair per class captioned with its
    # WordNet definition, heads only and on the adopted recipe
    "views4-grey0.5-proto-norm-both": [*VIEWS, PROTO_BOTH],
    "views4-grey0.5-proto-norm-both-defs": [*VIEWS, PROTO_DEFS],
    "proto-norm-both-bridge50-defs": [
        *ADOPTED,
        PROTO_DEFS,
        "model_overrides.class_bridge=imagenet-1k-both",
        "bridge_every=50",
    ],
    # the class bridge's embeddings with each class's definition beside its names
    "proto-norm-both-bridge50-bdefs": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
        "model_overrides.class_bridge_definitions=true",
        "bridge_every=50",
    ],
    # both: the prototypes' definition pairs and the bridge's definitions
    "proto-norm-both-bridge50-defs-bdefs": [
        *ADOPTED,
        PROTO_DEFS,
        "model_overrides.class_bridge=imagenet-1k-both",
        "model_overrides.class_bridge_definitions=true",
        "bridge_every=50",
    ],
    # 2026-12-03 (seventh session): a smaller share of low-resolution views on the adopted recipe
    "proto-norm-both-bridge50-lowres0.1": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
        "bridge_every=50",
        "model_overrides.preprocess.train_lowres=0.1",
    ],
    # 2026-12-03 (eighth session): negated views (Fashion-MNIST's garments and MNIST's digits are light
    # on black: negatives of objects on white, as Tux Paint and emoji are drawn)
    "views4-grey0.5-proto-norm-both-invert0.3": [*VIEWS, PROTO_BOTH, "model_overrides.preprocess.train_invert=0.3"],
    "views4-grey0.5-proto-norm-both-invert0.5": [*VIEWS, PROTO_BOTH, "model_overrides.preprocess.train_invert=0.5"],
    "proto-norm-both-bridge50-invert0.3": [
        *ADOPTED,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
        "bridge_every=50",
        "model_overrides.preprocess.train_invert=0.3",
    ],
    # 2026-12-03 (eighth session): WordNet hypernyms, for the prototypes (hyp-name, hyp-kind) and the
    # class bridge (bhyp-name, bhyp-kind)
    "views4-grey0.5-proto-norm-both-hyp-name": [*VIEWS, PROTO_HYP["name"]],
    "views4-grey0.5-proto-norm-both-hyp-kind": [*VIEWS, PROTO_HYP["kind"]],
    **{
        f"proto-norm-both-bridge50{proto}{bridge}": [
            *ADOPTED,
            PROTO_HYP[proto.removeprefix("-hyp-")] if proto else PROTO_BOTH,
            "model_overrides.class_bridge=imagenet-1k-both",
            "bridge_every=50",
            *([f"model_overrides.class_bridge_hypernyms={bridge.removeprefix('-bhyp-')}"] if bridge else []),
        ]
        for proto in ("", "-hyp-name", "-hyp-kind")
        for bridge in ("", "-bhyp-name", "-bhyp-kind")
        if proto or bridge
    },
    # 2026-12-03 (ninth session): the adopted recipe (hypernym names in the prototypes and the bridge) with
    # the definition pairs in the prototypes (-defs), and in the bridge as well (-defs-bdefs)
    **{
        f"proto-norm-both-bridge50-hyp-name-bhyp-name{defs}": [
            *ADOPTED,
            PROTO_HYP_DEFS,
            "model_overrides.class_bridge=imagenet-1k-both",
            "bridge_every=50",
            "model_overrides.class_bridge_hypernyms=name",
            *(["model_overrides.class_bridge_definitions=true"] if defs == "-defs-bdefs" else []),
        ]
        for defs in ("-defs", "-defs-bdefs")
    },
    "views4-grey0.5-bridge": [*VIEWS, "model_overrides.class_bridge=imagenet-1k-both"],
    "views4-grey0.5-proto-norm-bridge": [
        *VIEWS,
        PROTO_BOTH,
        "model_overrides.class_bridge=imagenet-1k-both",
    ],
    # the same on views4-grey0.5 (heads only, 256-d): training takes seconds instead of minutes
    "views4-grey0.5-proto-mean3": [*VIEWS, f"data.train={proto_mix(0.3)}"],
    "views4-grey0.5-proto-norm": [*VIEWS, f"data.train={proto_mix(0.3, placement='norm')}"],
    "views4-grey0.5-proto-mean3-first": [*VIEWS, f"data.train={proto_mix(0.3, captions='first')}"],
    "views4-grey0.5-proto-mean3-w0.5": [*VIEWS, f"data.train={proto_mix(0.5)}"],
    # curation (issue 15): OpenClipart raw or curated by lipkit data curate, on views4-grey0.5-proto-norm
    "cur-raw": [*VIEWS, f"data.train={occ_mix(OCC)}"],
    "cur-basic": [*VIEWS, f"data.train={occ_mix(OCC, CURATED + '/basic/keys.txt')}"],
    "cur-t10": [*VIEWS, f"data.train={occ_mix(OCC, CURATED + '/t10/keys.txt')}"],
    "cur-t30": [*VIEWS, f"data.train={occ_mix(OCC, CURATED + '/t30/keys.txt')}"],
    # combinations of the single changes that scored best on validation
    "mlpv-lr3e-3": ["model_overrides.vision.proj=mlp", "optim.lr=3e-3"],
    "scale30-mix": ["model_overrides.init_logit_scale=3.4012", "data.train=tuxpaint:train::0.5,emoji:train::0.5"],
    "scale30-lr3e-3": ["model_overrides.init_logit_scale=3.4012", "optim.lr=3e-3"],
    "scale30-mlpv-mix": [
        "model_overrides.init_logit_scale=3.4012",
        "model_overrides.vision.proj=mlp",
        "data.train=tuxpaint:train::0.5,emoji:train::0.5",
    ],
}

VAL_ZEROSHOT = ("fashion-mnist:train", "mnist:train")
TEST_ZEROSHOT = ("fashion-mnist:test", "mnist:test")
VAL_RETRIEVAL = ("tuxpaint:val", "emoji:val")
TEST_RETRIEVAL = ("tuxpaint:test", "emoji:test")


class TrunkMemo:
    """Memoised outputs of the locked trunks, keyed by the trunk weights and the exact input batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table: dict[str, torch.Tensor] = torch.load(path, weights_only=True) if path.is_file() else {}
        self.added = 0

    def wrap(self, model: DualEncoder) -> None:
        for tower in (model.visual, model.text):
            h = hashlib.sha256()
            update_digest(h, tower, skip_prefix="proj.")
            tower.features = self._memoised(tower.features, h.hexdigest()[:16])

    def _memoised(self, features: Callable[[Any], torch.Tensor], trunk: str) -> Callable:
        def call(x: Any) -> torch.Tensor:  # images, token ids, or a record of tensors (Hugging Face tokens)
            parts = [getattr(x, f.name) for f in fields(x)] if is_dataclass(x) else [x]
            parts = [t for t in parts if t is not None]
            key = hashlib.sha256(trunk.encode())
            for part in parts:
                data = part.detach().cpu().contiguous()
                key.update(f"|{data.dtype}|{tuple(data.shape)}".encode())
                key.update(data.numpy().tobytes())
            key = key.hexdigest()
            if key not in self.table:
                self.table[key] = features(x).detach().cpu()
                self.added += 1
            return self.table[key].to(parts[0].device)

        return call

    def save(self) -> None:
        if self.added:
            tmp = self.path.with_suffix(".tmp")
            torch.save(self.table, tmp)
            tmp.replace(self.path)
            self.added = 0


def overrides_of(name: str, occ: str, tpl: str, cur: str = "/tmp/occ-curated") -> list[str]:
    """The run's overrides: :data:`BASE` (the study's fixed starting point), then the variant's."""
    return [o.replace("{occ}", occ).replace("{tpl}", tpl).replace("{cur}", cur) for o in [*BASE, *VARIANTS[name]]]


def build_templated_emoji(out: Path, template: str = EMOJI_TEMPLATE) -> None:
    """``OUT/{train,val,test}.csv``: the emoji splits as PNG files, captioned ``template`` with the name."""
    import csv

    from lipkit.data.corpora import EmojiPairs

    (out / "img").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        if (out / f"{split}.csv").is_file():
            continue
        source = EmojiPairs(split)
        rows = []
        for i in range(len(source)):
            path = out / "img" / f"{source.key(i).replace('/', '_')}.png"
            if not path.is_file():
                source.image(i).save(path)
            rows.append((path.relative_to(out).as_posix(), template.format(c=source.caption(i))))
        tmp = out / f"{split}.csv.tmp"
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([("image", "caption"), *rows])
        tmp.replace(out / f"{split}.csv")


def evaluate(model: DualEncoder, val_images: int, device: torch.device) -> dict[str, float]:
    """Zero-shot top-1 and retrieval R@1 (both directions) on the validation and test sets."""
    test_cfg = QuickstartConfig(max_eval_images=2000, examples=0)
    val_cfg = QuickstartConfig(max_eval_images=val_images, examples=0)
    row: dict[str, float] = {}
    for split, cfg, zeroshot, retrieval in (
        ("val", val_cfg, VAL_ZEROSHOT, VAL_RETRIEVAL),
        ("test", test_cfg, TEST_ZEROSHOT, TEST_RETRIEVAL),
    ):
        for spec in zeroshot:
            row[f"{split} {spec.split(':')[0]}"] = zeroshot_result(model, spec, cfg, device)["values"]["top1"]
        for spec in retrieval:
            values = retrieval_result(model, spec, cfg, device)["values"]
            name = spec.split(":")[0]
            row[f"{split} {name} i2t"] = values["image_to_text_R@1"]
            row[f"{split} {name} t2i"] = values["text_to_image_R@1"]
    val_r1 = [row[f"val {n.split(':')[0]} {d}"] for n in VAL_RETRIEVAL for d in ("i2t", "t2i")]
    row["val score"] = (row["val fashion-mnist"] + sum(val_r1) / len(val_r1)) / 2
    return row


COLUMNS = (
    ("val fashion-mnist", "vFM"),
    ("val mnist", "vMN"),
    ("val tuxpaint i2t", "vTux i2t"),
    ("val tuxpaint t2i", "vTux t2i"),
    ("val emoji i2t", "vEmo i2t"),
    ("val emoji t2i", "vEmo t2i"),
    ("val score", "score"),
    ("test fashion-mnist", "FM"),
    ("test mnist", "MN"),
    ("test tuxpaint i2t", "Tux i2t"),
    ("test tuxpaint t2i", "Tux t2i"),
    ("test emoji i2t", "Emo i2t"),
    ("test emoji t2i", "Emo t2i"),
)


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    if not rows:
        print("no results yet")
        return
    width = max(len("variant"), *(len(n) for n in rows))
    sd = any("val score sd" in row for row in rows.values())
    extra = "  score sd  FM sd" if sd else ""
    print("\n" + f"{'variant':<{width}}  " + "  ".join(f"{h:>8}" for _, h in COLUMNS) + f"   train s  eval s{extra}")
    for name, row in rows.items():
        cells = "  ".join(f"{row[k]:>8.1f}" for k, _ in COLUMNS)
        tail = f"  {row['val score sd']:>8.1f}  {row['test fashion-mnist sd']:>5.1f}" if sd else ""
        print(f"{name:<{width}}  {cells}  {row['train_s']:>8.1f}  {row['eval_s']:>6.1f}{tail}")
    print(
        "\nval: zero-shot on 'fashion-mnist:train' / 'mnist:train' subsets, R@1 on tuxpaint:val / emoji:val; "
        "score = (vFM + mean of the 4 val R@1) / 2.\ntest: zero-shot on fashion-mnist:test (2,000) / mnist:test, "
        "R@1 on tuxpaint:test / emoji:test (the quickstart's measures)."
    )


def mean_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of every number over rows (seeds of one variant); ``KEY sd`` holds the standard deviation."""
    keys = [k for k, _ in COLUMNS] + ["train_s", "eval_s"]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    if len(rows) > 1:
        out |= {f"{k} sd": torch.tensor([r[k] for r in rows]).std().item() for k in keys}
    return out


def print_means(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Print (and return) the mean over seeds of every variant run with more than one seed."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for name, row in rows.items():
        by_variant.setdefault(row.get("variant", name), []).append(row)
    means = {f"{n} (mean of {len(r)})": mean_row(r) for n, r in by_variant.items() if len(r) > 1}
    if means:
        print("\nmean over seeds (sd: standard deviation over seeds)")
        print_table(means)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME", help="default: all")
    parser.add_argument("--out-dir", default="/tmp/lipkit_recipes", help="scratch folder for the runs")
    parser.add_argument("--occ", default="/tmp/occ", help="OpenClipart shards folder (lipkit data builtin)")
    parser.add_argument(
        "--curated", default="/tmp/occ-curated", help="lipkit data curate outputs for the cur-* variants"
    )
    parser.add_argument(
        "--templated-emoji", default="/tmp/emoji_templated", help="where the emoji-tpl variants' tables are built"
    )
    parser.add_argument("--val-images", type=int, default=1000, help="images per zero-shot validation subset")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (data order, initialisation); default 0"
    )
    parser.add_argument("--no-memo", action="store_true", help="run the trunks for every variant (to check the memo)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--show", action="store_true", help="print the table of every result in OUT_DIR and exit")
    args = parser.parse_args()
    if args.list:
        for name in VARIANTS:
            overrides = overrides_of(name, args.occ, args.templated_emoji, args.curated)
            print(f"{name:<14} {' '.join(overrides) or '(the preset)'}")
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out_dir = Path(args.out_dir)
    results_path = out_dir / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.show:
        print_table(saved)
        print_means(saved)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    device = torch.device("cpu")
    memo = TrunkMemo(out_dir / "trunk_memo.pt")
    rows: dict[str, dict[str, Any]] = {}
    for name, seed in [(n, s) for n in args.variants for s in args.seeds]:
        overrides = [
            f"seed={seed}",
            "progress=false",
            "tensorboard=false",
            *overrides_of(name, args.occ, args.templated_emoji, args.curated),
        ]
        run = name if seed == 0 else f"{name}-s{seed}"
        if any(args.occ in o for o in overrides) and not Path(args.occ, "train").is_dir():
            raise SystemExit(
                f"{name}: no shards in {args.occ}/train; build them with `lipkit data builtin openclipart`"
            )
        if any(args.templated_emoji in o for o in overrides):
            build_templated_emoji(Path(args.templated_emoji))
        start = time.perf_counter()
        weights = train_or_reuse(run, PRESET, out_dir, overrides)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        model = create_model(ckpt.recorded_model_config(weights), pretrained=str(weights), device=device)
        if not args.no_memo:
            memo.wrap(model)
        row = evaluate(model, args.val_images, device)
        memo.save()
        row |= {
            "train_s": train_s,
            "eval_s": time.perf_counter() - start,
            "overrides": overrides_of(name, args.occ, args.templated_emoji, args.curated),
        }
        rows[run] = saved[run] = row | {"variant": name, "seed": seed}
        print(f"{run}: val score {row['val score']:.1f} (train {train_s:.0f} s, eval {row['eval_s']:.0f} s)")
        results_path.write_text(json.dumps(saved, indent=2) + "\n")
    print_table(rows)
    if len(args.seeds) > 1:
        rows = print_means(rows)
    best = max(rows, key=lambda n: rows[n]["val score"])
    print(f"\nbest on validation (score): {best}")
    print(f"all results: {results_path}")


if __name__ == "__main__":
    main()
