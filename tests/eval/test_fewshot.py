from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import LipkitError
from lipkit.eval.adapters import ADAPTERS, cv_folds, select_on_folds
from lipkit.eval.adapters.base import one_hot, zeroshot_logits
from lipkit.eval.adapters.gda import gda_classifier, ledoit_wolf_shrinkage
from lipkit.eval.adapters.tip import tip_logits
from lipkit.eval.fewshot import run_fewshot, sample_k_shot, spread_indices

METHODS = ("zeroshot", "linear_probe", "tip_adapter", "tip_adapter_f", "gda")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, and stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n_classes=10, dim=32, n_train=24, n_test=40, zs_noise=0.5, seed=0):
    """CLIP-like features: images share a common direction, class embeddings sit in another cone, and the
    zero-shot class embeddings are noisy versions of the true class directions (a deliberately poor classifier)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    image_axis, text_axis, rest = basis[0], basis[1], basis[2:]
    directions = F.normalize(torch.randn(n_classes, dim - 2, generator=g), dim=-1) @ rest  # (C, D)

    def draw(n):
        labels = torch.arange(n_classes).repeat_interleave(n)
        noise = torch.randn(len(labels), dim - 2, generator=g) @ rest / (dim - 2) ** 0.5
        return F.normalize(image_axis + 0.35 * directions[labels] + 0.6 * noise, dim=-1), labels

    train, test = draw(n_train), draw(n_test)
    noisy = directions + zs_noise * torch.randn(n_classes, dim - 2, generator=g) @ rest
    zeroshot = F.normalize(text_axis + 0.5 * image_axis + 0.3 * noisy, dim=-1)
    return train, test, zeroshot


@pytest.fixture(scope="module")
def results():
    (train_x, train_y), (test_x, test_y), zs = synthetic()
    return run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(1, 16), methods=METHODS, seeds=(0, 1))


def test_sample_k_shot_is_deterministic_balanced_and_nested():
    labels = torch.arange(5).repeat(7)[torch.randperm(35, generator=torch.Generator().manual_seed(3))]
    four = sample_k_shot(labels, 4, seed=1)
    assert torch.equal(four, sample_k_shot(labels, 4, seed=1))
    assert not torch.equal(four, sample_k_shot(labels, 4, seed=2))
    assert torch.equal(labels[four], torch.arange(5).repeat_interleave(4))  # class by class
    assert len(set(four.tolist())) == 20
    two = sample_k_shot(labels, 2, seed=1)
    assert set(two.tolist()) <= set(four.tolist())  # nested in K for one seed


def test_sample_k_shot_names_the_short_class():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(LipkitError, match=r"class 'cat' \(label 1\) has 1 example\(s\), fewer than the 2 shots"):
        sample_k_shot(labels, 2, seed=0, classnames=["dog", "cat", "bird"])
    with pytest.raises(LipkitError, match=r"class 'fish' \(label 3\) has 0 example"):
        sample_k_shot(labels, 1, seed=0, classnames=["dog", "cat", "bird", "fish"])
    with pytest.raises(LipkitError, match="at least 1"):
        sample_k_shot(labels, 0, seed=0)


def test_cv_folds_rule():
    assert cv_folds(torch.arange(6)) == []  # one shot per class: nothing to hold out
    labels = torch.arange(3).repeat_interleave(16)
    folds = cv_folds(labels, n_folds=4)
    assert len(folds) == 4
    held_out = torch.cat([val for _, val in folds])
    assert sorted(held_out.tolist()) == list(range(48))  # every shot validated exactly once
    for train, val in folds:
        assert set(train.tolist()).isdisjoint(val.tolist())
        assert torch.equal(torch.bincount(labels[val]), torch.full((3,), 4))  # 4 shots per class held out
    assert [len(val) for _, val in cv_folds(torch.arange(3).repeat_interleave(2))] == [3, 3]  # K=2: 2 folds


def test_select_on_folds_breaks_ties_by_cross_entropy():
    labels = torch.tensor([0, 1, 0, 1])
    folds = cv_folds(labels)
    good = torch.tensor([[2.0, 0.0], [0.0, 2.0]])

    def scorer(train_feats, train_labels, val_feats):
        yield torch.tensor([[0.1, 0.0], [0.0, 0.1]])  # right but unsure
        yield good  # right and sure: same accuracy, lower cross-entropy
        yield -good  # wrong

    assert select_on_folds(torch.zeros(4, 1), labels, folds, scorer) == 1


def test_tip_adapter_with_alpha_zero_is_zero_shot_exactly():
    (train_x, train_y), (test_x, _), zs = synthetic(n_train=4)
    logits = tip_logits(test_x, train_x, one_hot(train_y, 10), zs, alpha=0.0, beta=5.5)
    assert torch.equal(logits, zeroshot_logits(test_x, zs))
    assert torch.equal(zeroshot_logits(test_x, zs), 100 * test_x @ zs.T)


def test_gda_closed_form_by_hand():
    # class 0: (0, 0), (2, 2), mean (1, 1); class 1: (3, 0), (5, 0), mean (4, 0)
    feats = torch.tensor([[0.0, 0.0], [2.0, 2.0], [3.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    weight, bias, s = gda_classifier(feats, labels, 2, shrinkage=0.5)
    # pooled covariance: centred rows (-1,-1), (1,1), (-1,0), (1,0) -> [[4, 2], [2, 2]] / (N - C = 2)
    # shrunk halfway to tr/D I = 1.5 I: [[1.75, 0.5], [0.5, 1.25]]; its inverse by hand:
    det = 1.75 * 1.25 - 0.5 * 0.5
    precision = torch.tensor([[1.25, -0.5], [-0.5, 1.75]], dtype=torch.float64) / det
    means = torch.tensor([[1.0, 1.0], [4.0, 0.0]], dtype=torch.float64)
    expected_w = means @ precision
    expected_b = torch.stack([-0.5 * means[c] @ precision @ means[c] for c in range(2)])
    assert s == 0.5
    assert torch.allclose(weight, expected_w) and torch.allclose(bias, expected_b)
    assert torch.allclose(weight[0], torch.tensor([0.75 / det, 1.25 / det], dtype=torch.float64))


def test_ledoit_wolf_matches_its_definition():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x - x.mean(0)
    n, d = x.shape
    s = x.T @ x / n
    mu = s.trace() / d
    dispersion = ((s - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    noise = sum(((torch.outer(r, r) - s) ** 2).sum() for r in x) / n**2 / d
    assert ledoit_wolf_shrinkage(x) == pytest.approx(float(min(noise, dispersion) / dispersion))
    assert ledoit_wolf_shrinkage(torch.zeros(4, 3)) == 1.0


def test_every_method_beats_a_poor_zero_shot_at_16_shots(results):
    zeroshot = results["methods"]["zeroshot"]["16"]["top1"]
    assert zeroshot < 50.0  # the synthetic zero-shot classifier is poor by design
    for method in METHODS[1:]:
        assert results["methods"][method]["16"]["top1"] > zeroshot + 20.0, method


def test_ensembles_keep_a_good_zero_shot_classifier():
    (train_x, train_y), (test_x, test_y), zs = synthetic(zs_noise=0.0)
    methods = ("zeroshot", "tip_adapter", "tip_adapter_f", "gda")
    out = run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(16,), methods=methods)["methods"]
    assert out["zeroshot"]["16"]["top1"] > 90.0
    for method in methods[1:]:
        assert out[method]["16"]["top1"] > out["zeroshot"]["16"]["top1"] - 3.0, method


def test_more_shots_do_not_hurt_the_probe(results):
    probe = results["methods"]["linear_probe"]
    assert probe["16"]["top1"] >= probe["1"]["top1"] - 1.0


def test_result_layout_and_defaults_without_validation(results):
    tip = results["methods"]["tip_adapter"]
    assert results["ks"] == [1, 16] and results["seeds"] == [0, 1]
    assert tip["1"]["val_folds"] == 0 and tip["16"]["val_folds"] == 4
    assert tip["1"]["params"] == [{"alpha": 1.0, "beta": 5.5}] * 2  # K=1: the defaults
    assert len(tip["16"]["top1_per_seed"]) == 2
    assert tip["16"]["top1"] == pytest.approx(sum(tip["16"]["top1_per_seed"]) / 2)
    assert tip["16"]["top1_std"] == pytest.approx(statistics.pstdev(tip["16"]["top1_per_seed"]))
    assert set(results["methods"]["tip_adapter_f"]["16"]["params"][0]) == {"alpha", "beta", "train_alpha", "train_beta"}


def test_selection_never_looks_at_test_labels(results):
    (train_x, train_y), (test_x, test_y), zs = synthetic()
    shuffled = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))]
    again = run_fewshot(train_x, train_y, test_x, shuffled, zs, ks=(1, 16), methods=METHODS, seeds=(0, 1))
    for method in METHODS:
        for k in ("1", "16"):
            assert again["methods"][method][k]["params"] == results["methods"][method][k]["params"], (method, k)


def test_adapters_fit_on_shots_only():
    (train_x, train_y), _, zs = synthetic(n_train=4)
    folds = cv_folds(train_y)
    for name in METHODS:
        adapted = ADAPTERS.get(name)(train_x, train_y, zs, folds, seed=0)
        assert adapted.predict(train_x[:3]).shape == (3, 10)


def test_probe_defaults_without_validation_and_its_old_option_names():
    (train_x, train_y), (test_x, _), zs = synthetic(n_train=4)
    assert ADAPTERS.get("linear_probe")(train_x[::4], train_y[::4], zs, [], seed=0).params == {"l2": 1e-2}
    folds = cv_folds(train_y)
    new = ADAPTERS.get("linear_probe")(train_x, train_y, zs, folds, l2_grid=(1.0, 1e-3), default_l2=0.5)
    with pytest.warns(DeprecationWarning, match="'weight_decays' is deprecated; use 'l2_grid'"):
        old = ADAPTERS.get("linear_probe")(train_x, train_y, zs, folds, weight_decays=(1.0, 1e-3))
    assert old.params == new.params and new.params["l2"] in (1.0, 1e-3)
    assert torch.equal(old.predict(test_x), new.predict(test_x))
    with pytest.warns(DeprecationWarning, match="'default_weight_decay' is deprecated; use 'default_l2'"):
        assert ADAPTERS.get("linear_probe")(train_x, train_y, zs, [], default_weight_decay=0.5).params == {"l2": 0.5}


def test_run_fewshot_input_errors():
    (train_x, train_y), (test_x, test_y), zs = synthetic(n_train=2, n_test=2)
    with pytest.raises(LipkitError, match="needs the model"):
        run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(1,), methods=("coop",))
    with pytest.raises(LipkitError, match="unknown few-shot method 'tip'"):
        run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(1,), methods=("tip",))
    with pytest.raises(LipkitError, match=r"test features must be \(N, 32\)"):
        run_fewshot(train_x, train_y, test_x[:, :8], test_y, zs, ks=(1,))
    with pytest.raises(LipkitError, match="fewer than the 4 shots"):
        run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(4,), methods=("zeroshot",))
    with pytest.raises(LipkitError, match="not run"):
        run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(1,), methods=("gda",), options={"linear_probe": {}})


def test_coop_hook_runs_through_the_driver():
    (train_x, train_y), (test_x, test_y), zs = synthetic(n_classes=3, n_train=2, n_test=3)
    seen = []

    def coop_fn(shots):
        seen.append(shots)
        return zeroshot_logits(test_x, zs)  # stands in for CoOp's test logits

    out = run_fewshot(train_x, train_y, test_x, test_y, zs, ks=(1, 2), methods=("zeroshot", "coop"), coop_fn=coop_fn)
    assert out["methods"]["coop"]["2"]["top1"] == out["methods"]["zeroshot"]["2"]["top1"]
    assert [len(s) for s in seen] == [3, 6]


def test_spread_indices():
    assert spread_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    assert spread_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert spread_indices(3, 10).tolist() == [0, 1, 2]
    with pytest.raises(LipkitError):
        spread_indices(3, 0)
