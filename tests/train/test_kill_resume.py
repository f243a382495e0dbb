"""``kill -9`` at random points of a run, again and again: resumed each time, it ends bit-exact.

One run is killed at KILLS random points (a fixed seed picks them: a step to reach, then a random delay, so
kills land in forward and backward passes, in checkpoint writes and in metric records), and resumed with
``resume=latest`` straight after each kill; the last resume runs to the end. Its weights, optimizer state and
metrics must equal those of a run that was never interrupted. ``LIPKIT_TEST_KILLS`` sets KILLS (3 by default;
``LIPKIT_TEST_KILLS=20`` for more).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipkit.train import checkpoint as ckpt
from lipkit.train.metrics import read_metrics

KILLS = int(os.environ.get("LIPKIT_TEST_KILLS", "3"))
STEPS = 6 * KILLS + 12
SEED = 2026  # picks the kill points
COMPARED = ("step", "loss", "grad_norm", "lr", "logit_scale")  # every record's entries but the timing


def launch(out_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    """``lipkit train`` in a process of its own (one thread, so every process computes alike)."""
    cmd = [sys.executable, "-m", "lipkit.cli.main", "train", "tiny-synthetic", f"out_dir={out_dir}", f"name={name}"]
    cmd += ["progress=false", "tensorboard=false", "device=cpu", f"steps={STEPS}", "checkpoint_every=2"]
    cmd += ["log_every=1", "data.workers=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (out_dir / f"{name}.log").open("a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def output(out_dir: Path, name: str) -> str:
    return (out_dir / f"{name}.log").read_text()


def last_step(run_dir: Path) -> int:
    """The newest step in the run's metrics (0 before the first)."""
    try:
        return max((int(r["step"]) for r in read_metrics(run_dir)), default=0)
    except FileNotFoundError:
        return 0


def kill_after(proc: subprocess.Popen, run_dir: Path, step: int, delay: float) -> int:
    """SIGKILL ``proc`` ``delay`` seconds after its metrics reach ``step``; returns the step reached by then."""
    deadline = time.time() + 300
    while last_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {output(run_dir.parent, run_dir.name)}"
        assert time.time() < deadline, f"the run did not reach step {step}"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, output(run_dir.parent, run_dir.name)
    return last_step(run_dir)


def final_state(run_dir: Path) -> dict:
    found = ckpt.list_checkpoints(run_dir)
    assert found[-1].name == f"step_{STEPS:08d}.pt"
    return ckpt.load_checkpoint(found[-1])


def same(a: object, b: object) -> bool:
    """Bit-exact equality of nested checkpoint entries."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_ends_bit_exact(tmp_path):
    rng = random.Random(SEED)
    targets = sorted(rng.sample(range(2, STEPS - 10), KILLS))  # room to spare: no run ends before its kill
    full = launch(tmp_path, "full")
    survived, reached = 0, 0
    proc = launch(tmp_path, "cut")
    for target in targets:
        reached = kill_after(proc, tmp_path / "cut", max(target, reached + 1), rng.uniform(0.0, 0.1))
        survived += 1
        resume = ["resume=latest"] if ckpt.list_checkpoints(tmp_path / "cut") else []  # killed before the first one
        proc = launch(tmp_path, "cut", *resume)  # at once: orphaned loader workers must not hold the lock
    assert proc.wait(timeout=600) == 0, output(tmp_path, "cut")
    assert full.wait(timeout=600) == 0, output(tmp_path, "full")
    assert survived == KILLS
    assert not list((tmp_path / "cut").rglob("*.tmp"))  # interrupted writes left nothing behind
    records = [[{k: r[k] for k in COMPARED} for r in read_metrics(tmp_path / name)] for name in ("full", "cut")]
    assert [r["step"] for r in records[1]] == list(range(1, STEPS + 1))
    assert records[1] == records[0]
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    assert same(a["model"], b["model"]) and same(a["optimizer"], b["optimizer"])
