from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lipkit.errors import LipkitError
from lipkit.eval.coop import (
    CoopConfig,
    CoopPrompts,
    coop_backward,
    coop_epochs,
    coop_hook,
    coop_logits,
    coop_loss,
    train_coop,
)
from lipkit.eval.fewshot import fewshot_report
from lipkit.models import create_model, get_tokenizer

NAMES = ["dog", "cat", "golden retriever", "aircraft carrier"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, and stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("micro")


def synthetic_shots(n_per_class=4, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(NAMES), dim, generator=g), dim=-1)
    labels = torch.arange(len(NAMES)).repeat_interleave(n_per_class)
    feats = F.normalize(centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), dim=-1)
    return feats, labels


@pytest.mark.parametrize("name", ["micro", "tiny-siglip"])  # causal + end-of-text pooling; bidirectional + last
def test_context_initialised_from_words_gives_the_hand_written_prompt_exactly(name):
    torch.manual_seed(0)
    model = create_model(name)
    prompts = CoopPrompts(model, NAMES, init="a photo of a")
    assert prompts.n_ctx == 4
    tokens = get_tokenizer(model.cfg)([f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        assert torch.equal(prompts(model.text), model.encode_text(tokens))
        assert torch.equal(prompts(model.text, slice(1, 3)), model.encode_text(tokens[1:3]))


def test_prompts_hold_only_the_context(model):
    prompts = CoopPrompts(model, NAMES, n_ctx=3, init=None, generator=torch.Generator().manual_seed(0))
    assert [name for name, _ in prompts.named_parameters()] == ["ctx"]
    assert prompts.ctx.shape == (3, 64)
    assert set(prompts.state_dict()) == {"ctx", "tokens"}


def test_training_lowers_the_loss_and_leaves_the_towers_alone(model):
    feats, labels = synthetic_shots()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    config = CoopConfig(init=None, n_ctx=4, epochs=15, batch_size=8, seed=0)  # 30 SGD steps at the paper lr
    start = CoopPrompts(model, NAMES, config.n_ctx, None, torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        loss_before = coop_loss(start(model.text), feats, labels, model.scale()).item()
    prompts = train_coop(model, NAMES, feats, labels, config)
    with torch.no_grad():
        loss_after = coop_loss(prompts(model.text), feats, labels, model.scale()).item()
    assert loss_after < loss_before - 0.3
    assert not torch.equal(prompts.ctx, start.ctx)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert coop_logits(prompts, model, feats).shape == (len(feats), len(NAMES))


def test_chunked_backward_gives_the_same_gradient(model):
    feats, labels = synthetic_shots()
    grads = []
    for chunk in (len(NAMES), 1, 3):
        prompts = CoopPrompts(model, NAMES, init="a photo of a")
        loss = coop_backward(prompts, model.text, feats, labels, 10.0, class_chunk=chunk)
        grads.append((loss, prompts.ctx.grad.clone()))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0])
        assert torch.allclose(grad, grads[0][1], atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_unsupported_text_tower_and_long_prompts(model):
    other = create_model("micro")
    other.text = nn.Identity()
    with pytest.raises(LipkitError, match=r"CoOp needs lipkit's CLIP text transformer.*Identity"):
        CoopPrompts(other, NAMES)
    with pytest.raises(LipkitError, match=r"class 'a very very .*' needs 2[0-9] tokens .* takes 16"):
        CoopPrompts(model, ["dog", "a very very very very very very very very very very very very long name"])
    with pytest.raises(LipkitError, match="at least one context vector"):
        CoopPrompts(model, NAMES, n_ctx=0)


def test_paper_epochs():
    assert [coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


def test_hook_trains_on_the_shots_it_is_given(model):
    feats, labels = synthetic_shots()
    hook = coop_hook(model, NAMES, feats, labels, feats[:5], CoopConfig(epochs=1))
    assert hook(torch.tensor([0, 4, 8, 12])).shape == (5, len(NAMES))


class _Squares:
    """A tiny labelled image set: class c is a uniform grey of level 60 c + noise."""

    classnames = NAMES

    def __init__(self, per_class: int, seed: int) -> None:
        self.items = [(c, seed * 100 + i) for c in range(len(NAMES)) for i in range(per_class)]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> Image.Image:
        c, i = self.items[index]
        return Image.new("RGB", (32, 32), (60 * c + i % 7, 60 * c, 30))

    def label(self, index: int) -> int:
        return self.items[index][0]


def test_fewshot_report_end_to_end(model):
    methods = ("zeroshot", "linear_probe", "tip_adapter", "tip_adapter_f", "gda", "coop")
    report = fewshot_report(
        model, _Squares(5, 0), _Squares(3, 1), NAMES, ["a photo of a {c}."], ks=(1, 2), methods=methods,
        max_test=8, coop=CoopConfig(epochs=2), progress=False,
    )  # fmt: skip
    assert report["n_test"] == 8 and report["n_train_pool"] == 20 and report["n_train"] == 8
    assert set(report["methods"]) == set(methods)
    top1 = {(m, k): report["methods"][m][k]["top1"] for m in methods for k in ("1", "2")}
    assert all((v / 12.5).is_integer() for v in top1.values())  # one seed, 8 test images: a count of eighths
    # the four grey levels are apart in feature space: every method that fits the features gets all 8 with K=2
    assert [top1[m, "2"] for m in ("linear_probe", "tip_adapter", "tip_adapter_f", "gda")] == [100.0] * 4
