"""Two-phase training pieces: schedules, freezing, BatchNorm kept in inference mode, runtime choices."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tftransfer.config.experiment import ModelConfig, load_config
from tftransfer.data.pipeline import make_datasets
from tftransfer.data.sources import load_arrays
from tftransfer.model import backbones
from tftransfer.model.classifier import build_model, get_backbone
from tftransfer.model.freezing import freeze_backbone, unfreeze_top_blocks
from tftransfer.runtime import resolve_jit, resolve_precision
from tftransfer.training.phases import fit_phases
from tftransfer.training.schedule import PhaseSchedule, SparseCrossentropy


def _tiny_model(num_classes: int = 3):
    spec = backbones.get_backbone_spec("tiny")
    model = build_model(ModelConfig(backbone="tiny", weights="none", dropout=0.0), spec, num_classes, 32)
    return model, backbones.blocks_for(spec, get_backbone(model))


def test_schedule_warmup_then_cosine_to_zero():
    s = PhaseSchedule(peak=1.0, total_steps=110, warmup_steps=10, kind="cosine")
    values = np.array([float(s(i)) for i in range(111)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, atol=1e-6)  # linear warmup
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5, abs=1e-6)  # half way through the cosine
    assert values[110] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(values[10:]) <= 1e-7)


def test_schedule_step_and_constant():
    step = PhaseSchedule(peak=1.0, total_steps=100, kind="step", decay_rate=0.1, decay_steps=30)
    assert [float(step(i)) for i in (0, 29, 30, 60)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    const = PhaseSchedule(peak=0.3, total_steps=100)
    assert float(const(0)) == pytest.approx(0.3) and float(const(99)) == pytest.approx(0.3)
    assert PhaseSchedule.from_config(step.get_config()).get_config() == step.get_config()


def test_label_smoothing_loss_matches_keras():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], dtype="float32")
    labels = np.array([0, 2])
    ours = SparseCrossentropy(3, label_smoothing=0.1)(labels, logits)
    ref = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        keras.ops.one_hot(labels, 3), logits)
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)


def test_freezing_whole_blocks_and_batchnorm_stays_frozen():
    model, blocks = _tiny_model()
    report = freeze_backbone(model)
    head_params = 3 * 32 + 3  # tiny backbone ends with 32 channels
    assert report.trainable_params == head_params
    report = unfreeze_top_blocks(model, blocks, 1)
    assert report.unfrozen_blocks == [blocks[-1].name]
    backbone = get_backbone(model)
    top = set(blocks[-1].layer_names)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable
        elif layer.weights:
            assert layer.trainable == (layer.name in top), layer.name
    assert report.trainable_params > head_params
    assert unfreeze_top_blocks(model, blocks, 0).trainable_params == head_params
    with pytest.raises(ValueError):
        unfreeze_top_blocks(model, blocks, -1)


def test_fit_phases_keeps_batchnorm_statistics_and_frozen_weights():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (48, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(48) % 3
    images[labels == 0, :, :, 0] = 255  # something learnable
    source = load_arrays(images, labels, ["a", "b", "c"], "synthetic", val_split=0.25)
    cfg = load_config(overrides=["phases.head.epochs=2", "phases.finetune.epochs=2",
                                 "phases.finetune.unfreeze_blocks=1", "phases.finetune.learning_rate=0.01",
                                 "data.batch_size=16"])
    data = make_datasets(cfg.data, source, image_size=32, seed=0)
    model, blocks = _tiny_model()
    backbone = get_backbone(model)
    before = {w.path: w.numpy().copy() for w in backbone.weights}
    result = fit_phases(model, cfg, data, blocks)
    assert [p.name for p in result.phases] == ["head", "finetune"]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert [r["phase"] for r in result.history] == ["head", "head", "finetune", "finetune"]
    top = set(blocks[-1].layer_names)
    changed = {w.path for w in backbone.weights if not np.array_equal(w.numpy(), before[w.path])}
    for layer in backbone.layers:
        for w in layer.weights:
            should_change = layer.name in top and not isinstance(layer, keras.layers.BatchNormalization)
            assert (w.path in changed) == should_change, w.path  # moving statistics included


def test_runtime_choices():
    assert resolve_precision("auto", None) == "float32"
    assert resolve_precision("auto", (8, 0)) == "mixed_float16"
    assert resolve_precision("auto", (6, 1)) == "float32"
    assert resolve_precision("mixed_bfloat16", None) == "mixed_bfloat16"
    assert resolve_jit("auto", has_gpu=False) is False
    assert resolve_jit("auto", has_gpu=True) is True
    assert resolve_jit("off", has_gpu=True) is False


def _synthetic_source():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 3
    images[labels == 0, :, :, 0] = 255
    return load_arrays(images, labels, ["a", "b", "c"], "synthetic", val_split=0.25)


def _head_only_fit(tmp_path, feature_cache: bool):
    from tftransfer.runtime import configure_runtime
    from tftransfer.training.phases import FeatureCacheSpec

    cfg = load_config(overrides=["phases.head.epochs=3", "phases.finetune.unfreeze_blocks=0", "data.batch_size=8",
                                 "data.augment.flip=false", "model.dropout=0", "phases.head.restore_best=false",
                                 f"phases.head.feature_cache={str(feature_cache).lower()}"])
    configure_runtime(cfg.runtime)
    data = make_datasets(cfg.data, _synthetic_source(), image_size=32, seed=cfg.runtime.seed)
    model, blocks = _tiny_model()
    spec = FeatureCacheSpec({"test": 1}, tmp_path / "cache")
    result = fit_phases(model, cfg, data, blocks, feature_cache=spec)
    return model.get_layer("logits").get_weights(), result


def test_cached_and_uncached_head_training_agree(tmp_path):
    cached, result = _head_only_fit(tmp_path, feature_cache=True)
    plain, _ = _head_only_fit(tmp_path, feature_cache=False)
    assert len(result.history) == 3
    for a, b in zip(cached, plain):
        np.testing.assert_allclose(a, b, atol=2e-5)
    files = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    assert len(files) == 2 and files[0].startswith("train-") and files[1].startswith("val-")
    again, _ = _head_only_fit(tmp_path, feature_cache=True)  # a second run reads the cache
    for a, b in zip(cached, again):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_xla_failure_falls_back_without_xla(monkeypatch):
    import tensorflow as tf

    from tftransfer.training import phases as phases_module
    from tftransfer.training.schedule import compile_for_phase

    requested = []  # the jit_compile each (re)compile asked for
    real_compile, real_fit = compile_for_phase, keras.Model.fit

    def spy_compile(model, phase, steps, num_classes, jit_compile):
        requested.append(jit_compile)
        return real_compile(model, phase, steps, num_classes, jit_compile)

    def flaky_fit(self, *args, **kwargs):
        if requested[-1]:  # what an XLA compile failure looks like: an op error before the first epoch ends
            raise tf.errors.InvalidArgumentError(None, None, "Detected unsupported operations when trying to "
                                                             "compile graph with XLA")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(phases_module, "compile_for_phase", spy_compile)
    monkeypatch.setattr(keras.Model, "fit", flaky_fit)
    cfg = load_config(overrides=["phases.head.epochs=1", "phases.finetune.epochs=1", "data.batch_size=16",
                                 "phases.head.feature_cache=false"])
    data = make_datasets(cfg.data, _synthetic_source(), image_size=32, seed=0)
    model, blocks = _tiny_model()
    result = fit_phases(model, cfg, data, blocks, jit_compile=True)
    assert requested == [True, False, False]  # one failed XLA attempt, then both phases without XLA
    assert result.jit_compile is False and len(result.history) == 2


def test_class_weight_auto_reaches_fit(monkeypatch):
    seen = []
    real_fit = keras.Model.fit

    def spy_fit(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy_fit)
    rng = np.random.default_rng(1)
    labels = np.array([0] * 30 + [1] * 10)  # 3:1 imbalance
    source = load_arrays(rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), labels, ["a", "b"], "imb",
                         val_split=0.0)
    cfg = load_config(overrides=["phases.head.epochs=1", "phases.finetune.epochs=0", "data.class_weight=auto"])
    data = make_datasets(cfg.data, source, image_size=32, seed=0)
    model, blocks = _tiny_model(num_classes=2)
    fit_phases(model, cfg, data, blocks)
    weights = seen[0]
    assert weights[1] / weights[0] == pytest.approx(3.0)  # the rare class weighs 3x


def test_default_run_name_is_a_safe_folder_name():
    from tftransfer.jobs.fit import default_run_name

    cfg = load_config(overrides=["data.path=data/office.csv#domain=webcam", "model.backbone=resnet50"])
    assert default_run_name(cfg) == "resnet50_office.csv_domain_webcam"
    assert default_run_name(load_config(overrides=["data.path=builtin:digits"])) == "mobilenetv2_digits"


def test_runtime_deterministic_false_switches_op_determinism_back_off():
    # Process-wide: a deterministic run must not leave a later run in the same process deterministic (and, with
    # it, without XLA: Keras never compiles under op determinism).
    from tensorflow.python.framework import config as tf_config

    from tftransfer.config.experiment import RuntimeConfig
    from tftransfer.runtime import configure_runtime

    configure_runtime(RuntimeConfig(deterministic=True))
    assert tf_config.is_op_determinism_enabled()
    configure_runtime(RuntimeConfig(deterministic=False))
    assert not tf_config.is_op_determinism_enabled()


def test_cosine_schedule_follows_the_steps_that_run_on_a_file_pipeline(tmp_path):
    """Issue 14, item 11: a file pipeline's length is unknown to Keras, which counted one extra optimizer step per
    epoch (the call that finds the data exhausted), so a cosine schedule reached zero half way through."""
    from conftest import make_colour_folder

    from tftransfer.data.sources import load_image_folder

    epochs = 6
    source = load_image_folder(make_colour_folder(tmp_path / "colours", per_class=4), val_split=0.0)
    cfg = load_config(overrides=[f"phases.head.epochs={epochs}", "phases.head.schedule=cosine",
                                 "phases.head.learning_rate=0.01", "phases.head.feature_cache=false",
                                 "phases.head.restore_best=false", "phases.finetune.unfreeze_blocks=0",
                                 "data.batch_size=16", "data.augment.flip=false"])
    data = make_datasets(cfg.data, source, image_size=32, seed=0)
    assert data.steps_per_epoch == 1  # 12 files, one batch an epoch
    model, blocks = _tiny_model()
    result = fit_phases(model, cfg, data, blocks)

    assert int(model.optimizer.iterations.numpy()) == epochs
    rates = [row["learning_rate"] for row in result.history]  # the rate of the next step, after each epoch
    assert len(rates) == epochs
    assert all(rate > 0 for rate in rates[:-1]), rates
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert np.all(np.diff(rates) < 0)


def test_step_progress_reports_each_epochs_steps_without_a_per_step_hook():
    import time

    import tensorflow as tf

    from tftransfer.core.progress import report_progress_to
    from tftransfer.training.callbacks import StepProgress

    # Keras calls a callback after every step only if it defines a batch hook; this one reads the step counter.
    assert StepProgress.on_train_batch_end is keras.callbacks.Callback.on_train_batch_end
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def slow(x, y):  # ~30 ms a batch, so the watcher sees steps while an epoch runs
        tf.py_function(lambda: time.sleep(0.03), [], [])
        return x, y

    data = tf.data.Dataset.from_tensor_slices((np.zeros((12, 2), np.float32), np.zeros(12, np.int64)))
    events = []
    with report_progress_to(events.append):
        model.fit(data.batch(2).map(slow), epochs=2, verbose=0,
                  callbacks=[StepProgress("finetune", 6, first_epoch=0, epochs=2, poll_seconds=0.005)])
    epochs = {}
    for event in events:
        epochs.setdefault(event.what, []).append(event)
    assert list(epochs) == ["finetune epoch 1/2", "finetune epoch 2/2"]
    for shown in epochs.values():
        done = [e.done for e in shown]
        assert done == sorted(done) and done[0] == 0 and done[-1] == 6 and shown[-1].finished
        assert [e.finished for e in shown].count(True) == 1 and all(e.total == 6 for e in shown)
    assert any(0 < e.done < 6 for e in events)  # seen while the epoch ran, not only at its end
