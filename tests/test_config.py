"""Configs: defaults < YAML < flags, typed values, and errors that name the key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from r1lab import config as C


@dataclass
class Inner:
    lr: float = 1e-3
    beta: float | None = None


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    flag: bool = False
    tasks: list[str] = field(default_factory=lambda: ["a"])
    knobs: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def _parse(argv, yaml_text=None, tmp_path=None):
    p = argparse.ArgumentParser()
    C.add_arguments(p, Outer)
    args = p.parse_args(argv)
    path = None
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
    return C.resolve(Outer, args, str(path) if path else None)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg = _parse(["--steps", "7", "--inner.lr", "0.5", "--flag", "true", "--tasks", "x,y"],
                 "steps: 3\nname: fromyaml\ninner:\n  beta: 0.9\n", tmp_path)
    assert cfg == Outer(name="fromyaml", steps=7, flag=True, tasks=["x", "y"], inner=Inner(lr=0.5, beta=0.9))


def test_dashes_and_json_dicts_are_accepted():
    cfg = _parse(["--knobs", '{"a": {"b": 1}}', "--inner.beta", "none"])
    assert cfg.knobs == {"a": {"b": 1}} and cfg.inner.beta is None


@pytest.mark.parametrize("argv, msg", [
    (["--steps", "2.5"], "steps expects int"),
    (["--flag", "maybe"], "flag expects bool"),
    (["--inner.lr", "fast"], "inner.lr expects float"),
])
def test_bad_values_name_the_key(argv, msg):
    with pytest.raises(C.ConfigError, match=msg):
        _parse(argv)


def test_unknown_yaml_keys_are_listed(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown config key.*stpes.*known keys: name, steps"):
        _parse([], "stpes: 3\n", tmp_path)


def test_missing_yaml_file_is_an_error(tmp_path):
    p = argparse.ArgumentParser()
    C.add_arguments(p, Outer)
    with pytest.raises(C.ConfigError, match="not found"):
        C.resolve(Outer, p.parse_args([]), str(tmp_path / "nope.yaml"))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = Outer(steps=4, inner=Inner(beta=0.1))
    C.save(cfg, tmp_path / "c.yaml")
    assert C.from_dict(Outer, yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg
