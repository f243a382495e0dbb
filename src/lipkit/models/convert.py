"""Checkpoint conversion: load lipkit, OpenCLIP and OpenAI weights into a dual encoder, export to OpenCLIP.

lipkit names its modules differently from OpenCLIP (``visual.patch_embed`` vs ``visual.conv1``,
``attn.qkv`` vs ``attn.in_proj_weight``...). The mapping is a table of rename rules, each a pair
``(OpenCLIP name, lipkit name)`` used in either direction, plus the few tensors stored in another
layout (OpenCLIP applies some projections as ``x @ proj``, lipkit as ``nn.Linear``).

Supported files (nothing is downloaded):

- lipkit: a training checkpoint ``{"model": state_dict, ...}`` or a bare state dict;
- OpenCLIP: ``torch.save(model.state_dict())``, or a training checkpoint ``{"state_dict": ...}``
  (``module.`` and ``_orig_mod.`` prefixes are stripped), or a ``.safetensors`` file; the image tower
  is OpenCLIP's own ViT, timm's ViT with attention pooling (``visual.trunk.*``, SigLIP), any other timm
  model (ConvNeXt, EVA, FastViT, ViTamin, Swin..., under lipkit's timm tower) or OpenAI's modified ResNet;
- OpenAI: the original TorchScript archives (``ViT-B-32.pt``, ``RN50.pt``...), whose names follow OpenCLIP's.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lipkit.errors import CheckpointError, LipkitError
from lipkit.models.clip import DualEncoder
from lipkit.utils import atomic_write

Rule = tuple[str, str]
"""``(OpenCLIP name, lipkit name)``: literal key fragments; ``^`` anchors one at a key's start, ``$`` at its end."""

VISION_RULES: list[Rule] = [  # OpenCLIP's own ViT (CLIP, OpenAI)
    ("^visual.conv1.", "^visual.patch_embed."),
    ("^visual.class_embedding$", "^visual.cls_token$"),
    ("^visual.positional_embedding$", "^visual.pos_embed$"),
    ("^visual.ln_pre.", "^visual.norm_pre."),
    ("^visual.transformer.resblocks.", "^visual.transformer.blocks."),
    ("^visual.ln_post.", "^visual.norm."),
    ("^visual.proj$", "^visual.proj.weight$"),  # transposed, see RESHAPES
    ("^visual.attn_pool.ln_q.", "^visual.query_pool.norm_q."),  # CoCa's pooler (nn.MultiheadAttention inside)
    ("^visual.attn_pool.ln_k.", "^visual.query_pool.norm_kv."),
    ("^visual.attn_pool.", "^visual.query_pool."),
]

TIMM_VISION_RULES: list[Rule] = [  # a timm ViT trunk (SigLIP); block internals already use lipkit's names
    ("^visual.trunk.patch_embed.proj.", "^visual.patch_embed."),
    ("^visual.trunk.pos_embed$", "^visual.pos_embed$"),  # (1, N, D) <-> (N, D), see RESHAPES
    ("^visual.trunk.norm_pre.", "^visual.norm_pre."),
    ("^visual.trunk.blocks.", "^visual.transformer.blocks."),
    ("^visual.trunk.norm.", "^visual.norm."),
    ("^visual.trunk.attn_pool.", "^visual.attn_pool."),
    ("^visual.head.proj.", "^visual.proj."),
]

RESNET_RULES: list[Rule] = [  # OpenAI's modified ResNet (RN50...)
    ("^visual.conv", "^visual.stem.conv"),
    ("^visual.bn", "^visual.stem.bn"),
    *((f"^visual.layer{i + 1}.", f"^visual.stages.{i}.") for i in range(4)),
    ("^visual.attnpool.positional_embedding$", "^visual.attn_pool.pos_embed$"),
    ("^visual.attnpool.q_proj.", "^visual.attn_pool.q."),
    ("^visual.attnpool.k_proj.", "^visual.attn_pool.k."),
    ("^visual.attnpool.v_proj.", "^visual.attn_pool.v."),
    ("^visual.attnpool.c_proj.", "^visual.proj."),  # the pool's output projection is the tower's head
]

TIMM_MODEL_RULES: list[Rule] = [  # any timm trunk under lipkit's TimmTower: ``visual.trunk.*`` keeps timm's names
    ("^visual.head.mlp.fc1.", "^visual.proj.fc1."),  # OpenCLIP's MLP head, lipkit's Mlp
    ("^visual.head.mlp.fc2.", "^visual.proj.fc2."),
    ("^visual.head.proj.", "^visual.proj."),
]

VISION_LAYOUTS: dict[str, list[Rule]] = {
    "openclip": VISION_RULES,
    "timm": TIMM_VISION_RULES,
    "resnet": RESNET_RULES,
    "timm-model": TIMM_MODEL_RULES,
}
"""Rules by the ``openclip_layout`` of an image tower's config; export writes that layout."""

TEXT_RULES: list[Rule] = [  # CLIP keeps these at the top level; CustomTextCLIP (SigLIP) nests them under ``text.``
    ("^token_embedding.", "^text.token_embed."),
    ("^positional_embedding$", "^text.pos_embed$"),
    ("^transformer.resblocks.", "^text.transformer.blocks."),
    ("^ln_final.", "^text.norm."),
    ("^cls_emb$", "^text.cls_emb$"),  # CoCa's class token after the text
]
TEXT_PROJ_PARAM: Rule = ("^text_projection$", "^text.proj.weight$")  # a [width, embed] Parameter, transposed
TEXT_PROJ_LINEAR: Rule = ("^text_projection.", "^text.proj.")  # an nn.Linear (OpenCLIP with proj_bias)

DECODER_RULES: list[Rule] = [  # CoCa's multimodal decoder
    ("^text_decoder.resblocks.", "^decoder.blocks."),
    ("^text_decoder.cross_attn.", "^decoder.cross."),
    ("^text_decoder.ln_final.", "^decoder.norm."),
    ("^text_decoder.text_projection$", "^decoder.head.weight$"),  # transposed, see RESHAPES
]

BLOCK_RULES: list[Rule] = [  # inside OpenCLIP's ``resblocks``
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".attn.in_proj_weight$", ".attn.qkv.weight$"),
    (".attn.in_proj_bias$", ".attn.qkv.bias$"),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    (".ls_1.gamma$", ".ls1.gamma$"),
    (".ls_2.gamma$", ".ls2.gamma$"),
]

RESNET_BLOCK_RULES: list[Rule] = [  # inside a bottleneck's projection shortcut (``-1`` is its parameter-free pool)
    (".downsample.0.", ".shortcut.conv."),
    (".downsample.1.", ".shortcut.bn."),
]

CROSS_BLOCK_RULES: list[Rule] = [(".ln_1_kv.", ".norm_kv."), *BLOCK_RULES]  # CoCa's cross-attention blocks

INNER_RULES: list[tuple[str, str, list[Rule]]] = [
    # (marker in an OpenCLIP key, marker in a key with OpenCLIP's outer and lipkit's inner names, rules)
    (".resblocks.", ".resblocks.", BLOCK_RULES),
    (".cross_attn.", ".cross_attn.", CROSS_BLOCK_RULES),
    (".downsample.", ".shortcut.", RESNET_BLOCK_RULES),
]

HF_TEXT_RULES: list[Rule] = [  # OpenCLIP's Hugging Face text towers (under ``text.``): the model, then the head
    ("^transformer.", "^text.encoder."),
    ("^proj.0.", "^text.proj.fc1."),  # OpenCLIP's MLP head is a Sequential (linear, GELU, linear)
    ("^proj.2.", "^text.proj.fc2."),
    ("^proj.", "^text.proj."),
]

TEXT_IMPORT_RULES: list[Rule] = [*TEXT_RULES, TEXT_PROJ_PARAM, TEXT_PROJ_LINEAR]


def _transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


RESHAPES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    # OpenCLIP name (text keys without ``text.``): (to lipkit, to OpenCLIP)
    "visual.proj": (_transpose, _transpose),
    "text_projection": (_transpose, _transpose),
    "text_decoder.text_projection": (_transpose, _transpose),
    "visual.trunk.pos_embed": (lambda t: t[0], lambda t: t[None]),
}

DROPPED = frozenset({"attn_mask", "input_resolution", "context_length", "vocab_size"})
"""Entries lipkit has no use for: OpenCLIP's causal mask buffer, the OpenAI archives' metadata."""

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@cache
def _compile(fragment: str) -> re.Pattern[str]:
    start, end = fragment.startswith("^"), fragment.endswith("$")
    return re.compile(("^" if start else "") + re.escape(fragment.strip("^$")) + ("$" if end else ""))


def _rename(key: str, rules: Iterable[Rule], reverse: bool = False) -> str | None:
    """Apply the first rule whose source fragment occurs in ``key``; ``None`` when none does."""
    for openclip, lipkit in rules:
        source, target = (lipkit, openclip) if reverse else (openclip, lipkit)
        new, found = _compile(source).subn(target.strip("^$"), key, count=1)
        if found:
            return new
    return None


def import_rules(layout: str = "", text_layout: str = "") -> list[Rule]:
    """The rename rules that read OpenCLIP checkpoints into a model whose image tower has ``layout``.

    A ViT reads either ViT layout (OpenCLIP's own or timm's); ``resnet`` reads OpenAI's ResNet names,
    ``timm-model`` OpenCLIP's timm towers (a trunk under timm's names and a projection head). A text
    tower with ``text_layout`` ``hf`` reads OpenCLIP's Hugging Face towers, any other CLIP's text transformer.
    """
    text = HF_TEXT_RULES if text_layout == "hf" else TEXT_IMPORT_RULES
    if layout in ("resnet", "timm-model"):
        return [*VISION_LAYOUTS[layout], *text, *DECODER_RULES]
    return [*VISION_RULES, *TIMM_VISION_RULES, *text, *DECODER_RULES]


def _inner_rename(key: str, marked: str, reverse: bool) -> str:
    for openclip_marker, export_marker, rules in INNER_RULES:
        if (export_marker if reverse else openclip_marker) in marked:
            return _rename(key, rules, reverse=reverse) or key
    return key


def openclip_to_lipkit(
    state: dict[str, Tensor], layout: str = "", text_layout: str = "", extra_rules: Iterable[Rule] = ()
) -> dict[str, Tensor]:
    """Convert an OpenCLIP (or OpenAI) state dict to lipkit's names and layouts.

    Keys no rule knows (``logit_scale``, ``logit_bias``, anything foreign) are kept as they are, so a
    strict load reports the foreign ones.

    Args:
        state: OpenCLIP state dict, without ``module.`` prefixes.
        layout: The ``openclip_layout`` of the receiving image tower (``resnet`` for OpenAI's ResNets;
            any ViT layout, or none, reads both ViT layouts).
        text_layout: The ``openclip_layout`` of the receiving text tower (``hf`` for a Hugging Face tower).
        extra_rules: Rules of the receiving model's own, tried first (:func:`tower_rules`).

    Returns:
        The state dict with lipkit's key names.
    """
    rules = [*extra_rules, *import_rules(layout, text_layout)]
    out = {}
    for key, tensor in state.items():
        if key.rsplit(".", 1)[-1] in DROPPED:
            continue
        name = key.removeprefix("text.")  # CustomTextCLIP nests the text tower
        new = _rename(name, rules)
        if new is None:
            out[key] = tensor
            continue
        new = _inner_rename(new, name, reverse=False)
        out[new] = RESHAPES[name][0](tensor) if name in RESHAPES else tensor
    return out


def lipkit_to_openclip(
    state: dict[str, Tensor],
    layout: str | None = None,
    custom_text: bool | None = None,
    text_layout: str = "",
    extra_rules: Iterable[Rule] = (),
) -> dict[str, Tensor]:
    """Convert a lipkit state dict to OpenCLIP's names and layouts.

    The text projection is an ``nn.Linear`` in OpenCLIP when it has a bias, else a transposed Parameter.

    Args:
        state: lipkit state dict.
        layout: The image tower's OpenCLIP layout (``openclip``, ``timm`` or ``resnet``, see
            :data:`VISION_LAYOUTS`); by default ``timm`` for an attention-pooled ViT, else ``openclip``.
        custom_text: Nest the text tower under ``text.`` (OpenCLIP's ``CustomTextCLIP``); by default
            when the layout is ``timm``, and always for a Hugging Face text tower.
        text_layout: The text tower's OpenCLIP layout: ``hf`` for a Hugging Face tower, else CLIP's.
        extra_rules: Rules of the model's own, tried first (:func:`tower_rules`).

    Returns:
        The state dict with OpenCLIP's key names, loadable by the matching ``open_clip`` model. Features
        OpenCLIP cannot express (e.g. a bias in a ViT's image projection) keep their lipkit names.
    """
    if layout is None:
        layout = "timm" if "visual.attn_pool.latent" in state else "openclip"
    if custom_text is None:
        custom_text = layout == "timm"
    custom_text = custom_text or text_layout == "hf"  # OpenCLIP always nests a Hugging Face tower
    text_proj = TEXT_PROJ_LINEAR if "text.proj.bias" in state else TEXT_PROJ_PARAM
    text_rules = HF_TEXT_RULES if text_layout == "hf" else [*TEXT_RULES, text_proj]
    rules = [*extra_rules, *VISION_LAYOUTS[layout], *text_rules, *DECODER_RULES]
    out = {}
    for key, tensor in state.items():
        renamed = _rename(key, rules, reverse=True)
        name = _inner_rename(renamed or key, renamed or key, reverse=True)
        if renamed is not None and name in RESHAPES:  # a key kept as it is keeps its layout (timm trunks)
            tensor = RESHAPES[name][1](tensor)
        if custom_text and key.startswith("text."):
            name = f"text.{name}"
        out[name] = tensor
    return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the model weights in a checkpoint file, whatever its format, without converting names.

    Args:
        path: A lipkit or OpenCLIP checkpoint or state dict, a ``.safetensors`` file or an OpenAI
            TorchScript archive.

    Returns:
        The state dict, with ``module.``/``_orig_mod.`` prefixes stripped.

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _unwrap(_load_file(path), path)


def _load_file(path: Path) -> Any:
    if _is_torchscript(path):  # what torch.load(weights_only=True) refuses, by the same test torch uses
        return _load_torchscript(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot read {path} safely: it holds Python objects besides tensors that torch.load(weights_only=True) "
            "refuses; save the state dict alone (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as exc:  # any unreadable file is a user-facing error
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        raise CheckpointError(
            f"cannot read {path} as a checkpoint ({reason}); expected a file written by torch.save or "
            "safetensors, or an OpenAI TorchScript archive"
        ) from None


def numpy_array_globals() -> list[Any]:
    """The NumPy types a pickled array refers to (older lipkit checkpoints hold NumPy's RNG key), safe to unpickle."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding ``constants.pkl`` and compiled ``code/``."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _load_torchscript(path: Path) -> dict[str, Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are TorchScript
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as exc:
        raise CheckpointError(f"cannot read TorchScript archive {path}: {exc}") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside a training checkpoint (``model`` for lipkit, ``state_dict`` for OpenCLIP)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no model weights: expected a state dict, a lipkit checkpoint with a 'model' entry "
            "or an OpenCLIP checkpoint with a 'state_dict' entry"
        )
    return {_strip_wrappers(key): tensor for key, tensor in obj.items()}


def _strip_wrappers(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_pretrained(model: DualEncoder, path: str | Path) -> None:
    """Load weights from ``path`` into ``model`` strictly, converting OpenCLIP/OpenAI names.

    The names are converted when OpenCLIP's reading matches more of the model's keys than the names as
    they are (so a lipkit checkpoint of a timm tower, whose ``visual.trunk.*`` keys look like OpenCLIP's
    SigLIP trunk, loads unchanged).

    Args:
        model: The model; its config must match the checkpoint's architecture.
        path: A lipkit checkpoint or state dict, an OpenCLIP state dict or training checkpoint, a
            ``.safetensors`` file, or an OpenAI TorchScript archive.

    Raises:
        CheckpointError: The file is missing or unreadable, or its weights do not fit the model (the
            message lists missing, unexpected and mis-shaped keys).
    """
    expected = model.state_dict()
    state = read_state_dict(path)
    converted = openclip_to_lipkit(state, *layouts(model), extra_rules=tower_rules(model))
    from_openclip = _overlap(converted, expected) > _overlap(state, expected)
    note = " (OpenCLIP names, converted)" if from_openclip else ""
    state = converted if from_openclip else state
    check_fit(expected, state, f"{path}{note} does not fit the model")
    model.load_state_dict(state, strict=True)


def layouts(model: DualEncoder) -> tuple[str, str]:
    """The OpenCLIP key layouts of ``model``'s image and text towers (``""`` where the tower has none of its own)."""
    return (
        getattr(model.cfg.vision_config(), "openclip_layout", ""),
        getattr(model.cfg.text_config(), "openclip_layout", ""),
    )


def tower_rules(model: DualEncoder) -> list[Rule]:
    """Renames that depend on the image tower itself, not only its layout (where a timm model keeps the
    classifier that serves as the projection)."""
    rules = getattr(model.visual, "openclip_rules", None)
    return list(rules()) if rules else []


def _overlap(state: dict[str, Tensor], expected: dict[str, Tensor]) -> int:
    return len(state.keys() & expected.keys())


def check_fit(expected: dict[str, Tensor], state: dict[str, Tensor], title: str) -> None:
    """Raise if ``state`` does not have exactly the keys and shapes of ``expected``.

    Args:
        expected: The model's state dict (only names and shapes are used).
        state: The weights to load.
        title: First line of the error message.

    Raises:
        CheckpointError: Listing missing, unexpected and mis-shaped keys.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        _listing(what, keys)
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError("\n".join([f"{title}:", *problems]))


def _listing(what: str, items: list[str], limit: int = 10) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {len(items)} {what}:\n" + "\n".join(f"    {item}" for item in items[:limit]) + more


def export_openclip(model: DualEncoder, path: str | Path) -> None:
    """Write ``model``'s weights as an OpenCLIP state dict (atomically), loadable by ``open_clip``.

    Args:
        model: The model to export.
        path: Destination file (``torch.save`` format).

    Raises:
        LipkitError: The model has a class bridge (``class_bridge``), which OpenCLIP cannot hold.
    """
    if getattr(model, "bridge_text", None) is not None:
        raise LipkitError(
            "this model has a class bridge (class_bridge): OpenCLIP has no such part, and its image "
            "embeddings would differ; use the lipkit checkpoint"
        )
    layout, text_layout = layouts(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = lipkit_to_openclip(
        state, layout or None, model.cfg.custom_text, text_layout, extra_rules=tower_rules(model)
    )
    atomic_write(Path(path), lambda f: torch.save(state, f))
