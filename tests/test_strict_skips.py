"""The strict-skip plugin (tests/strict_skips.py), run on tiny test files in a fresh pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ALLOWED = """
import pytest

def test_passes():
    assert 1 + 1 == 2

@pytest.mark.skipif(True, reason="needs CUDA")
def test_needs_cuda():
    raise AssertionError("skipped before it runs")

def test_needs_a_gpu():
    pytest.skip("no GPU here")

@pytest.mark.xfail(reason="a known failure", strict=True)
def test_known_failure():
    assert 1 + 1 == 3
"""
MISSING_ASSET = """
import pytest

def test_needs_an_asset():
    pytest.skip("dataset-fashion-mnist is not installed")
"""
MISSING_MODULE = """
import pytest

pytest.importorskip("no_such_module_for_lipkit")

def test_never_collected():
    raise AssertionError("the module is skipped")
"""


def _run(tmp_path: Path, files: dict[str, str], strict: bool) -> subprocess.CompletedProcess[str]:
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "LIPKIT_STRICT_SKIPS"}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    if strict:
        env["LIPKIT_STRICT_SKIPS"] = "1"
    command = [sys.executable, "-m", "pytest", "-p", "strict_skips", "-p", "no:cacheprovider", "-rs", str(tmp_path)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_cuda_and_gpu_skips_pass_in_strict_mode(tmp_path):
    result = _run(tmp_path, {"test_allowed.py": ALLOWED}, strict=True)
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout
    assert "only tests that need CUDA may skip" not in result.stdout


def test_other_skips_fail_strict_mode_and_are_listed(tmp_path):
    files = {"test_allowed.py": ALLOWED, "test_asset.py": MISSING_ASSET, "test_module.py": MISSING_MODULE}
    result = _run(tmp_path, files, strict=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in result.stdout
    section = result.stdout.split("only tests that need CUDA may skip", 1)[1].split("short test summary info")[0]
    assert [line for line in section.splitlines()[1:] if line and not line.startswith("=")] == [
        "test_module.py: Skipped: could not import 'no_such_module_for_lipkit': "
        "No module named 'no_such_module_for_lipkit'",
        "test_asset.py::test_needs_an_asset: Skipped: dataset-fashion-mnist is not installed",
    ]


def test_other_skips_pass_without_strict_mode(tmp_path):
    result = _run(tmp_path, {"test_allowed.py": ALLOWED, "test_asset.py": MISSING_ASSET}, strict=False)
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "SKIPPED [1] test_asset.py:5: dataset-fashion-mnist is not installed" in result.stdout
