"""Checkpoints and resume: a run killed mid-phase-2 finishes with every epoch exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_colour_folder

from tftransfer.cli import main
from tftransfer.training.checkpoint import list_checkpoints, load_latest, read_checkpoint

HEAD, FINETUNE = 2, 25


def _fit_args(runs: Path) -> list[str]:
    return ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
            "--name", "killed", "--set", f"runs_dir={runs}", "--set", f"export.dir={runs.parent / 'saved'}",
            "--set", f"runtime.cache_dir={runs.parent / 'cache'}", "--set", f"phases.head.epochs={HEAD}",
            "--set", f"phases.finetune.epochs={FINETUNE}"]


def _finetune_epochs_done(checkpoints: Path) -> int:
    found = list_checkpoints(checkpoints)
    if not found:
        return 0
    state = json.loads((found[-1] / "state.json").read_text())
    return state["epoch"] - HEAD if state["phase"] == "finetune" else 0


@pytest.mark.slow  # two fit processes, about 2 minutes under load: the slow suite
def test_sigkill_mid_phase_two_then_resume(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "tftransfer", *_fit_args(runs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    checkpoints = runs / "killed" / "checkpoints"
    deadline = time.time() + 240
    while _finetune_epochs_done(checkpoints) < 3:
        assert proc.poll() is None, f"fit ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "phase 2 never reached its third epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_latest(checkpoints).state
    assert killed_at.phase == "finetune" and 3 <= killed_at.epoch - HEAD < FINETUNE
    assert not (runs / "killed" / "metrics.json").exists()

    result = CliRunner().invoke(main, ["fit", "--resume", str(runs / "killed")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = json.loads((runs / "killed" / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, HEAD + FINETUNE + 1))  # none lost, none repeated
    assert [row["phase"] for row in history] == ["head"] * HEAD + ["finetune"] * FINETUNE
    metrics = json.loads((runs / "killed" / "metrics.json").read_text())
    assert [p["epochs_run"] for p in metrics["phases"]] == [HEAD, FINETUNE]
    # the learning-rate schedule continued where it stopped instead of restarting its warmup/cosine
    lrs = [row["learning_rate"] for row in history if row["phase"] == "finetune"]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))
    assert metrics["final"]["val"]["accuracy"] > 0.5


def test_resume_refuses_finished_or_foreign_dirs(tmp_path):
    result = CliRunner().invoke(main, ["fit", "--resume", str(tmp_path)])
    assert result.exit_code != 0 and "not a tftransfer run directory" in result.output
    result = CliRunner().invoke(main, ["fit", "--resume", str(tmp_path), "--epochs", "3"])
    assert result.exit_code != 0 and "drop --epochs" in result.output


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    args = _fit_args(tmp_path / "runs")[:-4] + ["--set", "phases.head.epochs=3", "--set", "phases.finetune.epochs=0",
                                                 "--set", "phases.head.learning_rate=1e38",
                                                 "--set", "phases.head.optimizer=sgd"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "NaN" in result.output and "learning_rate" in result.output
    assert "Traceback" not in result.output


def test_no_checkpoint_yet_is_explained(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    result = CliRunner().invoke(main, ["fit", "--resume", str(run)])
    assert result.exit_code != 0 and "no checkpoint" in result.output


def test_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    args = ["fit", "--data", str(make_colour_folder(tmp_path / "colours", per_class=6)), "--name", "cut",
            "--set", f"runs_dir={runs}", "--set", "export.enabled=false", "--backbone", "tiny", "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--set", "phases.head.epochs=1",
            "--set", "phases.finetune.epochs=3", "--set", "phases.finetune.warmup_epochs=0"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    run = runs / "cut"
    (run / "metrics.json").unlink()  # as if it had been killed after its last checkpoint
    older, newest = list_checkpoints(run / "checkpoints")[-2:]
    weights = newest / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed = CliRunner().invoke(main, ["fit", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert f"checkpoint {newest.name} (model.weights.h5 has 1000 bytes" in resumed.output
    assert f"resuming from {older.name}" in resumed.output
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    for path in list_checkpoints(run / "checkpoints"):  # the damaged one was written again, not kept
        read_checkpoint(path)
