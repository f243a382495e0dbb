from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lipkit.config import apply_overrides, from_dict, load_yaml, parse_overrides, save_yaml, to_dict
from lipkit.errors import ConfigError, UnknownNameError
from lipkit.registry import Registry


@dataclass
class Inner:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 3
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_from_dict_builds_nested_and_coerces_int_to_float():
    cfg = from_dict(Outer, {"steps": 5, "inner": {"lr": 1, "betas": [0.8, 0.9]}})
    assert cfg.steps == 5 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.betas == (0.8, 0.9)


def test_unknown_key_suggests_the_closest_dotted_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr'.*inner.lr"):
        from_dict(Outer, {"inner": {"lrr": 1}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": "many"}, r"'steps': expected int, got 'many'"),
        ({"steps": True}, r"'steps': expected int"),
        ({"inner": {"lr": "fast"}}, r"'inner.lr': expected float"),
        ({"inner": {"betas": [1.0]}}, r"'inner.betas': expected 2 items"),
        ({"inner": 3}, r"'inner': expected a mapping"),
        ({"maybe": "x"}, r"'maybe': expected"),
    ],
)
def test_wrong_types_name_the_key_and_type(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_overrides_parse_yaml_scalars_into_nested_dicts():
    assert parse_overrides(["steps=10", "inner.lr=1e-3", "name=run a", "maybe=null"]) == {
        "steps": 10,
        "inner": {"lr": 1e-3},
        "name": "run a",
        "maybe": None,
    }
    cfg = apply_overrides(Outer, {"steps": 2}, ["inner.lr=0.5"])
    assert cfg.steps == 2 and cfg.inner.lr == 0.5


@pytest.mark.parametrize("bad", ["steps", "=3", "inner=1 inner.lr=2"])
def test_malformed_overrides_are_rejected(bad):
    with pytest.raises(ConfigError):
        parse_overrides(bad.split(" "))


def test_yaml_round_trip(tmp_path):
    cfg = from_dict(Outer, {"steps": 7, "inner": {"lr": 0.25}})
    save_yaml(cfg, tmp_path / "c.yaml")
    assert from_dict(Outer, load_yaml(tmp_path / "c.yaml")) == cfg
    assert to_dict(cfg)["inner"]["betas"] == [0.9, 0.99]


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "broken.yaml")


def test_registry_lookup_and_suggestions():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha", 1)

    @reg.register("beta")
    def beta():
        return 2

    assert reg.get("alpha") == 1 and reg.get("beta")() == 2
    assert reg.names() == ["alpha", "beta"] and "beta" in reg and len(reg) == 2
    with pytest.raises(UnknownNameError, match=r"unknown thing 'alpah'.*Did you mean: alpha"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", 3)


def test_atomic_write_leaves_normal_permissions(tmp_path):
    import os

    from lipkit.utils import atomic_write_text

    atomic_write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~mask
