"""Shared fixtures: every test runs on CPU, offline, in a temporary directory."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

pytest_plugins = ["strict_skips"]  # LIPKIT_STRICT_SKIPS=1 (CI): only tests that need CUDA may skip


@pytest.fixture
def run_overrides(tmp_path):
    """Overrides that keep a training run small, quiet and inside ``tmp_path``."""
    return [f"out_dir={tmp_path}", "progress=false", "tensorboard=false", "device=cpu"]
