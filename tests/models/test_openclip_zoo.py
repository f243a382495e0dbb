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
    UnsupportedModelError,
    get_model_config,
    list_models,
    model_family,
    unsupported_reason,
)
from lipkit.models.convert import export_openclip, lipkit_to_openclip, openclip_to_lipkit

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
    return sorted(set(openclip_names()) & set(list_models(buildable=True)))


def signature(name: str) -> str:
    """The options of a translated config without its sizes: configs with equal signatures differ only in size."""
    sizes = {"image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "context_length", "vocab_size"}
    # the activation too: QuickGELU is covered by the ResNet and ViT-B-32-quickgelu tests
    sizes |= {"act"}
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
        key = (cfg.vision_config().width, cfg.text_config().width, name)
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


def test_unsupported_names_are_known_and_say_why() -> None:
    names = sorted(set(openclip_names()) - set(supported()))
    assert "convnext_base" in names and "coca_ViT-B-32" in names
    for name in names:
        with pytest.raises(UnsupportedModelError, match=rf"'{name}' \({model_family(name)}\) cannot be built yet"):
            get_model_config(name)
    assert unsupported_reason("coca_ViT-B-32") == "needs the CoCa multimodal text decoder and captioning head"
    assert unsupported_reason("RN50") is None


def test_families_of_the_built_configs() -> None:
    families = {name: model_family(name) for name in supported()}
    assert families["ViT-B-16-SigLIP"] == "siglip" and families["ViT-B-16-SigLIP2"] == "siglip2"
    assert families["RN50x4"] == "openai-resnet" and families["ViT-H-14-CLIPA"] == "clipa"
    assert families["ViT-L-14-worldwide"] == "metaclip2-worldwide" and families["ViT-B-32"] == "clip-vit"
    assert len(supported()) == 82


def test_siglip_vocabularies_follow_openclip() -> None:
    for name in ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP-i18n-256"):
        cfg = get_model_config(name)
        expected = open_clip.get_model_config(name)["text_cfg"]
        assert cfg.text_config().vocab_size == expected["vocab_size"]
        assert cfg.tokenizer == "hf" and cfg.tokenizer_source == expected["hf_tokenizer_name"]
    assert get_model_config("ViT-B-16-SigLIP").text_config().vocab_size == 32000
    assert get_model_config("ViT-B-16-SigLIP2").text_config().act == "gelu_tanh"


# --- twins: the same depth-reduced architecture in both libraries ---


@pytest.fixture
def timm_twin(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """OpenCLIP builds timm trunks by name only: inject the twin's depth and image size into timm."""
    small = {"depth": 1, "img_size": 32}
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **small}))
    return small


def twin_overrides(name: str, timm_size: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """OpenCLIP's vision_cfg and text_cfg of ``name``'s twin, and lipkit's overrides for the same twin."""
    cfg = open_clip.get_model_config(name)
    vision, text = dict(cfg["vision_cfg"]), {**cfg["text_cfg"], **TEXT_TWIN}
    if isinstance(vision.get("layers"), list):  # ResNet: one block per stage, a 2x2 final map
        small = {"layers": [1, 1, 1, 1], "image_size": 64}
    elif vision.get("timm_model_name"):
        small = {"layers": 1, "image_size": timm_size}
    else:
        small = {"layers": 1, "image_size": 2 * vision["patch_size"]}
    if not vision.get("timm_model_name"):
        vision.update(small)
    return vision, text, {"vision": small, "text": TEXT_TWIN}


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


def openclip_twin(name: str, timm_size: int, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    vision, text, overrides = twin_overrides(name, timm_size)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text)
    return perturb(model, seed), overrides


def assert_same_embeddings(lk: DualEncoder, oc: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    size, text = lk.cfg.vision_config().image_size, lk.cfg.text_config()
    images = torch.randn(2, 3, size, size, generator=gen)
    tokens = torch.randint(1, text.vocab_size, (2, text.context_length), generator=gen)
    tokens[0, 5] = text.eos_id  # an end token where ``eos`` pooling finds it; row 1 has it only by chance
    with torch.no_grad():
        torch.testing.assert_close(lk.encode_image(images), oc.encode_image(images), **TOL)
        torch.testing.assert_close(lk.encode_text(tokens), oc.encode_text(tokens), **TOL)


def check_parity(name: str, tmp_path: Path, timm_size: int) -> None:
    oc, overrides = openclip_twin(name, timm_size)
    path = tmp_path / f"{name}.pt"
    torch.save(oc.state_dict(), path)
    assert_same_embeddings(lipkit.create_model(name, pretrained=path, **overrides), oc)


def test_representatives_cover_every_family() -> None:
    families = {model_family(n) for n in supported()}
    assert {model_family(n) for n in representatives()} == families
    assert len(representatives()) < len(supported()) // 2


@pytest.mark.parametrize("name", representatives())
def test_openclip_state_dict_parity(name: str, tmp_path: Path, timm_twin: dict[str, int]) -> None:
    check_parity(name, tmp_path, timm_twin["img_size"])


@pytest.mark.exhaustive  # every supported config (82 twins); `make test-exhaustive`
@pytest.mark.parametrize("name", supported())
def test_openclip_state_dict_parity_every_config(name: str, tmp_path: Path, timm_twin: dict[str, int]) -> None:
    check_parity(name, tmp_path, timm_twin["img_size"])


# --- full size: key sets and shapes on the meta device ---


def assert_keys_and_shapes_correspond(name: str) -> None:
    with torch.device("meta"):
        oc = open_clip.create_model(name, pretrained=None, device="meta")
        lk = DualEncoder(get_model_config(name))
    oc_state, lk_state = oc.state_dict(), lk.state_dict()
    layout = getattr(lk.cfg.vision_config(), "openclip_layout", "")
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    assert shapes(openclip_to_lipkit(oc_state, layout)) == shapes(lk_state)
    assert shapes(lipkit_to_openclip(lk_state, layout, lk.cfg.custom_text)) == shapes(oc_state)


@pytest.mark.parametrize("name", ["RN50", "ViT-H-14-CLIPA", "ViT-B-16-SigLIP2", "ViT-L-14-worldwide"])
def test_full_size_keys_and_shapes_correspond(name: str) -> None:
    assert_keys_and_shapes_correspond(name)


@pytest.mark.exhaustive  # builds all 82 full-size OpenCLIP models on the meta device
@pytest.mark.parametrize("name", supported())
def test_full_size_keys_and_shapes_correspond_every_config(name: str) -> None:
    assert_keys_and_shapes_correspond(name)


# --- export: lipkit -> OpenCLIP's layout -> OpenCLIP ---


@pytest.mark.parametrize("name", ["RN50-quickgelu", "ViT-L-14-CLIPA", "ViT-B-16-SigLIP2", "ViT-L-14-worldwide"])
def test_export_round_trip(name: str, tmp_path: Path, timm_twin: dict[str, int]) -> None:
    vision, text, overrides = twin_overrides(name, timm_twin["img_size"])
    torch.manual_seed(0)
    lk = perturb(lipkit.create_model(name, **overrides), seed=3)
    export_openclip(lk, tmp_path / "openclip.pt")
    oc = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text).eval()
    oc.load_state_dict(torch.load(tmp_path / "openclip.pt", weights_only=True), strict=True)
    assert_same_embeddings(lk, oc)


# --- OpenAI's ResNet archives ---


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but OpenAI's files are TorchScript
def test_openai_resnet_torchscript_archive(tmp_path: Path, timm_twin: dict[str, int]) -> None:
    oc, overrides = openclip_twin("RN50-quickgelu", timm_twin["img_size"])
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

    assert main(["models", "--family", "timm-convnext"]) == 0
    out = capsys.readouterr().out
    assert "148 model configs, 86 buildable" in out
    assert "timm-convnext (11, cannot be built yet)" in out and "convnext_xxlarge_320" in out
    assert main(["models", "--family", "openai-resnet"]) == 0
    assert "RN50x64-quickgelu                 1024  resnet 448px w128 3-15-36-10" in capsys.readouterr().out
