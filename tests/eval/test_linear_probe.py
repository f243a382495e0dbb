from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lipkit.cli.main import main
from lipkit.errors import LipkitError
from lipkit.eval.linear_probe import fit_logistic, linear_probe, logistic_regression, select_l2, validation_split
from lipkit.eval.results import read_results
from lipkit.train.config import resolve_config
from lipkit.train.loop import train

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def gaussian_classes(n_per_class: int, means: torch.Tensor, std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of isotropic Gaussian classes around ``means`` (C, D), and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(means.shape[0]).repeat_interleave(n_per_class)
    return means[labels] + std * torch.randn(labels.shape[0], means.shape[1], generator=g), labels


def test_logistic_regression_matches_the_closed_form_of_a_symmetric_problem():
    # One sample x = +1 of class 1 and one x = -1 of class 0. By symmetry the bias stays 0 and W = [[-a], [a]],
    # so the objective is -log sigmoid(2a) + l2 * a^2, whose minimum solves l2 * a = sigmoid(-2a).
    l2, low, high = 0.1, 0.0, 10.0
    for _ in range(60):  # bisection: l2 * a - sigmoid(-2a) increases with a
        mid = (low + high) / 2
        low, high = (mid, high) if l2 * mid < 1 / (1 + math.exp(2 * mid)) else (low, mid)
    x, y = torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0])
    weight, bias = logistic_regression(x, y, 2, l2, max_iter=100, history_size=10)
    assert weight.flatten().tolist() == pytest.approx([-low, low], abs=3e-4)  # float32: the loss is flat here
    assert bias.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    # the probe standardises first: x is already standard, so it finds the same weights
    assert torch.equal(fit_logistic(x, y, 2, l2, max_iter=100).weight, weight)


def test_separable_classes_are_learned_perfectly():
    means = 6.0 * torch.eye(5, 16)
    train_x, train_y = gaussian_classes(40, means, 1.0, seed=0)
    test_x, test_y = gaussian_classes(40, means, 1.0, seed=1)
    out = linear_probe(train_x, train_y, test_x, test_y)
    assert out["top1"] >= 99.0 and out["mean_per_class_recall"] >= 99.0 and out["val_top1"] == 100.0
    assert out["l2"] == 1.0  # every strength is perfect on validation: ties go to the strongest
    assert [row["l2"] for row in out["l2_search"]] == sorted(row["l2"] for row in out["l2_search"])


def test_overlapping_classes_reach_the_bayes_accuracy():
    # Two unit Gaussians 2 apart along one axis (plus 7 noise dimensions): the best accuracy is Phi(1) = 84.1%.
    means = torch.zeros(2, 8)
    means[0, 0], means[1, 0] = -1.0, 1.0
    train_x, train_y = gaussian_classes(1000, means, 1.0, seed=0)
    test_x, test_y = gaussian_classes(2000, means, 1.0, seed=1)
    out = linear_probe(train_x, train_y, test_x, test_y, num_classes=2)
    bayes = 100 * 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert abs(out["top1"] - bayes) < 2.0
    assert out["per_class_recall"][0] == pytest.approx(out["per_class_recall"][1], abs=5.0)


def test_selection_never_sees_the_test_labels():
    means = 1.5 * torch.eye(4, 12)
    train_x, train_y = gaussian_classes(60, means, 1.0, seed=0)
    test_x, test_y = gaussian_classes(60, means, 1.0, seed=1)
    honest = linear_probe(train_x, train_y, test_x, test_y, num_classes=4)
    shuffled = test_y[torch.randperm(test_y.shape[0], generator=torch.Generator().manual_seed(3))]
    cheated = linear_probe(train_x, train_y, test_x, shuffled, num_classes=4)
    assert cheated["l2"] == honest["l2"] and cheated["val_top1"] == honest["val_top1"]
    assert cheated["l2_search"] == honest["l2_search"]
    assert cheated["top1"] < honest["top1"] - 20  # the shuffled labels only change the final score
    assert linear_probe(train_x, train_y, test_x, test_y, num_classes=4) == honest  # deterministic


def test_regularisation_matters_when_data_is_scarce():
    # Few noisy samples in many dimensions: the weakest regularisation overfits and is not chosen.
    means = 0.8 * torch.eye(3, 64)
    x, y = gaussian_classes(20, means, 1.0, seed=0)
    l2, _, table = select_l2(x, y, 3, grid=(1e-6, 1e-2, 1.0, 10.0), val_fraction=0.5)
    assert l2 != 1e-6 and len(table) == 4
    weak = fit_logistic(x, y, 3, 1e-6)
    strong = fit_logistic(x, y, 3, 10.0)
    assert strong.weight.norm() < 0.1 * weak.weight.norm()


def test_validation_split_and_bad_inputs():
    fit, val = validation_split(10, 0.2, seed=0)
    assert len(val) == 2 and sorted([*fit.tolist(), *val.tolist()]) == list(range(10))
    assert torch.equal(val, validation_split(10, 0.2, seed=0)[1])
    with pytest.raises(LipkitError, match="validation split"):
        validation_split(1, 0.2, seed=0)
    with pytest.raises(LipkitError, match="-d"):
        linear_probe(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(LipkitError, match="training labels"):
        linear_probe(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), torch.zeros(2, 3), torch.zeros(2), num_classes=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_on_gpu_matches_cpu():
    means = 2.0 * torch.eye(4, 16)
    train_x, train_y = gaussian_classes(50, means, 1.0, seed=0)
    test_x, test_y = gaussian_classes(50, means, 1.0, seed=1)
    cpu = linear_probe(train_x, train_y, test_x, test_y)
    gpu = linear_probe(train_x, train_y, test_x, test_y, device="cuda")
    assert gpu["l2"] == cpu["l2"] and abs(gpu["top1"] - cpu["top1"]) <= 1.0


@pytest.mark.skipif(
    not FASHION_MNIST.is_file(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_cli_linear_probe_on_fashion_mnist_subsets(tmp_path, capsys):
    overrides = [f"out_dir={tmp_path}", "steps=3", "progress=false", "tensorboard=false", "device=cpu"]
    run_dir = train(resolve_config("tiny-synthetic", overrides=overrides)).run_dir
    out_file = tmp_path / "lp.json"
    argv = ["eval", "linear-probe", str(run_dir), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test"]
    assert main([*argv, "--limit", "300", "--device", "cpu", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "L2" in printed and "mean per-class recall" in printed and "ankle boot" in printed
    result = read_results(out_file)
    assert result["task"] == "linear-probe"
    assert result["data"] == {"train": "fashion-mnist:train", "test": "fashion-mnist:test"}
    assert {"top1", "top5", "mean_per_class_recall", "val_top1", "l2"} <= set(result["metrics"])
    assert result["metrics"]["top1"] > 20.0  # even a random tower's features beat chance (10%) on clothes
    assert result["details"]["n"] == 300 and len(result["details"]["l2_search"]) == 7
