"""What the command line prints besides results: no TensorFlow start-up noise, readable lines, clear early errors."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import write_solid_images

from tftransfer import cli
from tftransfer.config.experiment import DataConfig, ExperimentConfig, RuntimeConfig, save_config
from tftransfer.core.native_logs import filtered_native_stderr, keep_line
from tftransfer.runs.finished import load_run_source
from tftransfer.runtime import configure_runtime

RGB = {"a_red": (250, 10, 10), "b_green": (10, 250, 10), "c_blue": (10, 10, 250)}  # sorted = channel order
NOISE = ("oneDNN custom operations are on", "Could not find cuda drivers", "cuInit",
         "All log messages before absl::InitializeLog()")


@pytest.mark.parametrize("level", [None, "3"])
def test_commands_print_no_tensorflow_start_up_noise(level):
    """Even TF_CPP_MIN_LOG_LEVEL=3 did not stop these before (absl logs before its initialisation ignore it)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    proc = subprocess.run([sys.executable, "-m", "tftransfer", "backbones", "tiny"], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)] == []
    assert "block3" in proc.stdout


def test_filtered_stderr_keeps_what_is_not_start_up_noise(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    lines = ["I0000 00:00:1796279920.706107    3617 port.cc:153] oneDNN custom operations are on.\n",
             "E0000 00:00:1796279925.792838    3617 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n",
             "E0000 00:00:1796279925.792838    3617 some_op.cc:12] a real error\n",
             "UserWarning: a Python warning\n"]
    with filtered_native_stderr():
        for line in lines:
            os.write(2, line.encode())
    assert capfd.readouterr().err == lines[2] + lines[3]
    assert all(keep_line(line, 0) for line in lines)  # TF_CPP_MIN_LOG_LEVEL=0: the user asked for everything
    assert [keep_line(line, 3) for line in lines] == [False, False, False, True]


def _never_called(*args, **kwargs):
    raise AssertionError("the command started its work before checking its output paths")


@pytest.mark.parametrize("command, out", [
    ("predict", ["--csv", "{missing}/x.csv"]),
    ("predict", ["--json", "{missing}/x.json"]),
    ("evaluate", ["--data", "{model}", "--output", "{file}/eval"]),
    ("domain", ["--corruptions", "all", "--out", "{file}/sub/domain"]),
    ("inspect", ["--json", "{missing}/report.json"]),
])
def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, command, out):
    for job in ("predict_files", "run_evaluation", "run_domain", "inspect_data"):
        monkeypatch.setattr(cli, job, _never_called)
    model = tmp_path / "run"
    model.mkdir()
    (tmp_path / "a_file").write_text("x")
    names = {"missing": tmp_path / "nonexistdir", "file": tmp_path / "a_file", "model": model}
    out = [part.format(**names) for part in out]
    args = {"predict": ["predict", str(model), str(model), *out], "evaluate": ["evaluate", str(model), *out],
            "domain": ["domain", str(model), *out], "inspect": ["data", "inspect", str(model), *out]}[command]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and ("does not exist" in error[0] or "not a folder" in error[0]), result.output


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_met_by_a_command_is_one_line(tmp_path, monkeypatch, code):
    def full_disk(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "run" / "domain" / "domain.md"))

    monkeypatch.setattr(cli, "run_domain", full_disk)
    model = tmp_path / "run"
    model.mkdir()
    result = CliRunner().invoke(cli.main, ["domain", str(model), "--corruptions", "all"])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError), result.output
    error = [line for line in result.output.splitlines() if line.strip()]
    assert len(error) == 1 and error[0].startswith(f"Error: cannot write {tmp_path / 'run' / 'domain' / 'domain.md'}")


def _colour_run(root: Path) -> Path:
    """A finished run's files (as tests/test_predict.py fakes them) whose config names its data: 8 red, green and
    blue images each, no val/ folder, so the held-out split is the run's 25% hash split."""
    import keras

    data = root / "data"
    for index, (name, colour) in enumerate(RGB.items()):
        write_solid_images(data / name, colour, 8, seed=index)
    run = root / "runs" / "colour"
    run.mkdir(parents=True)
    save_config(ExperimentConfig(name="colour", data=DataConfig(path=str(data), val_split=0.25)), run / "config.yaml")
    (run / "labels.txt").write_text("\n".join(RGB) + "\n")
    (run / "metrics.json").write_text(json.dumps({"run": {"image_size": 32}}))
    inputs = keras.Input((None, None, 3), name="pixels")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Resizing(32, 32, name="resize")(inputs))
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.Identity(10.0 / 255.0),
                                 bias_initializer="zeros", dtype="float32", name="logits")(x)
    keras.Model(inputs, outputs).save(run / "model.keras")
    return run


def test_evaluate_defaults_to_the_runs_own_held_out_data(tmp_path):
    run = _colour_run(tmp_path)
    held_out = load_run_source(run).val
    assert 0 < len(held_out) < 24

    result = CliRunner().invoke(cli.main, ["evaluate", str(run), "--no-progress", "--output", str(tmp_path / "e1")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert metrics["data"]["spec"] == str(tmp_path / "data") and metrics["data"]["split"] == "val"
    assert metrics["data"]["num_examples"] == len(held_out)  # the run's validation images, no training image
    assert "trained on" not in result.output

    result = CliRunner().invoke(cli.main, ["evaluate", str(run), "--split", "all", "--no-progress",
                                           "--output", str(tmp_path / "e2")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["data"]["num_examples"] == 24
    warning = [line for line in result.output.splitlines() if "includes the images it was trained on" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ")


def test_evaluate_an_export_without_data_is_one_clear_error(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "saved_model.pb").write_bytes(b"")
    result = CliRunner().invoke(cli.main, ["evaluate", str(tmp_path / "export"), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert "give --data" in result.output


def test_fit_logs_a_readable_runtime_line(caplog):
    with caplog.at_level("INFO", logger="tftransfer.runtime"):
        info = configure_runtime(RuntimeConfig(seed=7))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("runtime: "))
    assert "RuntimeInfo(" not in line and "distribution" not in line
    assert re.fullmatch(r"runtime: (cpu|\d+ GPUs?), \w+, XLA (on|off), seed 7, (non-)?deterministic ops, "
                        r"strategy \w+ \(\d+ replicas?\)", line), line
    assert "RuntimeInfo(" in repr(info)  # the repr still shows every field, for debugging


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)]
    for name, command in group.commands.items():
        found += _commands(command, (*path, name)) if isinstance(command, click.Group) else [((*path, name), command)]
    return found


COMMANDS = _commands(cli.main)


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "tftransfer" for p, _ in COMMANDS])
def test_every_help_ends_with_an_example_of_its_own_command(path, command):
    result = CliRunner().invoke(cli.main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    examples = [line.strip() for line in result.output.splitlines() if line.strip().startswith("Example: ")]
    assert len(examples) == 1, result.output
    words = examples[0].split()[1:]
    assert words[0] == "tftransfer" and tuple(words[1:1 + len(path)]) == path, examples[0]
    # a group's example runs one of its commands; every option the example uses exists
    target = command.commands[words[1 + len(path)]] if isinstance(command, click.Group) else command
    known = {opt for param in target.params for opt in (*param.opts, *param.secondary_opts)}
    assert [w for w in words if w.startswith("-") and w not in known] == [], examples[0]
