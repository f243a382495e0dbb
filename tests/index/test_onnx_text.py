"""Text queries on ONNX Runtime: the same embeddings as PyTorch, an export cached per model, and a fallback to
PyTorch (with the reason) wherever ONNX Runtime cannot be trusted."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lipkit.errors import ConfigError
from lipkit.index.encoder import QueryEncoder
from lipkit.index.onnx_text import OnnxTextError, cache_root_onnx
from lipkit.models import create_model

pytest.importorskip("onnxruntime")

TEXTS = [
    "a cat",
    "a red apple on a wooden table",
    "two dogs",
    "the moon over the sea at night, with a small boat and a lighthouse far away",
    "x",
    "a green frog sitting on a leaf",
    "an emoji of a smiling face",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("micro").eval()


def test_onnx_embeddings_equal_torch_for_any_batch_and_length(cache, micro):
    fast = QueryEncoder(micro, "cpu", text_runtime="onnx")
    plain = QueryEncoder(micro, "cpu")
    assert (fast.text_runtime, plain.text_runtime) == ("onnx", "torch")
    for batch in (TEXTS[:1], TEXTS[3:4], TEXTS[:3], TEXTS):
        got, expected = fast.encode_texts(batch), plain.encode_texts(batch)
        assert got.shape == expected.shape == (len(batch), micro.cfg.embed_dim)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert fast.encode_texts([]).shape == (0, micro.cfg.embed_dim)


@pytest.mark.slow  # three exports of the micro model
def test_the_export_is_cached_per_model_and_a_damaged_one_is_made_again(cache, micro):
    QueryEncoder(micro, "cpu", text_runtime="onnx")
    (path,) = cache.glob("text-*.onnx")
    made = path.stat().st_mtime_ns
    QueryEncoder(micro, "cpu", text_runtime="onnx")
    assert path.stat().st_mtime_ns == made  # reused, not exported again

    path.write_bytes(b"not an onnx model")
    with pytest.warns(UserWarning, match="cannot be opened"):
        again = QueryEncoder(micro, "cpu", text_runtime="auto")
    assert again.text_runtime == "onnx"
    np.testing.assert_allclose(again.encode_texts(TEXTS), QueryEncoder(micro, "cpu").encode_texts(TEXTS), atol=1e-5)

    torch.manual_seed(1)
    other = create_model("micro").eval()
    QueryEncoder(other, "cpu", text_runtime="onnx")
    assert len(list(cache.glob("text-*.onnx"))) == 2  # another model, another export


@pytest.mark.slow  # two exports
def test_an_export_that_disagrees_with_torch_is_not_used(cache, micro):
    QueryEncoder(micro, "cpu", text_runtime="onnx")
    (path,) = cache.glob("text-*.onnx")
    torch.manual_seed(2)
    other = create_model("micro").eval()
    QueryEncoder(other, "cpu", text_runtime="onnx")
    (other_path,) = set(cache.glob("text-*.onnx")) - {path}
    path.write_bytes(other_path.read_bytes())  # micro's cache entry now holds another model's graph

    with pytest.raises(OnnxTextError, match="differs from PyTorch's"):
        QueryEncoder(micro, "cpu", text_runtime="onnx")
    with pytest.warns(UserWarning, match="text queries run on PyTorch"):
        fallback = QueryEncoder(micro, "cpu", text_runtime="auto")
    assert fallback.text_runtime == "torch"


def test_without_onnxruntime_auto_uses_torch_and_onnx_says_how_to_install(cache, micro, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.warns(UserWarning, match="ONNX Runtime is not installed"):
        assert QueryEncoder(micro, "cpu", text_runtime="auto").text_runtime == "torch"
    with pytest.raises(OnnxTextError, match="pip install"):
        QueryEncoder(micro, "cpu", text_runtime="onnx")
    assert not cache.exists()


def test_unknown_runtime_is_refused(micro):
    with pytest.raises(ConfigError, match="use one of auto, torch, onnx"):
        QueryEncoder(micro, "cpu", text_runtime="tensorrt")


def test_the_cache_folder_follows_lipkit_cache_dir(cache):
    assert cache_root_onnx() == cache


def test_a_changed_checkpoint_is_refused_before_any_export(cache, micro, tmp_path):
    from lipkit.config import to_dict
    from lipkit.index.encoder import ModelChangedError, encoder_for_record, load_encoder
    from lipkit.train.checkpoint import save_checkpoint

    path = tmp_path / "step_00000001.pt"
    save_checkpoint(path, {"model": micro.state_dict(), "step": 1, "model_config": to_dict(micro.cfg)})
    record = load_encoder(path, device="cpu").record
    reloaded = encoder_for_record(record, "cpu", text_runtime="onnx")
    assert reloaded.text_runtime == "onnx" and reloaded.record == record
    (exported,) = cache.glob("text-*.onnx")
    exported.unlink()
    changed = create_model("micro", embed_dim=64)
    save_checkpoint(path, {"model": changed.state_dict(), "step": 1, "model_config": to_dict(changed.cfg)})
    with pytest.raises(ModelChangedError, match="changed"):
        encoder_for_record(record, "cpu", text_runtime="onnx")
    assert not list(cache.glob("text-*.onnx"))  # refused before the new weights were exported
