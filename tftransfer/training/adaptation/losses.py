"""Pure-math building blocks for training-time domain adaptation (TensorFlow backend; NumPy for pseudo-labels).

- Gradient reversal and its lambda schedule: Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation",
  ICML 2015 (DANN; Ganin et al., JMLR 2016).
- `coral_loss`: Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV-W 2016.
- `mmd_loss`: Long et al., "Learning Transferable Features with Deep Adaptation Networks", ICML 2015 (DAN, MK-MMD).
- `prediction_entropy`: Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NIPS 2004.
- `select_pseudo_labels`: confidence-thresholded self-training, class-balanced as in Zou et al., ECCV 2018 (CBST).
- `mcc_loss`: Jin et al., "Minimum Class Confusion for Versatile Domain Adaptation", ECCV 2020.
- `cdan_input`, `entropy_weights`: Long et al., "Conditional Adversarial Domain Adaptation", NeurIPS 2018 (CDAN+E).
- `information_maximization`, `centroid_pseudo_labels`: Liang et al., "Do We Really Need to Access the Source Data?
  Source Hypothesis Transfer for Unsupervised Domain Adaptation", ICML 2020 (SHOT).

Every TensorFlow function casts its inputs to float32 (so float16 / mixed-precision features do not overflow in
covariances or squared distances), returns float32, and is safe inside `tf.function` and a Keras `train_step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

_EPS = 1e-12


def gradient_reversal(x: tf.Tensor, lam: tf.Tensor | float) -> tf.Tensor:
    """Identity forward; backward multiplies the gradient by `-lam`, so the feature extractor maximises the
    domain classifier's loss while the classifier minimises it. No gradient flows to `lam` (it is a schedule)."""
    x = tf.convert_to_tensor(x)
    lam = tf.stop_gradient(tf.convert_to_tensor(lam))

    @tf.custom_gradient
    def _reverse(inputs: tf.Tensor) -> tuple[tf.Tensor, Any]:
        def grad(upstream: tf.Tensor) -> tf.Tensor:
            return -tf.cast(lam, upstream.dtype) * upstream

        return tf.identity(inputs), grad

    return _reverse(x)


@keras.saving.register_keras_serializable(package="tftransfer")
class GradientReversal(keras.layers.Layer):
    """Layer form of `gradient_reversal`; `lam` is a call argument so a schedule can change it every step
    without retracing or touching a variable."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self._allow_non_tensor_positional_args = True  # `layer(x, 0.5)` with a Python float lam

    def call(self, x: tf.Tensor, lam: tf.Tensor | float) -> tf.Tensor:
        return gradient_reversal(x, lam)

    def compute_output_shape(self, input_shape: Any, *args: Any, **kwargs: Any) -> Any:
        return input_shape


def dann_lambda(progress: float | tf.Tensor, gamma: float = 10.0) -> float | tf.Tensor:
    """DANN's adaptation factor `2 / (1 + exp(-gamma * p)) - 1`, p = training progress clipped to [0, 1]: it ramps
    from 0 to ~1 so the noisy early domain classifier does not wreck the features.

    Returns a Python float for a Python/NumPy number, a float32 scalar tensor for a tensor.
    """
    if isinstance(progress, (int, float, np.integer, np.floating)) and not isinstance(progress, bool):
        p = min(max(float(progress), 0.0), 1.0)
        return 2.0 / (1.0 + math.exp(-float(gamma) * p)) - 1.0
    p = tf.clip_by_value(tf.cast(progress, tf.float32), 0.0, 1.0)
    return 2.0 / (1.0 + tf.exp(-tf.cast(gamma, tf.float32) * p)) - 1.0


def _as_features(name: str, value: Any) -> tf.Tensor:
    tensor = tf.cast(tf.convert_to_tensor(value), tf.float32)
    if tensor.shape.rank is not None and tensor.shape.rank != 2:
        raise ValueError(f"{name} must be a [batch, features] matrix, got shape {tensor.shape}")
    return tensor


def _check_same_width(source: tf.Tensor, target: tf.Tensor) -> None:
    d_s, d_t = source.shape[-1], target.shape[-1]
    if d_s is not None and d_t is not None and d_s != d_t:
        raise ValueError(f"source and target must have the same feature size, got {d_s} and {d_t}")


def _covariance(features: tf.Tensor) -> tf.Tensor:
    n = tf.cast(tf.shape(features)[0], tf.float32)
    centred = features - tf.reduce_mean(features, axis=0, keepdims=True)
    # Unbiased (n - 1) as in the paper; a batch of one has no spread, and max() avoids dividing by zero.
    return tf.matmul(centred, centred, transpose_a=True) / tf.maximum(n - 1.0, 1.0)


def coral_loss(source: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Deep CORAL: `||C_s - C_t||_F^2 / (4 d^2)` with unbiased covariances of `[n, d]` batches; aligning second-order
    statistics is cheap and needs no target labels. Batch sizes may differ."""
    source = _as_features("source", source)
    target = _as_features("target", target)
    _check_same_width(source, target)
    d = tf.cast(tf.shape(source)[1], tf.float32)
    diff = _covariance(source) - _covariance(target)
    return tf.reduce_sum(tf.square(diff)) / (4.0 * d * d)


def _squared_distances(z: tf.Tensor) -> tf.Tensor:
    # ||a||^2 + ||b||^2 - 2ab avoids an [N, N, d] tensor; clamp the round-off negatives. No sqrt: gradients stay
    # finite for coincident points.
    sq = tf.reduce_sum(tf.square(z), axis=1)
    dist = sq[:, None] + sq[None, :] - 2.0 * tf.matmul(z, z, transpose_b=True)
    return tf.maximum(dist, 0.0)


def mmd_loss(source: tf.Tensor, target: tf.Tensor,
             kernel_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
             bandwidth: float | tf.Tensor | None = None) -> tf.Tensor:
    """Multi-kernel Gaussian MMD² (DAN): the average of `k(a, b) = exp(-||a - b||^2 / (bandwidth * m))` over the
    multipliers m, a family of widths so no single bandwidth has to be right.

    Estimator: the biased V-statistic `mean(K_ss) + mean(K_tt) - 2 mean(K_st)`. Unlike the U-statistic it is never
    negative (a proper loss), exactly 0 for identical batches up to round-off, and defined for batches of one, and
    it handles unequal batch sizes. `bandwidth=None` uses the mean off-diagonal pairwise squared distance of the
    joint batch, under `stop_gradient` (the features must not learn to move the bandwidth).
    """
    source = _as_features("source", source)
    target = _as_features("target", target)
    _check_same_width(source, target)
    multipliers = [float(m) for m in kernel_multipliers]
    if not multipliers or any(not m > 0 for m in multipliers):
        raise ValueError(f"kernel_multipliers must be a non-empty sequence of positive numbers, got {multipliers}")

    m = tf.shape(source)[0]
    joint = tf.concat([source, target], axis=0)
    dist = _squared_distances(joint)
    if bandwidth is None:
        n = tf.cast(tf.shape(joint)[0], tf.float32)
        base = tf.reduce_sum(dist) / tf.maximum(n * n - n, 1.0)
    else:
        base = tf.cast(bandwidth, tf.float32)
    base = tf.maximum(tf.stop_gradient(base), _EPS)

    kernel = tf.add_n([tf.exp(-dist / (base * mult)) for mult in multipliers]) / float(len(multipliers))
    k_ss = tf.reduce_mean(kernel[:m, :m])
    k_tt = tf.reduce_mean(kernel[m:, m:])
    k_st = tf.reduce_mean(kernel[:m, m:])
    return k_ss + k_tt - 2.0 * k_st


def prediction_entropy(logits: tf.Tensor, from_logits: bool = True) -> tf.Tensor:
    """Mean over the batch of `-sum p log p`, the entropy-minimisation objective on unlabelled target data.
    From logits it uses `log_softmax` (stable for large logits); `from_logits=False` takes probabilities."""
    values = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    if from_logits:
        log_p = tf.nn.log_softmax(values, axis=-1)
        p = tf.exp(log_p)
    else:
        p = values
        log_p = tf.math.log(tf.clip_by_value(values, _EPS, 1.0))
    return tf.reduce_mean(-tf.reduce_sum(p * log_p, axis=-1))


def select_pseudo_labels(probs: np.ndarray, threshold: float, max_per_class: int | None = None,
                         class_balanced: bool = True, balance_factor: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Confidence-thresholded pseudo-labels for the next self-training round (NumPy, outside the graph).

    `labels` is the argmax class of every row (int64 [N], first class on ties); `mask` (bool [N]) marks the rows
    kept. A row is a candidate when its max probability >= `threshold` (compared in `probs`' own dtype). Capping,
    most confident first (stable: equal confidences keep the lower index), stops an easy class from drowning the
    rest:
    - `max_per_class` (int >= 1) caps every predicted class at that many; it wins over `class_balanced`.
    - else `class_balanced=True` caps every class at `max(1, floor(min_count * balance_factor))`, min_count the
      candidate count of the rarest class with at least one candidate.
    - else every candidate is kept.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be a [N, num_classes] matrix with num_classes >= 1, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs must be finite (no NaN or inf)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if max_per_class is not None and (isinstance(max_per_class, bool) or
                                      not isinstance(max_per_class, (int, np.integer)) or max_per_class < 1):
        raise ValueError(f"max_per_class must be None or an int >= 1, got {max_per_class!r}")
    if not (isinstance(balance_factor, (int, float, np.integer, np.floating)) and balance_factor > 0):
        raise ValueError(f"balance_factor must be a positive number, got {balance_factor!r}")

    n, num_classes = probs.shape
    labels = np.argmax(probs, axis=1).astype(np.int64) if n else np.zeros((0,), np.int64)
    confidence = probs.max(axis=1) if n else np.zeros((0,), probs.dtype)
    mask = confidence >= np.asarray(threshold, dtype=probs.dtype)

    cap: int | None = None
    if max_per_class is not None:
        cap = int(max_per_class)
    elif class_balanced and mask.any():
        counts = np.bincount(labels[mask], minlength=num_classes)
        cap = max(1, int(math.floor(counts[counts > 0].min() * float(balance_factor))))

    if cap is not None:
        for cls in np.unique(labels[mask]):
            members = np.flatnonzero(mask & (labels == cls))
            if members.size > cap:
                order = np.argsort(-confidence[members], kind="stable")
                mask[members[order[cap:]]] = False
    return labels, mask.astype(bool)


def mcc_loss(logits: tf.Tensor, temperature: float = 2.5) -> tf.Tensor:
    """Minimum Class Confusion on a target batch: the off-diagonal mass of the class-correlation matrix.

    Probabilities are temperature-scaled; each example is weighted by its certainty (1 + exp(-entropy), rescaled
    to sum to the batch size); the [C, C] confusion matrix P^T W P is row-normalised, and the loss is the mean over
    classes of its off-diagonal row mass. Zero when every example is confidently one class and classes never
    co-occur in one prediction; it needs no discriminator, so it is stable with few steps and small batches.
    """
    values = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    num_classes = tf.cast(tf.shape(values)[-1], tf.float32)
    batch = tf.cast(tf.shape(values)[0], tf.float32)
    probs = tf.nn.softmax(values / temperature, axis=-1)
    entropy = -tf.reduce_sum(probs * tf.math.log(probs + 1e-5), axis=-1)
    weight = 1.0 + tf.exp(-entropy)
    weight = tf.stop_gradient(batch * weight / tf.reduce_sum(weight))
    confusion = tf.matmul(probs * weight[:, None], probs, transpose_a=True)
    confusion = confusion / (tf.reduce_sum(confusion, axis=1, keepdims=True) + _EPS)
    return (tf.reduce_sum(confusion) - tf.linalg.trace(confusion)) / num_classes


def cdan_input(features: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """CDAN's multilinear conditioning: the flattened outer product features (x) class probabilities, [N, D*C]."""
    f = tf.cast(features, tf.float32)
    g = tf.cast(probs, tf.float32)
    return tf.reshape(g[:, :, None] * f[:, None, :], (-1, f.shape[-1] * g.shape[-1]))


def entropy_weights(probs: tf.Tensor) -> tf.Tensor:
    """CDAN+E's example weights 1 + exp(-entropy), normalised to mean 1 (no gradient): confident examples count
    more in the domain loss, so hard-to-transfer ones do not dominate the alignment."""
    p = tf.cast(probs, tf.float32)
    weight = 1.0 + tf.exp(-tf.reduce_sum(-p * tf.math.log(p + 1e-5), axis=-1))
    return tf.stop_gradient(weight / tf.reduce_mean(weight))


def information_maximization(logits: tf.Tensor) -> tf.Tensor:
    """SHOT's information maximisation: mean per-example entropy minus the entropy of the batch's mean
    prediction, so each prediction is confident while the predictions as a whole stay spread over the classes."""
    probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    per_example = tf.reduce_mean(-tf.reduce_sum(probs * tf.math.log(probs + 1e-5), axis=-1))
    mean = tf.reduce_mean(probs, axis=0)
    diversity = -tf.reduce_sum(mean * tf.math.log(mean + 1e-5))
    return per_example - diversity


def centroid_pseudo_labels(features: np.ndarray, probs: np.ndarray, refinements: int = 1) -> np.ndarray:
    """SHOT's self-supervised pseudo-labels: each target example is labeled with its nearest class centroid.

    Centroids start as the probability-weighted means of the (L2-normalised) features, so they come from the
    target domain itself and not from the source classifier's decision boundary; then `refinements` rounds of
    hard re-assignment (k-means steps). Distances are cosine. Returns int64 [N].
    """
    feats = np.asarray(features, np.float64)
    feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-8)
    weights = np.asarray(probs, np.float64)
    labels = np.argmax(weights, axis=1)
    for step in range(refinements + 1):
        centroids = weights.T @ feats / (weights.sum(axis=0)[:, None] + 1e-8)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-8
        labels = np.argmax(feats @ centroids.T, axis=1)
        if step < refinements:
            # Hard re-assignment; a class that lost every member keeps its soft centroid.
            hard = np.eye(weights.shape[1])[labels]
            empty = hard.sum(axis=0) == 0
            hard[:, empty] = weights[:, empty]
            weights = hard
    return labels.astype(np.int64)
