"""Domain-adaptation building blocks: gradient reversal, DANN schedule, CORAL, MMD, entropy, pseudo-labels."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.training.adaptation.losses import (
    GradientReversal,
    coral_loss,
    dann_lambda,
    gradient_reversal,
    mmd_loss,
    prediction_entropy,
    select_pseudo_labels,
)


def _features(seed: int, n: int = 32, d: int = 6, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).astype(np.float32)


# Gradient reversal ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_is_identity_forward_and_flips_gradient(lam):
    x = tf.constant(_features(0, 4, 3))
    w = tf.constant(_features(1, 4, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = gradient_reversal(x, tf.constant(lam))
        loss = tf.reduce_sum(y * w)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -lam * w.numpy(), rtol=1e-6, atol=0)


def test_gradient_reversal_in_tf_function_float16_and_no_lambda_gradient():
    x = tf.constant(_features(0, 4, 3), tf.float16)
    lam = tf.Variable(0.5)

    @tf.function
    def step(values):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(values)
            loss = tf.reduce_sum(gradient_reversal(values, lam) * tf.cast(2.0, values.dtype))
        return tape.gradient(loss, values), tape.gradient(loss, lam)

    grad_x, grad_lam = step(x)
    assert grad_x.dtype == tf.float16
    np.testing.assert_allclose(grad_x.numpy(), np.full((4, 3), -1.0, np.float16))
    assert grad_lam is None


def test_gradient_reversal_layer_and_serialization():
    layer = GradientReversal(name="grl")
    x = tf.constant(_features(2, 5, 4))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, 0.7))
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), np.full((5, 4), -0.7), rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, lam=tf.constant(2.0)))
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), np.full((5, 4), -2.0), rtol=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, GradientReversal) and restored.name == "grl"
    np.testing.assert_array_equal(restored(x, 1.0).numpy(), x.numpy())


# DANN lambda schedule ------------------------------------------------------------------------------------------


def test_dann_lambda_values_monotone_and_clipped():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1) and dann_lambda(1.0) > 0.9999
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    values = [dann_lambda(p) for p in np.linspace(0, 1, 21)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert dann_lambda(-0.5) == 0.0 and dann_lambda(3.0) == dann_lambda(1.0)
    assert dann_lambda(0.5, gamma=1.0) < dann_lambda(0.5)


def test_dann_lambda_tensor_matches_float():
    progress = tf.constant([-1.0, 0.0, 0.25, 1.0, 2.0])
    out = tf.function(dann_lambda)(progress)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [dann_lambda(float(p)) for p in progress.numpy()], rtol=1e-6, atol=1e-7)


# CORAL and MMD ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [coral_loss, mmd_loss], ids=["coral", "mmd"])
def test_domain_losses_zero_for_identical_batches(loss_fn):
    x = _features(0)
    assert abs(float(loss_fn(x, x))) < 1e-6


def test_coral_grows_with_planted_scale_shift():
    # CORAL only sees second-order statistics: a mean shift is invisible, a scale change is not.
    source = _features(0, 64)
    target = _features(1, 64)
    losses = [float(coral_loss(source, target * scale)) for scale in (1.0, 1.5, 2.5, 4.0)]
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    assert float(coral_loss(source, source + 5.0)) < 1e-6


def test_mmd_grows_with_planted_mean_shift():
    source = _features(0, 64)
    losses = [float(mmd_loss(source, _features(1, 64, shift=shift))) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    assert losses[0] < 0.1 * losses[-1]


@pytest.mark.parametrize("loss_fn", [coral_loss, mmd_loss], ids=["coral", "mmd"])
def test_domain_losses_symmetric_unequal_batches_and_in_tf_function(loss_fn):
    source, target = _features(0, 32), _features(1, 7, shift=1.0)
    eager = float(loss_fn(source, target))
    assert eager > 0
    assert float(loss_fn(target, source)) == pytest.approx(eager, rel=1e-5)
    graph = tf.function(loss_fn, reduce_retracing=True)
    spec = tf.TensorSpec([None, 6], tf.float32)
    traced = graph.get_concrete_function(spec, spec)
    assert float(traced(tf.constant(source), tf.constant(target))) == pytest.approx(eager, rel=1e-5)
    assert float(traced(tf.constant(source[:1]), tf.constant(target))) >= 0  # a batch of one does not blow up


@pytest.mark.parametrize("loss_fn", [coral_loss, mmd_loss], ids=["coral", "mmd"])
def test_domain_losses_float16_and_finite_gradients(loss_fn):
    source = tf.constant(_features(0, 16), tf.float16)
    target = tf.Variable(_features(1, 12, shift=0.5))
    duplicate = tf.Variable(_features(0, 16))  # coincident points: where a sqrt-based distance would give NaN
    with tf.GradientTape() as tape:
        loss = loss_fn(source, target) + loss_fn(source, duplicate)
    assert loss.dtype == tf.float32
    grads = tape.gradient(loss, [target, duplicate])
    for grad in grads:
        assert grad is not None and np.all(np.isfinite(grad.numpy()))
    assert np.abs(grads[0].numpy()).sum() > 0


def test_coral_matches_numpy_hand_computation():
    source = np.array([[1.0, 2.0], [3.0, 1.0], [0.0, 0.0], [2.0, 5.0]])
    target = np.array([[0.5, 1.0], [1.0, -1.0], [2.0, 2.0]])

    def cov(x):
        c = x - x.mean(axis=0)
        return c.T @ c / (len(x) - 1)

    expected = np.sum((cov(source) - cov(target)) ** 2) / (4 * 2**2)
    np.testing.assert_allclose(np.cov(source, rowvar=False), cov(source))  # the unbiased estimator
    assert float(coral_loss(source, target)) == pytest.approx(expected, rel=1e-5)


def test_mmd_matches_numpy_v_statistic_with_fixed_bandwidth():
    source, target = _features(3, 5, 3), _features(4, 4, 3, shift=0.7)

    def kernel(a, b):
        dist = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.mean([np.exp(-dist / (2.0 * m)) for m in (1.0, 4.0)], axis=0)

    expected = kernel(source, source).mean() + kernel(target, target).mean() - 2 * kernel(source, target).mean()
    got = float(mmd_loss(source, target, kernel_multipliers=(1.0, 4.0), bandwidth=2.0))
    assert got == pytest.approx(expected, rel=1e-4)


def test_losses_reject_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="same feature size"):
        coral_loss(_features(0, 4, 3), _features(0, 4, 5))
    with pytest.raises(ValueError, match="same feature size"):
        mmd_loss(_features(0, 4, 3), _features(0, 4, 5))


# Entropy -----------------------------------------------------------------------------------------------------


def test_prediction_entropy_values_and_stability():
    assert float(prediction_entropy(tf.zeros([3, 4]))) == pytest.approx(math.log(4), rel=1e-6)
    huge = tf.constant([[1e4, -1e4, 0.0], [5e3, 5e3, -5e3]])  # naive softmax would overflow to NaN
    value = float(prediction_entropy(huge))
    assert np.isfinite(value) and value == pytest.approx(math.log(2) / 2, rel=1e-5)
    half = tf.constant([[6e4, 6e4, -6e4]], tf.float16)  # near float16's max: cast to float32 first
    assert float(prediction_entropy(half)) == pytest.approx(math.log(2), rel=1e-5)
    probs = tf.constant([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert float(prediction_entropy(probs, from_logits=False)) == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_prediction_entropy_gradient_finite_in_tf_function():
    logits = tf.Variable([[3.0, -2.0, 0.5], [50.0, -50.0, 0.0]])

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            loss = prediction_entropy(logits)
        return tape.gradient(loss, logits)

    assert np.all(np.isfinite(grad().numpy()))


# Pseudo-labels -----------------------------------------------------------------------------------------------


def test_pseudo_labels_threshold_without_caps():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3]], np.float32)
    labels, mask = select_pseudo_labels(probs, 0.7, class_balanced=False)
    assert labels.dtype == np.int64 and mask.dtype == np.bool_
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(mask, [True, False, True, False, True])  # 0.7 in float32 still counts as >= 0.7
    _, none = select_pseudo_labels(probs, 1.0, class_balanced=False)
    _, every = select_pseudo_labels(probs, 0.0, class_balanced=False)
    assert not none.any() and every.all()


def test_pseudo_labels_per_class_cap_keeps_most_confident_with_stable_ties():
    probs = np.array([
        [0.80, 0.20], [0.95, 0.05], [0.90, 0.10], [0.90, 0.10],  # class 0: 0.95 first, then the tie at rows 2 and 3
        [0.10, 0.90], [0.30, 0.70],
    ])
    _, mask = select_pseudo_labels(probs, 0.5, max_per_class=2, class_balanced=True)  # explicit cap wins
    np.testing.assert_array_equal(mask, [False, True, True, False, True, True])


def test_pseudo_labels_class_balanced_cap():
    class0 = np.column_stack([np.linspace(0.99, 0.90, 10), 1 - np.linspace(0.99, 0.90, 10), np.zeros(10)])
    class1 = np.array([[0.05, 0.95, 0.0], [0.1, 0.9, 0.0]])
    unsure = np.array([[0.4, 0.3, 0.3]])  # below threshold: class 2 has no candidate and does not set the cap
    probs = np.vstack([class1[:1], class0, class1[1:], unsure])
    labels, mask = select_pseudo_labels(probs, 0.8)
    assert mask[0] and mask[11] and not mask[12]
    assert int(mask[labels == 0].sum()) == 4  # rarest non-empty class has 2, factor 2.0
    np.testing.assert_array_equal(np.flatnonzero(mask[1:11]), [0, 1, 2, 3])  # the four most confident
    _, tight = select_pseudo_labels(probs, 0.8, balance_factor=1.0)
    assert int(tight.sum()) == 4
    _, loose = select_pseudo_labels(probs, 0.8, class_balanced=False)
    assert int(loose.sum()) == 12


def test_pseudo_labels_empty_selection_and_empty_input():
    probs = np.full((4, 4), 0.25)
    labels, mask = select_pseudo_labels(probs, 0.9)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0])
    assert mask.shape == (4,) and not mask.any()
    labels, mask = select_pseudo_labels(np.zeros((0, 3)), 0.5, max_per_class=3)
    assert labels.shape == (0,) and labels.dtype == np.int64 and mask.shape == (0,) and mask.dtype == np.bool_


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": 0.5, "max_per_class": 0}, "max_per_class"),
    ({"threshold": 0.5, "balance_factor": 0.0}, "balance_factor"),
])
def test_pseudo_labels_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_pseudo_labels(np.full((2, 2), 0.5), **kwargs)


@pytest.mark.parametrize("probs", [np.full((4,), 0.5), np.zeros((2, 0)), np.full((2, 2, 2), 0.5),
                                   np.array([[0.5, np.nan]])])
def test_pseudo_labels_bad_probs(probs):
    with pytest.raises(ValueError, match="probs"):
        select_pseudo_labels(probs, 0.5)
