"""Phase 2 on cached trunk activations: the cut, shared weights, the cache key and hit, auto/on/off, end to end."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import stop_first_fit_after_one_epoch

from tftransfer.cli import main
from tftransfer.config.experiment import ModelConfig, load_config
from tftransfer.core.errors import ConfigError
from tftransfer.data.pipeline import make_datasets
from tftransfer.data.sources import load_arrays
from tftransfer.model import backbones
from tftransfer.model.activations import ModelCut, find_cut_tensor, split_at_trainable
from tftransfer.model.classifier import build_model, get_backbone
from tftransfer.model.freezing import top_blocks, unfreeze_top_blocks
from tftransfer.runs.layout import create_run_dir
from tftransfer.training import activation_cache
from tftransfer.training.activation_cache import ActivationSet, activation_datasets
from tftransfer.training.checkpoint import read_checkpoint
from tftransfer.training.phases import FeatureCacheSpec, fit_phases

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def _tiny_model(num_classes: int = 3):
    spec = backbones.get_backbone_spec("tiny")
    model = build_model(ModelConfig(backbone="tiny", weights="none", dropout=0.0), spec, num_classes, 32)
    return model, backbones.blocks_for(spec, get_backbone(model))


def _unfrozen(blocks, n):
    return [name for block in top_blocks(blocks, n) for name in block.layer_names]


def _source(n: int = 48):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 3
    images[labels == 0, :, :, 0] = 255  # something learnable
    images[labels == 1, :, :, 1] = 255
    return load_arrays(images, labels, ["a", "b", "c"], "synthetic", val_split=0.25)


def _cfg(*overrides: str):
    return load_config(overrides=["phases.head.epochs=1", "phases.finetune.epochs=3",
                                  "phases.finetune.unfreeze_blocks=2", "phases.finetune.learning_rate=0.01",
                                  "phases.finetune.warmup_epochs=0", "data.batch_size=16",
                                  "phases.finetune.activation_cache_views=2", *overrides])


def _fit(cfg, cache_dir: Path | None = None):
    keras.utils.set_random_seed(cfg.runtime.seed)  # the same random weights: the trunk's digest is in the key
    data = make_datasets(cfg.data, _source(), image_size=32, seed=cfg.runtime.seed)
    model, blocks = _tiny_model()
    spec = FeatureCacheSpec({"test": 1}, cache_dir) if cache_dir is not None else None
    return model, blocks, data, fit_phases(model, cfg, data, blocks, feature_cache=spec)


def test_cut_is_the_input_of_the_first_unfrozen_block_and_trunk_then_top_is_the_model():
    model, blocks = _tiny_model()
    unfreeze_top_blocks(model, blocks, 2)
    result = split_at_trainable(model, _unfrozen(blocks, 2))
    assert result.cut is not None, result.reason
    assert result.cut.cut == "block1_add" and result.cut.shape == (16, 16, 8)
    x = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    full = model(x, training=False).numpy()
    np.testing.assert_allclose(result.cut.top(result.cut.trunk(x)).numpy(), full, atol=1e-5)
    # the top trains exactly the full model's trainable variables, in the same order (optimizer state, resume)
    assert [id(v) for v in result.cut.top.trainable_variables] == [id(v) for v in model.trainable_variables]
    assert not result.cut.trunk.trainable_variables or all(not v.trainable for v in result.cut.trunk.weights)


def test_no_cut_when_everything_trains_or_a_connection_skips_the_cut():
    model, blocks = _tiny_model()
    assert "nothing frozen" in split_at_trainable(model, _unfrozen(blocks, len(blocks))).reason
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 1, name="a")(inputs)
    b = keras.layers.Conv2D(4, 1, name="b")(a)
    c = keras.layers.Conv2D(4, 1, name="c")(b)
    out = keras.layers.Add(name="d")([a, c])  # reads `a`, which is below the first unfrozen layer `c`
    skip = keras.Model(inputs, out)
    tensor, reason = find_cut_tensor(skip, ["c", "d"])
    assert tensor is None and "2 tensors" in reason
    tensor, reason = find_cut_tensor(skip, ["b", "c", "d"])
    assert tensor is not None and reason == ""


def test_training_on_the_cache_trains_the_real_top_blocks_and_leaves_frozen_ones(tmp_path):
    cfg = _cfg()
    data = make_datasets(cfg.data, _source(), image_size=32, seed=cfg.runtime.seed)
    model, blocks = _tiny_model()
    backbone = get_backbone(model)
    before = {w.path: w.numpy().copy() for w in backbone.weights}
    result = fit_phases(model, cfg, data, blocks, feature_cache=FeatureCacheSpec({"test": 1}, tmp_path))
    finetune = result.phases[-1]
    assert finetune.activation_cache["used"] and finetune.activation_cache["cut"] == "block1_add"
    top = set(_unfrozen(blocks, 2))
    changed = {w.path for w in backbone.weights if not np.array_equal(w.numpy(), before[w.path])}
    for layer in backbone.layers:
        for w in layer.weights:
            should_change = layer.name in top and not isinstance(layer, keras.layers.BatchNormalization)
            assert (w.path in changed) == should_change, w.path  # moving statistics included
    assert [r["phase"] for r in result.history] == ["head", "finetune", "finetune", "finetune"]


def test_second_run_reads_the_cache_and_never_runs_the_trunk(tmp_path, monkeypatch):
    *_, first = _fit(_cfg(), tmp_path)
    assert first.phases[-1].activation_cache["from_cache"] is False
    assert list((tmp_path / "activations").glob("*.npz"))

    def no_trunk(*args, **kwargs):
        raise AssertionError("the trunk ran although the activations were cached")

    monkeypatch.setattr(activation_cache, "extract_features", no_trunk)
    *_, second = _fit(_cfg(), tmp_path)
    assert second.phases[-1].activation_cache["from_cache"] is True
    # another view count is another key: computed, not read
    monkeypatch.undo()
    *_, third = _fit(_cfg("phases.finetune.activation_cache_views=3"), tmp_path)
    assert third.phases[-1].activation_cache["from_cache"] is False


@pytest.mark.parametrize("overrides, reason", [
    (("prune.target_sparsity=0.5",), "prune.target_sparsity"),
    (("phases.finetune.activation_cache_max_mb=0.001",), "activation_cache_max_mb"),
    (("phases.finetune.unfreeze_blocks=1000",), "nothing frozen"),
    (("data.balanced_sampling=true",), "data.balanced_sampling"),
])
def test_auto_falls_back_to_images_with_the_reason_logged(caplog, overrides, reason):
    with caplog.at_level(logging.INFO, logger="tftransfer"):
        *_, result = _fit(_cfg("phases.finetune.epochs=1", *overrides))
    decision = result.phases[-1].activation_cache
    assert decision["used"] is False and reason in decision["reason"]
    assert any("not cached activations" in r.message and reason in r.message for r in caplog.records)


def test_on_where_it_cannot_apply_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        _fit(_cfg("phases.finetune.activation_cache=on", "prune.target_sparsity=0.5"))
    message = str(info.value)
    assert "phases.finetune.activation_cache=on" in message and "prune" in message and "\n" not in message


def test_off_trains_on_images():
    *_, result = _fit(_cfg("phases.finetune.activation_cache=off", "phases.finetune.epochs=1"))
    assert result.phases[-1].activation_cache == {"used": False, "reason": "phases.finetune.activation_cache is off"}


def test_validation_on_cached_activations_equals_the_full_model():
    cfg = _cfg()
    data = make_datasets(cfg.data, _source(), image_size=32, seed=0)
    model, blocks = _tiny_model()
    unfreeze_top_blocks(model, blocks, 2)
    cut = split_at_trainable(model, _unfrozen(blocks, 2)).cut
    val_x = np.concatenate([x.numpy() for x, _ in data.val])
    val_y = np.concatenate([y.numpy() for _, y in data.val])
    acts = cut.trunk.predict(val_x, verbose=0)
    found = ActivationSet(acts[:1].astype(np.float16), np.zeros(1, np.int64), acts, val_y, 1, False, None)
    for net in (model, cut.top):
        net.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    _, val, _, _ = activation_datasets(found, cut, 16, 16, 0, 0)
    on_images = model.evaluate(data.val, verbose=0, return_dict=True)
    on_cache = cut.top.evaluate(val, verbose=0, return_dict=True)
    assert on_images["accuracy"] == on_cache["accuracy"]
    assert on_images["loss"] == pytest.approx(on_cache["loss"], abs=1e-5)


class _Recording(keras.Model):
    """Remembers the mean input of its last training batch."""

    seen = None

    def train_step(self, data):
        self.seen.assign(tf.reduce_mean(tf.cast(data[0], tf.float32)))
        return super().train_step(data)


def test_each_epoch_of_fit_trains_on_its_view():
    n, views = 20, 3
    inputs = keras.Input((4,))
    net = _Recording(inputs, keras.layers.Dense(2)(inputs), name="recording")
    net.seen = tf.Variable(-1.0)
    net.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = np.concatenate([np.full((n, 4), v, np.float16) for v in range(views)])  # view v is all v
    found = ActivationSet(train, np.arange(n) % 2, None, None, views, False, None)
    ds, val, steps, schedule = activation_datasets(found, ModelCut(net, net, "x", (4,), "float32"), 8, 64, 0,
                                                   first_epoch=2)
    assert val is None and steps == 3
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(float(net.seen.numpy())))
    net.fit(ds, epochs=9, initial_epoch=2, callbacks=[schedule, record], verbose=0)
    assert seen == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]  # epoch e (from the phase's first) on view e % 3


def _cli_fit(tmp_path: Path, name: str, cache: str) -> dict:
    args = ["fit", "--config", SMOKE, "--name", name, "--set", f"runs_dir={tmp_path / 'runs'}",
            "--set", f"runtime.cache_dir={tmp_path / 'cache'}", "--set", "export.enabled=false",
            "--set", "phases.finetune.unfreeze_blocks=2", "--set", "phases.finetune.epochs=6",
            "--set", f"phases.finetune.activation_cache={cache}"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "runs" / name / "metrics.json").read_text())


def test_fit_end_to_end_with_and_without_the_cache(tmp_path):
    on = _cli_fit(tmp_path, "on", "on")
    off = _cli_fit(tmp_path, "off", "off")
    assert on["phases"][-1]["activation_cache"]["used"] is True
    assert off["phases"][-1]["activation_cache"]["used"] is False
    accuracy_on, accuracy_off = on["final"]["val"]["accuracy"], off["final"]["val"]["accuracy"]
    head = on["phases"][0]["val"]["accuracy"]
    assert accuracy_on > head + 0.2 and accuracy_off > head + 0.2  # phase 2 learns either way
    assert abs(accuracy_on - accuracy_off) < 0.15
    summary = (tmp_path / "runs" / "on" / "summary.md").read_text()
    assert "trained on cached activations" in summary


def test_resume_inside_phase_two_on_the_cache_continues_its_optimizer(tmp_path, monkeypatch):
    """A run stopped after epoch 1 of phase 2 on cached activations resumes with its optimizer state, reading the
    activations it cached instead of recomputing them."""
    cfg = _cfg("phases.head.epochs=0", "phases.finetune.epochs=2", "phases.finetune.restore_best=false")
    keras.utils.set_random_seed(0)
    data = make_datasets(cfg.data, _source(), image_size=32, seed=0)
    cache = FeatureCacheSpec({"test": 1}, tmp_path / "cache")
    run = create_run_dir(tmp_path / "runs", "r")
    model, blocks = _tiny_model()
    fitted = stop_first_fit_after_one_epoch(monkeypatch)
    fit_phases(model, cfg, data, blocks, run=run, feature_cache=cache)
    saved = read_checkpoint(run.checkpoints / "epoch-0001")
    assert saved.state.phase == "finetune" and not saved.state.phase_done
    resumed, blocks = _tiny_model()
    saved.restore_model(resumed)
    result = fit_phases(resumed, cfg, data, blocks, resume=saved, feature_cache=cache)
    top = fitted[1]
    assert top.name == "top" and result.phases[-1].activation_cache["from_cache"] is True
    assert int(top.optimizer.iterations.numpy()) == 2 * math.ceil(data.train_examples / 16)  # continued
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_on_with_pruning_fails_before_anything_trains(tmp_path):
    args = ["fit", "--config", SMOKE, "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "prune.target_sparsity=0.5",
            "--set", "phases.finetune.activation_cache=on", "--set", "phases.finetune.unfreeze_blocks=2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "phases.finetune.activation_cache=on cannot apply: prune.target_sparsity" in result.output
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made
