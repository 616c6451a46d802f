"""Compression: magnitude pruning (the schedule, the masks, their survival across an interrupted phase, exports
with zeros) and the compress-report command on the pruned run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import make_colour_folder

import tftransfer
from tftransfer.cli import main
from tftransfer.config.experiment import PRUNABLE_LAYER_KINDS, PruneConfig, load_config
from tftransfer.core.errors import ConfigError
from tftransfer.serving.tflite import load_interpreter, read_labels
from tftransfer.training import callbacks
from tftransfer.training.checkpoint import MASKS_FILE, list_checkpoints, read_checkpoint
from tftransfer.training.pruning import PRUNABLE_LAYERS, magnitude_mask, polynomial_sparsity, prunable_kernels

TARGET = 0.75
FINETUNE = 4


def test_schedule_is_monotone_and_reaches_the_target_at_the_end_step():
    steps = range(0, 121)
    values = [polynomial_sparsity(t, TARGET, begin_step=20, end_step=100, initial=0.1) for t in steps]
    assert values[:20] == [0.0] * 20 and values[20] == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[99] < TARGET and values[100] == TARGET and set(values[100:]) == {TARGET}
    # Zhu & Gupta's cubic: most of the pruning happens early
    assert values[60] == pytest.approx(TARGET + (0.1 - TARGET) * 0.5 ** 3)


def test_mask_drops_exactly_the_smallest_magnitudes():
    weights = np.array([[0.5, -0.1, 0.0], [-2.0, 0.05, 1.0]], np.float32)
    mask = magnitude_mask(weights, 0.5)
    assert mask.tolist() == [[True, False, False], [True, False, True]]
    assert magnitude_mask(weights, 0.0).all()


def test_config_kinds_match_the_registry_and_bad_schedules_name_the_keys():
    assert set(PRUNABLE_LAYER_KINDS) == set(PRUNABLE_LAYERS)
    with pytest.raises(ConfigError, match="prune.end_fraction"):
        load_config(None, ["prune.target_sparsity=0.5", "prune.begin_fraction=0.8", "prune.end_fraction=0.2"])
    with pytest.raises(ConfigError, match="prune.layers"):
        load_config(None, ["prune.layers=[conv, batchnorm]"])
    assert PruneConfig().target_sparsity == 0.0  # off unless asked for


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[str, Path]:
    """A pruned run interrupted after 2 of its 4 phase-2 epochs (the schedule ended in epoch 1), then resumed."""
    root = tmp_path_factory.mktemp("prune")
    data = make_colour_folder(root / "data", per_class=12, splits=True)
    runs = root / "runs"
    args = ["fit", "--data", str(data), "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--name", "pruned", "--set", f"runs_dir={runs}",
            "--set", f"export.dir={root / 'saved'}",
            "--set", f"runtime.cache_dir={root / 'cache'}", "--set", "model.dropout=0.0",
            "--set", "phases.head.epochs=8", "--set", "phases.head.learning_rate=0.05",
            "--set", f"phases.finetune.epochs={FINETUNE}", "--set", "phases.finetune.unfreeze_blocks=4",
            "--set", "phases.finetune.learning_rate=0.01", "--set", "phases.finetune.warmup_epochs=0",
            "--set", f"prune.target_sparsity={TARGET}", "--set", "prune.end_fraction=0.2"]
    real, calls = callbacks.EpochCheckpoint.on_epoch_end, []

    def interrupt_after_two(self, epoch, logs=None):
        real(self, epoch, logs)
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt

    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks.EpochCheckpoint, "on_epoch_end", interrupt_after_two)
        out = runner.invoke(main, args)
    assert out.exit_code == 1 and "tftransfer fit --resume" in out.output, out.output
    run = runs / "pruned"
    killed = root / "killed" / list_checkpoints(run / "checkpoints")[-1].name  # the resume rotates it away
    shutil.copytree(list_checkpoints(run / "checkpoints")[-1], killed)
    out = runner.invoke(main, ["fit", "--resume", str(run)])
    assert out.exit_code == 0, out.output
    assert f"restored 6 pruning masks at sparsity {TARGET:.3f}" in out.output
    assert "pruned " in out.output and f"({TARGET:.1%})" in out.output  # the summary line of the pruned phase
    return {"run": run, "killed": killed, "saved": root / "saved" / "pruned"}


def _kernel_zeros(arrays) -> tuple[int, int]:
    # conv kernels, not the 3-class output layer's (features, 3) or TFLite's (3, features)
    kernels = [a for a in arrays if a.ndim == 4 or (a.ndim == 2 and 3 not in a.shape)]
    return sum(int(np.count_nonzero(a == 0)) for a in kernels), sum(a.size for a in kernels)


def test_masks_are_checkpointed_and_survive_the_resume(pruned):
    assert (pruned["killed"] / MASKS_FILE).is_file()
    state = json.loads((pruned["killed"] / "state.json").read_text())
    assert state["phase"] == "finetune" and state["prune_sparsity"] == TARGET
    history = json.loads((pruned["run"] / "history.json").read_text())
    assert [row["phase"] for row in history] == ["head"] * 8 + ["finetune"] * FINETUNE
    # The schedule ended before the interruption: the resumed epochs train with the checkpoint's masks (the
    # fixture checks the resume restored them) and end at the target.
    prune = json.loads((pruned["run"] / "metrics.json").read_text())["phases"][1]["pruning"]
    assert prune["sparsity"] == pytest.approx(TARGET, abs=0.01) and prune["scheduled_sparsity"] == TARGET
    assert prune["pruned_kernels"] == 6  # the tiny backbone's convolutions, not the output layer
    assert all(row["sparsity"] == pytest.approx(TARGET, abs=0.02) for row in prune["layers"])
    assert "## Pruning (phase finetune)" in (pruned["run"] / "summary.md").read_text()
    # and the final weights are zero exactly where the interrupted run's masks said
    saved = read_checkpoint(pruned["killed"]).masks()
    model = keras.saving.load_model(pruned["run"] / "model.keras")
    kernels = prunable_kernels(model, ("conv", "dense"), trainable_only=False)
    assert sorted(saved) == sorted(kernel.path for _, _, kernel in kernels)
    for _, _, kernel in kernels:
        assert np.array_equal(keras.ops.convert_to_numpy(kernel) != 0, saved[kernel.path]), kernel.path


def test_a_checkpoint_whose_weights_do_not_match_its_masks_is_refused(pruned, tmp_path):
    run = tmp_path / "pruned"
    shutil.copytree(pruned["run"], run)
    (run / "metrics.json").unlink()
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints)
    killed = checkpoints / pruned["killed"].name
    shutil.copytree(pruned["killed"], killed)
    with np.load(killed / MASKS_FILE) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["m00000"] = np.ones_like(arrays["m00000"])  # a mask that prunes nothing...
    arrays["m00000"][0] = False  # ...but the first row, which the saved weights do not hold as zeros
    np.savez(killed / MASKS_FILE, **arrays)
    state = json.loads((killed / "state.json").read_text())
    state["files"].pop(MASKS_FILE)  # the sha256 check would catch the change first; this tests the mask check
    (killed / "state.json").write_text(json.dumps(state))
    out = CliRunner().invoke(main, ["fit", "--resume", str(run)])
    assert out.exit_code != 0 and "nonzero weights where its mask prunes them" in out.output, out.output
    assert "Traceback" not in out.output


def test_exports_are_ordinary_graphs_with_the_zeros_in_them(pruned, tmp_path):
    version = sorted(pruned["saved"].iterdir())[-1]
    loaded = tf.saved_model.load(str(version))
    names = [v.name for v in loaded.variables]
    assert names and not any("mask" in name.lower() for name in names)
    zeros, total = _kernel_zeros([v.numpy() for v in loaded.variables])
    assert zeros / total >= TARGET - 0.01
    exported = tftransfer.export(pruned["run"], tflite="float32", force=True, model_dir=tmp_path / "model")
    assert read_labels(exported.tflite["file"]) == ["cyan", "magenta", "yellow"]  # the run's classes, inside
    interpreter = load_interpreter(exported.tflite["file"])
    tensors = []
    for detail in interpreter.get_tensor_details():
        try:
            tensors.append(interpreter.get_tensor(detail["index"]))
        except ValueError:  # activations have no data before invoke
            continue
    zeros, total = _kernel_zeros([t for t in tensors if t.dtype == np.float32])
    assert zeros / total >= TARGET - 0.05


def test_compress_report_compares_the_run_its_export_and_tflite_conversions(pruned, tmp_path):
    out = tmp_path / "report"
    lone = tmp_path / "lone.tflite"  # a .tflite file passed on its own: its labels come from inside it
    version = sorted(pruned["saved"].iterdir())[-1]
    args = ["compress-report", str(pruned["run"]), str(version), "--tflite", "float32,int8-uint8", "-o", str(out),
            "--latency-runs", "2", "--batch-size", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lone.write_bytes((out / "pruned_model_int8-uint8.tflite").read_bytes())
    result = CliRunner().invoke(main, [*args[:-6], str(lone), *args[-6:]])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compress_report.json").read_text())
    rows = {row["name"]: row for row in report["models"]}
    assert set(rows) == {"pruned", "pruned tflite float32", "pruned tflite int8-uint8", f"pruned/v{version.name}",
                         "lone.tflite"}
    assert report["split"] == "val" and all(row["examples"] == report["examples"] > 0 for row in rows.values())
    float_models = [rows["pruned"], rows["pruned tflite float32"], rows[f"pruned/v{version.name}"]]
    assert len({row["accuracy"] for row in float_models}) == 1  # the same model, the same images
    assert abs(rows["pruned tflite int8-uint8"]["accuracy"] - rows["pruned"]["accuracy"]) <= 0.2
    assert rows["lone.tflite"]["accuracy"] == rows["pruned tflite int8-uint8"]["accuracy"]
    for row in rows.values():
        assert 0 < row["nonzero_parameters"] < row["parameters"] and row["gzip_bytes"] < row["size_bytes"]
        assert row["latency_batch1_ms"] > 0 and row["latency_batch8_ms"] > 0
    assert rows["pruned tflite float32"]["sparsity"] > 0.6  # pruned convolutions, folded BatchNorm kept
    assert any(row["pareto"] for row in rows.values())
    markdown = (out / "compress_report.md").read_text()
    assert "| Model | Kind | Accuracy |" in markdown and "pareto.png" in markdown and (out / "pareto.png").is_file()
    bad = CliRunner().invoke(main, ["compress-report", str(pruned["run"] / "config.yaml")])
    assert bad.exit_code != 0 and "must be a .tflite model" in bad.output and "Traceback" not in bad.output
