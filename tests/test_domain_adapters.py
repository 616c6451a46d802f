"""AdaBN against a hand computation, batch-statistics BN, TENT and its collapse guard, on a handmade tiny model."""

from __future__ import annotations

import gc
import weakref

import keras
import numpy as np
import pytest

from tftransfer.config.experiment import ModelConfig
from tftransfer.core.errors import ConfigError
from tftransfer.domain import adapters, batchnorm
from tftransfer.domain.shift import batchnorm_drift, entropy
from tftransfer.evaluation.inference import batches_of, features_and_probs, inference_fn, predict_probabilities
from tftransfer.model.backbones import get_backbone_spec
from tftransfer.model.classifier import build_model

SIZE = 8
EPS = 1e-3  # Keras BatchNormalization's default epsilon


def handmade_backbone(with_bn: bool = True) -> keras.Model:
    """pixels -> c1 -> bn1 -> relu -> c2 -> bn2 -> relu -> (+ side: cs -> bns) -> bn3, all 'valid' convs.

    bns sits on a branch parallel to bn1 (same stage), bn2 needs bn1 adapted first, bn3 needs bn2 and bns.
    """
    inputs = keras.Input((SIZE, SIZE, 3), name="input_layer")
    norm = (lambda name: keras.layers.BatchNormalization(name=name)) if with_bn else \
        (lambda name: keras.layers.Identity(name=name))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="c1")(inputs)  # 6x6
    x = keras.layers.ReLU(name="r1")(norm("bn1")(x))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="c2")(x)  # 4x4
    x = keras.layers.ReLU(name="r2")(norm("bn2")(x))
    side = norm("bns")(keras.layers.Conv2D(4, 5, use_bias=False, name="cs")(inputs))  # 4x4
    x = norm("bn3")(keras.layers.Add(name="add")([x, side]))
    return keras.Model(inputs, x, name="handmade")


def handmade_model(seed: int = 0, with_bn: bool = True) -> keras.Model:
    """A tftransfer model around the handmade backbone, with random kernels and random stored BN statistics."""
    keras.utils.set_random_seed(seed)
    model = build_model(ModelConfig(backbone="tiny", weights="none", dropout=0.0), get_backbone_spec("tiny"), 3,
                        SIZE, backbone=handmade_backbone(with_bn))
    rng = np.random.default_rng(seed)
    for layer in batchnorm.get_backbone(model).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2.0, c))
            layer.beta.assign(rng.normal(0, 0.5, c))
            layer.moving_mean.assign(rng.normal(0, 1.0, c))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, c))
    return model


def target_images(n: int = 12, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32) * rng.uniform(0.3, 1.0, (n, 1, 1, 1)).astype(
        np.float32)


def conv_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = w.shape[0]
    h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
    out = np.zeros((x.shape[0], h, wd, w.shape[3]))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + h, j:j + wd], w[i, j])
    return out


def hand_adabn(model: keras.Model, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact AdaBN statistics computed with NumPy, layer by layer, each layer fed by the adapted layers below."""
    bb = batchnorm.get_backbone(model)
    w = {name: bb.get_layer(name).get_weights()[0].astype(np.float64) for name in ("c1", "c2", "cs")}
    gb = {name: [v.astype(np.float64) for v in bb.get_layer(name).get_weights()[:2]]
          for name in ("bn1", "bn2", "bns", "bn3")}

    def stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))  # population variance, as BN stores it

    def bn(a: np.ndarray, name: str, s: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        gamma, beta = gb[name]
        return gamma * (a - s[0]) / np.sqrt(s[1] + EPS) + beta

    out = {}
    p = images.astype(np.float64) / 255.0  # the tiny spec's "unit" preprocessing
    a1 = conv_valid(p, w["c1"])
    out["bn1"] = stats(a1)
    h1 = np.maximum(bn(a1, "bn1", out["bn1"]), 0)
    a2 = conv_valid(h1, w["c2"])
    out["bn2"] = stats(a2)
    h2 = np.maximum(bn(a2, "bn2", out["bn2"]), 0)
    side = conv_valid(p, w["cs"])
    out["bns"] = stats(side)
    a3 = h2 + bn(side, "bns", out["bns"])
    out["bn3"] = stats(a3)
    return out


def bn_stats(model: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {layer.name: batchnorm.stored_moments(layer)
            for layer in batchnorm.batchnorm_layers(batchnorm.get_backbone(model))}


@pytest.mark.parametrize("budget", [512.0, 0.0])
def test_adabn_matches_the_hand_computation(budget):
    model = handmade_model()
    before = [w.copy() for w in model.get_weights()]
    images = target_images()
    # Batches of 5, 4, 3 images... (array_split of 12 into 3): the merge of batch statistics must be exact.
    adapted, info = adapters.adabn_model(model, images, batch_size=5, memory_budget_mb=budget)
    expected = hand_adabn(model, images)
    got = bn_stats(adapted)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(got[name][0], mean, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got[name][1], var, rtol=1e-4, atol=1e-5, err_msg=name)
    assert info["stages"] == 3 and info["layers"] == 4  # {bn1, bns}, {bn2}, {bn3}
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)  # the input model is untouched


def test_the_hand_computation_would_catch_a_one_pass_implementation():
    """Measuring every layer's input in one pass through the unadapted network gets bn1/bns right, not bn2/bn3."""
    model = handmade_model()
    images = target_images()
    layers = batchnorm.batchnorm_layers(batchnorm.get_backbone(model))
    one_pass = dict(zip([layer.name for layer in layers], batchnorm.input_moments(model, layers, [images])))
    expected = hand_adabn(model, images)
    np.testing.assert_allclose(one_pass["bn1"].variance, expected["bn1"][1], rtol=1e-4)
    assert not np.allclose(one_pass["bn2"].variance, expected["bn2"][1], rtol=1e-2)
    assert not np.allclose(one_pass["bn3"].mean, expected["bn3"][0], rtol=1e-2)


def test_adabn_equals_batch_statistics_over_the_whole_target_at_once():
    model = handmade_model(seed=3)
    images = target_images(16, seed=4)
    adapted, _ = adapters.adabn_model(model, images, batch_size=4)
    stats_model, _ = adapters.build_batch_stats_model(model)
    np.testing.assert_allclose(adapted.predict_on_batch(images), stats_model.predict_on_batch(images), rtol=1e-4,
                               atol=1e-4)
    # Fixed point: measured again in the adapted network, every layer's input has its new stored statistics.
    layers = batchnorm.batchnorm_layers(batchnorm.get_backbone(adapted))
    for layer, moments in zip(layers, batchnorm.input_moments(adapted, layers, batches_of(images, 3))):
        np.testing.assert_allclose(moments.variance, batchnorm.stored_moments(layer)[1], rtol=1e-4, atol=1e-6)
    drift = batchnorm_drift(adapted, [images])
    assert max(row["target"]["kl"] for row in drift) < 1e-6


def test_adabn_aligned_is_identity_on_the_source_and_plain_adabn_when_stored_stats_are_the_source():
    model = handmade_model(seed=5)
    source, target = target_images(12, seed=6), target_images(12, seed=7) * 0.5
    aligned_self, info = adapters.adabn_model(model, source, 4, source_images=source)
    np.testing.assert_allclose(aligned_self.predict_on_batch(target), model.predict_on_batch(target), rtol=1e-4,
                               atol=1e-4)
    assert info["aligned_to_source"]
    # A model whose stored statistics are the source's own: aligning to the source is AdaBN, up to epsilon (the
    # aligned layer reproduces the source's output spread sigma_s / sqrt(sigma_s^2 + eps) exactly, AdaBN gives
    # sigma_t / sqrt(sigma_t^2 + eps)), so epsilon is made negligible here.
    for layer in batchnorm.batchnorm_layers(batchnorm.get_backbone(model)):
        layer.epsilon = 1e-9
    source_bn, _ = adapters.adabn_model(model, source, 4)
    aligned, _ = adapters.adabn_model(source_bn, target, 4, source_images=source)
    plain, _ = adapters.adabn_model(source_bn, target, 4)
    for name, (mean, var) in bn_stats(plain).items():
        np.testing.assert_allclose(bn_stats(aligned)[name][0], mean, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(bn_stats(aligned)[name][1], var, rtol=1e-3, atol=1e-6)


def test_batchnorm_levels_group_parallel_layers():
    model = handmade_model()
    bb = batchnorm.get_backbone(model)
    levels = adapters.batchnorm_levels(bb, batchnorm.batchnorm_layers(bb))
    assert [[layer.name for layer in group] for group in levels] == [["bn1", "bns"], ["bn2"], ["bn3"]]


def test_batch_stats_layer_uses_batch_statistics_and_leaves_stored_ones():
    layer = adapters.BatchStatsNormalization(epsilon=EPS)
    x = np.random.default_rng(0).normal(3.0, 2.0, (6, 5, 5, 4)).astype(np.float32)
    layer.build(x.shape)
    layer.gamma.assign(np.array([1.0, 2.0, 0.5, 1.5], np.float32))
    layer.beta.assign(np.array([0.0, 1.0, -1.0, 0.5], np.float32))
    out = np.asarray(layer(x, training=False))
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    expected = layer.gamma.numpy() * (x - mean) / np.sqrt(var + EPS) + layer.beta.numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(4))


def test_bn_batch_predicts_per_batch_in_a_seeded_order():
    model = handmade_model()
    images = target_images(20, seed=2)
    one = adapters.adapt("bn-batch", model, images, batch_size=5, seed=1)
    again = adapters.adapt("bn-batch", model, images, batch_size=5, seed=1)
    np.testing.assert_array_equal(one.probs, again.probs)
    # Batch statistics: an image's prediction depends on its batch mates, hence on the order's seed.
    other = adapters.adapt("bn-batch", model, images, batch_size=5, seed=2)
    assert not np.allclose(one.probs, other.probs)
    # One batch holding everything is AdaBN.
    adabn = adapters.adapt("adabn", model, images, batch_size=20)
    whole = adapters.adapt("bn-batch", model, images, batch_size=20)
    np.testing.assert_allclose(whole.probs, adabn.probs, atol=1e-5)


def test_reused_working_copies_start_from_the_model_every_time():
    # adapt() reuses one working copy per model (so the domain report traces each once); no call may see
    # what an earlier one did, and a change to the model itself must reach the copies.
    model = handmade_model(seed=2)
    a, b = target_images(12, seed=4), target_images(12, seed=5) * 0.3
    online = dict(batch_size=6, seed=0, min_diversity_ratio=0.0, min_entropy_ratio=0.0)
    first = {m: adapters.adapt(m, model, a, batch_size=6, seed=0).probs for m in ("adabn", "bn-batch")}
    first["tent"] = adapters.adapt("tent", model, a, learning_rate=0.05, **online).probs
    for method in ("adabn", "bn-batch"):
        adapters.adapt(method, model, b, batch_size=6, seed=0)
    adapters.adapt("tent", model, b, learning_rate=5.0, **online)
    for method in ("adabn", "bn-batch"):
        np.testing.assert_allclose(adapters.adapt(method, model, a, batch_size=6, seed=0).probs, first[method],
                                   atol=1e-6)
    np.testing.assert_allclose(adapters.adapt("tent", model, a, learning_rate=0.05, **online).probs, first["tent"],
                               atol=1e-6)
    backbone = batchnorm.get_backbone(model)
    backbone.get_layer("c1").kernel.assign(backbone.get_layer("c1").kernel * -1.5)
    fresh = adapters.copy_model(model)  # another model: new working copies
    for method in ("adabn", "bn-batch"):
        changed = adapters.adapt(method, model, a, batch_size=6, seed=0).probs
        assert not np.allclose(changed, first[method], atol=1e-4)
        np.testing.assert_allclose(changed, adapters.adapt(method, fresh, a, batch_size=6, seed=0).probs, atol=1e-6)
    np.testing.assert_allclose(adapters.adapt("tent", model, a, learning_rate=0.05, **online).probs,
                               adapters.adapt("tent", fresh, a, learning_rate=0.05, **online).probs, atol=1e-6)


def test_episodic_tent_predicts_like_bn_batch_and_online_tent_learns():
    model = handmade_model(seed=1)
    before = [w.copy() for w in model.get_weights()]
    images = target_images(24, seed=3)
    bn = adapters.adapt("bn-batch", model, images, batch_size=6, seed=0)
    # Reset before each batch and predict before its update: exactly the batch-statistics predictions.
    episodic = adapters.adapt("tent", model, images, batch_size=6, seed=0, episodic=True, learning_rate=0.05)
    np.testing.assert_allclose(episodic.probs, bn.probs, atol=1e-5)
    online = adapters.adapt("tent", model, images, batch_size=6, seed=0, learning_rate=0.05,
                            min_diversity_ratio=0.0, min_entropy_ratio=0.0)
    assert not np.allclose(online.probs, bn.probs, atol=1e-3)
    # Entropy minimisation: the later batches' predictions are more confident than without the updates.
    assert entropy(online.probs).mean() < entropy(bn.probs).mean()
    assert online.info["parameters"] == 2 * 4 * 4  # gamma and beta of 4 BN layers with 4 channels each
    assert not online.info["collapsed"]
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)  # TENT trains a copy of the BatchNorm parameters


def test_tent_collapse_guard_stops_and_falls_back():
    model = handmade_model(seed=2)
    images = target_images(40, seed=5)
    reference = predict_probabilities(model, images, 8)
    # A rate this bold drives every prediction to one class within a few batches.
    result = adapters.adapt("tent", model, images, batch_size=8, seed=0, learning_rate=5.0, steps=5,
                            reference_probs=reference)
    assert result.info["collapsed"], result.info
    assert "entropy collapsed" in result.info["collapse_reason"]
    np.testing.assert_allclose(result.probs, reference)
    assert result.info["fallback"].startswith("source-only")
    # With the entropy test off, the predicted class distribution is seen to degenerate a batch later.
    diversity = adapters.adapt("tent", model, images, batch_size=8, seed=0, learning_rate=5.0, steps=5,
                               reference_probs=reference, min_entropy_ratio=0.0)
    assert diversity.info["collapsed"] and "distribution degenerated" in diversity.info["collapse_reason"]
    # Without a reference the fallback is the unadapted batch-statistics model.
    no_ref = adapters.adapt("tent", model, images, batch_size=8, seed=0, learning_rate=5.0, steps=5)
    assert no_ref.info["collapsed"]
    bn = adapters.adapt("bn-batch", model, images, batch_size=8, seed=0)
    np.testing.assert_allclose(no_ref.probs, bn.probs, atol=1e-5)
    # A gentle rate on the same data does not trip the guard.
    gentle = adapters.adapt("tent", model, images, batch_size=8, seed=0, learning_rate=1e-3,
                            reference_probs=reference)
    assert not gentle.info["collapsed"]


def test_methods_need_batchnorm_and_known_names():
    model = handmade_model(with_bn=False)
    images = target_images()
    for method in ("adabn", "bn-batch", "tent"):
        with pytest.raises(batchnorm.ModelStructureError, match="BatchNormalization"):
            adapters.adapt(method, model, images)
    with pytest.raises(ConfigError, match="unknown adaptation method.*'tnet'"):
        adapters.resolve_adapters("adabn,tnet")
    assert adapters.resolve_adapters("all") == adapters.list_adapters()
    assert {"adabn", "adabn-aligned", "bn-batch", "tent"} <= set(adapters.list_adapters())
    with pytest.raises(ConfigError, match="source images"):
        adapters.adapt("adabn-aligned", handmade_model(), images)


def test_per_model_caches_are_freed_with_their_model():
    # Every cached per-model value (traced inference, feature/head split, BN probes, working copies, source
    # moments) lives only as long as the model: a value holding its model strongly would keep both forever.
    model, images = handmade_model(seed=3), target_images(8, seed=6)
    inference_fn(model)(images)
    features_and_probs(model, images, 4)
    online = dict(batch_size=4, seed=0, min_diversity_ratio=0.0, min_entropy_ratio=0.0)
    for method in adapters.list_adapters():
        extra = online if method.startswith("tent") else dict(batch_size=4, seed=0)
        if method == "adabn-aligned":
            extra["source_images"] = images
        adapters.adapt(method, model, images, **extra)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_source_moments_are_measured_once_per_images_and_weights(monkeypatch):
    model, source = handmade_model(seed=4), target_images(8, seed=7)
    calls = []
    measure = batchnorm.input_moments
    monkeypatch.setattr(batchnorm, "input_moments", lambda *a, **k: calls.append(1) or measure(*a, **k))
    first = adapters.source_input_moments(model, source, 4)
    again = adapters.source_input_moments(model, source, 4)
    assert len(calls) == 1 and again.keys() == first.keys()
    adapters.source_input_moments(model, source[:6], 4)  # other images: measured
    backbone = batchnorm.get_backbone(model)
    backbone.get_layer("c1").kernel.assign(backbone.get_layer("c1").kernel * 2.0)  # other weights: measured
    changed = adapters.source_input_moments(model, source, 4)
    assert len(calls) == 3
    assert not np.allclose(changed["bn1"].mean, first["bn1"].mean)
