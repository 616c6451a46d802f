"""The one inference path: a Keras logits model -> batched float32 probabilities (and pooled features).

Evaluation, export parity, the domain adapters, prediction from a run and feature extraction all call these, so a
fix to batching, dtype or distribution-strategy handling lands everywhere at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.core.memo import per_object
from tftransfer.core.numerics import stable_softmax
from tftransfer.model.classifier import build_inference_fn
from tftransfer.model.features import build_feature_extractor, build_head_model

logger = logging.getLogger(__name__)

def inference_fn(model: keras.Model) -> Callable[[Any], np.ndarray]:
    """The model's inference-mode call (see build_inference_fn), traced once per live model."""
    return per_object(model, "inference", lambda: build_inference_fn(model, weak=True))


def batches_of(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Splits images into ceil(N / batch_size) nearly equal batches (no tiny last batch for batch statistics)."""
    if len(images) == 0:
        raise ValueError("no images")
    count = max(1, math.ceil(len(images) / batch_size))
    return np.array_split(images, count)


def predict_outputs(model: keras.Model, images: Any, batch_size: int = 64) -> np.ndarray:
    """float32 outputs (logits, or features for a feature extractor) over in-memory images, batch by batch."""
    images = np.asarray(images)
    if len(images) == 0:
        return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
    infer = inference_fn(model)
    return np.concatenate([np.asarray(infer(b), np.float32) for b in batches_of(images, batch_size)])


def predict_probabilities(model: keras.Model, images: Any, batch_size: int = 64) -> np.ndarray:
    """float32 softmax probabilities of a logits model over in-memory images."""
    return stable_softmax(predict_outputs(model, images, batch_size))


def predict_dataset(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` (which returns logits) over `(pixels, int labels)` batches.

    Returns `(y_true, probs)`: int64 labels of shape [N] and float32 softmax probabilities of shape [N, C].
    """

    infer = inference_fn(model)
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







logger = logging.getLogger(__name__)


def features_and_probs(model: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features (as the phase-1 cache) and softmax probabilities, from one pass."""
    # Built once per model: a domain report splits the same model for the source and the target.
    split = per_object(model, "feature-head split", lambda: (build_feature_extractor(model), build_head_model(model)))
    features = predict_outputs(split[0], images, batch_size)
    return features, predict_probabilities(split[1], features, 4 * batch_size)
