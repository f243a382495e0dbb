"""OpenCLIP's model zoo as lipkit configs: the lists in step, fresh translations, and parity by name.

Parity: an OpenCLIP model built by name (random weights, perturbed), its state dict loaded into lipkit by
the same name, gives the same image and text embeddings within 1e-5 in fp32. Both libraries get the same
depth-reduced twin (one block per tower, a 2x2 patch grid, short texts over a small vocabulary); full-size
models are compared by their key sets and shapes on the meta device.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lipkit
from lipkit.models.clip import DualEncoder
from lipkit.models.config import (
    ViTConfig,
    get_model_config,
    list_models,
    model_family,
    unsupported_reason,
)
from lipkit.models.convert import export_openclip, layouts, lipkit_to_openclip, openclip_to_lipkit, tower_rules

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[2]
OPENCLIP_DIR = ROOT / "src" / "lipkit" / "models" / "configs" / "openclip"
TOL = {"atol": 1e-5, "rtol": 1e-5}
TEXT_TWIN = {"layers": 1, "vocab_size": 300, "context_length": 16}


def load_generator() -> Any:
    """``tools/openclip_configs.py``, the script that writes the translated configs."""
    spec = importlib.util.spec_from_file_location("openclip_configs", ROOT / "tools" / "openclip_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def openclip_names() -> list[str]:
    return sorted(open_clip.list_models())


def supported() -> list[str]:
    """OpenCLIP's names lipkit builds, but CoCa's: tests/models/test_coca.py checks their parity (embeddings,
    the decoder's logits and loss, captions), key sets and export."""
    return sorted(n for n in set(openclip_names()) & set(list_models(buildable=True)) if model_family(n) != "coca")


def signature(name: str) -> str:
    """The options of a translated config without its sizes: configs with equal signatures differ only in size."""
    sizes = {"image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "context_length", "vocab_size"}
    # the activation too: QuickGELU is covered by the ResNet and ViT-B-32-quickgelu tests
    sizes |= {"act"}
    sizes |= {"name", "proj_hidden"}  # a timm tower's model name (its family stays) and MLP head width
    cfg = json.loads((OPENCLIP_DIR / f"{name}.json").read_text())
    keep = {k: v for k, v in cfg.items() if k not in ("embed_dim", "tokenizer_source", "preprocess")}
    for tower in ("vision", "text"):
        keep[tower] = {k: v for k, v in cfg[tower].items() if k not in sizes}
    return json.dumps(keep, sort_keys=True)


def representatives() -> list[str]:
    """One supported config per distinct option signature: the narrowest."""
    best: dict[str, tuple[int, int, str]] = {}
    for name in supported():
        cfg = get_model_config(name)
        key = (getattr(cfg.vision_config(), "width", 0), getattr(cfg.text_config(), "width", 0), name)
        best[signature(name)] = min(best.get(signature(name), key), key)
    return sorted(name for _, _, name in best.values())


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the two lists stay in step ---


def test_every_openclip_name_has_one_translated_config_and_no_other() -> None:
    files = sorted(p.stem for p in OPENCLIP_DIR.glob("*.json"))
    assert files == openclip_names()
    assert len(files) == 144
    assert set(files) <= set(list_models())


def test_each_committed_config_equals_a_fresh_translation() -> None:
    generator = load_generator()
    fresh = generator.translate_all()
    assert sorted(fresh) == openclip_names()
    stale = [n for n, cfg in fresh.items() if (OPENCLIP_DIR / f"{n}.json").read_text() != generator.render(cfg)]
    assert stale == []


def test_every_openclip_name_builds() -> None:
    assert sorted(set(openclip_names()) - set(list_models(buildable=True))) == []
    assert [unsupported_reason(name) for name in ("coca_ViT-B-32", "RN50")] == [None, None]
    coca = sorted(set(openclip_names()) - set(supported()))
    assert coca == ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base", "coca_roberta-ViT-B-32"]
    assert {model_family(name) for name in coca} == {"coca"}


def test_families_of_the_built_configs() -> None:
    families = {name: model_family(name) for name in supported()}
    assert families["ViT-B-16-SigLIP"] == "siglip" and families["ViT-B-16-SigLIP2"] == "siglip2"
    assert families["RN50x4"] == "openai-resnet" and families["ViT-H-14-CLIPA"] == "clipa"
    assert families["ViT-L-14-worldwide"] == "metaclip2-worldwide" and families["ViT-B-32"] == "clip-vit"
    assert families["convnext_base"] == "timm-convnext" and families["EVA02-B-16"] == "timm-eva"
    assert families["MobileCLIP-S1"] == "timm-fastvit" and families["ViTamin-S"] == "timm-vitamin"
    assert families["MobileCLIP2-L-14"] == "timm-vision_transformer" and families["PE-Core-B-16"] == "timm-eva"
    assert families["xlm-roberta-base-ViT-B-32"] == "hf-text" and families["nllb-clip-base-siglip"] == "hf-text"
    assert len(supported()) == 140


def test_siglip_vocabularies_follow_openclip() -> None:
    for name in ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP-i18n-256"):
        cfg = get_model_config(name)
        expected = open_clip.get_model_config(name)["text_cfg"]
        assert cfg.text_config().vocab_size == expected["vocab_size"]
        assert cfg.tokenizer == "hf" and cfg.tokenizer_source == expected["hf_tokenizer_name"]
    assert get_model_config("ViT-B-16-SigLIP").text_config().vocab_size == 32000
    assert get_model_config("ViT-B-16-SigLIP2").text_config().act == "gelu_tanh"


# --- twins: the same depth-reduced architecture in both libraries ---


# timm trunks are built by name: the twin's sizes go into timm.create_model, per timm module (or model), with
# the twin's image size
TIMM_TWINS: dict[str, tuple[dict[str, Any], int]] = {
    "vision_transformer": ({"depth": 1, "img_size": 32}, 32),
    "vision_transformer_relpos": ({"depth": 1, "img_size": 32}, 32),
    "vision_transformer_hybrid": ({"depth": 1, "img_size": 64}, 64),  # a convolution stem of stride 16 or 32
    "eva": ({"depth": 1, "img_size": 28}, 28),  # EVA's and the Perception Encoder's 14- or 16-pixel patches
    "vitamin": ({"depth": 1, "img_size": 32}, 32),
    "fastvit": ({"layers": (1, 1, 1, 1)}, 64),
    "convnext": ({"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}, 64),
    "swin_transformer": ({"depths": (1, 1, 1, 1), "img_size": 64, "window_size": 4}, 64),
    "fastvit_mci3": ({"layers": (1, 1, 1, 1, 1)}, 64),  # five stages
    "fastvit_mci4": ({"layers": (1, 1, 1, 1, 1)}, 64),
}


def timm_twin_sizes(model_name: str) -> tuple[dict[str, Any], int]:
    """The timm arguments and image size of a timm model's twin: by model name, else by its timm module."""
    if model_name in TIMM_TWINS:
        return TIMM_TWINS[model_name]
    return TIMM_TWINS[timm.models.model_entrypoint(model_name).__module__.rsplit(".", 1)[-1]]


# Hugging Face text towers: one layer and a small vocabulary, by the model's type
HF_TWINS: dict[str, dict[str, int]] = {
    "roberta": {"num_hidden_layers": 1, "vocab_size": 300},
    "xlm-roberta": {"num_hidden_layers": 1, "vocab_size": 300},
    "mt5": {"num_layers": 1, "num_decoder_layers": 1, "vocab_size": 300},
    "m2m_100": {"encoder_layers": 1, "decoder_layers": 1, "vocab_size": 300},
}


def hf_config_folder(name: str) -> Path:
    """The Hugging Face config lipkit ships for ``name``'s text tower."""
    from lipkit.models.text import resolve_local_path

    return resolve_local_path(get_model_config(name).text_config().path)


def hf_twin_sizes(name: str) -> dict[str, int]:
    return HF_TWINS[json.loads((hf_config_folder(name) / "config.json").read_text())["model_type"]]


@pytest.fixture
def twin_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCLIP builds timm trunks and Hugging Face text towers by name only: inject the twin's sizes.

    timm gets the twin's arguments (lipkit builds its timm towers through the same function); OpenCLIP's
    Hugging Face tower reads, in place of the hub, the config lipkit ships, with the twin's sizes.
    """
    create = timm.create_model
    monkeypatch.setattr(
        timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **timm_twin_sizes(name)[0]})
    )
    local_hf_configs(monkeypatch, twin=True)


def local_hf_configs(monkeypatch: pytest.MonkeyPatch, twin: bool) -> None:
    """OpenCLIP's Hugging Face towers read the configs lipkit ships (with the twin's sizes if ``twin``)."""
    import open_clip.hf_model
    import transformers

    by_hub_name = {
        open_clip.get_model_config(n)["text_cfg"]["hf_model_name"]: n
        for n in supported()
        if open_clip.get_model_config(n)["text_cfg"].get("hf_model_name")
    }

    class LocalConfig:
        @staticmethod
        def from_pretrained(hub_name: str, **kwargs: Any) -> Any:
            name = by_hub_name[hub_name]
            config = transformers.AutoConfig.from_pretrained(str(hf_config_folder(name)), local_files_only=True)
            for key, value in (hf_twin_sizes(name) if twin else {}).items():
                setattr(config, key, value)
            return config

    monkeypatch.setattr(open_clip.hf_model, "AutoConfig", LocalConfig)


def twin_overrides(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """OpenCLIP's vision_cfg and text_cfg of ``name``'s twin, and lipkit's overrides for the same twin."""
    cfg = open_clip.get_model_config(name)
    vision, text = dict(cfg["vision_cfg"]), {**cfg["text_cfg"], **TEXT_TWIN}
    text_small: dict[str, Any] = TEXT_TWIN
    if cfg["text_cfg"].get("hf_model_name"):  # built from its config, sized by twin_builders; lipkit: the same
        text = {**cfg["text_cfg"], "hf_model_pretrained": False}
        text_small = {"config_overrides": hf_twin_sizes(name)}
    if isinstance(vision.get("layers"), list):  # ResNet: one block per stage, a 2x2 final map
        small = {"layers": [1, 1, 1, 1], "image_size": 64}
    elif vision.get("timm_model_name"):
        small = {"image_size": timm_twin_sizes(vision["timm_model_name"])[1]}
        if isinstance(get_model_config(name).vision_config(), ViTConfig):  # a timm ViT on lipkit's own ViT
            small["layers"] = 1
    else:
        small = {"layers": 1, "image_size": 2 * vision["patch_size"]}
    if not vision.get("timm_model_name"):
        vision.update(small)
    return vision, text, {"vision": small, "text": text_small}


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Seeded noise on every parameter and on batch-norm statistics (variances kept positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.mul_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def openclip_twin(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    vision, text, overrides = twin_overrides(name)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=False, vision_cfg=vision, text_cfg=text)
    return perturb(model, seed), overrides


def assert_same_embeddings(lk: DualEncoder, oc: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    size, text = lk.cfg.vision_config().image_size, lk.cfg.text_config()
    images = torch.randn(2, 3, size, size, generator=gen)
    vocab = getattr(text, "vocab_size", None) or text.config_overrides["vocab_size"]  # a Hugging Face tower's twin
    tokens = torch.randint(1, vocab, (2, text.context_length), generator=gen)
    tokens[0, 5] = getattr(text, "eos_id", 2)  # an end token where ``eos`` pooling finds it; row 1 has it by chance
    tokens[1, -3:] = getattr(lk.text, "pad_id", 0)  # padding, which a Hugging Face tower masks
    with torch.no_grad():
        torch.testing.assert_close(lk.encode_image(images), oc.encode_image(images), **TOL)
        torch.testing.assert_close(lk.encode_text(tokens), oc.encode_text(tokens), **TOL)


def check_parity(name: str, tmp_path: Path) -> None:
    oc, overrides = openclip_twin(name)
    path = tmp_path / f"{name}.pt"
    torch.save(oc.state_dict(), path)
    assert_same_embeddings(lipkit.create_model(name, pretrained=path, **overrides), oc)


def test_representatives_cover_every_family() -> None:
    families = {model_family(n) for n in supported()}
    assert {model_family(n) for n in representatives()} == families
    assert len(representatives()) < len(supported()) // 2


@pytest.mark.parametrize("name", representatives())
def test_openclip_state_dict_parity(name: str, tmp_path: Path, twin_builders: None) -> None:
    check_parity(name, tmp_path)


@pytest.mark.exhaustive  # every supported config (82 twins); `make test-exhaustive`
@pytest.mark.parametrize("name", supported())
def test_openclip_state_dict_parity_every_config(name: str, tmp_path: Path, twin_builders: None) -> None:
    check_parity(name, tmp_path)


# --- full size: key sets and shapes on the meta device ---


def assert_keys_and_shapes_correspond(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    local_hf_configs(monkeypatch, twin=False)
    with torch.device("meta"):
        oc = open_clip.create_model(name, pretrained=None, pretrained_text=False, device="meta")
        lk = DualEncoder(get_model_config(name))
    oc_state, lk_state = oc.state_dict(), lk.state_dict()
    layout, text_layout = layouts(lk)
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    assert shapes(openclip_to_lipkit(oc_state, layout, text_layout, tower_rules(lk))) == shapes(lk_state)
    exported = lipkit_to_openclip(lk_state, layout or None, lk.cfg.custom_text, text_layout, tower_rules(lk))
    assert shapes(exported) == shapes(oc_state)


@pytest.mark.parametrize(
    "name",
    [
        "RN50",
        "ViT-H-14-CLIPA",
        "ViT-B-16-SigLIP2",
        "ViT-L-14-worldwide",
        "convnext_large_d",
        "MobileCLIP-S1",
        "roberta-ViT-B-32",
        "nllb-clip-base-siglip",
    ],
)
def test_full_size_keys_and_shapes_correspond(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_keys_and_shapes_correspond(name, monkeypatch)


@pytest.mark.exhaustive  # builds all 82 full-size OpenCLIP models on the meta device
@pytest.mark.parametrize("name", supported())
def test_full_size_keys_and_shapes_correspond_every_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_keys_and_shapes_correspond(name, monkeypatch)


# --- export: lipkit -> OpenCLIP's layout -> OpenCLIP ---


@pytest.mark.parametrize(
    "name",
    [
        "RN50-quickgelu",
        "ViT-L-14-CLIPA",
        "ViT-B-16-SigLIP2",
        "ViT-L-14-worldwide",
        "convnext_large_d",
        "EVA02-B-16",
        "mt5-base-ViT-B-32",
        "nllb-clip-base-siglip",
    ],
)
def test_export_round_trip(name: str, tmp_path: Path, twin_builders: None) -> None:
    vision, text, overrides = twin_overrides(name)
    torch.manual_seed(0)
    lk = perturb(lipkit.create_model(name, **overrides), seed=3)
    export_openclip(lk, tmp_path / "openclip.pt")
    oc = open_clip.create_model(name, pretrained=None, pretrained_text=False, vision_cfg=vision, text_cfg=text).eval()
    oc.load_state_dict(torch.load(tmp_path / "openclip.pt", weights_only=True), strict=True)
    assert_same_embeddings(lk, oc)


# --- OpenAI's ResNet archives ---


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but OpenAI's files are TorchScript
def test_openai_resnet_torchscript_archive(tmp_path: Path) -> None:
    oc, overrides = openclip_twin("RN50-quickgelu")
    del oc.context_length, oc.vocab_size  # OpenAI's archives hold these as tensors, next to the weights
    for key in ("context_length", "vocab_size"):
        oc.register_buffer(key, torch.tensor(TEXT_TWIN[key]))
    oc.register_buffer("input_resolution", torch.tensor(64))
    path = tmp_path / "RN50.pt"
    torch.jit.script(oc).save(str(path))
    assert any(k.endswith("num_batches_tracked") for k in torch.jit.load(path).state_dict())
    assert_same_embeddings(lipkit.create_model("RN50-quickgelu", pretrained=path, **overrides), oc)


# --- tokenizers from local files (SigLIP, SigLIP 2, CLIPA, MetaCLIP 2) ---

WORDS = ["a", "photo", "of", "cat", "dog", "the", "caf\u00e9", "two", "birds", "s"]
TEXTS = ["A photo of a CAT!", "  the   caf\u00e9's dog_photo &amp; two birds  ", "birds"]


def save_tokenizer(folder: Path, with_sep: bool) -> Path:
    """A small word-level tokenizer saved as ``save_pretrained`` writes it (its ``tokenizer.json`` inside)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_sep:  # BERT-style framing, as CLIPA's tokenizer has
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    else:  # an end token, as SigLIP's tokenizer appends
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 4)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", sep_token="[SEP]" if with_sep else None
    )
    fast.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-L-14-CLIPA", "ViT-L-14-worldwide"])
def test_local_tokenizer_gives_openclips_ids(name: str, tmp_path: Path) -> None:
    from open_clip.tokenizer import HFTokenizer

    text_cfg = open_clip.get_model_config(name)["text_cfg"]
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    folder = save_tokenizer(tmp_path / "tok", with_sep=bool(kwargs.get("strip_sep_token")))
    reference = HFTokenizer(str(folder), context_length=text_cfg["context_length"], **kwargs)(TEXTS)
    for path in (folder, folder / "tokenizer.json"):  # a folder, or the tokenizer file alone
        ids = lipkit.get_tokenizer(name, tokenizer_path=str(path))(TEXTS)
        assert ids.dtype == torch.long and ids.shape == (3, text_cfg["context_length"])
        assert torch.equal(ids, reference)
    assert ids[0, :5].tolist() != [1] * 5  # the words are known: not all unknown tokens


def test_canonicalize_drops_punctuation_and_case(tmp_path: Path) -> None:
    folder = save_tokenizer(tmp_path / "tok", with_sep=False)
    ids = lipkit.get_tokenizer("ViT-B-16-SigLIP", tokenizer_path=str(folder))(["A photo, of the CAT!"])
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", *WORDS])}
    expected = [vocab[w] for w in ("a", "photo", "of", "the", "cat")] + [vocab["</s>"]]
    assert ids[0, :6].tolist() == expected and ids[0, 6:].eq(0).all()


def test_missing_tokenizer_names_what_to_fetch() -> None:
    from lipkit.errors import LipkitError

    with pytest.raises(LipkitError, match=r"'timm/ViT-B-16-SigLIP2' from a local file or folder.*tokenizer_path"):
        lipkit.get_tokenizer("ViT-B-16-SigLIP2")
    with pytest.raises(LipkitError, match=r"tokenizer file or folder not found: .*nowhere"):
        lipkit.get_tokenizer("ViT-B-16-SigLIP2", tokenizer_path="/nowhere")


def test_models_command_groups_by_family_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    from lipkit.cli.main import main

    assert main(["models", "--family", "coca"]) == 0
    out = capsys.readouterr().out
    assert "149 model configs, 149 buildable" in out
    assert "coca (5)" in out and "coca_ViT-L-14" in out and "tiny-coca" in out
    assert main(["models", "--family", "openai-resnet"]) == 0
    assert "RN50x64-quickgelu                 1024  resnet 448px w128 3-15-36-10" in capsys.readouterr().out
