"""Compression: magnitude pruning (the schedule, the masks, their survival across an interrupted phase, exports
with zeros) and the compress-report command on the pruned run."""

from __future__ import annotations

import dataclasses
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
from tftransfer.config.experiment import (
    PRUNABLE_LAYER_KINDS,
    PRUNE_ALLOCATION_NAMES,
    PRUNE_SCORE_NAMES,
    PruneConfig,
    load_config,
)
from tftransfer.core.errors import ConfigError
from tftransfer.model.backbones import build_tiny_backbone
from tftransfer.serving.tflite import load_interpreter, read_labels
from tftransfer.training import callbacks
from tftransfer.training.checkpoint import MASKS_FILE, list_checkpoints, read_checkpoint
from tftransfer.training.pruning import (
    PRUNABLE_LAYERS,
    PRUNE_ALLOCATIONS,
    PRUNE_SCORES,
    build_pruning,
    compute_masks,
    following_batchnorms,
    kernel_scores,
    magnitude_mask,
    polynomial_sparsity,
    prunable_kernels,
    prune_once,
)

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
    assert set(PRUNE_SCORE_NAMES) == set(PRUNE_SCORES) and set(PRUNE_ALLOCATION_NAMES) == set(PRUNE_ALLOCATIONS)


def test_a_bad_score_or_allocation_is_a_one_line_error_naming_the_key():
    for key in ("score", "allocation"):
        with pytest.raises(ConfigError, match=f"prune.{key}") as caught:
            load_config(None, [f"prune.{key}=biggest"])
        assert "\n" not in str(caught.value)
    # a config built in Python, past load_config's checks, fails the same way at the registry
    kernels = prunable_kernels(build_tiny_backbone(), ("conv",), trainable_only=False)
    with pytest.raises(ConfigError, match="prune.score: unknown value 'biggest'; choose one of folded, magnitude"):
        compute_masks(kernels, PruneConfig(target_sparsity=0.5, score="biggest"), 0.5, {})


def test_min_weights_leaves_small_kernels_dense():
    model = build_tiny_backbone()  # kernels of 216 (stem), 576, 128, 1152, 512 and 4608 (block3_conv) weights
    assert len(prunable_kernels(model, ("conv",), trainable_only=False)) == 6
    big = [name for name, _, _ in prunable_kernels(model, ("conv",), trainable_only=False, min_weights=1000)]
    assert big == ["block2_conv", "block3_conv"]
    before = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}
    masks = prune_once(model, PruneConfig(target_sparsity=0.5, min_weights=1000, layers=("conv",),
                                          allocation="uniform"))
    assert sorted(masks) == ["block2_conv/kernel", "block3_conv/kernel"]
    for weight in model.weights:
        values = keras.ops.convert_to_numpy(weight)
        if weight.path in masks:
            assert np.count_nonzero(values == 0) == values.size // 2, weight.path
        else:  # the small kernels (and every other weight) are untouched
            assert np.array_equal(values, before[weight.path]), weight.path
    callback = build_pruning(PruneConfig(target_sparsity=0.5), model, total_steps=10)  # the default 4096
    assert [name for name, _, _ in callback.kernels] == ["block3_conv"]


def _conv_bn(gamma: np.ndarray, variance: np.ndarray) -> keras.Model:
    """A 1x1 conv of 4 output channels into a BatchNorm, and a second conv with no BatchNorm after it."""
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(4, 1, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn", epsilon=1e-3)(x)
    x = keras.layers.Conv2D(4, 1, use_bias=False, name="bare")(x)
    model = keras.Model(inputs, x)
    kernel = np.array([[1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5]], np.float32).reshape(1, 1, 2, 4)
    model.get_layer("conv").kernel.assign(kernel)
    model.get_layer("bare").kernel.assign(np.tile(kernel, (1, 1, 2, 1)))
    model.get_layer("bn").gamma.assign(gamma)
    model.get_layer("bn").moving_variance.assign(variance)
    return model


def test_folded_score_weighs_each_channel_by_its_batchnorm_and_keeps_the_weights_it_amplifies():
    # channel 0 has the smallest weights but BatchNorm multiplies it by 10 / sqrt(0.25 + eps) ~ 20;
    # channel 3 has the largest weights but a variance of 99.999 -> x 0.1
    gamma = np.array([10.0, 1.0, 1.0, 1.0], np.float32)
    variance = np.array([0.25, 1.0, 1.0, 99.999], np.float32)
    model = _conv_bn(gamma, variance)
    batchnorms = following_batchnorms(model)
    assert {path: bn.name for path, bn in batchnorms.items()} == {"conv/kernel": "bn"}  # not the bare conv
    kernels = prunable_kernels(model, ("conv",), trainable_only=False)
    folded = kernel_scores(kernels, "folded", batchnorms)
    magnitude = kernel_scores(kernels, "magnitude", batchnorms)
    weights = keras.ops.convert_to_numpy(model.get_layer("conv").kernel)
    scale = gamma / np.sqrt(variance + 1e-3)
    np.testing.assert_allclose(folded["conv/kernel"], np.abs(weights * scale), rtol=1e-6)
    np.testing.assert_array_equal(folded["bare/kernel"], magnitude["bare/kernel"])  # no BatchNorm: |w|
    cfg = PruneConfig(target_sparsity=0.5, min_weights=0, score="folded", allocation="uniform")
    kept = compute_masks(kernels, cfg, 0.5, batchnorms)["conv/kernel"].reshape(2, 4)
    by_magnitude = compute_masks(kernels, dataclasses.replace(cfg, score="magnitude"), 0.5,
                                 batchnorms)["conv/kernel"].reshape(2, 4)
    assert by_magnitude.tolist() == [[False, False, True, True], [False, False, True, True]]
    # folded: channel 0 (x20) and 2 (x1, weights 3 and 3.5) stay; channel 3's 4 and 4.5 x 0.1 go
    assert kept.tolist() == [[True, False, True, False], [True, False, True, False]]
    # equal statistics in every channel: the folded ranking is the magnitude ranking
    same = _conv_bn(np.full(4, 2.0, np.float32), np.full(4, 3.0, np.float32))
    kernels = prunable_kernels(same, ("conv",), trainable_only=False)
    assert np.array_equal(compute_masks(kernels, cfg, 0.5, following_batchnorms(same))["conv/kernel"],
                          compute_masks(kernels, dataclasses.replace(cfg, score="magnitude"), 0.5, {})["conv/kernel"])


def test_global_allocation_ranks_all_kernels_together_and_depthwise_kernels_are_found():
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(inputs)
    x = keras.layers.Conv2D(4, 1, name="small")(x)
    x = keras.layers.Conv2D(4, 1, name="big")(x)
    model = keras.Model(inputs, x)
    model.get_layer("small").kernel.assign(np.full((1, 1, 2, 4), 0.01, np.float32))
    model.get_layer("big").kernel.assign(np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4))
    kinds = ("conv", "depthwise")
    assert [name for name, _, _ in prunable_kernels(model, kinds, trainable_only=False)] == ["dw", "small", "big"]
    masks = prune_once(model, PruneConfig(target_sparsity=0.25, min_weights=0, allocation="global",
                                          layers=("conv",), score="magnitude"))
    # 24 conv weights, 6 go: all 8 of `small` score lowest but only 6 are dropped, `big` keeps everything
    assert int((~masks["small/kernel"]).sum()) == 6 and masks["big/kernel"].all()
    uniform = prune_once(model, PruneConfig(target_sparsity=0.25, min_weights=0, layers=("conv",),
                                            allocation="uniform"))
    assert int((~uniform["small/kernel"]).sum()) == 2 and int((~uniform["big/kernel"]).sum()) == 4


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
            "--set", f"prune.target_sparsity={TARGET}", "--set", "prune.end_fraction=0.2",
            "--set", "prune.min_weights=0",  # the tiny backbone's kernels are all small
            "--set", "prune.allocation=uniform",  # so that every kernel ends at the target
            "--set", "prune.score=folded"]
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
    assert "(folded score, uniform allocation, kernels of at least 0 weights)" in (pruned["run"] / "summary.md"
                                                                                    ).read_text()
    assert prune["score"] == "folded" and prune["folded_kernels"] == 4  # the shortcuts have no BatchNorm after them
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
