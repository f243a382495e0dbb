"""Training-state faults: each ends in one clear line, and what is on disk stays good.

Non-finite weights are never checkpointed; a resume from another model, seed or a later step is refused;
stale temporary files go; TensorBoard drops the resumed steps; every JSON file is strict; bad data and a
missing GPU are refused before the run folder exists; the run lock dies with the main process alone.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipkit.cli.main import main
from lipkit.errors import CheckpointError, ConfigError, FolderInUseError, TrainingDivergedError
from lipkit.eval.results import make_result, write_results
from lipkit.train import checkpoint as ckpt
from lipkit.train import loop
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics
from lipkit.utils import FolderLock, resolve_device, strict_json

PRESET = "tiny-synthetic"  # model micro, seed 0


def strict_loads(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity, as every strict JSON reader does."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, which must fail with exit code 2 and one line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def train(overrides: list[str], callbacks: tuple = ()) -> loop.TrainResult:
    return loop.train(resolve_config(PRESET, overrides=overrides), callbacks=callbacks)


def stop_at(step: int):
    """A callback that interrupts the run after ``step`` (its record and checkpoint are written)."""

    def stop(at: int, _metrics: dict) -> None:
        if at == step:
            raise KeyboardInterrupt

    return stop


def finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in ckpt.load_checkpoint(path)["model"].values())


# --- non-finite weights ---------------------------------------------------------------------------------------

EXPLODE = ["optim.lr=1e39", "optim.warmup_steps=0", "checkpoint_every=1", "log_every=1"]


def test_an_update_that_makes_the_weights_infinite_is_never_checkpointed(run_overrides, tmp_path, capsys):
    line = one_line_error(capsys, ["train", PRESET, *run_overrides, "name=boom", "steps=4", *EXPLODE])
    assert line == (
        "lipkit train: error: the weights became NaN or infinite in the update of step 1; no checkpoint was "
        "written. Lower optim.lr, set optim.grad_clip, or use precision=fp32."
    )
    assert ckpt.list_checkpoints(tmp_path / "boom") == []


def test_a_diverged_resume_names_the_last_good_checkpoint_which_is_finite(run_overrides, tmp_path, capsys):
    base = [*run_overrides, "name=good", "checkpoint_every=1", "log_every=1"]
    train([*base, "steps=2"])
    line = one_line_error(capsys, ["train", PRESET, *base, "steps=4", "resume=latest", *EXPLODE])
    kept = tmp_path / "good" / "checkpoints" / "step_00000002.pt"
    assert line.startswith("lipkit train: error: the weights became NaN or infinite in the update of step 3; ")
    assert f"the last good checkpoint, {kept}, is kept." in line
    assert ckpt.list_checkpoints(tmp_path / "good")[-1] == kept and finite(kept)


def test_a_non_finite_loss_names_the_last_good_checkpoint(run_overrides, tmp_path, monkeypatch):
    real = loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda *args: real(*args) * (math.nan if args[0].step == 3 else 1))
    with pytest.raises(TrainingDivergedError) as info:
        train([*run_overrides, "name=nan", "steps=6", "checkpoint_every=2", "log_every=2"])
    kept = tmp_path / "nan" / "checkpoints" / "step_00000002.pt"
    assert str(info.value).startswith("the loss or gradient became [nan, ")
    assert f"at step 4; the last good checkpoint, {kept}, is kept. Lower optim.lr" in str(info.value)


# --- resume mismatches ----------------------------------------------------------------------------------------


@pytest.fixture
def finished(run_overrides, tmp_path) -> tuple[list[str], Path]:
    """A 2-step run of the micro model with seed 0 (checkpoint at step 2); the overrides that resume it."""
    base = [*run_overrides, "name=first", "checkpoint_every=2", "log_every=1"]
    train([*base, "steps=2"])
    return [*base, "resume=latest"], tmp_path / "first"


def test_resume_with_another_model_and_seed_is_refused_in_one_line(finished, capsys):
    overrides, run_dir = finished
    config = (run_dir / "config.yaml").read_text()
    line = one_line_error(capsys, ["train", PRESET, *overrides, "steps=4", "model=tiny", "seed=1"])
    path = run_dir / "checkpoints" / "step_00000002.pt"
    assert line == (
        f"lipkit train: error: resume: {path} was trained with model=micro, seed=0; this run has model=tiny, "
        "seed=1; pass resume_force=true to resume anyway"
    )
    assert (run_dir / "config.yaml").read_text() == config  # refused before the run directory changed


def test_a_refused_resume_into_a_new_run_name_leaves_no_folder(finished, capsys, tmp_path):
    overrides, run_dir = finished
    path = run_dir / "checkpoints" / "step_00000002.pt"
    line = one_line_error(capsys, ["train", PRESET, *overrides[:-1], "name=second", f"resume={path}", "seed=1"])
    assert line.endswith("trained with seed=0; this run has seed=1; pass resume_force=true to resume anyway")
    assert not (tmp_path / "second").exists()  # the lock's folder goes again: nothing was written there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]


def test_resume_with_another_seed_or_model_override_is_refused(finished):
    overrides, _ = finished
    with pytest.raises(CheckpointError, match=r"trained with seed=0; this run has seed=3; pass resume_force=true"):
        train([*overrides, "steps=4", "seed=3"])
    with pytest.raises(CheckpointError, match=r'with model_overrides=\{\}; this run has model_overrides=\{"embed_'):
        train([*overrides, "steps=4", "model_overrides.embed_dim=48"])


def test_resume_force_resumes_with_another_seed(finished):
    overrides, run_dir = finished
    result = train([*overrides, "steps=4", "seed=3", "resume_force=true"])
    assert result.step == 4
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_resume_force_with_weights_that_do_not_fit_lists_the_keys_without_a_traceback(finished, capsys):
    overrides, run_dir = finished
    assert main(["train", PRESET, *overrides, "steps=4", "model=tiny", "resume_force=true"]) == 2
    err = capsys.readouterr().err
    path = run_dir / "checkpoints" / "step_00000002.pt"
    assert err.startswith(f"lipkit train: error: resume: {path} does not fit the model:\n")
    assert "shape mismatches" in err and "Traceback" not in err


def test_resume_below_the_checkpoint_step_is_refused_and_changes_nothing(finished, capsys):
    overrides, run_dir = finished
    before = (run_dir / "summary.json").read_text()
    line = one_line_error(capsys, ["train", PRESET, *overrides, "steps=1"])
    path = run_dir / "checkpoints" / "step_00000002.pt"
    assert line == f"lipkit train: error: resume: {path} is at step 2, past steps=1; set steps to 2 or more"
    assert (run_dir / "summary.json").read_text() == before


def test_resume_at_the_checkpoint_step_finishes_at_once_with_strict_json(finished):
    overrides, run_dir = finished
    loss = read_metrics(run_dir)[-1]["loss"]
    result = train([*overrides, "steps=2"])
    assert (result.step, result.loss) == (2, loss)
    assert strict_loads((run_dir / "summary.json").read_text())["loss"] == loss
    (run_dir / "metrics.jsonl").unlink()  # no recorded loss left: null, never NaN
    train([*overrides, "steps=2"])
    summary = strict_loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["loss"]) == (2, None)


@pytest.mark.slow
def test_a_cut_off_last_metrics_line_does_not_stop_resume(run_overrides, tmp_path):
    base = [*run_overrides, "name=cut", "steps=4", "checkpoint_every=2", "log_every=1"]
    with pytest.raises(KeyboardInterrupt):
        train(base, callbacks=(stop_at(3),))
    metrics = tmp_path / "cut" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 0.')  # a killed writer's half line
    train([*base, "resume=latest"])
    assert [strict_loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


# --- stale temporary files and TensorBoard -------------------------------------------------------------------


def test_resume_removes_stale_temporary_files_and_only_those(finished):
    overrides, run_dir = finished
    stale = [run_dir / "checkpoints" / ".step_00000004.pt.k3x_9q2a.tmp", run_dir / ".summary.json.a1b2c3d4.tmp"]
    foreign = [run_dir / "checkpoints" / ".notes.txt.k3x_9q2a.tmp", run_dir / "draft.tmp"]
    for path in [*stale, *foreign]:
        path.write_bytes(b"partial")
    train([*overrides, "steps=3"])
    assert [p.exists() for p in stale] == [False, False]
    assert [p.exists() for p in foreign] == [True, True]


@pytest.mark.slow
def test_tensorboard_drops_the_steps_after_the_resumed_checkpoint(run_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    base = [*run_overrides, "name=tb", "tensorboard=true", "steps=4", "checkpoint_every=2", "log_every=1"]
    with pytest.raises(KeyboardInterrupt):
        train(base, callbacks=(stop_at(3),))
    train([*base, "resume=latest"])
    files = sorted((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    purges = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert purges == [3]  # events from step 3 on, written before the interruption, are dropped
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("loss")] == [1, 2, 3, 4]


# --- strict JSON -------------------------------------------------------------------------------------------


def test_strict_json_writes_non_finite_numbers_as_null():
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": "NaN"}}
    assert strict_json(value) == '{"a": null, "b": [1.5, null, [null, 2]], "c": {"d": "NaN"}}'
    assert strict_loads(strict_json(value, indent=2)) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": "NaN"}}


def test_results_with_non_finite_details_are_strict_json(tmp_path):
    result = make_result("zeroshot", {}, None, "x", {"top1": 50.0}, {"spread": math.nan, "per_class": [1.0, math.inf]})
    write_results(tmp_path / "r.json", result)
    assert strict_loads((tmp_path / "r.json").read_text())["details"] == {"spread": None, "per_class": [1.0, None]}


# --- checked before anything is written ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train_spec", "message"),
    [
        ("nosuchcorpus", "lipkit train: error: data.train: unknown data source 'nosuchcorpus'"),
        ("{data}/none-*.tar", "lipkit train: error: data.train: no shards match '{data}/none-*.tar'"),
    ],
)
def test_bad_data_is_refused_before_the_run_folder_exists(run_overrides, tmp_path, capsys, train_spec, message):
    spec = train_spec.format(data=tmp_path / "data")
    line = one_line_error(capsys, ["train", PRESET, *run_overrides, "name=bad", f"data.train={spec}"])
    assert line.startswith(message.format(data=tmp_path / "data"))
    assert not (tmp_path / "bad").exists()


def test_a_missing_tokenizer_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    argv = ["train", "vit-b-16-siglip", "--set", f"out_dir={tmp_path}", "name=sig", "device=cpu", "progress=false"]
    line = one_line_error(capsys, argv)
    assert line.startswith(
        "lipkit train: error: model 'ViT-B-16-SigLIP' needs its Hugging Face tokenizer 'timm/ViT-B-16-SigLIP' from a "
        "local file or folder and none is set"
    )
    assert line.endswith("(in training: model_overrides.tokenizer_path=PATH)")
    assert not (tmp_path / "sig").exists()


def test_cuda_without_a_gpu_is_refused_before_the_run_folder_exists(run_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    overrides = [o for o in run_overrides if not o.startswith("device=")]
    line = one_line_error(capsys, ["train", PRESET, *overrides, "name=gpu", "device=cuda"])
    assert (
        line
        == "lipkit train: error: device 'cuda': this machine has no CUDA device that torch can use; use cpu or auto"
    )
    assert not (tmp_path / "gpu").exists()


def test_eval_on_cuda_without_a_gpu_is_one_line(finished, capsys, monkeypatch):
    _, run_dir = finished
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_line_error(capsys, ["eval", "retrieval", str(run_dir), "--data", "synthetic", "--device", "cuda:0"])
    assert line.startswith("lipkit eval: error: device 'cuda:0': this machine has no CUDA device")


def test_device_names_are_checked():
    with pytest.raises(ConfigError, match=r"^device 'gpu' is not a device name: use auto, cpu, cuda or cuda:N$"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


# --- the run lock belongs to the main process ----------------------------------------------------------------

FORK_AND_HOLD = """
import os, sys, time
from lipkit.utils import FolderLock
FolderLock(sys.argv[1], "a training run").acquire()
if os.fork() == 0:  # as a DataLoader worker: inherits the parent's descriptors
    print(os.getpid(), flush=True)  # only once the after-fork hooks have run
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def test_the_lock_dies_with_its_holder_even_while_forked_children_live(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(FolderInUseError, match=rf"\(a training run, pid {proc.pid}, since "):
            FolderLock(tmp_path).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child still runs
        FolderLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


HOLD_AS_DEAD_PID = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"a training run, pid 999999999, since 2026-01-01 00:00:00")
print("held", flush=True)
time.sleep(60)
"""


def test_a_holder_that_has_exited_is_not_named_as_the_holder(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_AS_DEAD_PID, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    try:
        with pytest.raises(FolderInUseError) as info:
            FolderLock(tmp_path, "a training run").acquire()
    finally:
        proc.kill()
        proc.wait()
    assert "(pid 999999999 took the lock and has exited; a process it started still holds it)" in str(info.value)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_an_immediate_resume_after_kill_9_of_a_run_with_loader_workers_is_not_refused(tmp_path):
    overrides = ["progress=false", "tensorboard=false", "device=cpu", f"out_dir={tmp_path}", "name=killed"]
    overrides += ["data.workers=2", "steps=400", "checkpoint_every=2", "log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "lipkit.cli.main", "train", PRESET, *overrides])
    run_dir, deadline = tmp_path / "killed", time.time() + 180
    while time.time() < deadline and len(ckpt.list_checkpoints(run_dir)) < 1:
        time.sleep(0.1)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        assert len(workers) >= 2, "the run has no loader workers"
        assert any(_alive(w) for w in workers)  # orphaned workers still run
        FolderLock(run_dir, "a training run").acquire().release()  # yet the lock is free at once
        step = int(ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1])["step"])
        result = train([*overrides[:5], "data.workers=0", f"steps={step + 1}", "log_every=1", "resume=latest"])
        assert result.step == step + 1
    finally:
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
