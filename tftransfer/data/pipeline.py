"""tf.data pipelines: parallel decode, resize, cache, shuffle, augment, batch, prefetch.

Element order is always deterministic (parallel maps keep their input order), so a seed reproduces every epoch's
order. Images are resized in the pipeline (so batches have one shape and the cache holds small tensors) with the same
function the serving signature uses; the model's own Resizing layer is then an identity for pipeline batches and
only does work for raw inputs of other sizes. Augmentation runs in the pipeline on the CPU, after the cache, so
every epoch sees new random views.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config import AugmentConfig, DataConfig
from tftransfer.data.images import decode_and_resize, resize_image
from tftransfer.data.sources import DataSource, Split

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Datasets:
    """Batched train/val datasets of (float32 pixels in [0, 255], int64 label), with their sizes and source."""

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    train_examples: int
    val_examples: int
    steps_per_epoch: int
    image_size: int
    class_names: list[str]
    source: DataSource
    batch_size: int
    shuffle_buffer: int = 2048
    augmenter: keras.Sequential | None = None

    def ordered_train(self, augment: bool = False) -> tf.data.Dataset:
        """The training split in source order (not shuffled), augmented or not: for feature extraction."""
        return make_split_dataset(self.source.train, self.image_size, self.batch_size, shuffle=False,
                                  cache="none", augmenter=self.augmenter if augment else None)


def build_augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """A Sequential of Keras random preprocessing layers, or None when every augmentation is off."""
    layers: list[keras.layers.Layer] = []
    if cfg.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation > 0:
        layers.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom > 0:
        layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed + 2))
    if cfg.translation > 0:
        layers.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode="reflect",
                                                     seed=seed + 3))
    if cfg.contrast > 0:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 4))
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")


def _examples(split: Split, image_size: int) -> tf.data.Dataset:
    """Unbatched (pixels, label) examples of one split, decoded and resized."""
    labels = tf.constant(split.labels, dtype=tf.int64)
    if split.images is not None:
        ds = tf.data.Dataset.from_tensor_slices((split.images, labels))
        return ds.map(lambda x, y: (resize_image(tf.cast(x, tf.float32), image_size), y),
                      num_parallel_calls=AUTOTUNE)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(split.paths), labels))
    ds = ds.map(lambda p, y: (decode_and_resize(tf.io.read_file(p), image_size), y),
                num_parallel_calls=AUTOTUNE)
    # Files were validated when listed; this is the safety net for damage only a full decode finds (a truncated
    # JPEG), so a bad file costs one example, not the run.
    return ds.ignore_errors(log_warning=True)


def make_split_dataset(split: Split, image_size: int, batch_size: int, *, shuffle: bool, cache: str = "memory",
                       shuffle_buffer: int = 2048, seed: int = 0,
                       augmenter: keras.Sequential | None = None) -> tf.data.Dataset:
    """Batched, prefetched dataset of one split; shuffled when `shuffle`, augmented when given an augmenter."""
    ds = _examples(split, image_size)
    if cache == "memory":
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(min(shuffle_buffer, max(len(split), 1)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augmenter is not None:
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def make_datasets(cfg: DataConfig, source: DataSource, image_size: int, seed: int = 0) -> Datasets:
    """Train and validation pipelines for a resolved source."""
    augmenter = build_augmenter(cfg.augment, seed)
    train = make_split_dataset(source.train, image_size, cfg.batch_size, shuffle=True, cache=cfg.cache,
                               shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                               augmenter=augmenter)
    val = None
    if source.val is not None and len(source.val) > 0:
        val = make_split_dataset(source.val, image_size, cfg.batch_size, shuffle=False, cache=cfg.cache)
    return Datasets(train=train, val=val, train_examples=len(source.train),
                    val_examples=len(source.val) if source.val is not None else 0,
                    steps_per_epoch=max(1, math.ceil(len(source.train) / cfg.batch_size)),
                    image_size=image_size, class_names=source.class_names, source=source,
                    batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer, augmenter=augmenter)


def take_pixels(ds: tf.data.Dataset, max_examples: int) -> np.ndarray:
    """Up to max_examples images from a batched dataset as a float32 array (for parity checks)."""
    out, n = [], 0
    for x, _ in ds:
        out.append(x.numpy())
        n += len(out[-1])
        if n >= max_examples:
            break
    return np.concatenate(out)[:max_examples] if out else np.zeros((0, 1, 1, 3), np.float32)
