"""Disk faults: a read-only or full file system, or a refused write, ends in one line that names the path and
the cause, with exit code 2; the previous files survive intact and no temporary file is left behind.

A read-only location is a real read-only bind mount (in a private mount namespace, ``unshare -rm``) where this
user may make one, and an injected ``EROFS`` otherwise. Full disks and folders that turn read-only mid-run are
injected.
"""

from __future__ import annotations

import builtins
import errno
import functools
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lipkit.cli.main import main
from lipkit.errors import FolderInUseError, StorageError
from lipkit.utils import FolderLock, atomic_write, atomic_write_text

CAUSES = {
    errno.EROFS: "read-only file system; write somewhere else",
    errno.EACCES: "permission denied; write somewhere else, or give this user write permission",
    errno.EPERM: "operation not permitted; write somewhere else, or give this user write permission",
    errno.ENOSPC: "no space left on device; free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded; free some space or write somewhere else",
    errno.ENOENT: "no such file or directory",
}
READ_ONLY = CAUSES[errno.EROFS]
FULL = CAUSES[errno.ENOSPC]
MOUNT_READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"'
INJECTED_READ_ONLY = """
import sys
sys.path.insert(0, sys.argv[1])
from test_faults_disk import refuse_writes_under
from lipkit.cli.main import main
refuse_writes_under(sys.argv[2], setattr)
sys.exit(main(sys.argv[3:]))
"""
PREVIOUS = b"the previous version\n"


def refuse_writes_under(
    folder: str | Path, patch: Callable[..., Any], when: Callable[[], bool] = lambda: True, code: int = errno.EROFS
) -> None:
    """Make every write under ``folder`` fail with ``code`` (once ``when()`` holds), as a read-only mount does.

    Args:
        folder: The folder that refuses writes (creating, opening for writing, renaming, removing, chmod).
        patch: ``monkeypatch.setattr`` in a test, ``setattr`` in a process of its own.
        when: Writes are refused only while this holds (a folder that turns read-only mid-run).
        code: The ``errno`` of the refusal.
    """
    root = os.path.realpath(folder)

    def refused(path: Any) -> bool:
        if isinstance(path, int):
            return False
        full = os.path.realpath(os.fspath(path))
        return (full == root or full.startswith(root + os.sep)) and when()

    def guard(function: Callable[..., Any], writes: Callable[..., bool]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if writes(*args, **kwargs) and refused(args[0]):
                raise OSError(code, os.strerror(code), os.fspath(args[0]))
            return function(*args, **kwargs)

        return guarded

    def opens_for_writing(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> bool:
        return any(c in mode for c in "wax+")

    patch(os, "open", guard(os.open, lambda path, flags, *a, **k: bool(flags & (os.O_WRONLY | os.O_RDWR))))
    for name in ("mkdir", "replace", "rename", "unlink", "rmdir", "chmod"):
        patch(os, name, guard(getattr(os, name), lambda *a, **k: True))
    guarded_open = guard(io.open, opens_for_writing)
    patch(io, "open", guarded_open)
    patch(builtins, "open", guarded_open)


class FillsUp:
    """A file on a disk with ``room`` bytes left: writes beyond it fail with ``ENOSPC``, as a full disk's do."""

    def __init__(self, file: io.BufferedWriter, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def fill_up_under(folder: Path, patch: Callable[..., Any], room: int, when: Callable[[], bool] = lambda: True) -> None:
    """Make files that :func:`atomic_write` opens under ``folder`` take only ``room`` bytes (once ``when()`` holds)."""
    real_fdopen, root = os.fdopen, os.path.realpath(folder)

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        file = real_fdopen(fd, *args, **kwargs)
        inside = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) == root
        return FillsUp(file, room) if inside and when() else file

    patch(os, "fdopen", fdopen)


def one_line(stderr: str) -> str:
    """The only line of ``stderr`` (the test fails if there are more, or none)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under ``folder``."""
    return sorted(folder.rglob("*.tmp"))


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lipkit.cli.main", *argv]


@functools.cache
def can_mount_read_only() -> bool:
    """Whether this user may bind-mount a folder read-only in a private mount namespace."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            probe = subprocess.run(
                ["unshare", "-rm", "sh", "-c", MOUNT_READ_ONLY + ' && ! touch "$1/probe" 2>/dev/null', "sh", folder],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return probe.returncode == 0 and not Path(folder, "probe").exists()


def run_read_only(folder: Path, *argv: str, inject: bool = False) -> subprocess.CompletedProcess:
    """``lipkit ARGV`` with ``folder`` read-only: a real read-only mount where possible (unless ``inject``), else
    injected ``EROFS``."""
    if not inject and can_mount_read_only():
        command = ["unshare", "-rm", "sh", "-c", MOUNT_READ_ONLY + ' && shift && exec "$@"', "sh", str(folder)]
        command += cli(*argv)
    else:
        command = [sys.executable, "-c", INJECTED_READ_ONLY, str(Path(__file__).parent), str(folder), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with one checkpoint of a one-step training run."""
    from lipkit.train.config import resolve_config
    from lipkit.train.loop import train

    out = tmp_path_factory.mktemp("trained")
    overrides = [f"out_dir={out}", "progress=false", "tensorboard=false", "device=cpu", "steps=1"]
    return train(resolve_config("tiny-synthetic", overrides=overrides)).run_dir


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A file written before the fault, which must survive it unchanged."""
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    path.write_bytes(PREVIOUS)
    return path


@pytest.mark.parametrize("code", sorted(CAUSES), ids=errno.errorcode.get)
def test_a_refused_write_names_the_path_and_the_cause(code, previous, monkeypatch):
    refuse_writes_under(previous.parent, monkeypatch.setattr, code=code)
    with pytest.raises(StorageError) as caught:
        atomic_write_text(previous, "the next version\n")
    monkeypatch.undo()
    assert str(caught.value) == f"cannot write {previous}: {CAUSES[code]}"
    assert previous.read_bytes() == PREVIOUS and leftovers(previous.parent) == []


def test_a_full_disk_mid_write_keeps_the_previous_file_and_leaves_no_temporary(previous, monkeypatch):
    fill_up_under(previous.parent, monkeypatch.setattr, room=100)
    with pytest.raises(StorageError) as caught:
        atomic_write(previous, lambda f: [f.write(bytes(64)) for _ in range(10)])
    monkeypatch.undo()
    assert str(caught.value) == f"cannot write {previous}: {FULL}"
    assert previous.read_bytes() == PREVIOUS and leftovers(previous.parent) == []


def test_torch_save_on_a_full_disk_is_one_storage_error(tmp_path, monkeypatch):
    import torch

    from lipkit.train.checkpoint import save_checkpoint

    path = tmp_path / "step_00000001.pt"
    fill_up_under(tmp_path, monkeypatch.setattr, room=4096)
    with pytest.raises(StorageError) as caught:  # torch.save's own error is "unexpected pos", the disk's is inside
        save_checkpoint(path, {"model": {"w": torch.zeros(64, 64)}, "step": 1})
    assert str(caught.value) == f"cannot write {path}: {FULL}"
    assert sorted(tmp_path.iterdir()) == []


def test_a_failed_read_inside_a_write_is_not_called_a_write_fault(previous):
    missing = previous.parent.parent / "missing.bin"
    with pytest.raises(FileNotFoundError) as caught:
        atomic_write(previous, lambda f: f.write(missing.read_bytes()))
    assert caught.value.filename == str(missing)
    assert previous.read_bytes() == PREVIOUS and leftovers(previous.parent) == []


def test_a_folder_lock_in_a_read_only_location_is_a_storage_error(tmp_path, monkeypatch):
    refuse_writes_under(tmp_path, monkeypatch.setattr)
    with pytest.raises(StorageError) as caught:
        FolderLock(tmp_path / "run").acquire()
    assert str(caught.value) == f"cannot write {tmp_path / 'run'}: {READ_ONLY}"


def test_an_os_error_no_command_caught_is_one_line(monkeypatch, capsys):
    def refuse(args: Any) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/srv/data/file.bin")

    monkeypatch.setattr("lipkit.cli.models.run", refuse)
    assert main(["models"]) == 2
    assert one_line(capsys.readouterr().err) == "lipkit models: error: /srv/data/file.bin: permission denied"


@pytest.mark.parametrize("inject", [False, True], ids=["mount", "injected"])
def test_data_pack_into_a_read_only_location(inject, tmp_path):
    image = tmp_path / "pairs" / "a.png"
    image.parent.mkdir()
    _png(image)
    image.with_suffix(".txt").write_text("a red square")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    (read_only / "kept.txt").write_bytes(PREVIOUS)
    argv = ["data", "pack", str(image.parent), "--out-dir", str(read_only / "shards"), "-q"]
    result = run_read_only(read_only, *argv, inject=inject)
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr) == f"lipkit data: error: cannot write {read_only / 'shards'}: {READ_ONLY}"
    assert sorted(read_only.iterdir()) == [read_only / "kept.txt"]
    assert (read_only / "kept.txt").read_bytes() == PREVIOUS


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "written"),
    [
        (["eval", "retrieval", "{run}", "--data", "synthetic:val", "--out", "{ro}/output", "-q"], "output"),
        (["export", "{run}/checkpoints/step_00000001.pt", "--out", "{ro}/output"], "output"),
        (["train", "tiny-synthetic", "out_dir={ro}", "name=run", "progress=false", "tensorboard=false"], "run"),
    ],
    ids=["eval", "export", "train"],
)
def test_commands_writing_into_a_read_only_location_stop_before_the_work(command, written, trained_run, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    (read_only / "output").write_bytes(PREVIOUS)  # eval and export are told to replace it
    argv = [arg.format(run=trained_run, ro=read_only) for arg in command]
    result = run_read_only(read_only, *argv)
    assert result.returncode == 2 and result.stdout == ""  # nothing was computed, so nothing was printed
    line = one_line(result.stderr)
    assert line == f"lipkit {command[0]}: error: cannot write {read_only / written}: {READ_ONLY}"
    assert sorted(read_only.iterdir()) == [read_only / "output"]
    assert (read_only / "output").read_bytes() == PREVIOUS


def _train_until_fault(tmp_path: Path, inject: Callable[[Path], None], capsys: pytest.CaptureFixture) -> str:
    """Train three steps with a checkpoint after each, the fault set by ``inject``; returns the one error line."""
    checkpoints = tmp_path / "faulty" / "checkpoints"
    checkpoints.mkdir(parents=True)
    inject(checkpoints)
    overrides = [f"out_dir={tmp_path}", "name=faulty", "progress=false", "tensorboard=false", "device=cpu"]
    code = main(["train", "tiny-synthetic", "--set", *overrides, "steps=3", "checkpoint_every=1"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    return one_line(stderr)


def _only_the_first_checkpoint_survives(run_dir: Path) -> None:
    from lipkit.train.checkpoint import list_checkpoints, load_checkpoint

    first = run_dir / "checkpoints" / "step_00000001.pt"
    assert list_checkpoints(run_dir) == [first]
    assert load_checkpoint(first)["step"] == 1
    assert leftovers(run_dir) == []


@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_written(tmp_path, monkeypatch, capsys):
    def inject(checkpoints: Path) -> None:
        fill_up_under(checkpoints, monkeypatch.setattr, room=4096, when=lambda: any(checkpoints.glob("step_*.pt")))

    line = _train_until_fault(tmp_path, inject, capsys)
    monkeypatch.undo()
    path = tmp_path / "faulty" / "checkpoints" / "step_00000002.pt"
    assert line == f"lipkit train: error: cannot write {path}: {FULL}"
    _only_the_first_checkpoint_survives(tmp_path / "faulty")


@pytest.mark.slow
def test_a_checkpoint_folder_that_turns_read_only_mid_run(tmp_path, monkeypatch, capsys):
    def inject(checkpoints: Path) -> None:
        refuse_writes_under(checkpoints, monkeypatch.setattr, when=lambda: any(checkpoints.glob("step_*.pt")))

    line = _train_until_fault(tmp_path, inject, capsys)
    monkeypatch.undo()
    path = tmp_path / "faulty" / "checkpoints" / "step_00000002.pt"
    assert line == f"lipkit train: error: cannot write {path}: {READ_ONLY}"
    _only_the_first_checkpoint_survives(tmp_path / "faulty")


def test_a_second_packing_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path):
    image = tmp_path / "slow.jpg"
    os.mkfifo(image)  # the first packing waits on this image, holding the folder, until the test feeds it
    (tmp_path / "pairs.csv").write_text("image,caption\nslow.jpg,a red square\n")
    out = tmp_path / "shards"
    argv = cli("data", "pack", str(tmp_path / "pairs.csv"), "--out-dir", str(out), "--workers", "1", "-q")
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        feed = _writer_once_read(image, first)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        with os.fdopen(feed, "wb") as f:
            f.write(_png_bytes())
        printed, errors = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2 and second.stdout == ""
    refusal = f"lipkit data: error: cannot start packing shards in {out}: another process is working there "
    assert one_line(second.stderr).startswith(refusal + f"(packing shards, pid {first.pid}, since ")
    assert first.returncode == 0 and errors == ""
    assert printed == f"1 of 1 pairs in 1 shards in {out} (1 written, 0 already done); left out: none\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "00000.tar", "00000_stats.json"]
    with tarfile.open(out / "00000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.txt", "000000000.json"]


def test_building_a_labelled_set_in_a_busy_folder_is_refused(tmp_path):
    from lipkit.data.builtin import write_labelled

    class OneImage:
        classnames = ("square",)

        def __len__(self) -> int:
            return 1

        def image(self, i: int) -> Any:
            from PIL import Image

            return Image.new("RGB", (8, 8), "red")

        def label(self, i: int) -> int:
            return 0

    with FolderLock(tmp_path / "set", "another build"), pytest.raises(FolderInUseError, match="another build"):
        write_labelled(OneImage(), tmp_path / "set", "test", ["a {c}"], progress=False)
    assert not (tmp_path / "set").exists()  # the refused build wrote nothing; the holder's empty folder went with it
    assert write_labelled(OneImage(), tmp_path / "set", "test", ["a {c}"], progress=False) == 1


def _writer_once_read(fifo: Path, reader: subprocess.Popen, timeout: float = 120) -> int:
    """A blocking write end of ``fifo``, opened once ``reader`` has opened it for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            assert reader.poll() is None, reader.communicate()
            assert time.monotonic() < deadline, "the first packing never read its image"
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return fd


def _png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _png(path: Path) -> None:
    path.write_bytes(_png_bytes())


class TextFillsUp(FillsUp):
    """:class:`FillsUp` for a text file."""

    def write(self, data: str) -> int:
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.file.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)


@pytest.mark.slow
def test_a_full_disk_while_metrics_are_appended_names_the_file_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import pathlib

    from lipkit.metrics_log import read_metrics

    real_open = pathlib.Path.open

    def opens(path: pathlib.Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = real_open(path, mode, *args, **kwargs)
        # room for the first record (about 160 characters) and part of the second
        return TextFillsUp(file, room=250) if path.name == "metrics.jsonl" and mode == "a" else file

    monkeypatch.setattr(pathlib.Path, "open", opens)
    overrides = [f"out_dir={tmp_path}", "name=full", "progress=false", "tensorboard=false", "device=cpu"]
    argv = ["train", "tiny-synthetic", "--set", *overrides, "steps=3", "checkpoint_every=1", "log_every=1"]
    assert main(argv) == 2
    metrics = tmp_path / "full" / "metrics.jsonl"
    assert one_line(capsys.readouterr().err) == f"lipkit train: error: cannot write {metrics}: {FULL}"
    assert not metrics.read_text().endswith("\n")  # the disk took part of a line
    monkeypatch.undo()
    assert main([*argv, "resume=latest"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "full")] == [1, 2, 3]  # the cut-off line is gone
