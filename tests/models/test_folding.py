"""BatchNorm folded into the convolutions of a frozen trunk: the same features, state and gradients."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lipkit
from lipkit.models.folding import FoldedBatchNorm2d, FoldedConv2d, fold_batchnorm

pytest.importorskip("timm")


def tower(name: str, fold: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = lipkit.create_model(
        f"timm/{name}",
        embed_dim=16,
        text={"layers": 1, "width": 32, "heads": 2},
        vision={"image_size": 64, "fold_batchnorm": fold},
    )
    randomise_batchnorm(model.visual.trunk)  # far from the identity, so a skipped BatchNorm shows
    return model.visual.eval()


@pytest.mark.parametrize("name", ["test_efficientnet", "tf_efficientnet_lite0", "resnet18"])
def test_folded_trunk_computes_the_same_features_and_keeps_its_state(name):
    plain, folded = tower(name, fold=False), tower(name, fold=True)
    state = {k: v.clone() for k, v in folded.state_dict().items()}
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = plain.features(images)
        got = folded.features(images)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.trunk.modules())
    assert plain.folded is None and folded.folded == n_bn  # every BatchNorm of these follows its convolution
    assert any(isinstance(m, FoldedConv2d) for m in folded.trunk.modules())
    if name.startswith("tf_"):  # TensorFlow padding: timm's Conv2dSame layers fold too
        assert any(type(m).__name__ == "FoldedConv2dSame" for m in folded.trunk.modules())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert folded.state_dict().keys() == state.keys()
    assert all(torch.equal(folded.state_dict()[k], v) for k, v in state.items())


def randomise_batchnorm(module: nn.Module) -> None:
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)


def test_clip_resnet_tower_folds_too():
    small = {"layers": [1, 2, 1, 1], "width": 16, "head_width": 16, "image_size": 64}
    towers = []
    for fold in (False, True):
        torch.manual_seed(0)
        model = lipkit.create_model("RN50", embed_dim=32, vision={**small, "fold_batchnorm": fold}, lock_image=True)
        randomise_batchnorm(model.visual)
        towers.append(model.visual.eval())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = (t.features(images) for t in towers)
    assert towers[0].folded is None
    assert towers[1].folded == sum(isinstance(m, nn.BatchNorm2d) for m in towers[1].modules())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_folded_weights_follow_new_weights_and_gradients_flow_unfolded():
    plain, folded = tower("test_efficientnet", fold=False), tower("test_efficientnet", fold=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded.features(images)  # folds
    other = tower("test_efficientnet", fold=False, seed=1)
    plain.load_state_dict(other.state_dict())
    folded.load_state_dict(other.state_dict())  # new weights, in place: the folded ones are recomputed
    with torch.no_grad():
        assert torch.allclose(folded.features(images), plain.features(images), rtol=1e-4, atol=1e-5)
    # with gradients into the trunk (eval mode, trainable weights) the pairs run unfolded: same gradients
    outputs = [t.features(images).square().sum() for t in (plain, folded)]
    for out in outputs:
        out.backward()
    grads = [dict((n, p.grad) for n, p in t.trunk.named_parameters()) for t in (plain, folded)]
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6) for n in grads[0])


def test_folded_trunk_survives_copy_and_pickle():
    folded = tower("test_efficientnet", fold=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = folded.features(images)
        for clone in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
            conv = next(m for m in clone.trunk.modules() if isinstance(m, FoldedConv2d))
            assert any(conv.__dict__["_fold_bn"] is m for m in clone.trunk.modules())  # the clone's own BatchNorm
            assert torch.allclose(clone.features(images), want, atol=1e-6)


class Tapped(nn.Module):
    """A convolution whose output also bypasses its BatchNorm: folding would change the bypass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_pair_whose_output_is_used_elsewhere_is_not_folded():
    net = Tapped().eval()
    with torch.no_grad():
        net.bn.running_mean.fill_(0.3)
        net.bn.running_var.fill_(2.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
        assert fold_batchnorm(net, lambda: net(x)) == 0
        assert type(net.conv) is nn.Conv2d and type(net.bn) is nn.BatchNorm2d  # restored
        assert "_fold_bn" not in net.conv.__dict__ and "_fold_conv" not in net.bn.__dict__
        assert torch.equal(net(x), want)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        plain[1].running_var.fill_(3.0)
        want = plain(x)
        assert fold_batchnorm(plain, lambda: plain(x)) == 1
        assert isinstance(plain[1], FoldedBatchNorm2d)
        assert torch.allclose(plain(x), want, atol=1e-6)
        plain.train()  # training statistics: the pair runs as before
        assert torch.equal(plain(x), nn.Sequential(*[copy.deepcopy(m) for m in plain]).train()(x))
