"""metrics: moved from tftransfer.jobs.evaluate."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from tftransfer.core.numerics import stable_softmax
from tftransfer.evaluation.inference import predict_dataset

logger = logging.getLogger(__name__)

LOG_LOSS_CLIP = 1e-12
# Loose enough for float32 softmax over thousands of classes, tight enough to catch logits passed by mistake.
_PROB_SUM_ATOL = 1e-3


def _validate(y_true: Any, probs: Any, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Checks shapes, label range and that probs look like probabilities; returns (int64 [N], float64 [N, C])."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D [num_examples, num_classes]; got shape {probs.shape}")
    n, c = probs.shape
    if c < 2:
        raise ValueError(f"probs must have at least 2 classes (columns); got {c}")
    if num_classes is not None and c != num_classes:
        raise ValueError(f"probs has {c} columns but there are {num_classes} class names")
    if n == 0:
        raise ValueError("no examples: probs has 0 rows")
    if not np.issubdtype(probs.dtype, np.number) or np.issubdtype(probs.dtype, np.complexfloating):
        raise ValueError(f"probs must be real numbers; got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    if probs.min() < 0.0 or probs.max() > 1.0 + _PROB_SUM_ATOL:
        raise ValueError("probs must lie in [0, 1]; pass softmax probabilities, not logits")
    row_sums = probs.sum(axis=1)
    if not np.allclose(row_sums, 1.0, rtol=0.0, atol=_PROB_SUM_ATOL):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(
            f"each row of probs must sum to 1 (row {worst} sums to {row_sums[worst]:.6g}); "
            "pass softmax probabilities, not logits"
        )

    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D integer labels; got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"y_true has {y.shape[0]} labels but probs has {n} rows")
    if np.issubdtype(y.dtype, np.floating):
        # Labels that went through float arrays are accepted only when they are whole numbers.
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y_true must contain integer class ids; got non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must contain integer class ids; got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= c:
        bad = y[(y < 0) | (y >= c)]
        raise ValueError(f"y_true labels must be in [0, {c - 1}]; found {sorted(set(bad.tolist()))[:10]}")
    return y, probs


def _bin_edges(bins: int) -> np.ndarray:
    # k / M rather than linspace's k * (1 / M): the edge 0.6 of 5 bins is then exactly the float 0.6, so a
    # confidence of 0.6 lands in (0.4, 0.6] as the definition says.
    return np.arange(bins + 1, dtype=np.float64) / bins


def _bin_indices(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each confidence for equal-width bins ((m-1)/M, m/M] (Guo et al. 2017); 0 goes to the first bin."""
    return np.clip(np.digitize(confidence, _bin_edges(bins)[1:-1], right=True), 0, bins - 1)


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Per-bin mean confidence, accuracy and count of the top-1 prediction, plus the ECE they give.

    Bins are equal-width over [0, 1] on the max probability. Empty bins have `None` confidence and accuracy
    (JSON has no NaN).
    """
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins!r}")
    y, p = _validate(y_true, probs)
    bins = int(bins)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_indices(conf, bins)
    counts = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    n = len(y)
    confidence: list[float | None] = []
    accuracy: list[float | None] = []
    ece = 0.0
    for k in range(bins):
        if counts[k] == 0:
            confidence.append(None)
            accuracy.append(None)
            continue
        bin_conf = conf_sum[k] / counts[k]
        bin_acc = acc_sum[k] / counts[k]
        confidence.append(float(bin_conf))
        accuracy.append(float(bin_acc))
        ece += abs(bin_acc - bin_conf) * counts[k] / n
    return {
        "bins": bins,
        "edges": _bin_edges(bins).tolist(),
        "confidence": confidence,
        "accuracy": accuracy,
        "count": [int(v) for v in counts],
        "num_examples": int(n),
        "ece": float(ece),
    }


def _top_k_accuracy(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the k highest probabilities.

    Hand-rolled because sklearn's top_k_accuracy_score rejects 2-column scores when y_true is binary. A stable
    sort on -p breaks ties towards the lower class index, as argmax does, so top-1 always equals accuracy.
    """
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == y[:, None], axis=1)))


def _per_class(names: Sequence[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
               support: np.ndarray) -> dict[str, dict[str, float | int]]:
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])} for i, name in enumerate(names)}


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    top_k: int = 5,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, top-k, log loss, ECE, per-class scores and confusion matrix.

    Everything is plain Python (floats, ints, lists, dicts) so the result goes straight into metrics.json.
    Macro-F1 averages over all classes (an absent, never-predicted class counts as F1 0, as in the per-class
    table); balanced accuracy averages recall over the classes present in y_true (sklearn's definition).
    The "reliability" entry is `reliability_curve` output, kept so the reliability plot can be redrawn later.
    """
    names = [str(name) for name in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique; got {names}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
    y, p = _validate(y_true, probs, num_classes=len(names))
    c = len(names)
    labels = list(range(c))
    y_pred = p.argmax(axis=1)

    absent = [names[i] for i in labels if not np.any(y == i)]
    if absent:
        logger.warning("classes with no examples in y_true (recall undefined, reported as 0): %s", absent)

    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    # sklearn's balanced_accuracy_score is the mean recall over classes present in y_true; computing it from
    # the recall above gives the same number without its warnings for absent classes or a single label.
    balanced = float(np.mean(recall[support > 0]))

    k = min(int(top_k), c)
    true_prob = np.clip(p[np.arange(len(y)), y], LOG_LOSS_CLIP, 1.0)
    # Computed directly: sklearn's log_loss clips at the dtype's eps (not 1e-12) and its keyword names changed
    # across versions.
    log_loss = float(-np.mean(np.log(true_prob)))
    curve = reliability_curve(y, p, bins=ece_bins)

    return {
        "num_examples": len(y),
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, y_pred, labels=labels, average="macro", zero_division=0)),
        "top_k_accuracy": {"k": k, "value": _top_k_accuracy(y, p, k)},
        "log_loss": log_loss,
        "ece": curve["ece"],
        "mean_confidence": float(np.mean(p.max(axis=1))),
        "per_class": _per_class(names, precision, recall, f1, support),
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).astype(int).tolist(),
        "class_names": names,
        "reliability": curve,
    }


def evaluate_model(
    model: keras.Model,
    dataset: tf.data.Dataset,
    class_names: Sequence[str],
    top_k: int = 5,
) -> dict[str, Any]:
    """Predicts over `dataset` and returns `classification_metrics` plus "seconds" and "images_per_second".

    The timing covers the whole prediction loop, input pipeline and first-call tracing included, so it is
    what a user waits for rather than peak model throughput.
    """
    start = time.perf_counter()
    y_true, probs = predict_dataset(model, dataset)
    seconds = time.perf_counter() - start
    metrics = classification_metrics(y_true, probs, class_names, top_k=top_k)
    metrics["seconds"] = float(seconds)
    metrics["images_per_second"] = float(len(y_true) / seconds) if seconds > 0 else 0.0
    logger.info(
        "evaluated %d images in %.1f s (%.1f images/s): accuracy %.4f, macro-F1 %.4f",
        len(y_true),
        seconds,
        metrics["images_per_second"],
        metrics["accuracy"],
        metrics["macro_f1"],
    )
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Calibration: temperature scaling (Guo et al. 2017)

TEMPERATURE_BOUNDS = (0.05, 20.0)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """log p as logits: softmax(log p / T) == softmax(z / T) because log p differs from z by a per-row constant."""
    return np.log(np.clip(np.asarray(probs, np.float64), LOG_LOSS_CLIP, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities rescaled by a temperature: softmax(logits / T), computed from the probabilities themselves."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return stable_softmax(_log_probs(probs) / float(temperature))


def _nll(y: np.ndarray, log_probs: np.ndarray, temperature: float) -> float:
    from scipy.special import logsumexp

    z = log_probs / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) on (y_true, probs).

    T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; argmax (so accuracy) never
    changes. A bounded 1-D search on log T (scipy's Brent) is all this one-parameter problem needs.
    """
    from scipy.optimize import minimize_scalar

    y, p = _validate(y_true, probs)
    log_probs = _log_probs(p)
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(lambda log_t: _nll(y, log_probs, float(np.exp(log_t))), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-5})
    temperature = float(np.exp(result.x))
    # A bounded search can stop at a worse interior point than T=1 on a flat objective; never make NLL worse.
    if _nll(y, log_probs, temperature) > _nll(y, log_probs, 1.0):
        return 1.0
    return temperature


def calibration_metrics(y_true: np.ndarray, probs: np.ndarray, temperature: float, ece_bins: int = 15
                        ) -> dict[str, Any]:
    """ECE and log loss (NLL) of `probs` before and after dividing the logits by `temperature`."""
    y, p = _validate(y_true, probs)
    after = apply_temperature(p, temperature)

    def scores(q: np.ndarray) -> dict[str, float]:
        true_prob = np.clip(q[np.arange(len(y)), y], LOG_LOSS_CLIP, 1.0)
        # + 0.0 turns the -0.0 of a perfect fit into 0.0.
        return {"ece": reliability_curve(y, q, bins=ece_bins)["ece"],
                "log_loss": float(-np.mean(np.log(true_prob))) + 0.0,
                "mean_confidence": float(np.mean(q.max(axis=1)))}

    return {"temperature": float(temperature), "before": scores(p), "after": scores(after)}


# ---------------------------------------------------------------------------------------------------------------
# Mistakes and latency


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, files: Sequence[str], class_names: Sequence[str],
                       n: int = 10) -> list[dict[str, Any]]:
    """The n wrong predictions with the highest confidence, most confident first, with their files."""
    y, p = _validate(y_true, probs, num_classes=len(class_names))
    if len(files) != len(y):
        raise ValueError(f"{len(files)} file names for {len(y)} examples")
    pred = p.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    # Stable on the example order, so equal confidences list in data order and the output is reproducible.
    wrong = wrong[np.argsort(-p[wrong, pred[wrong]], kind="stable")][: max(int(n), 0)]
    return [
        {"file": str(files[i]), "true": class_names[y[i]], "predicted": class_names[pred[i]],
         "confidence": float(p[i, pred[i]]), "true_class_probability": float(p[i, y[i]])}
        for i in wrong
    ]


def time_calls(call: Any, batches: Sequence[Any], runs: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `runs` calls cycling through `batches`, after `warmup` untimed calls (the first
    call's tracing is not what a latency figure means)."""
    for i in range(warmup):
        call(batches[i % len(batches)])
    times = []
    for i in range(runs):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        call(batch)
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def latency_summary(times_ms: Sequence[float], batch_size: int) -> dict[str, Any]:
    """p50, p95 and mean milliseconds per call and images per second, the shape every latency figure has."""
    if not len(times_ms):
        return {"batch_size": batch_size, "runs": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None,
                "images_per_second": None}
    times = np.asarray(times_ms, np.float64)
    return {"batch_size": batch_size, "runs": len(times), "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)), "mean_ms": float(np.mean(times)),
            "images_per_second": float(1000.0 * batch_size * len(times) / np.sum(times))}


def measure_latency(predict: Any, pixels: np.ndarray, runs: int = 20, batch_size: int = 1) -> dict[str, Any]:
    """Latency of `predict` on batches of `batch_size` images (see latency_summary) over `runs` calls, after a
    warm-up; the images come from the evaluated data (cycled when there are fewer than a batch)."""
    pixels = np.asarray(pixels, np.float32)
    if len(pixels) == 0 or runs < 1:
        return latency_summary([], batch_size)
    batches = [pixels[np.arange(i, i + batch_size) % len(pixels)] for i in range(0, runs * batch_size, batch_size)]
    return latency_summary(time_calls(predict, batches, runs), batch_size)
