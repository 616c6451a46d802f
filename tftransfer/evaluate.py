"""Prediction over a tf.data pipeline and JSON-ready classification metrics, calibration included."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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

import tftransfer
from tftransfer.data.sources import DataSource, Split, load_source
from tftransfer.errors import DataError, RunDirError
from tftransfer.predict import (
    Classifier,
    load_classifier,
    load_run_source,
    make_indexed_dataset,
    predict_batches,
)
from tftransfer.workdir import RunDir, write_json

logger = logging.getLogger(__name__)

LOG_LOSS_CLIP = 1e-12
# Loose enough for float32 softmax over thousands of classes, tight enough to catch logits passed by mistake.
_PROB_SUM_ATOL = 1e-3


def stable_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in float64 after subtracting the row max, returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)


def predict_dataset(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` (which returns logits) over `(pixels, int labels)` batches.

    Returns `(y_true, probs)`: int64 labels of shape [N] and float32 softmax probabilities of shape [N, C].
    """
    from tftransfer.model import build_inference_fn

    infer = build_inference_fn(model)
    labels: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for element in dataset:
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise ValueError("dataset must yield (pixels, labels) batches; got a single tensor per element")
        x, y = element[0], element[1]
        batch_logits = np.asarray(infer(x))
        batch_labels = np.asarray(y)
        if batch_labels.ndim == 2 and batch_labels.shape[1] == 1:
            batch_labels = batch_labels[:, 0]
        if batch_labels.ndim != 1:
            raise ValueError(
                f"dataset labels must be integer class ids of shape [batch]; got shape {batch_labels.shape} "
                "(one-hot labels are not supported)"
            )
        if batch_logits.ndim != 2 or batch_logits.shape[0] != batch_labels.shape[0]:
            raise ValueError(
                f"model output must be logits of shape [batch, classes] matching {batch_labels.shape[0]} labels; "
                f"got shape {batch_logits.shape}"
            )
        labels.append(batch_labels.astype(np.int64))
        logits.append(batch_logits)
    if not labels:
        raise ValueError("dataset yielded no batches; nothing to predict")
    return np.concatenate(labels), stable_softmax(np.concatenate(logits, axis=0))


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
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
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


def measure_latency(predict: Any, pixels: np.ndarray, runs: int = 20) -> dict[str, Any]:
    """Batch-1 latency of `predict` in milliseconds (p50, p95, mean) over up to `runs` images, after a warm-up.

    The warm-up call takes the first-call tracing out of the figures; the images come from the evaluated data.
    """
    pixels = np.asarray(pixels, np.float32)
    if len(pixels) == 0 or runs < 1:
        return {"batch_size": 1, "runs": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None}
    predict(pixels[:1])
    times = []
    for i in range(runs):
        one = pixels[i % len(pixels)][None]
        start = time.perf_counter()
        predict(one)
        times.append(1000.0 * (time.perf_counter() - start))
    return {"batch_size": 1, "runs": len(times), "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)), "mean_ms": float(np.mean(times))}


# ---------------------------------------------------------------------------------------------------------------
# The `tftransfer evaluate` job

EVALUATION_SCHEMA_VERSION = 1
EVALUATION_KIND = "evaluation"


@dataclass
class EvaluationResult:
    """Where an evaluation wrote its files, and its metrics.json content."""

    output_dir: Path
    metrics: dict[str, Any]


def _concat_splits(*splits: Split | None) -> Split:
    """One split holding the examples of all given ones, in order."""
    parts = [s for s in splits if s is not None and len(s) > 0]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Split(labels=np.zeros((0,), np.int64), keys=[])
    paths = [p for s in parts for p in s.paths] if all(s.paths is not None for s in parts) else None
    images = np.concatenate([s.images for s in parts]) if all(s.images is not None for s in parts) else None
    domains = [d for s in parts for d in s.domains] if all(s.domains is not None for s in parts) else None
    headers = (np.concatenate([s.headers for s in parts]) if all(s.headers is not None for s in parts)
               else None)
    return Split(labels=np.concatenate([s.labels for s in parts]), keys=[k for s in parts for k in s.keys],
                 paths=paths, images=images, domains=domains, headers=headers)


def _nonempty(split: Split | None) -> bool:
    return split is not None and len(split) > 0


def _auto_split(source: DataSource) -> tuple[Split | None, str]:
    # Loaded with no hash split, so a val or test split here is one the data itself defines.
    if _nonempty(source.test):
        return source.test, "test"
    if _nonempty(source.val):
        return source.val, "val"
    return _concat_splits(source.train, source.val, source.test), "all"


SPLIT_SELECTORS: dict[str, Callable[[DataSource], tuple[Split | None, str]]] = {
    "auto": _auto_split,
    "all": lambda s: (_concat_splits(s.train, s.val, s.test), "all"),
    "train": lambda s: (s.train, "train"),
    "val": lambda s: (s.val, "val"),
    "test": lambda s: (s.test, "test"),
}
SPLIT_CHOICES = tuple(SPLIT_SELECTORS)


def select_split(source: DataSource, split: str) -> tuple[Split, str]:
    """The examples of `split` (see SPLIT_SELECTORS) and the split's resolved name.

    "auto" is the data's own test split, else its own validation split (a val/ folder, a manifest's split
    column, a TFDS split), else every example.
    """
    if split not in SPLIT_SELECTORS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_CHOICES)}")
    examples, name = SPLIT_SELECTORS[split](source)
    if examples is None or len(examples) == 0:
        sizes = ", ".join(f"{len(v)} {k}" for k, v in source.splits().items())
        raise DataError(f"{source.root} has no {name} examples (it has {sizes}); choose another --split, or "
                        f"--val-split / --test-split to draw one")
    return examples, name


def load_evaluation_source(data: str, split: str, classifier: Classifier, val_split: float | None = None,
                           test_split: float | None = None, tfds_data_dir: str = "") -> DataSource:
    """Lists `data` for evaluation. "auto" and "all" draw no hash split; "train", "val" and "test" draw the one
    the classifier's run used (its val_split, test_split, stratify), so `--split val` on the run's data is exactly
    its validation split. Explicit fractions override.
    """
    if split in ("auto", "all"):
        return load_source(data, 0.0, False, tfds_data_dir, test_split=0.0)
    cfg = _run_data_config(classifier)
    val = val_split if val_split is not None else (cfg.val_split if cfg is not None else 0.2)
    test = test_split if test_split is not None else (cfg.test_split if cfg is not None else 0.0)
    stratify = bool(getattr(cfg, "stratify", False))
    return load_source(data, val, False, tfds_data_dir, test_split=test, stratify=stratify)


def _run_data_config(classifier: Classifier) -> Any:
    """The data section of the classifier's run config, or None without a (loadable) run."""
    from tftransfer.config import load_config
    from tftransfer.errors import ConfigError

    if classifier.run_dir is None:
        return None
    try:
        return load_config(RunDir(classifier.run_dir).config).data
    except ConfigError as exc:
        logger.warning("cannot read the data settings of %s: %s", classifier.run_dir, exc)
        return None


def align_classes(model_names: Sequence[str], data_names: Sequence[str], where: str) -> np.ndarray:
    """Maps the data's class ids to the model's (by name); DataError listing both sets when they disagree.

    A data set holding only some of the model's classes is allowed (those classes get support 0); a class the
    model does not know is an error, since no prediction could ever be right for it.
    """
    model_set, data_set = set(model_names), set(data_names)
    unknown = sorted(data_set - model_set)
    if unknown:
        raise DataError(f"the classes of {where} differ from the model's. Data classes ({len(data_set)}): "
                        f"{sorted(data_set)}; model classes ({len(model_set)}): {sorted(model_set)}; "
                        f"not known to the model: {unknown}")
    missing = sorted(model_set - data_set)
    if missing:
        logger.warning("%s has no examples of the model's classes %s", where, missing)
    index = {name: i for i, name in enumerate(model_names)}
    return np.array([index[name] for name in data_names], dtype=np.int64)


def _safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def default_evaluation_dir(classifier: Classifier, data_label: str) -> Path:
    """<run>/eval/<data>-<split> for a run; evaluations/<name>-v<version>/<data>-<split> for an export."""
    if classifier.kind == "run":
        return classifier.path / "eval" / data_label
    return Path("evaluations") / _safe_label(f"{classifier.path.parent.name}-v{classifier.path.name}") / data_label


def _predict_split(classifier: Classifier, examples: Split, labels: np.ndarray, batch_size: int, progress: bool
                   ) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(labels, probabilities, file names, seconds) of the examples TensorFlow could decode, in data order."""
    dataset = make_indexed_dataset(classifier.image_size, batch_size, paths=examples.paths, images=examples.images)
    for _, pixels in dataset.take(1):
        # Untimed warm-up on a full batch: the first call traces the model, which is not throughput.
        classifier.predict(pixels.numpy())
    indices, probs, seconds = predict_batches(classifier, dataset, len(examples), progress=progress)
    names = examples.paths if examples.paths is not None else examples.keys
    if len(indices) < len(examples):
        lost = sorted(set(range(len(examples))) - set(indices.tolist()))
        logger.warning("%d images could not be decoded by TensorFlow and were left out: %s", len(lost),
                       ", ".join(str(names[i]) for i in lost[:10]))
    return labels[indices], probs, [str(names[i]) for i in indices], seconds


def _run_validation_set(classifier: Classifier) -> tuple[Split, np.ndarray, str] | None:
    """The validation split of the classifier's run, re-listed from its data, with labels in model ids."""
    assert classifier.run_dir is not None
    source = load_run_source(classifier.run_dir)
    if source is None or source.val is None or len(source.val) == 0:
        return None
    mapping = align_classes(classifier.class_names, source.class_names, source.root)
    return source.val, mapping[source.val.labels], source.root


def _calibration(classifier: Classifier, y: np.ndarray, probs: np.ndarray, eval_root: str, eval_split: Split,
                 batch_size: int, ece_bins: int) -> dict[str, Any]:
    """Fits a temperature on the run's validation split (or, lacking one, the evaluated data) and reports both."""
    val = _run_validation_set(classifier) if classifier.run_dir is not None else None
    if val is not None and not (Path(val[2]).resolve() == Path(eval_root).resolve()
                                and sorted(val[0].keys) == sorted(eval_split.keys)):
        split, labels, root = val
        y_fit, p_fit, _, _ = _predict_split(classifier, split, labels, batch_size, progress=False)
        fitted_on, in_sample = f"validation split of run {classifier.run_dir} ({root})", False
    else:
        y_fit, p_fit = y, probs
        in_sample = True
        fitted_on = ("the evaluated data, which is the run's validation split" if val is not None
                     else "the evaluated data (no separate validation data was available)")
    temperature = fit_temperature(y_fit, p_fit)
    result = calibration_metrics(y, probs, temperature, ece_bins=ece_bins)
    result.update(fitted_on=fitted_on, fit_examples=int(len(y_fit)), in_sample=in_sample)
    logger.info("temperature %.3f (fitted on %s): ECE %.4f -> %.4f, NLL %.4f -> %.4f", temperature, fitted_on,
                result["before"]["ece"], result["after"]["ece"], result["before"]["log_loss"],
                result["after"]["log_loss"])
    return result


def run_evaluation(model: str | Path, data: str, *, split: str = "auto", output: str | Path | None = None,
                   overwrite: bool = False, val_split: float | None = None, test_split: float | None = None,
                   top_k: int = 5, mistakes: int = 10,
                   temperature: bool = True, batch_size: int = 32, image_size: int | None = None,
                   latency_runs: int = 20, ece_bins: int = 15, tfds_data_dir: str = "", progress: bool = False
                   ) -> EvaluationResult:
    """The `tftransfer evaluate` job: a run directory or SavedModel on any data source -> metrics, summary, plots.

    Writes metrics.json (schema: docs/metrics_schema.md), summary.md, confusion_matrix.png and reliability.png to
    `output` (default `default_evaluation_dir`), and for a run directory the plots as TensorBoard images under
    <run>/logs/eval/<data>-<split>.
    """
    import keras

    from tftransfer import report

    started = time.perf_counter()
    classifier = load_classifier(model, image_size=image_size, batch_size=batch_size)
    source = load_evaluation_source(data, split, classifier, val_split, test_split, tfds_data_dir)
    examples, split_name = select_split(source, split)
    mapping = align_classes(classifier.class_names, source.class_names, f"{data} ({split_name})")
    label = _safe_label(f"{source.name}-{split_name}")
    out = Path(output) if output is not None else default_evaluation_dir(classifier, label)
    if (out / "metrics.json").exists() and not overwrite:
        raise RunDirError(f"{out} already holds an evaluation; pass --overwrite to replace it or --output DIR")
    logger.info("evaluating %s (%s) on %d %s examples of %s", classifier.path, classifier.kind, len(examples),
                split_name, data)

    y, probs, files, seconds = _predict_split(classifier, examples, mapping[examples.labels], batch_size, progress)
    if len(y) == 0:
        raise DataError(f"none of the {len(examples)} examples of {data} could be decoded")
    metrics = classification_metrics(y, probs, classifier.class_names, top_k=top_k, ece_bins=ece_bins)
    sample = next(iter(make_indexed_dataset(classifier.image_size, max(latency_runs, 1),
                                            paths=examples.paths, images=examples.images)))[1].numpy()
    latency = measure_latency(classifier.predict, sample, runs=latency_runs)
    calibration = _calibration(classifier, y, probs, source.root, examples, batch_size, ece_bins) \
        if temperature else None

    result = {
        "schema_version": EVALUATION_SCHEMA_VERSION,
        "kind": EVALUATION_KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": str(classifier.path), "kind": classifier.kind, "name": classifier.name,
                  "class_names": classifier.class_names, "image_size": classifier.image_size,
                  "run_dir": str(classifier.run_dir) if classifier.run_dir else None},
        "data": {"spec": data, "name": source.name, "root": source.root, "split": split_name,
                 "split_method": source.split_method, "class_names": source.class_names,
                 "num_examples": int(len(y)), "listed_examples": len(examples),
                 "skipped_files": [{"file": f, "reason": r} for f, r in source.skipped]},
        "metrics": metrics,
        "calibration": calibration,
        "timing": {"batch_size": batch_size, "seconds": seconds,
                   "images_per_second": len(y) / seconds if seconds > 0 else None,
                   "latency": latency},
        "mistakes": confident_mistakes(y, probs, files, classifier.class_names, n=mistakes),
        "versions": {"tftransfer": tftransfer.__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_evaluation_plots(report, out, metrics)
    result["timing"]["total_seconds"] = time.perf_counter() - started
    write_json(out / "metrics.json", result)
    report.write_evaluation_summary(result, out)
    if classifier.kind == "run":
        report.write_tensorboard_images(
            RunDir(classifier.path).logs / "eval" / label,
            {name: out / name for name in (report.CONFUSION_MATRIX_PNG, report.RELIABILITY_PNG)
             if (out / name).is_file()},
            scalars={"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"],
                     "log_loss": metrics["log_loss"]})
    logger.info("accuracy %.4f, macro-F1 %.4f, ECE %.4f on %d images (%.1f images/s); wrote %s",
                metrics["accuracy"], metrics["macro_f1"], metrics["ece"], len(y),
                result["timing"]["images_per_second"] or 0.0, out)
    return EvaluationResult(out, result)


def _write_evaluation_plots(report: Any, out: Path, metrics: dict[str, Any]) -> None:
    """Confusion matrix and reliability diagram; a plotting failure must not cost the evaluation its metrics."""
    try:
        report.plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"],
                                     out / report.CONFUSION_MATRIX_PNG)
        report.plot_reliability_diagram(metrics["reliability"], out / report.RELIABILITY_PNG)
    except Exception:  # noqa: BLE001
        logger.exception("could not draw the plots in %s", out)
