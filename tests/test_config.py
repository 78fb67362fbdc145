"""The one config loader: YAML 1.2 values, types checked on load, defaults that live only in the dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from m3w import CONFIGS_DIR
from m3w.cli import DEFAULTS_FILES, defaults_header, main
from m3w.config import (
    CONFIG_CLASSES,
    config_class,
    from_dict,
    load_config,
    parse_override,
    parse_yaml,
    to_dict,
    to_yaml,
)
from m3w.errors import ConfigError
from m3w.model.config import FlamingoConfig
from m3w.pipeline.filters import FilterConfig
from m3w.trainer.config import TrainConfig


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("optim.lr=3e-4", 3e-4),  # YAML 1.1 (PyYAML's default) reads this as the string "3e-4"
        ("a=1.0e-4", 1e-4),
        ("a=no", "no"),  # 1.1: False
        ("a=on", "on"),  # 1.1: True
        ("a=010", 10),  # 1.1: 8
        ("a=0x1f", 31),
        ("a=2024-01-02", "2024-01-02"),  # 1.1: a date
        ("a=1:30", "1:30"),  # 1.1: 90 (sexagesimal)
        ("a=true", True),
        ("a=null", None),
        ("a=", None),
        ("a=[x, 2]", ["x", 2]),
        ("a=.inf", float("inf")),
    ],
)
def test_set_values_are_yaml_1_2(text, value):
    assert parse_override(text)[1] == value
    assert type(parse_override(text)[1]) is type(value)


def test_wrong_types_and_unknown_keys_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^document\.min_words: expected an int, got 'abc'"):
        load_config(FilterConfig, overrides=["document.min_words=abc"])
    with pytest.raises(ConfigError, match=r"^dedup\.enabled: expected true or false, got 'no'"):
        load_config(FilterConfig, overrides=["dedup.enabled=no"])
    with pytest.raises(ConfigError, match=r"did you mean 'min_words'"):
        load_config(FilterConfig, overrides=["paragraph.min_wrds=3"])
    with pytest.raises(ConfigError, match=r"^precision: expected one of 'auto', 'bf16', 'fp32', got 'fp16'"):
        load_config(TrainConfig, overrides=["precision=fp16"])
    with pytest.raises(ConfigError, match=r"^model\.config\.num_latens: unknown key"):
        load_config(TrainConfig, overrides=["model.config.num_latens=8"])  # checked against FlamingoConfig
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        parse_override("document")
    bad = tmp_path / "bad.yaml"
    bad.write_text("paragraph:\n  min_words: 5\n  max_wrds: 9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: paragraph\.max_wrds: unknown key"):
        load_config(FilterConfig, bad)
    bad.write_text("paragraph:\n  min_words: [5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+: invalid YAML"):
        load_config(FilterConfig, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(FilterConfig, bad)
    # a value __post_init__ refuses names its section
    with pytest.raises(ConfigError, match=r"^p_next must be a probability|p_next"):
        load_config(FlamingoConfig, overrides=["p_next=2.0"])


def test_layers_merge_sections_and_replace_mappings(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump({"datasets": {"m3w": {"path": "x", "batch_size": 2}}, "optim": {"lr": 0.5}})
    )
    cfg = load_config(
        TrainConfig, path, ["optim.warmup_steps=7", "datasets.m3w.weight=0.5", "datasets.more.path=y"]
    )
    assert set(cfg.datasets) == {"m3w", "more"}  # the YAML mapping replaced the paper's four streams
    assert (cfg.datasets["m3w"].batch_size, cfg.datasets["m3w"].weight) == (2, 0.5)
    assert cfg.datasets["more"] == dataclasses.replace(TrainConfig().datasets["m3w"], path="y", weight=1.0)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == (0.5, 7, "cosine")  # merged section
    assert isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.999)
    # --set on the defaults reaches a default stream
    assert (
        load_config(TrainConfig, overrides=["datasets.alt_pairs.batch_size=3"])
        .datasets["alt_pairs"]
        .batch_size
        == 3
    )


@pytest.mark.parametrize("stage", sorted(CONFIG_CLASSES))
def test_every_config_round_trips_through_yaml(stage):
    cls = config_class(stage)
    default = cls()
    assert from_dict(cls, to_dict(default)) == default
    text = to_yaml(default)
    assert from_dict(cls, parse_yaml(text)) == default


@pytest.mark.parametrize("stage", sorted(DEFAULTS_FILES))
def test_shipped_default_files_are_generated_from_the_dataclasses(stage):
    """filters/images/shards.yaml are `m3w config show STAGE` output: regenerate them when a default changes."""
    shipped = (CONFIGS_DIR / DEFAULTS_FILES[stage]).read_text()
    expected = to_yaml(config_class(stage)(), header=defaults_header(stage))
    assert shipped == expected, f"regenerate: m3w config show {stage} > m3w/configs/{DEFAULTS_FILES[stage]}"


def _repeated_defaults(cls, data: dict, where: str = "") -> list[str]:
    """Keys of `data` whose value equals the dataclass default: an override file should not repeat them."""
    default = cls()
    repeated = []
    for key, value in data.items():
        current = getattr(default, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            repeated += _repeated_defaults(type(current), value, f"{where}{key}.")
        elif not isinstance(value, dict) and value == current:
            repeated.append(f"{where}{key}")
    return repeated


@pytest.mark.parametrize(
    ("name", "stage"),
    [("model_tiny.yaml", "model"), ("model_bench.yaml", "model"), ("model_compact.yaml", "model"),
     ("train_tiny.yaml", "train"), ("train_compact.yaml", "train"), ("train_demo.yaml", "train")],
)  # fmt: skip
def test_presets_and_run_configs_hold_only_overrides(name, stage):
    path = CONFIGS_DIR / name
    load_config(config_class(stage), path)  # every key known, every type right
    assert _repeated_defaults(config_class(stage), yaml.safe_load(path.read_text())) == []


def test_config_show_prints_the_resolved_config():
    result = CliRunner().invoke(
        main,
        [
            "config",
            "show",
            "train",
            "--config",
            str(CONFIGS_DIR / "train_tiny.yaml"),
            "--set",
            "optim.lr=3e-4",
        ],
    )
    assert result.exit_code == 0, result.output
    shown = parse_yaml(result.output)
    assert shown["optim"]["lr"] == 3e-4 and shown["model"]["preset"] == "tiny"
    assert "# after warmup" in result.output  # each key with the comment of its dataclass field
