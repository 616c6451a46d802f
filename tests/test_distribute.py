"""tf.distribute on a CPU machine: mirrored over 2 logical CPU devices, and 2 local multi-worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tftransfer.runtime import resolve_strategy

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def _fit_command(runs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tftransfer", "fit", "--config", SMOKE, "--name", name,
            "--set", f"runs_dir={runs}", "--set", f"runtime.cache_dir={runs.parent / 'cache'}",
            "--set", "phases.head.epochs=2", "--set", "phases.finetune.epochs=2", "--set", "export.enabled=false",
            *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **extra})
    return env


def test_resolve_strategy(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    assert resolve_strategy("auto", gpus=0) == "default"
    assert resolve_strategy("auto", gpus=2) == "mirrored"
    assert resolve_strategy("mirrored", gpus=0) == "mirrored"
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker"}}')
    assert resolve_strategy("auto", gpus=0) == "multiworker"


# A fit process over 2 logical CPUs, about 2 minutes under load: the slow suite
# (test_two_replicas_on_padded_batches_step_like_one is the fast check).
@pytest.mark.slow
def test_mirrored_over_two_logical_cpus(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(_fit_command(runs, "mirrored", "--set", "runtime.strategy=mirrored",
                                       "--set", "runtime.cpu_replicas=2", "--set", "phases.finetune.epochs=8"),
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    runtime = json.loads((runs / "mirrored" / "runtime.json").read_text())
    assert runtime["strategy"] == "mirrored" and runtime["replicas"] == 2
    assert json.loads((runs / "mirrored" / "metrics.json").read_text())["run"]["runtime"]["replicas"] == 2
    metrics = json.loads((runs / "mirrored" / "metrics.json").read_text())
    assert [p["epochs_run"] for p in metrics["phases"]] == [2, 8]
    assert metrics["final"]["val"]["accuracy"] > 0.2  # 10 classes: it learned something on both replicas


def test_malformed_tf_config_is_a_one_line_config_error(monkeypatch):
    from tftransfer.config.experiment import RuntimeConfig
    from tftransfer.core.errors import ConfigError
    from tftransfer.runtime import configure_runtime

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}')
    with pytest.raises(ConfigError, match=r"^TF_CONFIG task.index 3 is not an index into cluster.worker") as err:
        configure_runtime(RuntimeConfig(strategy="auto"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["runtime.strategy=pipeline", "runtime.cpu_replicas=-1"])
def test_bad_strategy_settings_are_config_errors(bad):
    from tftransfer.config.experiment import load_config
    from tftransfer.core.errors import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(overrides=[bad])


# A fit process, over a minute: the slow suite
# (test_placement_model_under_mirrored_with_an_adaptive_trainer is the fast check).
@pytest.mark.slow
def test_adaptive_training_under_mirrored(tmp_path):
    """The custom train_step (DANN, source + target batches) runs on 2 replicas with the losses added up right."""
    runs = tmp_path / "runs"
    proc = subprocess.run(_fit_command(runs, "dann", "--set", "runtime.strategy=mirrored",
                                       "--set", "runtime.cpu_replicas=2", "--target", "builtin:digits",
                                       "--adapt", "dann", "--set", "adapt.max_target_images=200",
                                       "--set", "model.bottleneck=16"),
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((runs / "dann" / "runtime.json").read_text())["replicas"] == 2
    history = json.loads((runs / "dann" / "history.json").read_text())
    assert len(history) == 4
    for row in history:
        assert 0.0 <= row["domain_accuracy"] <= 1.0 and "target_accuracy" in row
        assert abs(row["loss"] - (row["task_loss"] + row["adapt_loss"])) < 1e-3 * max(1.0, row["loss"])
