"""data.augment.placement: augmentation in the tf.data pipeline or inside the training step (on the accelerator)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import COLOURS, make_colour_folder, stop_first_fit_after_one_epoch, write_solid_images

from tftransfer.config.experiment import AugmentConfig, ModelConfig, load_config
from tftransfer.core.errors import ConfigError
from tftransfer.data.augment import RandomGeometry
from tftransfer.data.pipeline import build_augmenter, make_datasets
from tftransfer.data.sources import load_arrays
from tftransfer.model import backbones
from tftransfer.model.classifier import build_model, get_backbone
from tftransfer.model.freezing import freeze_backbone, unfreeze_top_blocks
from tftransfer.runtime import resolve_augment_placement
from tftransfer.training.augment_step import AugmentingModel, device_augmenter
from tftransfer.training.phases import fit_phases


def _tiny_model(num_classes: int = 3) -> tuple[keras.Model, list[backbones.Block]]:
    spec = backbones.get_backbone_spec("tiny")
    model = build_model(ModelConfig(backbone="tiny", weights="none", dropout=0.0), spec, num_classes, 32)
    return model, backbones.blocks_for(spec, get_backbone(model))


def _asymmetric_images(n: int, seed: int = 0) -> np.ndarray:
    """Noisy images bright on the left, dark on the right: a horizontal flip always changes them."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(255.0, 0.0, 32, dtype=np.float32)[np.newaxis, np.newaxis, :, np.newaxis]
    return np.clip(ramp + rng.normal(0, 10, (n, 32, 32, 3)), 0, 255).astype(np.float32)


def _source(n: int = 40):
    labels = np.arange(n) % 3
    images = _asymmetric_images(n).astype(np.uint8)
    images[labels == 0, :, :, 0] = 255  # something learnable
    return load_arrays(images, labels, ["a", "b", "c"], "synthetic", val_split=0.25)


@pytest.fixture
def fitted_models(monkeypatch) -> list[keras.Model]:
    """Every model keras.Model.fit is called on, in order."""
    seen: list[keras.Model] = []
    real_fit = keras.Model.fit

    def spy_fit(self, *args, **kwargs):
        seen.append(self)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy_fit)
    return seen


@pytest.fixture
def warp_calls(monkeypatch) -> list[bool]:
    """One entry per RandomGeometry.augment call: whether it ran eagerly (False: traced into a graph)."""
    calls: list[bool] = []
    real = RandomGeometry.augment

    def spy(self, images, seed):
        calls.append(tf.executing_eagerly())
        return real(self, images, seed)

    monkeypatch.setattr(RandomGeometry, "augment", spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# The setting


def test_resolve_augment_placement():
    assert resolve_augment_placement("auto", has_gpu=False) == "pipeline"
    assert resolve_augment_placement("auto", has_gpu=True) == "model"
    assert resolve_augment_placement("pipeline", has_gpu=True) == "pipeline"
    assert resolve_augment_placement("model", has_gpu=False) == "model"
    # an augmenter XLA cannot compile (Keras' RandAugment) stays in the pipeline on a GPU unless asked
    assert resolve_augment_placement("auto", has_gpu=True, compilable=False) == "pipeline"
    assert resolve_augment_placement("model", has_gpu=True, compilable=False) == "model"


def test_placement_config_values():
    assert load_config().data.augment.placement == "auto"
    assert load_config(overrides=["data.augment.placement=model"]).data.augment.placement == "model"
    with pytest.raises(ConfigError, match=r"data\.augment\.placement: 'gpu' is not one of auto, pipeline, model"):
        load_config(overrides=["data.augment.placement=gpu"])


# ---------------------------------------------------------------------------------------------------------------
# Pipeline and wrapper


def _epoch(ds: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in ds])


def test_placement_model_leaves_train_batches_unaugmented():
    cfg = load_config(overrides=["data.batch_size=8", "data.augment.rotation=0.1", "data.augment.contrast=0.2"])
    source = _source()
    in_model = make_datasets(cfg.data, source, 32, seed=3, has_gpu=True)  # auto: in the step on a GPU
    unaugmented = load_config(overrides=["data.batch_size=8", "data.augment.preset=none"]).data
    plain = make_datasets(unaugmented, source, 32, seed=3)
    in_pipeline = make_datasets(cfg.data, source, 32, seed=3)  # auto: in the pipeline on a CPU
    assert in_model.augment_in_model and not in_pipeline.augment_in_model
    assert in_model.augmenter is not None  # still there for phase 1's augmented feature views
    np.testing.assert_array_equal(_epoch(in_model.train), _epoch(plain.train))
    assert not np.allclose(_epoch(in_pipeline.train), _epoch(plain.train))  # the comparison can fail
    # nothing to move into the model when nothing augments
    assert not make_datasets(unaugmented, source, 32, has_gpu=True).augment_in_model
    # under auto, an augmenter XLA cannot compile in the step (Keras' RandAugment) stays in the pipeline on a GPU
    randaugment = load_config(overrides=["data.augment.preset=randaugment"]).data
    assert make_datasets(randaugment, source, 32, has_gpu=True).augment_placement == "pipeline"


def test_wrapper_augments_in_training_only_and_shares_the_models_variables():
    model, blocks = _tiny_model()
    wrapped = AugmentingModel(model, keras.Sequential([RandomGeometry(flip=True, seed=1)]))
    x = _asymmetric_images(16, seed=1)
    np.testing.assert_array_equal(wrapped(x, training=False).numpy(), model(x, training=False).numpy())
    for set_trainable in (lambda: freeze_backbone(model), lambda: unfreeze_top_blocks(model, blocks, 2)):
        set_trainable()
        # the same variable objects in the same order: an optimizer state saved from either restores into the other
        assert [id(v) for v in wrapped.trainable_variables] == [id(v) for v in model.trainable_variables]
        assert [id(v) for v in wrapped.weights] == [id(v) for v in model.weights]

    # A dense layer on the raw pixels tells a mirrored image from the original one.
    keras.utils.set_random_seed(0)
    dense = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    wrapped = AugmentingModel(dense, keras.Sequential([RandomGeometry(flip=True, seed=1)]))
    out = wrapped(x, training=True).numpy()
    as_is, mirrored = dense(x).numpy(), dense(x[:, :, ::-1]).numpy()
    flipped = [bool(np.allclose(o, m, atol=1e-3)) for o, m in zip(out, mirrored)]
    kept = [bool(np.allclose(o, a, atol=1e-3)) for o, a in zip(out, as_is)]
    assert all(f != k for f, k in zip(flipped, kept))  # every image went through as it is or mirrored
    assert 0 < sum(flipped) < len(x)  # per image, about half of them
    np.testing.assert_array_equal(wrapped(x, training=False).numpy(), as_is)


def test_wrapper_keeps_float32_pixels_under_mixed_precision(monkeypatch):
    keras.mixed_precision.set_global_policy("mixed_float16")
    seen = []
    real = RandomGeometry.augment
    monkeypatch.setattr(RandomGeometry, "augment", lambda self, im, seed: seen.append(im) or real(self, im, seed))
    model, _ = _tiny_model()
    augmenter = device_augmenter(build_augmenter(AugmentConfig(preset="randaugment"), 0))
    assert all(layer.dtype_policy.name == "float32" for layer in augmenter.layers)  # Keras' layers too
    augmenter = device_augmenter(build_augmenter(AugmentConfig(preset="light"), 0))
    wrapped = AugmentingModel(model, augmenter)
    x = _asymmetric_images(4)
    out = wrapped(x, training=True)
    assert len(seen) == 1 and seen[0].dtype == tf.float32 and out.dtype == tf.float32
    np.testing.assert_array_equal(seen[0].numpy(), x)  # never rounded to float16 on the way
    # compiled like the plain model: loss scaling, and the same optimizer state to checkpoint and restore
    from tftransfer.training.schedule import compile_for_phase

    phase = load_config().phases.finetune
    for m in (model, wrapped):
        compile_for_phase(m, phase, 10, 3, jit_compile=False)
        m.optimizer.build(m.trainable_variables)
    assert isinstance(wrapped.optimizer, keras.optimizers.LossScaleOptimizer)
    assert [v.shape for v in wrapped.optimizer.variables] == [v.shape for v in model.optimizer.variables]


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_fit_with_placement_model_trains_and_exports(tmp_path, fitted_models):
    """End to end on the CPU: phase 1 on cached (clean + augmented) features, phase 2 augmenting in its step."""
    data = make_colour_folder(tmp_path / "colours")
    cfg = load_config(overrides=[
        f"data.path={data}", "model.backbone=tiny", "model.weights=none", "data.image_size=32", "data.batch_size=8",
        "data.augment.placement=model", "data.augment.rotation=0.05", "phases.head.epochs=1",
        "phases.head.feature_cache_views=2", "phases.finetune.epochs=1", "phases.finetune.unfreeze_blocks=1",
        "phases.finetune.warmup_epochs=0", f"runs_dir={tmp_path / 'runs'}", f"export.dir={tmp_path / 'saved'}",
        f"runtime.cache_dir={tmp_path / 'cache'}", "name=device",
        "phases.finetune.activation_cache=off"])  # phase 2 on images: what this test checks
    from tftransfer.jobs.fit import run_fit

    result = run_fit(cfg)
    assert [type(m).__name__ for m in fitted_models][-1] == "AugmentingModel"
    assert not isinstance(fitted_models[0], AugmentingModel)  # phase 1 trains on cached features
    assert result.metrics["run"]["runtime"]["augment_placement"] == "model"
    assert json.loads((result.run_dir / "runtime.json").read_text())["augment_placement"] == "model"
    assert [p["epochs_run"] for p in result.metrics["phases"]] == [1, 1]
    export = result.metrics["export"]
    assert export["parity_ok"] and export["parity_max_abs_diff"] <= 1e-4, export
    # the run's model is the plain classifier: nothing random left in it for inference
    assert not isinstance(result.model, AugmentingModel)
    assert not any(isinstance(layer, RandomGeometry) for layer in result.model._flatten_layers())


def test_placement_model_compiles_with_xla(caplog, fitted_models, warp_calls):
    """runtime.jit=on on the CPU: the image phases XLA-compile with the warp and colour kernels inside the step."""
    cfg = load_config(overrides=[
        "data.batch_size=16", "data.augment.preset=custom", "data.augment.flip=true", "data.augment.rotation=0.1",
        "data.augment.zoom=0.1", "data.augment.contrast=0.2", "data.augment.placement=model", "phases.head.epochs=1",
        "phases.head.feature_cache=false", "phases.finetune.epochs=1", "phases.finetune.unfreeze_blocks=1",
        "phases.finetune.activation_cache=off"])  # phase 2 on images: what this test checks
    data = make_datasets(cfg.data, _source(), 32, seed=0)
    model, blocks = _tiny_model()
    with caplog.at_level(logging.WARNING):
        result = fit_phases(model, cfg, data, blocks, jit_compile=True)
    assert result.jit_compile is True and len(result.history) == 2
    assert [type(m).__name__ for m in fitted_models] == ["AugmentingModel", "AugmentingModel"]
    assert all(m.jit_compile for m in fitted_models)
    assert warp_calls and not any(warp_calls)  # only ever traced, inside the compiled steps
    assert not [r for r in caplog.records if "XLA" in r.getMessage()], caplog.text


def test_keras_refusing_xla_is_logged_not_hidden(caplog, fitted_models):
    """RandAugment's geometric layers are not XLA-compilable: the phase runs without XLA and says so."""
    cfg = load_config(overrides=["data.batch_size=16", "data.augment.preset=randaugment",
                                 "data.augment.placement=model", "phases.head.epochs=1",
                                 "phases.head.feature_cache=false", "phases.finetune.epochs=0"])
    data = make_datasets(cfg.data, _source(), 32, seed=0)
    model, blocks = _tiny_model()
    with caplog.at_level(logging.WARNING):
        result = fit_phases(model, cfg, data, blocks, jit_compile=True)
    assert result.jit_compile is False and len(result.history) == 1
    assert isinstance(fitted_models[0], AugmentingModel)
    assert "phase head runs without XLA" in caplog.text and "RandomRotation" in caplog.text
    assert "data.augment.placement=pipeline" in caplog.text


def test_adaptive_trainer_augments_source_and_target_in_its_step(tmp_path, monkeypatch, fitted_models, warp_calls):
    from tftransfer.jobs.fit import run_fit
    from tftransfer.training import phases as phases_module
    from tftransfer.training.adaptation.target import target_stream
    from tftransfer.training.adaptation.trainer import AdaptiveTrainer

    source = make_colour_folder(tmp_path / "source", per_class=10)
    for index, (name, colour) in enumerate(COLOURS.items()):
        write_solid_images(tmp_path / "target" / name, tuple(int(c * 0.25 + 100) for c in colour), 6,
                           seed=50 + index)
    streams = []
    real_stream = target_stream

    def spy_stream(*args, **kwargs):
        streams.append(kwargs.get("augmenter"))
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(phases_module, "target_stream", spy_stream)
    cfg = load_config(overrides=[
        f"data.path={source}", f"adapt.target={tmp_path / 'target'}", "adapt.method=coral", "model.backbone=tiny",
        "model.weights=none", "data.image_size=32", "data.batch_size=8", "model.bottleneck=8",
        "data.augment.placement=model", "data.augment.rotation=0.05", "phases.head.epochs=1",
        "phases.head.feature_cache=false", "phases.finetune.epochs=0", f"runs_dir={tmp_path / 'runs'}",
        "export.enabled=false", f"runtime.cache_dir={tmp_path / 'cache'}", "name=coral"])
    result = run_fit(cfg)
    assert streams == [None]  # the target stream is un-augmented: the step augments it
    trainer = fitted_models[0]
    assert isinstance(trainer, AdaptiveTrainer) and trainer.augmenter is not None
    assert warp_calls and not any(warp_calls)  # traced into the trainer's step
    history = json.loads((result.run_dir / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["coral_loss"])
    assert result.metrics["run"]["runtime"]["augment_placement"] == "model"


def test_resume_restores_the_optimizer_into_the_augmenting_model(tmp_path, monkeypatch):
    """A run stopped after epoch 1 of phase 2 resumes with the optimizer state it saved, in the same order."""
    from tftransfer.runs.layout import create_run_dir
    from tftransfer.training import checkpoint as ckpt
    cfg = load_config(overrides=["data.batch_size=16", "data.augment.placement=model", "data.augment.rotation=0.05",
                                 "phases.head.epochs=0", "phases.finetune.epochs=2",
                                 "phases.finetune.unfreeze_blocks=1", "phases.finetune.restore_best=false",
                                 "phases.finetune.activation_cache=off"])  # the augmenting model on images
    data = make_datasets(cfg.data, _source(), 32, seed=0)
    run = create_run_dir(tmp_path / "runs", "r")
    model, blocks = _tiny_model()
    fitted = stop_first_fit_after_one_epoch(monkeypatch)
    fit_phases(model, cfg, data, blocks, run=run)
    stopped = run.checkpoints / "epoch-0001"  # the per-epoch checkpoint, before the phase's end
    saved = ckpt.read_checkpoint(stopped)
    assert saved.state.phase == "finetune" and not saved.state.phase_done

    restored = []
    real_restore = ckpt.Checkpoint.restore_optimizer

    def spy_restore(self, optimizer, variables):
        ok = real_restore(self, optimizer, variables)
        restored.append((ok, [v.numpy().copy() for v in optimizer.variables], list(variables)))
        return ok

    monkeypatch.setattr(ckpt.Checkpoint, "restore_optimizer", spy_restore)
    resumed, blocks = _tiny_model()
    saved.restore_model(resumed)
    result = fit_phases(resumed, cfg, data, blocks, resume=saved)
    wrapped = fitted[1]
    assert isinstance(wrapped, AugmentingModel)
    ok, values, variables = restored[0]
    assert ok and [id(v) for v in variables] == [id(v) for v in resumed.trainable_variables]
    for value, expected in zip(values, ckpt._arrays_list(stopped / "optimizer.npz"), strict=True):
        np.testing.assert_array_equal(value, expected)
    assert int(wrapped.optimizer.iterations.numpy()) == 2 * data.steps_per_epoch  # continued, not restarted
    assert [row["epoch"] for row in result.history] == [1, 2]


# A fit process over 2 logical CPUs, over a minute under load: the slow suite.
@pytest.mark.slow
def test_placement_model_under_mirrored_with_an_adaptive_trainer(tmp_path):
    """2 logical CPU replicas (set before TensorFlow starts: a new process), DANN, augmentation in the step."""
    import os
    import subprocess
    import sys

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "tftransfer", "fit", "--config", str(smoke), "--name", "dann",
               "--set", f"runs_dir={runs}", "--set", f"runtime.cache_dir={tmp_path / 'cache'}",
               "--set", "phases.head.epochs=1", "--set", "phases.finetune.epochs=1", "--set", "export.enabled=false",
               "--set", "runtime.strategy=mirrored", "--set", "runtime.cpu_replicas=2", "--target", "builtin:digits",
               "--adapt", "dann", "--set", "adapt.max_target_images=100", "--set", "model.bottleneck=16",
               "--set", "data.augment.placement=model", "--set", "data.augment.rotation=0.05"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "augmented in the training step" in proc.stderr
    metrics = json.loads((runs / "dann" / "metrics.json").read_text())
    assert metrics["run"]["runtime"]["replicas"] == 2
    assert metrics["run"]["runtime"]["augment_placement"] == "model"
    assert [p["epochs_run"] for p in metrics["phases"]] == [1, 1]
