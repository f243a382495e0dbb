"""Shared helpers: files inside installed packages, this process's rank, the cache folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lipkit.data import shards
from lipkit.errors import ConfigError, LipkitError
from lipkit.utils import cache_root, find_in_package, package_folders, package_path, rank_and_world


@pytest.fixture
def installed(tmp_path, monkeypatch) -> Path:
    """A package ``lipkit_fake_assets`` holding ``data/table.csv``, on ``sys.path``; importing it fails."""
    folder = tmp_path / "site" / "lipkit_fake_assets"
    (folder / "data").mkdir(parents=True)
    (folder / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (folder / "data" / "table.csv").write_text("a,b\n")
    (tmp_path / "site" / "lipkit_fake_module.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return folder


def test_a_file_inside_an_installed_package_is_found_without_importing_it(installed):
    assert package_path("lipkit_fake_assets", "data/table.csv") == installed / "data" / "table.csv"
    assert package_path("lipkit_fake_assets") == installed
    assert find_in_package("lipkit_fake_assets", "data") == installed / "data"
    assert package_folders("lipkit_fake_assets") == [installed]
    assert "lipkit_fake_assets" not in sys.modules


def test_a_missing_package_names_the_package_and_the_install_command(installed):
    with pytest.raises(LipkitError) as err:
        package_path("lipkit_no_such", "x.txt")
    assert str(err.value) == "package 'lipkit_no_such' is not installed; install it with `pip install lipkit_no_such`"
    with pytest.raises(LipkitError) as err:
        package_path("lipkit_no_such", "x.txt", "pip install --no-deps lipkit-no-such==1.0")
    assert str(err.value).endswith("install it with `pip install --no-deps lipkit-no-such==1.0`")
    assert find_in_package("lipkit_no_such", "x.txt") is None
    assert package_folders("lipkit_no_such") == []


def test_a_missing_file_names_its_path_and_the_reinstall_command(installed):
    with pytest.raises(LipkitError, match="reinstall it with `pip install -U fake`") as err:
        package_path("lipkit_fake_assets", "data/gone.csv", "pip install -U fake")
    assert str(installed / "data" / "gone.csv") in str(err.value)
    assert find_in_package("lipkit_fake_assets", "data/gone.csv") is None


def test_a_module_file_or_a_dotted_name_is_no_package_folder(installed):
    assert package_folders("lipkit_fake_module") == []
    assert package_folders("lipkit_no_such.sub") == []


def test_rank_and_world_from_torchrun_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world() == (3, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4"):
        rank_and_world()
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="must be integers"):
        rank_and_world()


def test_rank_and_world_follow_a_running_process_group(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert rank_and_world() == (0, 1)
    finally:
        dist.destroy_process_group()
    assert rank_and_world() == (1, 2)


def test_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert shards.cache_dir() == tmp_path / "cache" / "tar-index"
    monkeypatch.setenv("LIPKIT_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lipkit"
