"""A folder that one process works in is refused to a second one, and freed when the first ends or dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lipkit.errors import FolderInUseError
from lipkit.train.config import resolve_config
from lipkit.train.loop import train
from lipkit.utils import FolderLock

HOLD = """
import sys, time
from lipkit.utils import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold(folder: Path) -> subprocess.Popen:
    """A second process that takes the folder's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    proc = hold(tmp_path / "run")
    try:
        holder = rf"another process is working there \(a lipkit job, pid {proc.pid}, since"
        with pytest.raises(FolderInUseError, match=holder):
            FolderLock(tmp_path / "run").acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up: the kernel drops the flock with the process
        proc.wait()
    with FolderLock(tmp_path / "run"):  # free again, no stale lock
        pass
    with FolderLock(tmp_path / "run"), pytest.raises(FolderInUseError):  # held: a second holder is refused
        FolderLock(tmp_path / "run").acquire()


def test_a_second_training_run_in_the_same_folder_is_refused_and_changes_nothing(run_overrides, tmp_path):
    overrides = [*run_overrides, "name=busy", "steps=2", "checkpoint_every=2"]
    train(resolve_config("tiny-synthetic", overrides=overrides))
    run_dir = tmp_path / "busy"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = hold(run_dir)
    try:
        with pytest.raises(FolderInUseError, match=r"cannot start a training run in .*another process is working"):
            train(resolve_config("tiny-synthetic", overrides=[*overrides, "overwrite=true"]))
    finally:
        proc.kill()
        proc.wait()
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # overwrite=true would have deleted the checkpoints: the refusal came first


def test_cli_reports_a_busy_folder_in_one_line(tmp_path):
    run_dir = tmp_path / "cli-run"
    proc = hold(run_dir)
    try:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "lipkit.cli.main", "train", "tiny-synthetic", f"out_dir={tmp_path}", "name=cli-run"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 2, out.stderr
    assert "another process is working there" in out.stderr and "Traceback" not in out.stderr
    assert time.perf_counter() - start < 60  # refused at once, not after waiting


def test_a_folder_the_lock_created_goes_again_when_the_job_wrote_nothing(tmp_path):
    with FolderLock(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / ".lock").exists()
    assert list(tmp_path.iterdir()) == []  # both folders the lock made are gone
    with FolderLock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".lock", "result.json"]
    (tmp_path / "existing").mkdir()
    with FolderLock(tmp_path / "existing"):
        pass
    assert [p.name for p in (tmp_path / "existing").iterdir()] == [".lock"]  # not ours to remove
