"""The command configs (tftransfer.config.commands): strict like the experiment config, and the one source of the
Click options' defaults, choices, ranges and help. No TensorFlow needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from tftransfer import cli
from tftransfer.config.commands import (
    AdaptCommandConfig,
    CompressReportCommandConfig,
    DomainCommandConfig,
    EvaluateCommandConfig,
    ExportCommandConfig,
    LrFindCommandConfig,
    PredictCommandConfig,
    SelectCommandConfig,
    command_config,
    setting_specs,
)
from tftransfer.core.errors import ConfigError

# command name -> its config, and the options of the command that are not settings of the job
COMMAND_CONFIGS = {
    "export": (ExportCommandConfig, {"show_signatures"}),
    "predict": (PredictCommandConfig, {"csv_path", "json_path"}),
    "evaluate": (EvaluateCommandConfig, {"data", "progress"}),
    "domain": (DomainCommandConfig, set()),
    "adapt": (AdaptCommandConfig, set()),
    # lr-find also takes fit's experiment options (config, --set, --backbone, ...): they build the ExperimentConfig
    "lr-find": (LrFindCommandConfig, {o.name for o in cli.main.commands["fit"].params if isinstance(o, click.Option)}),
    "select": (SelectCommandConfig, {"data", "candidates"}),
    "compress-report": (CompressReportCommandConfig, set()),
}


def _options(command: str) -> list[click.Option]:
    return [p for p in cli.main.commands[command].params if isinstance(p, click.Option) and p.name != "help"]


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_every_option_default_choice_range_and_help_is_the_config_fields(command):
    cls, cli_only = COMMAND_CONFIGS[command]
    specs = setting_specs(cls)
    options = _options(command)
    assert {o.name for o in options} - cli_only <= set(specs), "an option that is not a config field"
    for option in options:
        if option.name in cli_only:
            continue
        spec = specs[option.name]
        assert option.default == spec.default, option.name
        assert option.help == spec.help, option.name
        if spec.choices:
            assert tuple(option.type.choices) == spec.choices, option.name
        if isinstance(option.type, (click.IntRange, click.FloatRange)):
            assert (option.type.min, option.type.max) == (spec.min, spec.max), option.name
            assert (option.type.min_open, option.type.max_open) == (spec.min_exclusive, spec.max_exclusive)
        else:
            assert spec.min is None and spec.max is None, f"{option.name}: a range the option does not check"
        if spec.type is bool:
            assert option.is_flag, option.name


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_the_options_parse_into_the_config(command, tmp_path):
    cls, cli_only = COMMAND_CONFIGS[command]
    arguments = {"predict": [str(tmp_path), "image.jpg"], "evaluate": [str(tmp_path), "--data", "d"], "lr-find": [],
                 "select": ["--data", "d", "--candidates", "tiny"]}
    args = arguments.get(command, [str(tmp_path)])
    ctx = cli.main.commands[command].make_context(command, args)
    settings = {k: v for k, v in ctx.params.items() if k in setting_specs(cls) and k not in cli_only}
    assert command_config(cls, settings=settings) == cls(**settings)


def test_unknown_keys_and_bad_types_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'tfite'; did you mean tflite"):
        command_config(ExportCommandConfig, settings={"tfite": "int8"})
    with pytest.raises(ConfigError, match="version: expected int"):
        command_config(ExportCommandConfig, settings={"version": "two"})
    with pytest.raises(ConfigError, match="tflite: 'int4' is not one of float32, float16, dynamic, int8"):
        command_config(ExportCommandConfig, settings={"tflite": "int4"})
    with pytest.raises(ConfigError, match="top_k: must be >= 1"):
        command_config(ExportCommandConfig, ExportCommandConfig(top_k=0))  # built directly: checked all the same
    with pytest.raises(TypeError, match="not both"):
        command_config(ExportCommandConfig, ExportCommandConfig(), {"top_k": 2})


def test_keywords_are_coerced_like_yaml_values():
    cfg = command_config(ExportCommandConfig, settings={"model_dir": "out/m", "version": "3", "tflite": None})
    assert cfg == ExportCommandConfig(model_dir=Path("out/m"), version=3)


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    from tftransfer.jobs.export import export_run

    with pytest.raises(ConfigError, match="tflite: 'int4'"):
        export_run(tmp_path / "missing", tflite="int4")


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_help_comes_back_without_tensorflow(command):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom tftransfer.cli import main\n"
            f"result = CliRunner().invoke(main, [{command!r}, '--help'])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_exclusive_maximum_is_checked():
    with pytest.raises(ConfigError, match="val_split: must be < 1.0, got 1.0"):
        command_config(EvaluateCommandConfig, settings={"val_split": 1})
    assert command_config(EvaluateCommandConfig, settings={"val_split": "0.5"}).val_split == 0.5


def test_lists_come_as_comma_separated_text_lists_or_tuples():
    cfg = command_config(DomainCommandConfig, settings={"corruptions": "fog, snow", "severities": [3, "5"],
                                                        "adapt": "all", "adapt_severities": ""})
    assert (cfg.corruptions, cfg.severities, cfg.adapt, cfg.adapt_severities) == (("fog", "snow"), (3, 5), ("all",), ())
    with pytest.raises(ConfigError, match=r"severities\[1\]: expected int, got 'x'"):
        command_config(DomainCommandConfig, settings={"severities": "1,x"})
    with pytest.raises(ConfigError, match="folds: must be >= 2"):
        command_config(DomainCommandConfig, settings={"folds": 1})


def test_domain_options_parse_lists(tmp_path):
    ctx = cli.main.commands["domain"].make_context("domain", [str(tmp_path), "--severities", "3,5", "--adapt",
                                                              "adabn,tent", "--corruptions", "all"])
    assert ctx.params["severities"] == (3, 5) and ctx.params["adapt"] == ("adabn", "tent")
    assert ctx.params["corruptions"] == ("all",) and ctx.params["adapt_severities"] == ()
    with pytest.raises(click.BadParameter, match="comma-separated int"):
        cli.main.commands["domain"].make_context("domain", [str(tmp_path), "--severities", "3,five"])
