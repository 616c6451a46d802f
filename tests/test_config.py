"""Config loading: defaults, YAML, overrides, strict errors that name the key, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tftransfer.config.base_yaml import base_yaml_text
from tftransfer.config.experiment import ExperimentConfig, config_to_dict, load_config, save_config
from tftransfer.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    cfg = load_config(overrides=["phases.finetune.epochs=3", "model.backbone_kwargs={alpha: 0.5}",
                                 "phases.head.learning_rate=1e-4", "data.augment.flip=false"])
    assert cfg.phases.finetune.epochs == 3
    assert cfg.phases.finetune.learning_rate == pytest.approx(1e-5)  # untouched default kept
    assert cfg.model.backbone_kwargs == {"alpha": 0.5}
    assert cfg.phases.head.learning_rate == pytest.approx(1e-4)  # "1e-4" is a string to YAML; coerced
    assert cfg.data.augment.flip is False


@pytest.mark.parametrize("override, message", [
    ("phases.head.lr=1", "unknown config key 'phases.head.lr'"),
    ("phases.finetune.unfreez_blocks=1", "did you mean unfreeze_blocks"),
    ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("data.batch_size=abc", "data.batch_size: expected int"),
    ("runtime.precision=fp8", "runtime.precision: 'fp8' is not one of"),
    ("phases.head.learning_rate=0", "phases.head.learning_rate: must be > 0"),
    ("data.val_split=1.5", "data.val_split: must be <= 0.9"),
    ("data=3", "data: expected a mapping"),
    ("model.dropout=true", "model.dropout: expected float"),
    ("nonsense", "must look like key.path=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[override])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet50\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.colour'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_base_yaml_equals_library_defaults():
    assert config_to_dict(load_config(CONFIGS / "base.yaml")) == config_to_dict(ExperimentConfig())
    # and it lists every key, so it documents every default
    raw = yaml.safe_load((CONFIGS / "base.yaml").read_text())

    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            if isinstance(v, dict) and k != "backbone_kwargs":
                out |= keys(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    assert keys(raw) == keys(config_to_dict(ExperimentConfig()))


def test_base_yaml_is_generated_from_the_dataclasses():
    assert (CONFIGS / "base.yaml").read_text() == base_yaml_text(), (
        "configs/base.yaml is stale: python -m tftransfer.config.base_yaml > configs/base.yaml")


def test_base_yaml_text_round_trips_any_config():
    cfg = load_config(overrides=["phases.finetune.learning_rate=3e-5", "model.backbone_kwargs={alpha: 0.5}",
                                 "name='a: b # c'", "data.path=wait...", "runtime.cache_dir='yes'"])
    assert yaml.safe_load(base_yaml_text(cfg)) == config_to_dict(cfg) != config_to_dict(ExperimentConfig())


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(CONFIGS / name)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "mobilenetv2_hymenoptera.yaml", overrides=["phases.finetune.epochs=3"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
