"""torchrun with two gloo processes: same losses and weights as one process; a dead rank ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lipkit.losses import LOSSES
from lipkit.train import checkpoint as ckpt
from lipkit.train.config import resolve_config
from lipkit.train.loop import train
from lipkit.train.metrics import read_metrics

PRESET = "tiny-synthetic"
# the other cases of a check run by `make test-exhaustive`; CI runs one or two of each
EXHAUSTIVE = pytest.mark.exhaustive
COMMON = ["progress=false", "tensorboard=false", "device=cpu", "data.workers=0", "log_every=1"]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "lipkit.cli.main", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [  # plain InfoNCE across two processes also runs in the micro-batch and resume checks
        pytest.param("infonce", marks=EXHAUSTIVE),
        pytest.param("siglip", marks=EXHAUSTIVE),
        pytest.param("infonce-streaming", marks=EXHAUSTIVE),
        "siglip-streaming",
    ],
)
def test_two_processes_match_one_process(tmp_path, loss):
    """The streaming forms run across processes as infonce-streaming-distributed and siglip-ring."""
    extra = [f"loss={loss}", "steps=4", "checkpoint_every=4", "data.batch_size=16", f"out_dir={tmp_path}"]
    if LOSSES.get(loss).needs_bias:
        extra.append("model=tiny-siglip")
    if loss.endswith("streaming"):
        extra.append("loss_options.tile=3")  # several tiles per rank's 8 rows
    single = train(resolve_config(PRESET, overrides=[*COMMON, *extra, "name=single"]))
    proc = torchrun([PRESET, *COMMON, *extra, "name=ddp"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one = [r["loss"] for r in read_metrics(single.run_dir)]
    two = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    a = torch.load(single.checkpoint, weights_only=True)["model"]
    b = torch.load(ckpt.list_checkpoints(tmp_path / "ddp")[-1], weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_killing_one_rank_ends_the_run_promptly(tmp_path):
    proc = torchrun([PRESET, *COMMON, "steps=100000", "checkpoint_every=100000", f"out_dir={tmp_path}", "name=kill"])
    metrics = tmp_path / "kill" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.5)
    assert metrics.exists(), "the run never started"
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - start < 60, out


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [pytest.param(False, marks=EXHAUSTIVE), True])
def test_resume_under_another_number_of_processes(tmp_path, fsdp):
    extra = ["steps=6", "checkpoint_every=3", "data.batch_size=16", f"out_dir={tmp_path}"]
    full = train(resolve_config(PRESET, overrides=[*COMMON, *extra, "name=full"]))

    def stop(step, _metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(resolve_config(PRESET, overrides=[*COMMON, *extra, "name=moved"]), callbacks=[stop])
    proc = torchrun([PRESET, *COMMON, *extra, "name=moved", "resume=latest", f"fsdp={str(fsdp).lower()}"])  # 1 -> 2
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one = [(r["step"], r["loss"]) for r in read_metrics(full.run_dir)]
    moved = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "moved")]
    assert [s for s, _ in moved] == [s for s, _ in one]
    assert [loss for _, loss in moved] == pytest.approx([loss for _, loss in one], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@EXHAUSTIVE  # FSDP against one process: also test_micro_batches_...[infonce-True] and test_resume_..._processes[True]
def test_fsdp_matches_one_process(tmp_path):
    extra = ["steps=4", "checkpoint_every=2", "data.batch_size=16", f"out_dir={tmp_path}"]
    single = train(resolve_config(PRESET, overrides=[*COMMON, *extra, "name=single"]))
    proc = torchrun([PRESET, *COMMON, *extra, "name=fsdp", "fsdp=true"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one = [r["loss"] for r in read_metrics(single.run_dir)]
    two = [r["loss"] for r in read_metrics(tmp_path / "fsdp")]
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    a = torch.load(single.checkpoint, weights_only=True)["model"]
    b = torch.load(ckpt.list_checkpoints(tmp_path / "fsdp")[-1], weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key
    resumed = torch.load(ckpt.list_checkpoints(tmp_path / "fsdp")[0], weights_only=True)
    assert resumed["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "fsdp"), [pytest.param("siglip", False, marks=EXHAUSTIVE), ("infonce", True)])
def test_micro_batches_on_two_processes_match_one_process(tmp_path, loss, fsdp):
    """GradCache across ranks: 2 x 8 samples in micro-batches of 3 (3 + 3 + 2) equal 16 in one pass."""
    extra = [f"loss={loss}", "steps=3", "checkpoint_every=3", "data.batch_size=16", f"out_dir={tmp_path}"]
    if loss == "siglip":
        extra.append("model=tiny-siglip")
    single = train(resolve_config(PRESET, overrides=[*COMMON, *extra, "name=single"]))
    proc = torchrun([PRESET, *COMMON, *extra, "name=micro", "accum_micro_batch=3", f"fsdp={str(fsdp).lower()}"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert_same_run(single, tmp_path / "micro", steps=3)


def assert_same_run(single, run_dir, steps: int) -> None:
    """Losses, gradient norms and final weights of the torchrun run in ``run_dir`` equal ``single``'s.

    Tight on the weights: Adam's steps of ~1e-3 would hide a missing or mis-scaled gradient otherwise.
    """
    one = [(r["loss"], r["grad_norm"]) for r in read_metrics(single.run_dir)]
    two = [(r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]
    assert len(one) == len(two) == steps
    for got, want in zip(two, one):
        assert got == pytest.approx(want, rel=1e-4)
    a = torch.load(single.checkpoint, weights_only=True)["model"]
    b = torch.load(ckpt.list_checkpoints(run_dir)[-1], weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_fsdp_needs_torchrun(run_overrides):
    from lipkit.errors import ConfigError

    with pytest.raises(ConfigError, match="torchrun"):
        train(resolve_config(PRESET, overrides=[*run_overrides, "fsdp=true"]))


@pytest.mark.slow
def test_cached_features_on_two_processes_match_one_process(tmp_path):
    """LiT on cached features under torchrun: each rank computes half the features; same run as one process."""
    locked = ["model_overrides.lock_image=true", "model_overrides.lock_text=true", "cache_features=true"]
    extra = [*locked, "steps=4", "checkpoint_every=4", "data.batch_size=16", f"out_dir={tmp_path}"]
    single = train(
        resolve_config(PRESET, overrides=[*COMMON, *extra, "name=single", f"feature_cache_dir={tmp_path / 'a'}"])
    )
    proc = torchrun([PRESET, *COMMON, *extra, "name=ddp", f"feature_cache_dir={tmp_path / 'b'}"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (want,), (got,) = list((tmp_path / "a").glob("*.pt")), list((tmp_path / "b").glob("*.pt"))
    assert got.name == want.name  # the same cache key: a later run in either setting reuses the entry
    a_feats, b_feats = (torch.load(p, weights_only=True)["payload"] for p in (want, got))
    for key in a_feats:  # the halves are computed in other batches: equal up to float rounding
        torch.testing.assert_close(b_feats[key], a_feats[key], atol=1e-5, rtol=1e-4)
    assert_same_run(single, tmp_path / "ddp", steps=4)  # a gradient left unaveraged would move the heads apart
