"""tf.data pipelines: parallel decode, resize, cache, shuffle or class-balanced sampling, augment, batch, prefetch.

Element order is always deterministic (parallel maps keep their input order), so a seed reproduces every epoch's
order. Images are resized in the pipeline (so batches have one shape and the cache holds small tensors) with the same
function the serving signature uses; the model's own Resizing layer is then an identity for pipeline batches and
only does work for raw inputs of other sizes. Augmentation runs in the pipeline on the CPU, after the cache, so
every epoch sees new random views; validation and test are never augmented.

`data.cache` is `memory` (the default), `none`, or a folder: tf.data then writes the decoded, resized examples to
files named after the split's content and the image size, so data larger than RAM is decoded once and later runs
on the same data reuse the files (a changed file or size gives a new name, never a stale cache).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config import AugmentConfig, DataConfig
from tftransfer.data.images import decode_and_resize, resize_image
from tftransfer.data.sources import DataSource, Split, shard_split
from tftransfer.errors import DataError

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
CACHE_MODES = ("memory", "none")  # anything else is a folder for cache files


@dataclass
class Datasets:
    """Batched train/val(/test) datasets of (float32 pixels in [0, 255], int64 label), with sizes and source."""

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
    test: tf.data.Dataset | None = None
    test_examples: int = 0

    def ordered_train(self, augment: bool = False) -> tf.data.Dataset:
        """The training split in source order (not shuffled), augmented or not: for feature extraction."""
        return make_split_dataset(self.source.train, self.image_size, self.batch_size, shuffle=False,
                                  cache="none", augmenter=self.augmenter if augment else None)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation: presets are a registry of layer lists


def _custom_layers(cfg: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """The individual data.augment keys."""
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
    if cfg.brightness > 0:
        layers.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255), seed=seed + 5))
    return layers


def _light_layers(cfg: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """Mild geometric and photometric jitter that keeps photos natural (about +-11 degrees, 10 % zoom/shift)."""
    light = AugmentConfig(flip=True, rotation=0.03, zoom=0.1, translation=0.1, contrast=0.1, brightness=0.1)
    return _custom_layers(light, seed)


def _randaugment_layers(cfg: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """Flip plus Keras RandAugment: two random ops per image at half strength."""
    return [keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed + 6)]


AUGMENT_PRESETS: dict[str, Callable[[AugmentConfig, int], list[keras.layers.Layer]]] = {
    "custom": _custom_layers,
    "none": lambda cfg, seed: [],
    "light": _light_layers,
    "randaugment": _randaugment_layers,
}


def build_augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """A Sequential of Keras random preprocessing layers for data.augment.preset, or None when it adds nothing."""
    if cfg.preset not in AUGMENT_PRESETS:
        raise DataError(f"data.augment.preset: unknown preset {cfg.preset!r}; one of {', '.join(AUGMENT_PRESETS)}")
    layers = AUGMENT_PRESETS[cfg.preset](cfg, seed)
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def _examples(split: Split, image_size: int) -> tf.data.Dataset:
    """Unbatched (pixels, label) examples of one split, decoded and resized."""
    labels = tf.constant(split.labels, dtype=tf.int64)
    if split.images is not None:
        ds = tf.data.Dataset.from_tensor_slices((split.images, labels))
        return ds.map(lambda x, y: (resize_image(tf.cast(x, tf.float32), image_size), y),
                      num_parallel_calls=AUTOTUNE)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(split.paths, dtype=tf.string), labels))
    ds = ds.map(lambda p, y: (decode_and_resize(tf.io.read_file(p), image_size), y),
                num_parallel_calls=AUTOTUNE)
    # Files were validated when listed; this is the safety net for damage only a full decode finds (a truncated
    # JPEG), so a bad file costs one example, not the run.
    return ds.ignore_errors(log_warning=True)


def cache_file_prefix(cache_dir: str | Path, split: Split, image_size: int, name: str) -> Path:
    """Where a split's tf.data file cache lives: named by its content and size, so a stale cache is never read."""
    from tftransfer.features import cache_key, split_fingerprint

    key = cache_key({"split": split_fingerprint(split), "image_size": image_size, "resize": "bilinear-aa"})
    return Path(cache_dir) / f"{name}-{key}"


def check_cache_setting(cache: str) -> Path | None:
    """The cache folder data.cache names (None for memory/none); a DataError for a value that is neither.

    A folder must look like a path (contain a slash, or start with ~ or .) or exist, so a typo such as `memroy`
    is an error rather than a new folder.
    """
    if cache in CACHE_MODES:
        return None
    folder = Path(cache).expanduser()
    if not (folder.is_dir() or "/" in cache or "\\" in cache or cache.startswith(("~", "."))):
        raise DataError(f"data.cache: {cache!r} is not memory, none, or a folder path (write ./{cache} for a "
                        "folder in the working directory)")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data.cache: {folder} is a file; give memory, none, or a folder for cache files")
    return folder


def _cached(ds: tf.data.Dataset, cache: str, split: Split, image_size: int, name: str) -> tf.data.Dataset:
    folder = check_cache_setting(cache)
    if folder is None:
        return ds.cache() if cache == "memory" else ds
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache: cannot create cache folder {folder}: {exc.strerror or exc}") from None
    prefix = cache_file_prefix(folder, split, image_size, name)
    state = "reusing" if Path(f"{prefix}.index").exists() else "writing"
    logger.info("data cache (%s): %s %s.*", name, state, prefix)
    return ds.cache(str(prefix))


def _balanced_examples(split: Split, image_size: int, cache: str, shuffle_buffer: int, seed: int,
                       name: str) -> tf.data.Dataset:
    """len(split) examples per epoch drawn with equal probability per class (rare ones repeat, common ones wait).

    Each class is its own shuffled, repeating stream; `rerandomize_each_iteration` gives every epoch new draws
    while the seed still reproduces the whole sequence.
    """
    streams = []
    for label in np.unique(split.labels):
        members = split.subset(np.flatnonzero(split.labels == label))
        ds = _cached(_examples(members, image_size), cache, members, image_size, f"{name}-class{int(label)}")
        ds = ds.shuffle(min(shuffle_buffer, len(members)), seed=seed + int(label), reshuffle_each_iteration=True)
        streams.append(ds.repeat())
    mixed = tf.data.Dataset.sample_from_datasets(streams, weights=[1.0 / len(streams)] * len(streams), seed=seed,
                                                 rerandomize_each_iteration=True)
    return mixed.take(len(split))


def make_split_dataset(split: Split, image_size: int, batch_size: int, *, shuffle: bool, cache: str = "memory",
                       shuffle_buffer: int = 2048, seed: int = 0, augmenter: keras.Sequential | None = None,
                       balanced: bool = False, name: str = "split") -> tf.data.Dataset:
    """Batched, prefetched dataset of one split.

    Shuffled when `shuffle`, class-balanced sampling when `balanced` (implies shuffling), augmented when given an
    augmenter. `cache` is memory, none or a folder (see the module docstring); `name` names the cache files.
    """
    if balanced and len(split) > 0:
        ds = _balanced_examples(split, image_size, cache, shuffle_buffer, seed, name)
    else:
        ds = _cached(_examples(split, image_size), cache, split, image_size, name)
        if shuffle:
            ds = ds.shuffle(min(shuffle_buffer, max(len(split), 1)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augmenter is not None:
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def make_datasets(cfg: DataConfig, source: DataSource, image_size: int, seed: int = 0, *,
                  shard: tuple[int, int] | None = None) -> Datasets:
    """Train, validation and test pipelines for a resolved source.

    `shard=(num_workers, index)` keeps this worker's share of the training files before any decoding (for
    multi-worker training); tf.data's own auto-sharding is then switched off for that dataset.
    """
    augmenter = build_augmenter(cfg.augment, seed)
    train_split = shard_split(source.train, *shard) if shard is not None else source.train
    if cfg.balanced_sampling:
        counts = train_split.class_counts(len(source.class_names))
        logger.info("balanced sampling over %d classes (train counts %d-%d)", int(np.sum(counts > 0)),
                    int(counts[counts > 0].min(initial=0)), int(counts.max(initial=0)))
    train = make_split_dataset(train_split, image_size, cfg.batch_size, shuffle=True, cache=cfg.cache,
                               shuffle_buffer=cfg.shuffle_buffer, seed=seed, augmenter=augmenter,
                               balanced=cfg.balanced_sampling,
                               name="train" if shard is None else f"train-shard{shard[1]}of{shard[0]}")
    if shard is not None:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        train = train.with_options(options)
    evals = {}
    for name in ("val", "test"):
        split = getattr(source, name)
        if split is not None and len(split) > 0:
            evals[name] = make_split_dataset(split, image_size, cfg.batch_size, shuffle=False, cache=cfg.cache,
                                             name=name)
    return Datasets(train=train, val=evals.get("val"), train_examples=len(train_split),
                    val_examples=len(source.val) if source.val is not None else 0,
                    steps_per_epoch=max(1, math.ceil(len(train_split) / cfg.batch_size)),
                    image_size=image_size, class_names=source.class_names, source=source,
                    batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer, augmenter=augmenter,
                    test=evals.get("test"), test_examples=len(source.test) if source.test is not None else 0)


def take_pixels(ds: tf.data.Dataset, max_examples: int) -> np.ndarray:
    """Up to max_examples images from a batched dataset as a float32 array (for parity checks)."""
    out, n = [], 0
    for x, _ in ds:
        out.append(x.numpy())
        n += len(out[-1])
        if n >= max_examples:
            break
    return np.concatenate(out)[:max_examples] if out else np.zeros((0, 1, 1, 3), np.float32)
