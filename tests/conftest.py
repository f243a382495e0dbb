"""Shared fixtures: every test runs on CPU, offline, in a temporary directory."""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one intra-op thread per pytest-xdist worker (two workers share two cores), two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

pytest_plugins = ["strict_skips"]  # LIPKIT_STRICT_SKIPS=1 (CI): only tests that need CUDA may skip


@pytest.fixture
def run_overrides(tmp_path):
    """Overrides that keep a training run small, quiet and inside ``tmp_path``."""
    return [f"out_dir={tmp_path}", "progress=false", "tensorboard=false", "device=cpu"]


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray instance (two CPUs, no dashboard) shared by every Ray test of the session."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    short = tmp_path_factory.mktemp("ray")  # Ray's socket paths under it must stay within 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=str(short))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def nginx():
    """One nginx on 127.0.0.1 for the session (tests/nginx_server.py); each test serves its own sub-folder."""
    from nginx_server import Nginx

    server = Nginx()
    yield server
    server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files that hold slow tests first (each file's tests stay together, in their order), so
    that under pytest-xdist the long tests start early and the workers finish together."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def headed_model(tmp_path):
    """A tiny locked model whose timm image tower ships a 3-class classifier."""
    timm = pytest.importorskip("timm")
    trunk = timm.create_model("test_efficientnet", num_classes=3)
    weights = tmp_path / "w.pth"
    torch.save(trunk.state_dict(), weights)
    micro = json.loads((resources.files("lipkit.models") / "configs" / "micro.json").read_text())
    config = {
        "embed_dim": 32,
        "vision": {
            "type": "timm",
            "name": "test_efficientnet",
            "image_size": 32,
            "pretrained": str(tmp_path / "w.pth"),
        },
        "text": micro["text"],
        "lock_image": True,
        "lock_text": True,
    }
    (tmp_path / "model.json").write_text(json.dumps(config))
    return str(tmp_path / "model.json"), trunk.classifier.weight.detach()
