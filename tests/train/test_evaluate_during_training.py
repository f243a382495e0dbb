"""Evaluation every N steps, in one process and split unequally over two torchrun ranks (DDP, FSDP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipkit.eval.zeroshot import zeroshot_classify
from lipkit.models import create_model
from lipkit.train.config import resolve_config
from lipkit.train.loop import train

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir()
    or not Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file(),
    reason="dataset-fashion-mnist or fonts-noto-color-emoji is not installed",
)
EVAL = [
    "eval.every=2",
    "eval.zeroshot=[fashion-mnist:test]",
    # 125 pairs, every caption distinct: with repeated captions Recall@k would turn on ties that rounding
    # noise (1e-7, from a different thread count per process) decides, not on the evaluation's split.
    "eval.retrieval=[emoji:val]",
    "eval.max_samples=41",
    "steps=4",
    "checkpoint_every=4",
    "data.batch_size=8",
]


def _results(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("*.json"))}


@pytest.mark.slow
def test_eval_every_n_steps_matches_a_separate_evaluation(run_overrides):
    result = train(resolve_config("tiny-synthetic", overrides=[*run_overrides, *EVAL]))
    found = _results(result.run_dir)
    assert set(found) == {
        "zeroshot_fashion-mnist_test_step00000002.json",
        "zeroshot_fashion-mnist_test_step00000004.json",
        "retrieval_emoji_val_step00000002.json",
        "retrieval_emoji_val_step00000004.json",
    }
    last = found["zeroshot_fashion-mnist_test_step00000004.json"]
    assert last["details"]["step"] == 4
    model = create_model("micro", pretrained=str(result.checkpoint))
    from lipkit.data.labelled import open_labelled
    from lipkit.eval.templates import default_templates

    data = open_labelled("fashion-mnist:test", max_samples=41)
    templates, _ = default_templates(data.name, getattr(data, "templates", None))
    want = zeroshot_classify(model, data, data.classnames, templates, cache=False, progress=False)
    # one metrics implementation: the same numbers as a separate evaluation, to the last bit
    assert last["metrics"] == {key: want[key] for key in ("top1", "top5", "mean_per_class_recall")}
    for key in ("n", "per_class_recall", "confusion_matrix"):
        assert last["details"][key] == want[key], key


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [pytest.param(False, marks=pytest.mark.exhaustive), True])
def test_two_ranks_with_unequal_shares_give_the_same_results(tmp_path, fsdp):
    """DDP: shares of 21 and 20 images, 63 and 62 pairs. FSDP, where every forward pass is collective:
    shares of one zero-shot image and none (the second rank must join the forward anyway)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_tests", Path(__file__).with_name("test_distributed_train.py"))
    ddp_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_tests)
    common = ["progress=false", "tensorboard=false", "device=cpu", f"out_dir={tmp_path}", *EVAL]
    if fsdp:
        common.append("eval.max_samples=1")
    single = train(resolve_config("tiny-synthetic", overrides=[*common, "name=one"]))
    proc = ddp_tests.torchrun(["tiny-synthetic", *common, "name=two", f"fsdp={str(fsdp).lower()}"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one, two = _results(single.run_dir), _results(tmp_path / "two")
    assert set(one) == set(two) and len(one) == 4
    for name in one:
        for key, value in one[name]["metrics"].items():
            assert two[name]["metrics"][key] == pytest.approx(value, abs=0.5), (name, key)
