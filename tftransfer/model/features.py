"""Backbone feature extraction and the on-disk phase-1 feature cache.

While the backbone is frozen, its pooled output for an image never changes, so phase 1 computes it once per
image (or once per augmented view), stores it on disk, and trains the head on those vectors. The head layers are
shared with the full model, so training them here trains the real model's head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer.core.cache import cache_key
from tftransfer.core.io import read_npz, write_npz
from tftransfer.core.progress import track
from tftransfer.data.sources import Split, split_fingerprint
from tftransfer.model.classifier import POOL_LAYER, build_inference_fn

logger = logging.getLogger(__name__)


def build_feature_extractor(model: keras.Model) -> keras.Model:
    """pixels -> pooled backbone features, sharing the model's layers (so its weights)."""
    return keras.Model(model.inputs, model.get_layer(POOL_LAYER).output, name="feature_extractor")


def build_head_model(model: keras.Model, after: str = POOL_LAYER) -> keras.Model:
    """features -> logits through the model's own layers after `after` (pooling: bottleneck, dropout, Dense)."""
    return build_chain(model, after, None, name="head")


def build_chain(model: keras.Model, after: str, upto: str | None, name: str = "chain") -> keras.Model:
    """A model of the layers strictly after `after` up to and including `upto` (None = to the output).

    The layers are shared with `model` (so are their weights); valid for the sequential tail after pooling.
    Equal `after` and `upto` give the identity on `after`'s output.
    """
    start = model.get_layer(after)
    inputs = keras.Input(shape=start.output.shape[1:], dtype=start.output.dtype, name="features")
    x = inputs
    active = False
    for layer in model.layers:
        if active:
            x = layer(x)
            if layer.name == upto:
                break
        if layer is start:
            active = True
            if upto == after:
                break
    return keras.Model(inputs, x, name=name)


@dataclass
class FeatureSet:
    """Pooled features of one split: [N * views, D] float32 and their labels."""

    features: np.ndarray
    labels: np.ndarray
    views: int
    from_cache: bool
    path: Path | None


def extract_features(extractor: keras.Model | Callable[[Any], np.ndarray], dataset: Iterable,
                     total: int | None = None, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Runs the extractor (a model, or a build_inference_fn of one) over (pixels, labels) batches."""
    infer = build_inference_fn(extractor) if isinstance(extractor, keras.Model) else extractor
    feats, labels = [], []
    with track(f"features {what}".strip(), total or 0, "images") as progress:
        for x, y in dataset:
            feats.append(np.asarray(infer(x), dtype=np.float32))
            labels.append(y.numpy())
            progress.advance(len(labels[-1]))
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def feature_cache_path(split: Split, key_parts: dict[str, Any], views: int, cache_dir: Path | None,
                       what: str = "train") -> Path | None:
    """Where the features of `split` (`views` passes) are cached under `key_parts`; None without a cache folder."""
    if cache_dir is None:
        return None
    parts = {**key_parts, "split": split_fingerprint(split), "views": views, "tftransfer": tftransfer.__version__}
    return Path(cache_dir) / "features" / f"{what}-{cache_key(parts)}.npz"


def read_cached_features(path: Path | None, views: int) -> FeatureSet | None:
    """The features cached at `path`, or None when there are none (a damaged file is logged and ignored)."""
    saved = read_npz(path, "feature")
    if saved is None or "features" not in saved or "labels" not in saved:
        return None
    logger.info("feature cache hit: %s (%d vectors)", path, len(saved["labels"]))
    return FeatureSet(saved["features"], saved["labels"], views, True, path)


def cached_features(extractor: keras.Model | Callable[[Any], np.ndarray], views: Sequence[Iterable], split: Split,
                    key_parts: dict[str, Any], cache_dir: Path | None, what: str = "train") -> FeatureSet:
    """Features of `split`, one pass per view dataset, read from or written to the disk cache."""
    path = feature_cache_path(split, key_parts, len(views), cache_dir, what)
    found = read_cached_features(path, len(views))
    if found is not None:
        return found
    started = time.perf_counter()
    chunks = [extract_features(extractor, ds, len(split), f"{what} view {v + 1}/{len(views)}" if len(views) > 1
                               else what) for v, ds in enumerate(views)]
    features = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks])
    logger.info("computed %d %s feature vectors in %.1f s", len(labels), what, time.perf_counter() - started)
    if path is not None:
        write_npz(path, features=features, labels=labels)
    return FeatureSet(features, labels, len(views), False, path)


def features_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool,
                     shuffle_buffer: int, seed: int) -> tf.data.Dataset:
    """Batches of cached features, shuffled like the image pipeline (same buffer and seed) when training."""
    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    if training:
        ds = ds.shuffle(min(shuffle_buffer, max(len(labels), 1)), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
