"""Multi-worker training: tftransfer's step driver against Model.fit, TF_CONFIG checks, two workers on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.core.errors import ConfigError
from tftransfer.runtime import worker_task
from tftransfer.training.loop import fit_loop, pad_partial_batches, with_class_weight

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return (tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
            tf.data.Dataset.from_tensor_slices((x[:20], y[:20])).batch(16))


def test_step_driver_equals_model_fit_under_the_default_strategy():
    train, val = _data()
    keras_model, ours = _model(), _model()
    expected = keras_model.fit(train, validation_data=val, epochs=3, verbose=0, class_weight={0: 1.0, 1: 2.0})
    found = fit_loop(ours, train, validation_data=val, epochs=3, class_weight={0: 1.0, 1: 2.0})
    assert found.history.keys() == expected.history.keys()
    for key, values in expected.history.items():
        np.testing.assert_allclose(found.history[key], values, rtol=1e-5, atol=1e-6)
    assert int(ours.optimizer.iterations) == int(keras_model.optimizer.iterations) == 12
    for a, b in zip(keras_model.get_weights(), ours.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_step_driver_stops_early_and_restores_best_weights():
    train, val = _data()
    model = _model()
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, mode="max")  # stops after epoch 2
    history = fit_loop(model, train, validation_data=val, epochs=10, callbacks=[stop])
    assert len(history.history["loss"]) == 2


def test_step_driver_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = fit_loop(model, _data()[0], epochs=2)
    assert all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("raw, key", [("{", "not valid JSON"), ('{"task": {}}', 'no "cluster"'),
                                      ('{"cluster": {"worker": ["a"]}}', "host:port"),
                                      ('{"cluster": {"worker": ["a:1"]}}', 'no "task"'),
                                      ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief"}}', "task.type"),
                                      ("", "TF_CONFIG environment variable")])
def test_bad_tf_config_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=key) as err:
        worker_task(raw)
    assert "\n" not in str(err.value) and "TF_CONFIG" in str(err.value)


def test_the_chief_is_worker_zero_unless_there_is_a_chief_job():
    assert worker_task('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}').is_chief
    assert not worker_task('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}').is_chief
    with_chief = '{"cluster": {"chief": ["c:3"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    assert not worker_task(with_chief).is_chief


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _fit_args(runs: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "tftransfer", "fit", "--config", SMOKE, "--name", name,
            "--set", f"runs_dir={runs}", "--set", f"runtime.cache_dir={runs.parent / 'cache'}",
            "--set", "phases.head.epochs=2", "--set", "phases.finetune.epochs=2", "--set", "export.enabled=false",
            "--set", "runtime.loop=tftransfer"]


def _env(tf_config: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


# Two worker processes, over a minute under load: the slow suite, beside the 2-workers-against-1 test
# (test_two_replicas_on_padded_batches_step_like_one is the fast check of the replicated step).
@pytest.mark.slow
def test_two_workers_on_loopback_train_in_lockstep(tmp_path):
    runs = tmp_path / "runs"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = [subprocess.Popen(_fit_args(runs, "mw"), env=_env({"cluster": cluster,
                                                               "task": {"type": "worker", "index": i}}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [out for out, _ in _finish(procs)]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert sorted(p.name for p in runs.iterdir()) == ["mw"]  # the chief alone wrote a run directory
    assert "is not the chief" in outputs[1]
    runtime = json.loads((runs / "mw" / "runtime.json").read_text())
    assert runtime["strategy"] == "multiworker" and runtime["workers"] == 2 and runtime["replicas"] == 2
    history = json.loads((runs / "mw" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    # both workers logged the same epochs (their weights are the same all-reduced ones)
    lines = [[line.split("(")[0] for line in out.splitlines() if line.startswith("epoch ")] for out in outputs]
    assert len(lines[0]) == 4 and lines[0] == lines[1]
    digests = [_weights_digest(out) for out in outputs]
    assert digests[0] == digests[1], digests  # bit-identical final weights on both


def _weights_digest(output: str) -> str:
    found = re.findall(r"final weights digest (\w+)", output)
    assert len(found) == 1, output[-2000:]
    return found[0]


@pytest.mark.slow
def test_two_workers_match_one_worker_with_the_same_global_batch(tmp_path):
    """Same seed and global batch (64; the train split is not a multiple of it, so every epoch ends on a padded
    batch): the two workers' weights are identical, and those of a single process within float tolerance."""
    from tftransfer.runs.finished import load_run

    runs = tmp_path / "runs"
    args = _fit_args(runs, "two") + ["--set", "phases.finetune.epochs=3"]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = [subprocess.Popen(args, env=_env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [out for out, _ in _finish(procs)]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert _weights_digest(outputs[0]) == _weights_digest(outputs[1])
    single = subprocess.run(_fit_args(runs, "one") + ["--set", "phases.finetune.epochs=3"], env=_env(),
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    train = len(json.loads((runs / "one" / "split.json").read_text())["train"])
    assert train % 64 != 0, train
    two, one = load_run(runs / "two").model, load_run(runs / "one").model
    for a, b in zip(two.get_weights(), one.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-4)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[str, str]]:
    """Each worker's (stdout, stderr) once it exits; any still running after the timeout is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _start_workers(args: list[str], cluster: dict) -> list[subprocess.Popen]:
    return [subprocess.Popen(args, env=_env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]


@pytest.mark.slow  # four worker processes, about 2 minutes: the slow suite
def test_a_killed_worker_then_both_restarted_resume_with_no_epoch_lost(tmp_path):
    import signal
    import time

    from tftransfer.training.checkpoint import list_checkpoints

    runs = tmp_path / "runs"
    args = _fit_args(runs, "killed") + ["--set", "phases.finetune.epochs=8"]  # the later --set wins
    checkpoints = runs / "killed" / "checkpoints"
    procs = _start_workers(args, {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]})
    try:
        deadline = time.time() + 180
        while not any(json.loads((c / "state.json").read_text())["epoch"] >= 4 for c in list_checkpoints(checkpoints)
                      if not c.name.endswith("-end")):
            assert all(p.poll() is None for p in procs), "a worker ended before it could be killed"
            assert time.time() < deadline, "phase 2 never reached its second epoch"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert not (runs / "killed" / "metrics.json").exists()
    resume = [sys.executable, "-m", "tftransfer", "fit", "--resume", str(runs / "killed")]
    procs = _start_workers(resume, {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]})
    errors = [err for _, err in _finish(procs)]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    history = json.loads((runs / "killed" / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 11))  # none lost, none repeated


def test_pad_partial_batches_keeps_every_row_and_weights_the_real_ones():
    x = np.arange(10, dtype="float32").reshape(10, 1)
    y = np.arange(10, dtype="int32") % 2
    padded = list(pad_partial_batches(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), 4).as_numpy_iterator())
    assert [len(b) for b in padded] == [3, 3, 3] and all(b[0].shape == (4, 1) for b in padded)
    weights = np.concatenate([b[2] for b in padded])
    np.testing.assert_allclose(weights, [1] * 8 + [2, 2, 0, 0])  # the last 2 rows stand for a batch of 4
    rows = np.concatenate([b[0][:, 0] for b in padded])[weights > 0]
    np.testing.assert_array_equal(rows, x[:, 0])  # none dropped, none repeated
    assert np.all(padded[-1][0][2:] == 0) and np.all(padded[-1][1][2:] == 0)
    weighted = list(with_class_weight(pad_partial_batches(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(4), 4), {0: 1.0, 1: 3.0}).as_numpy_iterator())
    np.testing.assert_allclose(weighted[-1][2], [2 * 1.0, 2 * 3.0, 0, 0])
    zipped = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
                                  tf.data.Dataset.from_tensor_slices(x).repeat().batch(4)))
    (source, target), = list(pad_partial_batches(zipped, 4).skip(2).as_numpy_iterator())
    assert len(source) == 3 and source[0].shape == (4, 1) and target.shape == (4, 1)


# Run in a fresh process: the CPU is split into 2 logical devices before TensorFlow starts.
_REPLICAS_SCRIPT = """
import json, keras, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tftransfer.training.distill import DistillTrainer
from tftransfer.training.loop import fit_loop, pad_partial_batches, with_class_weight

rng = np.random.default_rng(0)
x = rng.normal(size=(50, 8)).astype("float32")  # 50 = 3 batches of 16 and one of 2
y = (x[:, 0] > 0).astype("int32")
teacher = rng.normal(size=(50, 2)).astype("float32")
mirrored = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])

def net():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])

def plain():
    model = net()
    model.compile(keras.optimizers.Adam(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model

def distiller():
    model = DistillTrainer(net(), 0.5, 2.0)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    return model

out = {}
for name, build, data in (("plain", plain, (x, y)), ("distill", distiller, (x, y, teacher))):
    ds = tf.data.Dataset.from_tensor_slices(data).batch(16)
    one = build()
    kwargs = {"class_weight": {0: 1.0, 1: 2.0}} if name == "plain" else {}
    fit_loop(one, ds, epochs=3, **kwargs)
    with mirrored.scope():
        two = build()
    history = fit_loop(two, ds, validation_data=tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(16),
                       epochs=3, strategy=mirrored, global_batch=16, **kwargs)
    out[name] = {"steps": [int(keras.ops.convert_to_numpy(m.optimizer.iterations)) for m in (one, two)],
                 "max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one.get_weights(), two.get_weights())),
                 "finite": bool(np.all(np.isfinite(history.history["val_loss"])))}
print("RESULT", json.dumps(out))
"""


def test_two_replicas_on_padded_batches_step_like_one():
    proc = subprocess.run([sys.executable, "-c", _REPLICAS_SCRIPT], capture_output=True, text=True, timeout=180,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("plain", "distill"):  # the plain model's loss and the DistillTrainer's own
        assert found[name]["steps"] == [12, 12], name  # 4 steps an epoch on both: the partial batch is kept
        assert found[name]["max_diff"] < 1e-5, name
        assert found[name]["finite"], name  # the 7 validation rows leave replica 2 only padding
