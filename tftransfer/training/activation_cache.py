"""Phase 2 on cached trunk activations: the frozen lower blocks run once per image and view, not once per step.

With the top N blocks unfrozen and BatchNorm frozen, the output of everything below the first unfrozen block (the
cut, tftransfer.model.activations) is a fixed function of the input view. So K augmented views of every training
image are pushed through the trunk once (the same augmenter and seed stream as phase 2's pipeline), kept in memory
as float16 (and on disk in the cache folder, by a content key in the style of the feature cache), and the top
blocks plus head train on them: epoch e reads view e % K, shuffled. Validation images are pushed through once,
un-augmented, and kept as float32, so per-epoch validation on `top` gives the full model's numbers.
Augmentation then varies over K fixed views instead of every epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer.config.experiment import ExperimentConfig, FinetuneConfig
from tftransfer.core.cache import arrays_digest, cache_key
from tftransfer.core.errors import ConfigError
from tftransfer.core.io import read_npz, write_npz
from tftransfer.data.augment import AUGMENT_VERSION
from tftransfer.data.pipeline import Datasets
from tftransfer.data.sources import split_fingerprint
from tftransfer.model.activations import ModelCut
from tftransfer.model.classifier import build_inference_fn
from tftransfer.model.features import extract_features

logger = logging.getLogger(__name__)

STORE_DTYPE = np.float16  # halves the memory of float32; its 11-bit mantissa is below the training noise
_FLOAT16_MAX = 65000.0


@dataclass(frozen=True)
class CacheConditions:
    """What decides whether phase 2 can train on cached activations, besides the model's cut."""

    pruning: bool = False
    distill: bool = False
    adaptive: bool = False  # a target domain or L2-SP: the AdaptiveTrainer
    multiworker: bool = False
    replicas: int = 1  # the strategy's replicas in sync
    balanced: bool = False  # data.balanced_sampling


# Each condition that rules the cache out, with why; checked in order (a registry, not a chain of ifs).
_BLOCKERS: tuple[tuple[Callable[[CacheConditions], bool], str], ...] = (
    (lambda c: c.pruning, "prune.target_sparsity > 0 (pruning runs on the full model's training)"),
    (lambda c: c.distill, "distillation trains on its own fixed views and teacher logits"),
    (lambda c: c.adaptive, "the adaptive trainer (a target domain or L2-SP) trains the full encoder"),
    (lambda c: c.multiworker, "multiworker training shards the images over workers"),
    # Its datasets are not distributed over replicas yet (the per-epoch view is a variable read by tf.data).
    (lambda c: c.replicas > 1, "it runs on one replica, and the strategy has several"),
    (lambda c: c.balanced, "data.balanced_sampling draws class-balanced batches from the images"),
)


def blocked_by(conditions: CacheConditions) -> str | None:
    """Why the activation cache cannot apply under `conditions`, or None."""
    return next((why for blocks, why in _BLOCKERS if blocks(conditions)), None)


def config_conditions(cfg: ExperimentConfig, multiworker: bool = False, replicas: int = 1) -> CacheConditions:
    """The conditions a config alone decides (the model's cut and the cache's size are known only at phase 2)."""
    finetune = cfg.phases.finetune
    return CacheConditions(pruning=cfg.prune.target_sparsity > 0, distill=bool(cfg.distill.teacher),
                           adaptive=bool(cfg.adapt.target) or finetune.l2_sp_alpha > 0 or finetune.l2_sp_beta > 0,
                           multiworker=multiworker, replicas=replicas, balanced=cfg.data.balanced_sampling)


def check_config(cfg: ExperimentConfig) -> None:
    """activation_cache=on in a config where it can never apply is a ConfigError before anything trains."""
    finetune = cfg.phases.finetune
    why = blocked_by(config_conditions(cfg))
    if why is not None and finetune.epochs > 0 and finetune.unfreeze_blocks > 0:
        refuse_or_skip(finetune, why)


def estimated_mb(cut: ModelCut, train_examples: int, val_examples: int, views: int) -> float:
    """Memory (and disk) of the cache: train views in float16, val in float32."""
    values = cut.values_per_example
    return (values * train_examples * views * np.dtype(STORE_DTYPE).itemsize + values * val_examples * 4) / 2**20


def refuse_or_skip(phase: FinetuneConfig, reason: str) -> str:
    """`reason` (logged by the caller) under auto; under `on` a ConfigError naming the key."""
    if phase.activation_cache == "on":
        raise ConfigError(f"phases.finetune.activation_cache=on cannot apply: {reason}")
    return reason


@dataclass
class ActivationSet:
    """Trunk activations: train [views * N, ...] (view-major) and val [M, ...], with labels."""

    train: np.ndarray
    labels: np.ndarray
    val: np.ndarray | None
    val_labels: np.ndarray | None
    views: int
    from_cache: bool
    path: Path | None
    seconds: float = 0.0


def activation_key_parts(cut: ModelCut, data: Datasets, base_parts: dict[str, Any], views: int, clean_view: bool,
                         seed: int) -> dict[str, Any]:
    """Everything the cached activations depend on: images, trunk weights, cut, size, augmentation, seed, views."""
    augment = f"{AUGMENT_VERSION} {_unnamed(data.augmenter.get_config())}" if data.augmenter is not None else None
    return {**base_parts, "trunk": arrays_digest(cut.trunk.get_weights()), "cut": cut.cut, "shape": list(cut.shape),
            "image_size": data.image_size, "augment": augment, "seed": seed, "views": views,
            "clean_view": clean_view, "store": np.dtype(STORE_DTYPE).name,
            "train": split_fingerprint(data.source.train),
            "val": split_fingerprint(data.source.val) if data.val is not None and data.source.val is not None else None,
            "tftransfer": tftransfer.__version__}


def _unnamed(config: Any) -> Any:
    """A layer config without its names: Keras numbers auto-named layers per process (random_geometry_1, ...)."""
    if isinstance(config, dict):
        return {key: _unnamed(value) for key, value in config.items() if key != "name"}
    return [_unnamed(value) for value in config] if isinstance(config, (list, tuple)) else config


def activation_cache_path(cache_dir: Path | None, parts: dict[str, Any]) -> Path | None:
    """Where activations of `parts` are cached on disk; None without a cache folder."""
    return None if cache_dir is None else Path(cache_dir) / "activations" / f"{cache_key(parts)}.npz"


def _read(path: Path | None, views: int) -> ActivationSet | None:
    saved = read_npz(path, "activation")
    if saved is None or not {"train", "labels", "has_val", "val", "val_labels"} <= saved.keys():
        return None
    has_val = bool(saved["has_val"])
    found = ActivationSet(saved["train"], saved["labels"], saved["val"] if has_val else None,
                          saved["val_labels"] if has_val else None, views, True, path)
    logger.info("activation cache hit: %s (%d train activations, %d views)", path, len(found.train), views)
    return found


def _write(path: Path, found: ActivationSet) -> None:
    has_val = found.val is not None
    write_npz(path, train=found.train, labels=found.labels, has_val=np.asarray(has_val),
              val=found.val if has_val else np.zeros(0, np.float32),
              val_labels=found.val_labels if has_val else np.zeros(0, np.int64))


def _stored(values: np.ndarray) -> np.ndarray:
    """Train activations as float16, or float32 where float16 would overflow (an unnormalised trunk)."""
    if values.size and float(np.max(np.abs(values))) > _FLOAT16_MAX:
        logger.info("activation cache kept as float32: values up to %.3g overflow float16",
                    float(np.max(np.abs(values))))
        return values
    return values.astype(STORE_DTYPE)


def cached_activations(cut: ModelCut, data: Datasets, views: int, clean_view: bool, parts: dict[str, Any],
                       cache_dir: Path | None) -> ActivationSet:
    """The trunk's activations of `views` views of every training image and of the val images, cached."""
    path = activation_cache_path(cache_dir, parts)
    found = _read(path, views)
    if found is not None:
        return found
    started = time.perf_counter()
    trunk = build_inference_fn(cut.trunk)  # traced once for every view and split
    augmented = views - 1 if clean_view else views
    # One dataset for all augmented passes: the first decodes into its memory cache, the others read it.
    passes = ([data.ordered_train(augment=False)] * (views - augmented)
              + [data.ordered_train(augment=True, cache="memory")] * augmented)
    n = len(data.source.train)
    chunks = [extract_features(trunk, ds, n, f"activations train view {v + 1}/{views}") for v, ds in enumerate(passes)]
    labels = chunks[0][1]
    if any(len(c[1]) != len(labels) or np.any(c[1] != labels) for c in chunks):
        raise RuntimeError("activation cache: the views of the training split differ in their examples")
    train = _stored(np.concatenate([c[0] for c in chunks]))
    val = val_labels = None
    if data.val is not None and data.source.val is not None:
        val, val_labels = extract_features(trunk, data.val, len(data.source.val), "activations val")
    found = ActivationSet(train, labels, val, val_labels, views, False, path, time.perf_counter() - started)
    logger.info("computed %d train activations (%d views) and %d val in %.1f s", len(train), views,
                0 if val is None else len(val), found.seconds)
    if path is not None:
        _write(path, found)
    return found


class ViewSchedule(keras.callbacks.Callback):
    """Points the training dataset at view (epoch - first_epoch) % views before each epoch's iterator opens."""

    def __init__(self, view: tf.Variable, views: int, first_epoch: int) -> None:
        super().__init__()
        self.view, self.views, self.first_epoch = view, views, first_epoch

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        self.view.assign((epoch - self.first_epoch) % self.views)


def activation_datasets(found: ActivationSet, cut: ModelCut, batch_size: int, shuffle_buffer: int, seed: int,
                        first_epoch: int) -> tuple[tf.data.Dataset, tf.data.Dataset | None, int, ViewSchedule]:
    """(train, val, steps per epoch, the callback choosing each epoch's view) on the cached activations.

    Training batches are shuffled like the image pipeline (same buffer and seed); each is one gather from the
    store, cast to the top model's input dtype.
    """
    n = len(found.labels)
    store = tf.constant(found.train)
    labels = tf.constant(found.labels, tf.int64)
    view = tf.Variable(0, dtype=tf.int64, trainable=False, name="activation_view")
    dtype = tf.as_dtype(cut.dtype)

    @tf.autograph.experimental.do_not_convert  # plain tensor ops; AutoGraph only warns that it cannot convert it
    def gather(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.cast(tf.gather(store, view.read_value() * n + rows), dtype), tf.gather(labels, rows)

    order = tf.data.Dataset.range(n).shuffle(min(shuffle_buffer, max(n, 1)), seed=seed, reshuffle_each_iteration=True)
    train = order.batch(batch_size).map(gather).prefetch(tf.data.AUTOTUNE)
    val = None
    if found.val is not None and found.val_labels is not None:
        val = tf.data.Dataset.from_tensor_slices((found.val.astype(dtype.as_numpy_dtype), found.val_labels))
        val = val.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return train, val, max(1, math.ceil(n / batch_size)), ViewSchedule(view, found.views, first_epoch)
