"""What the command line prints besides results: no TensorFlow start-up noise, readable lines, clear early errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tftransfer import cli
from tftransfer.core.native_logs import filtered_native_stderr, keep_line

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
