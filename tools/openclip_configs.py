"""Translate OpenCLIP's model configs into lipkit's schema: ``src/lipkit/models/configs/openclip/<name>.json``.

Also writes OpenCLIP's pretrained tags (which weights file each ``(name, tag)`` pair names, on the Hugging
Face hub, and the preprocessing they were trained with) to ``src/lipkit/models/openclip_pretrained.json``.

One file per name in OpenCLIP's list. A config whose towers lipkit can build becomes a lipkit model config
(see ``lipkit.models.config.ModelConfig``); any other becomes ``{"family": ..., "unsupported": reason}``, so
``lipkit.create_model(name)`` knows the name and says what it lacks. The family is read from the config's
structure (its towers, the timm module that defines a timm trunk, the tokenizer it names).

Needs ``open_clip`` and ``timm`` installed (test dependencies); lipkit itself never imports them.

Usage::

    python tools/openclip_configs.py            # rewrite the folder
    python tools/openclip_configs.py --check    # exit 1 if a committed file differs from a fresh translation
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "lipkit" / "models" / "configs" / "openclip"
PRETRAINED_FILE = OUT_DIR.parents[1] / "openclip_pretrained.json"  # src/lipkit/models/
PRETRAINED_KEYS = ("hf_hub", "url", "mean", "std", "interpolation", "resize_mode", "quick_gelu")

# OpenCLIP config keys that only matter for training or for loading pretrained weights from the hub
IGNORED_VISION = {"timm_model_pretrained", "timm_drop", "timm_drop_path", "patch_dropout", "output_tokens"}
OPENCLIP_VIT_KEYS = {
    "image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "ls_init_value", "no_ln_pre",
    "pool_type", "final_ln_after_pool", "act_kwargs", "norm_kwargs", "attentional_pool", "attn_pooler_heads",
    "attn_pooler_queries",
}  # fmt: skip
TIMM_KEYS = {"image_size", "timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias"}
TEXT_KEYS = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "no_causal_mask", "pool_type",
    "eos_id", "pad_id", "proj_bias", "proj_type", "act_kwargs", "norm_kwargs", "hf_tokenizer_name", "tokenizer_kwargs",
    "embed_cls", "correct_cls_mask", "output_tokens",
}  # fmt: skip
TEXT_POOLS = {"argmax": "eot", "eos": "eos", "last": "last", "first": "first"}
HF_TEXT_KEYS = {
    "hf_model_name", "hf_tokenizer_name", "hf_proj_type", "hf_pooler_type", "context_length", "tokenizer_kwargs",
    "output_tokens", "width",
}  # fmt: skip
# CoCa's decoder settings OpenCLIP reads (its mlp_ratio, n_queries and attn_pooler_heads are never used: the
# decoder's MLP is 4x wide, and the image pooler's settings come from vision_cfg)
DECODER_KEYS = {"width", "layers", "heads", "context_length", "ls_init_value", "vocab_size", "mlp_ratio",
                "dim_head", "n_queries", "attn_pooler_heads"}  # fmt: skip
HF_POOLS = {"mean_pooler": "mean", "cls_pooler": "cls", "cls_last_hidden_state_pooler": "cls"}
# The configs of OpenCLIP's Hugging Face text towers, shipped with lipkit, one folder per model, named as
# the last part of its hub name (``google/mt5-base`` -> ``mt5-base``)
HF_CONFIG_DIR = OUT_DIR.parent / "hf"
VIT_POOLS = {"tok": "cls", "avg": "mean"}

# timm ViT arguments (model_args of a timm entrypoint) that lipkit's ViT expresses
TIMM_VIT_ARGS = {
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token", "global_pool", "img_size",
    "act_layer", "qkv_bias", "init_values", "fc_norm", "pre_norm",
}  # fmt: skip
TIMM_ACTS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}
TIMM_POOLS = {("map", False): "map", ("avg", False): "mean", ("avg", True): "mean", ("token", True): "cls"}

# What tokenizer each OpenCLIP text config names, as a family label (by the vocabulary it was trained with)
TOKENIZER_FAMILIES = {
    "bert-base-uncased": "clipa",
    "google/mt5-base": "metaclip2-worldwide",
    "facebook/xlm-v-base": "metaclip2-worldwide",
}
SIGLIP_FAMILIES = {32000: "siglip", 250000: "siglip-i18n", 256000: "siglip2"}  # by text vocabulary size
TIMM_FAMILY_NEEDS = "needs timm image towers through timm (timm.models.{module}) with OpenCLIP's head"


class Unsupported(Exception):
    """This config needs a tower lipkit cannot build yet (the message says which)."""

    def __init__(self, family: str, reason: str) -> None:
        super().__init__(reason)
        self.family, self.reason = family, reason


def openclip_config_dir() -> Path:
    """OpenCLIP's ``model_configs`` folder, found without importing OpenCLIP."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed (pip install open-clip-torch)")
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def openclip_configs() -> dict[str, dict[str, Any]]:
    """OpenCLIP's model configs by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(openclip_config_dir().glob("*.json"))}


class _Captured(Exception):
    pass


@cache
def timm_model_args(name: str) -> tuple[str, dict[str, Any] | None]:
    """The timm module defining model ``name``, and its ViT arguments when it is a plain timm ViT (else None).

    The arguments are what the entrypoint hands to timm's ViT builder, caught before anything is built.
    """
    import timm.models
    import timm.models.vision_transformer as vit

    entry = timm.models.model_entrypoint(name)
    module = entry.__module__.rsplit(".", 1)[-1]
    if entry.__module__ != vit.__name__:
        return module, None
    captured: dict[str, Any] = {}

    def capture(variant: str, pretrained: bool = False, **kwargs: Any) -> None:
        captured.update(kwargs)
        raise _Captured

    with mock.patch.object(vit, "_create_vision_transformer", capture), contextlib.suppress(_Captured):
        entry()
    return module, captured or None


def translate_all() -> dict[str, dict[str, Any]]:
    """Every OpenCLIP config, translated (:func:`translate`)."""
    return {name: translate(cfg) for name, cfg in openclip_configs().items()}


def translate(oc: dict[str, Any]) -> dict[str, Any]:
    """One OpenCLIP config as a lipkit model config, or as ``{"family", "unsupported"}``."""
    try:
        return _translate(oc)
    except Unsupported as exc:
        return {"family": exc.family, "unsupported": exc.reason}


def _translate(oc: dict[str, Any]) -> dict[str, Any]:
    v, t = oc["vision_cfg"], oc["text_cfg"]
    vision = _vision(v, oc.get("quick_gelu", False), oc["embed_dim"])
    if t.get("hf_model_name"):
        text, tokenizer = _hf_text(t), _tokenizer(t)
    else:
        text, tokenizer = _text(t, oc.get("quick_gelu", False))
    out: dict[str, Any] = {"family": _family(vision, text, tokenizer), "embed_dim": oc["embed_dim"]}
    if oc.get("custom_text"):
        out["custom_text"] = True
    out.update(vision=vision, text=text, **tokenizer)
    if "init_logit_bias" in oc:  # SigLIP: sigmoid loss, logit scale starts at 10
        out.update(init_logit_scale=math.log(10), init_logit_bias=float(oc["init_logit_bias"]))
    if vision.get("openclip_layout") == "timm":
        out["preprocess"] = _timm_preprocess(v["timm_model_name"])
    if "multimodal_cfg" in oc:
        out["family"] = "coca"
        out["decoder"] = _decoder(oc["multimodal_cfg"], t, oc.get("quick_gelu", False))
    return out


def _decoder(m: dict[str, Any], t: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    """CoCa's multimodal decoder as OpenCLIP builds it: it predicts the text tower's vocabulary."""
    extra = sorted(set(m) - DECODER_KEYS)
    if extra:
        raise Unsupported("coca", f"decoder options lipkit has no equivalent for: {', '.join(extra)}")
    out = {
        "width": m.get("width", 512),
        "layers": m.get("layers", 12),
        "heads": m.get("heads", 8),
        "act": "quick_gelu" if quick_gelu else "gelu",
        "vocab_size": t.get("vocab_size", 49408),
        "context_length": m.get("context_length", 77),
    }
    if m.get("ls_init_value") is not None:
        out["layer_scale_init"] = m["ls_init_value"]
    return out


def _family(vision: dict[str, Any], text: dict[str, Any], tokenizer: dict[str, Any]) -> str:
    if text["type"] == "hf":
        return "hf-text"
    if vision["type"] == "resnet":
        return "openai-resnet"
    if vision["type"] == "timm":
        return f"timm-{timm_model_args(vision['name'])[0]}"
    if vision.get("openclip_layout") == "timm":  # SigLIP's trunk is pooled by its attention head
        return SIGLIP_FAMILIES.get(text["vocab_size"], "siglip") if vision["pool"] == "map" else "timm-vit"
    return TOKENIZER_FAMILIES.get(tokenizer.get("tokenizer_source", ""), "clip-vit")


def _check_keys(cfg: dict[str, Any], known: set[str], family: str, what: str) -> None:
    extra = sorted(set(cfg) - known - IGNORED_VISION)
    if extra:
        raise Unsupported(family, f"{what} options lipkit has no equivalent for: {', '.join(extra)}")


def _act(quick_gelu: bool, act_kwargs: dict[str, Any] | None) -> str:
    if quick_gelu:
        return "quick_gelu"
    return "gelu_tanh" if (act_kwargs or {}).get("approximate") == "tanh" else "gelu"


def _vision(v: dict[str, Any], quick_gelu: bool, embed_dim: int) -> dict[str, Any]:
    if v.get("timm_model_name"):
        try:  # a plain timm ViT runs on lipkit's own ViT; any other timm model through timm
            return _timm_vit(v)
        except Unsupported:
            return _timm_tower(v, embed_dim)
    if isinstance(v.get("layers"), (list, tuple)):
        return {"type": "resnet", "image_size": v["image_size"], "layers": list(v["layers"]), "width": v["width"]}
    _check_keys(v, OPENCLIP_VIT_KEYS, "clip-vit", "image tower")
    out = {
        "type": "vit",
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "width": v["width"],
        "layers": v["layers"],
        "heads": v["width"] // v.get("head_width", 64),
        "mlp_ratio": v.get("mlp_ratio", 4.0),
        "act": _act(quick_gelu, v.get("act_kwargs")),
        "pool": VIT_POOLS[v.get("pool_type", "tok")],
    }
    if v.get("attentional_pool"):  # CoCa's pooler: learned queries, the first pooling (OpenCLIP's bool form)
        if v["attentional_pool"] is not True:
            raise Unsupported("coca", f"needs OpenCLIP's {v['attentional_pool']!r} attentional pooling")
        queries, heads = v.get("attn_pooler_queries", 256), v.get("attn_pooler_heads", 8)
        out.update(pool="queries", pool_queries=queries, pool_heads=heads)
    optional = {
        "ln_pre": not v.get("no_ln_pre", False),
        "norm_after_pool": v.get("final_ln_after_pool", False),
        "layer_scale_init": v.get("ls_init_value"),
        "norm_eps": (v.get("norm_kwargs") or {}).get("eps", 1e-5),
    }
    defaults = {"ln_pre": True, "norm_after_pool": False, "layer_scale_init": None, "norm_eps": 1e-5}
    out.update({k: val for k, val in optional.items() if val != defaults[k]})
    return out


def _timm_vit(v: dict[str, Any]) -> dict[str, Any]:
    name = v["timm_model_name"]
    module, args = timm_model_args(name)
    unsupported = Unsupported(f"timm-{module}", TIMM_FAMILY_NEEDS.format(module=module))
    if args is None or set(args) - TIMM_VIT_ARGS or set(v) - TIMM_KEYS - IGNORED_VISION:
        raise unsupported
    class_token = args.get("class_token", True)
    pool = TIMM_POOLS.get((v.get("timm_pool") or args.get("global_pool", "token"), class_token))
    proj = v.get("timm_proj", "linear") or "missing"  # OpenCLIP's None makes timm's own classifier the projection
    # timm's fc_norm (a norm after the pooling, by default after average pooling) has no twin in lipkit
    fc_norm = args.get("fc_norm")
    fc_norm = pool == "mean" if fc_norm is None else fc_norm
    if pool is None or proj not in ("none", "linear") or fc_norm or args.get("act_layer") not in TIMM_ACTS:
        raise unsupported
    out = {
        "type": "vit",
        "openclip_layout": "timm",
        "image_size": v["image_size"],
        "patch_size": args["patch_size"],
        "width": args["embed_dim"],
        "layers": args["depth"],
        "heads": args["num_heads"],
        "mlp_ratio": args.get("mlp_ratio", 4.0),
        "act": TIMM_ACTS[args.get("act_layer")],
        "class_token": class_token,
        "pool": pool,
        "ln_pre": args.get("pre_norm", False),
        "patch_bias": not args.get("pre_norm", False),
        "qkv_bias": args.get("qkv_bias", True),
        "norm_eps": 1e-06,
        "layer_scale_init": args.get("init_values"),
        "proj": proj == "linear",
    }
    if proj == "linear" and v.get("timm_proj_bias"):
        out["proj_bias"] = True
    return out


def _timm_tower(v: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    """Any timm model under lipkit's timm tower, with OpenCLIP's pooling and projection head."""
    name = v["timm_model_name"]
    module, _ = timm_model_args(name)
    family = f"timm-{module}"
    extra = sorted(set(v) - TIMM_KEYS - IGNORED_VISION)
    if extra:
        raise Unsupported(family, f"image tower options lipkit has no equivalent for: {', '.join(extra)}")
    pool = v.get("timm_pool", "avg")  # OpenCLIP's defaults
    proj = v.get("timm_proj", "linear") or "classifier"  # None or "": timm's classifier is the projection
    if pool in ("abs_attn", "rot_attn"):
        raise Unsupported(family, f"needs OpenCLIP's {pool} pooling head on a timm trunk")
    out: dict[str, Any] = {"type": "timm", "name": name, "image_size": v.get("image_size", 224), "pool": pool}
    out["proj"] = proj
    if proj == "linear" and v.get("timm_proj_bias"):
        out["proj_bias"] = True
    if proj == "mlp":  # OpenCLIP's MLP head: hidden width 2 * embed_dim, output bias from its proj_bias
        out.update(proj_hidden=2 * embed_dim, mlp_bias=[True, bool(v.get("timm_proj_bias", False))])
    return out


def _timm_preprocess(name: str) -> dict[str, Any]:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    return {
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "interpolation": cfg.interpolation,
        "resize_mode": "squash",
    }


def _text(t: dict[str, Any], quick_gelu: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    extra = sorted(set(t) - TEXT_KEYS)
    if extra:
        raise Unsupported("clip-vit", f"text tower options lipkit has no equivalent for: {', '.join(extra)}")
    text = {
        "type": "transformer",
        "context_length": t.get("context_length", 77),
        "vocab_size": t.get("vocab_size", 49408),
        "width": t.get("width", 512),
        "heads": t.get("heads", 8),
        "layers": t.get("layers", 12),
        "mlp_ratio": t.get("mlp_ratio", 4.0),
        "act": _act(quick_gelu, t.get("act_kwargs")),
        "causal": not t.get("no_causal_mask", False),
        "pool": TEXT_POOLS[t.get("pool_type", "argmax")],
    }
    if t.get("embed_cls"):  # CoCa: a class token after the text pools, whatever pool_type says
        text.update(pool="last", embed_cls=True)
        if t.get("correct_cls_mask"):
            text["correct_cls_mask"] = True
    optional = {
        "norm_eps": (t.get("norm_kwargs") or {}).get("eps", 1e-5),
        "proj": t.get("proj_type", "linear") != "none",
        "proj_bias": t.get("proj_bias", False),
        "pad_id": t.get("pad_id", 0),
        "eos_id": t.get("eos_id", 2),
    }
    defaults = {"norm_eps": 1e-5, "proj": True, "proj_bias": False, "pad_id": 0, "eos_id": 2}
    text.update({k: val for k, val in optional.items() if val != defaults[k]})
    return text, _tokenizer(t)


def _hf_text(t: dict[str, Any]) -> dict[str, Any]:
    """OpenCLIP's Hugging Face text tower, built from the config lipkit ships for its model (no hub)."""
    name = t["hf_model_name"]
    folder = name.rsplit("/", 1)[-1]
    if not (HF_CONFIG_DIR / folder / "config.json").is_file():
        raise Unsupported("hf-text", f"needs a config for the Hugging Face model {name} shipped with lipkit")
    extra = sorted(set(t) - HF_TEXT_KEYS)
    if extra:
        raise Unsupported("hf-text", f"text tower options lipkit has no equivalent for: {', '.join(extra)}")
    pooler = t.get("hf_pooler_type", "mean_pooler")  # OpenCLIP's defaults
    config = json.loads((HF_CONFIG_DIR / folder / "config.json").read_text())
    # OpenCLIP's cls_pooler reads a pooling layer where the model has one: only an encoder-decoder's has none
    if pooler not in HF_POOLS or (pooler == "cls_pooler" and not config.get("is_encoder_decoder")):
        raise Unsupported("hf-text", f"needs OpenCLIP's {pooler} on {name}")
    proj = t.get("hf_proj_type", "mlp")
    out = {
        "type": "hf",
        "path": f"pkg:lipkit/models/configs/hf/{folder}",
        "from_config": True,
        "context_length": t.get("context_length", 77),
        "pool": HF_POOLS[pooler],
        "proj": proj,
    }
    if proj == "mlp":  # OpenCLIP's: two linear layers without bias
        out["mlp_bias"] = [False, False]
    return out


def _tokenizer(t: dict[str, Any]) -> dict[str, Any]:
    if not t.get("hf_tokenizer_name"):
        return {}
    kwargs = t.get("tokenizer_kwargs") or {}
    unknown = sorted(set(kwargs) - {"clean", "strip_sep_token"})
    if unknown:
        raise Unsupported("clip-vit", f"tokenizer options lipkit has no equivalent for: {', '.join(unknown)}")
    out = {"tokenizer": "hf", "tokenizer_source": t["hf_tokenizer_name"]}
    out["tokenizer_clean"] = kwargs.get("clean", "whitespace")
    if kwargs.get("strip_sep_token"):
        out["tokenizer_strip_sep"] = True
    return out


def pretrained_all() -> dict[str, dict[str, dict[str, Any]]]:
    """OpenCLIP's pretrained tags: name -> tag -> the non-empty fields lipkit reads (hub id, URL, preprocessing)."""
    import open_clip
    from open_clip import pretrained

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, tag in open_clip.list_pretrained():
        cfg = pretrained.get_pretrained_cfg(name, tag)
        kept = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PRETRAINED_KEYS and v}
        table.setdefault(name, {})[tag] = kept
    return table


def render(cfg: dict[str, Any]) -> str:
    """A translated config as the committed file's text."""
    return json.dumps(cfg, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, metavar="DIR", help="where the JSON files go")
    parser.add_argument("--tags-file", type=Path, default=PRETRAINED_FILE, metavar="FILE", help="the pretrained tags")
    args = parser.parse_args(argv)
    configs = translate_all()
    wanted = {f"{name}.json": render(cfg) for name, cfg in configs.items()}
    present = {p.name: p.read_text() for p in args.out_dir.glob("*.json")} if args.out_dir.is_dir() else {}
    stale = sorted(set(present) - set(wanted))
    changed = sorted(n for n, text in wanted.items() if present.get(n) != text)
    tags_file = args.tags_file
    tags = render(pretrained_all())
    tags_changed = not tags_file.is_file() or tags_file.read_text() != tags
    if args.check:
        for name in [*changed, *stale]:
            print(f"out of date: {args.out_dir / name}")
        if tags_changed:
            print(f"out of date: {tags_file}")
        return 1 if changed or stale or tags_changed else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.out_dir / name).unlink()
    for name in changed:
        (args.out_dir / name).write_text(wanted[name])
    if tags_changed:
        tags_file.write_text(tags)
    supported = sum("unsupported" not in c for c in configs.values())
    print(f"{len(configs)} OpenCLIP configs: {supported} translated, {len(configs) - supported} marked unsupported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
