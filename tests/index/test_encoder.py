"""The query encoder: same vectors as the model itself, a fingerprint that follows the weights, reloading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lipkit.config import to_dict
from lipkit.errors import LipkitError
from lipkit.index.encoder import (
    ImageInputError,
    ModelChangedError,
    ModelRecord,
    QueryEncoder,
    encoder_for_record,
    load_encoder,
    model_fingerprint,
)
from lipkit.models import create_model, get_tokenizer, image_transform
from lipkit.train.checkpoint import save_checkpoint

TEXTS = ["a red square", "two cats on a sofa", "x"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("micro")


def test_encode_texts_equals_the_model(model):
    encoder = QueryEncoder(model)
    vectors = encoder.encode_texts(TEXTS)
    with torch.no_grad():
        expected = model.encode_text(get_tokenizer(model.cfg)(TEXTS), normalize=True).numpy()
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_images_equals_the_model(model):
    images = _images(4)
    vectors = QueryEncoder(model).encode_images(images)
    transform = image_transform(model.cfg)
    with torch.no_grad():
        expected = model.encode_image(torch.stack([transform(i) for i in images]), normalize=True).numpy()
    assert vectors.shape == (4, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_inputs_give_empty_arrays(model):
    encoder = QueryEncoder(model)
    assert encoder.encode_texts([]).shape == (0, 64)
    assert encoder.encode_images([]).shape == (0, 64)


def test_an_image_that_cannot_be_converted_is_a_lipkit_error(model):
    with pytest.raises(ImageInputError, match="image 1 cannot be read"):
        QueryEncoder(model).encode_images([_images(1)[0], "not a picture"])


def test_fingerprint_is_stable_and_follows_one_weight():
    torch.manual_seed(1)
    net = create_model("micro")
    first = model_fingerprint(net)
    assert first == model_fingerprint(net) and len(first) == 64
    other = create_model("micro")
    other.load_state_dict(net.state_dict())
    assert model_fingerprint(other) == first  # same config and weights, another object
    with torch.no_grad():
        net.text.proj.weight[0, 0] += 1e-3  # one weight, in place
    changed = model_fingerprint(net)
    assert changed != first
    with torch.no_grad():
        net.text.proj.weight[0, 0] -= 1e-3
    assert model_fingerprint(net) in (first, changed)  # float round trip may not restore the bits exactly
    assert model_fingerprint(create_model("micro", embed_dim=32)) != first


def test_fingerprint_follows_a_config_change_without_a_weight_change():
    net = create_model("micro")
    first = model_fingerprint(net)
    net.cfg.max_logit_scale = net.cfg.max_logit_scale * 2  # changes what the model computes, no tensor touched
    changed = model_fingerprint(net)
    assert changed != first
    fresh = create_model("micro", max_logit_scale=net.cfg.max_logit_scale)  # hashed anew, never cached
    fresh.load_state_dict(net.state_dict())
    assert model_fingerprint(fresh) == changed


def test_record_round_trips_through_json(model):
    record = QueryEncoder(model).record
    assert record.embed_dim == 64 and record.checkpoint is None
    assert record.config == to_dict(model.cfg) and record.fingerprint == model_fingerprint(model)
    assert ModelRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(LipkitError, match="not a model record"):
        ModelRecord.from_dict({"embed_dim": 4})


def test_load_encoder_from_a_saved_checkpoint_gives_the_same_vectors(model, tmp_path):
    path = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    save_checkpoint(path, {"model": model.state_dict(), "step": 1, "model_config": to_dict(model.cfg)})
    images = _images(2, seed=3)
    direct = QueryEncoder(model)
    for loaded in (load_encoder(path, device="cpu"), load_encoder(tmp_path / "run", "micro", device="cpu")):
        np.testing.assert_allclose(loaded.encode_texts(TEXTS), direct.encode_texts(TEXTS), atol=1e-6)
        np.testing.assert_allclose(loaded.encode_images(images), direct.encode_images(images), atol=1e-6)
        assert loaded.record.fingerprint == direct.record.fingerprint
        assert loaded.record.checkpoint == str(path.resolve())
    record = load_encoder(path, device="cpu").record
    assert encoder_for_record(record, "cpu").record == record
    changed = create_model("micro", embed_dim=64)
    save_checkpoint(path, {"model": changed.state_dict(), "step": 1, "model_config": to_dict(changed.cfg)})
    with pytest.raises(ModelChangedError, match="changed"):
        encoder_for_record(record, "cpu")


def test_importing_the_package_does_not_import_torch():
    code = "import sys, lipkit.index; assert 'torch' not in sys.modules; print(lipkit.index.ModelRecord.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ModelRecord"
