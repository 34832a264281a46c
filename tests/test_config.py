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
    cfg = _parse(
        ["--steps", "7", "--inner.lr", "0.5", "--flag", "true", "--tasks", "x,y"],
        "steps: 3\nname: fromyaml\ninner:\n  beta: 0.9\n",
        tmp_path,
    )
    assert cfg == Outer(name="fromyaml", steps=7, flag=True, tasks=["x", "y"], inner=Inner(lr=0.5, beta=0.9))


def test_dashes_and_json_dicts_are_accepted():
    cfg = _parse(["--knobs", '{"a": {"b": 1}}', "--inner.beta", "none"])
    assert cfg.knobs == {"a": {"b": 1}} and cfg.inner.beta is None


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--steps", "2.5"], "steps expects int"),
        (["--flag", "maybe"], "flag expects bool"),
        (["--inner.lr", "fast"], "inner.lr expects float"),
    ],
)
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


# ----------------------------------------------------------------------------- the command explains itself

CONFIGS = [
    "r1lab.train.pretrain:PretrainConfig",
    "r1lab.train.sft:SFTConfig",
    "r1lab.train.grpo:GRPOConfig",
    "r1lab.recipes:PipelineConfig",
    "r1lab.eval:EvalConfig",
    "r1lab.distill:DistillConfig",
]


def _cls(spec):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_field_has_a_one_line_help(spec):
    from r1lab.config import _walk

    missing = [name for name, _, help_text, _ in _walk(_cls(spec)) if not help_text.strip()]
    assert not missing, f"{spec}: fields without help: {missing}"


def test_every_flag_of_every_command_says_what_it_is_for():
    from r1lab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, p in sub.choices.items():
        silent = [a.option_strings or a.dest for a in p._actions if not (a.help or "").strip()]
        assert not silent, f"r1lab {command}: flags without help: {silent}"


def test_pipeline_help_explains_every_option(capsys):
    from r1lab.cli import main

    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    out = capsys.readouterr().out
    for flag in ("--grpo.policy-loss", "--pretrain.direct-fraction", "--eval.k", "--distill.onpolicy-lr"):
        entry = out[out.index("\n  " + flag) + 1 :].split("\n  --", 1)[0]  # the flag's own help, to the next flag
        assert "default" in entry and len(entry.split("]", 1)[0]) > 40, entry
    assert "--pretrain.seed" not in out and "--grpo.model" not in out  # set by the pipeline, so not flags


@pytest.mark.parametrize(
    "spec,field,bad,choices",
    [
        ("r1lab.train.grpo:GRPOConfig", "template", "chatml", "r1, r1zero, model"),
        ("r1lab.train.grpo:GRPOConfig", "policy_loss", "ppo2", "clip, gspo, gspo-token, cispo"),
        ("r1lab.train.grpo:GRPOConfig", "rollout_correction", "tis", "none, token-truncate"),
        ("r1lab.train.grpo:GRPOConfig", "advantage", "ppo", "grpo, rloo"),
        ("r1lab.train.grpo:GRPOConfig", "parallel", "tp", "ddp, fsdp"),
        ("r1lab.train.grpo:GRPOConfig", "rollout", "sglang", "r1lab or vllm"),
        ("r1lab.train.pretrain:PretrainConfig", "template", "model", "r1, r1zero"),
        ("r1lab.train.sft:SFTConfig", "template", "chatml", "r1, r1zero, model"),
        ("r1lab.eval:EvalConfig", "template", "chatml", "auto, r1zero, r1, model"),
    ],
)
def test_choice_fields_name_their_choices(spec, field, bad, choices):
    from r1lab.config import ConfigError, merge

    cls = _cls(spec)
    required = {"GRPOConfig": {"model": "m"}, "SFTConfig": {"model": "m", "data": __file__}}
    base = cls(**required.get(cls.__name__, {}))
    with pytest.raises((ValueError, ConfigError)) as e:
        merge(base, {field: bad}).validate()
    assert choices in str(e.value), str(e.value)
