"""tf.data pipelines: parallel decode, resize, cache, shuffle or class-balanced sampling, augment, batch, prefetch.

Element order is always deterministic (parallel maps keep their input order), so a seed reproduces every epoch's
order. Images are resized in the pipeline (so batches have one shape and the cache holds small tensors) with the same
function the serving signature uses; the model's own Resizing layer is then an identity for pipeline batches and
only does work for raw inputs of other sizes. Augmentation runs in the pipeline on the CPU, after the cache, so
every epoch sees new random views (or, with data.augment.placement model, in the training step: see
tftransfer.training.augment_step); validation and test are never augmented.

A shuffled split is shuffled as indices, before anything is decoded: every epoch visits the examples in the order
`Dataset.range(n).shuffle(min(shuffle_buffer, n), seed, reshuffle_each_iteration=True)` gives (the order a shuffle
after a cache of the source-ordered split gives, and the order phase 1's cached features are shuffled in), and the
first batch comes after batch_size decodes instead of after the whole split. The memory cache of a shuffled split is
an index-addressed store filled as examples are first decoded, so later epochs read them in any order; a folder cache
is written and read in source order, so with one the first epoch still waits for a shuffle buffer of decodes (as
does a memory cache built inside a distribution strategy's scope, where the store's variables would be mirrored).

`data.cache` is `memory` (the default), `none`, or a folder: tf.data then writes the decoded, resized examples to
files named after the split's content, the image size and the decoder version, so data larger than RAM is decoded
once and later runs on the same data reuse the files (a changed file or size gives a new name, never a stale cache).
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

from tftransfer.config.experiment import AugmentConfig, DataConfig
from tftransfer.core.cache import cache_key
from tftransfer.core.errors import DataError
from tftransfer.data.augment import RandomColour, RandomGeometry, augment_with_seed, stateless_layers
from tftransfer.data.images import (
    DECODE_VERSION,
    decode_and_resize,
    decode_and_resize_known,
    jpeg_scale_index,
    resize_image,
)
from tftransfer.data.sources import DataSource, Split, shard_split, split_fingerprint
from tftransfer.runtime import resolve_augment_placement

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
    augmenter: keras.Sequential | None = None  # kept whatever the placement: phase 1's feature views use it
    test: tf.data.Dataset | None = None
    test_examples: int = 0
    augment_placement: str | None = None  # resolved data.augment.placement (None: nothing augments)

    @property
    def augment_in_model(self) -> bool:
        """`train` is un-augmented: the training step applies `augmenter` instead (tftransfer.training.augment_step)."""
        return self.augment_placement == "model"

    def ordered_train(self, augment: bool = False, cache: str = "none") -> tf.data.Dataset:
        """The training split in source order (not shuffled), augmented or not: for feature extraction.

        With cache="memory", passes after the first read the decoded images from memory (augmentation still
        draws new random views every pass).
        """
        return make_split_dataset(self.source.train, self.image_size, self.batch_size, shuffle=False,
                                  cache=cache, augmenter=self.augmenter if augment else None)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation: presets are a registry of layer lists


def _custom_layers(cfg: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """The individual data.augment keys: one geometric warp and one colour change, each left out when a no-op."""
    layers: list[keras.layers.Layer] = []
    if cfg.flip or cfg.rotation > 0 or cfg.zoom > 0 or cfg.translation > 0:
        layers.append(RandomGeometry(flip=cfg.flip, rotation=cfg.rotation, zoom=cfg.zoom,
                                     translation=cfg.translation, fill_mode="reflect", seed=seed))
    if cfg.contrast > 0 or cfg.brightness > 0:
        layers.append(RandomColour(contrast=cfg.contrast, brightness=cfg.brightness, seed=seed + 4))
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
    """A Sequential of random preprocessing layers for data.augment.preset, or None when it adds nothing.

    custom and light use tftransfer's RandomGeometry/RandomColour (tftransfer.data.augment: one warp per image,
    seeded per batch by the pipeline); randaugment uses Keras' layers.
    """
    if cfg.preset not in AUGMENT_PRESETS:
        raise DataError(f"data.augment.preset: unknown preset {cfg.preset!r}; one of {', '.join(AUGMENT_PRESETS)}")
    layers = AUGMENT_PRESETS[cfg.preset](cfg, seed)
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def _loader(split: Split, image_size: int) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """index -> (float32 [S, S, 3] pixels, int64 label) of one split: decoded and resized, or resized."""
    labels = tf.constant(split.labels, dtype=tf.int64)
    if split.images is not None:
        images = tf.constant(split.images)
        return lambda i: (resize_image(tf.cast(tf.gather(images, i), tf.float32), image_size), tf.gather(labels, i))
    paths = tf.constant(split.paths, dtype=tf.string)
    if split.headers is None:
        return lambda i: (decode_and_resize(tf.io.read_file(tf.gather(paths, i)), image_size), tf.gather(labels, i))
    # The listing read every header: the decode choices are constants, and a choice the same for every file
    # (no EXIF rotation, no JPEG large enough to decode at reduced scale) is no op at all.
    width, height, orientation, jpeg = (split.headers[:, c] for c in range(split.headers.shape[1]))
    scales = np.array([jpeg_scale_index(w, h, j, image_size) for w, h, j in zip(width, height, jpeg)], np.int32)
    scale_of = tf.constant(scales) if np.any(scales != 0) else None
    orientation_of = tf.constant(orientation, tf.int32) if np.any(orientation != 1) else None

    def load(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels = decode_and_resize_known(
            tf.io.read_file(tf.gather(paths, i)), image_size,
            None if scale_of is None else tf.gather(scale_of, i),
            None if orientation_of is None else tf.gather(orientation_of, i))
        return pixels, tf.gather(labels, i)

    return load


def _order(n: int, shuffle_buffer: int | None, seed: int) -> tf.data.Dataset:
    """The indices 0..n-1, in source order or (with a buffer) in a seeded order that changes every iteration."""
    order = tf.data.Dataset.range(n)
    if shuffle_buffer is not None:
        order = order.shuffle(min(shuffle_buffer, max(n, 1)), seed=seed, reshuffle_each_iteration=True)
    return order


def _examples(split: Split, image_size: int, order: tf.data.Dataset | None = None,
              load: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None) -> tf.data.Dataset:
    """Unbatched (pixels, label) examples of one split, decoded and resized, in `order` (source order by default)."""
    order = _order(len(split), None, 0) if order is None else order
    ds = order.map(load or _loader(split, image_size), num_parallel_calls=AUTOTUNE)
    if split.images is not None:
        return ds
    # Files were validated when listed; this is the safety net for damage only a full decode finds (a truncated
    # JPEG), so a bad file costs one example, not the run.
    return ds.ignore_errors(log_warning=True)


def _stored(split: Split, image_size: int, order: tf.data.Dataset, batch_size: int | None = None) -> tf.data.Dataset:
    """`_examples` in `order` (batched when given batch_size), each decoded once: an in-memory store by index.

    The store (a float32 [n, S, S, 3] variable) is allocated when the dataset is first iterated, not when it is
    built. Until one epoch has run to its end, an epoch decodes and writes all its examples (so an epoch stopped
    early costs the next one a full decode, as with tf.data's cache); after that, epochs only read rows. A file
    that fails to decode is skipped by the ignore_errors safety net, its row stays unwritten, and reading epochs
    skip it too.

    One function (about 70 lines, most of them comments): the nested functions close over the same four store
    variables and the filling dataset, which is built once here; split apart, they would only pass those around.
    """
    n = len(split)
    load = _loader(split, image_size)
    labels = tf.constant(split.labels, dtype=tf.int64)
    with tf.init_scope(), tf.device("/CPU:0"):
        store = tf.Variable(tf.zeros([0, image_size, image_size, 3]), trainable=False, name="pixel_store",
                            shape=tf.TensorShape([None, image_size, image_size, 3]))
        written = tf.Variable(tf.zeros([n], tf.bool), trainable=False, name="pixel_store_written")
        complete = tf.Variable(False, trainable=False, name="pixel_store_complete")
        epoch_order = tf.Variable(tf.zeros([n], tf.int64), trainable=False, name="pixel_store_order")

    # Rows are only ever gathered and scattered: a full read of the store kept alive would make the next write
    # copy all of it.
    def decode_and_write(j: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        i = tf.gather(epoch_order, j)
        pixels, label = load(i)
        with tf.control_dependencies([store.scatter_update(tf.IndexedSlices(pixels[tf.newaxis], i[tf.newaxis]))]):
            # marked written only once the row is
            with tf.control_dependencies([written.scatter_update(tf.IndexedSlices([True], i[tf.newaxis]))]):
                return tf.identity(pixels), label

    # Built once, here: inside the per-epoch function below, the decoding function would be set up again (tens
    # of milliseconds) every epoch, even the ones that only read.
    filling = tf.data.Dataset.range(n).map(decode_and_write, num_parallel_calls=AUTOTUNE)
    if split.images is None:
        # Files were validated when listed; this is the safety net for damage only a full decode finds (a
        # truncated JPEG), so a bad file costs one example, not the run.
        filling = filling.ignore_errors(log_warning=True)
    # Reached only once every example before it came out: marks the store complete, then drops itself.
    end = tf.data.Dataset.range(1).map(lambda _: _mark(complete, image_size)).filter(lambda x, y: y >= 0)
    filling = filling.concatenate(end)
    if batch_size is not None:
        filling = filling.batch(batch_size)
    spec = filling.element_spec
    filling = tf.data.experimental.to_variant(filling)

    @tf.autograph.experimental.do_not_convert
    def epoch(indices: tf.Tensor) -> tf.data.Dataset:
        # One element per epoch holding all its indices, so the shuffle's iterator opens with the epoch's, as it
        # would without the store (Keras opens iterators it never reads; each one draws the next order).
        def fill() -> tf.Tensor:
            rows = tf.raw_ops.VariableShape(input=store.handle)[0]
            allocated = tf.cond(rows == 0, lambda: _allocate(store, tf.size(indices), image_size),
                                lambda: tf.constant(False))
            with tf.control_dependencies([allocated, epoch_order.assign(indices)]):
                return tf.identity(filling)

        def read() -> tf.Tensor:
            # Whole batches in one gather each: no per-example work, no copy into a batch afterwards. (A gather
            # is a copy; a parallel map would cost more to set up every epoch than it saves.)
            rows = tf.data.Dataset.from_tensor_slices(tf.boolean_mask(indices, tf.gather(written, indices)))
            rows = rows if batch_size is None else rows.batch(batch_size)
            return tf.data.experimental.to_variant(rows.map(lambda i: (tf.gather(store, i), tf.gather(labels, i))))

        return tf.data.experimental.from_variant(tf.cond(complete.read_value(), read, fill), spec)

    ds = order.batch(max(n, 1)).flat_map(epoch)
    if split.images is None:
        return ds
    # nothing is dropped, so Keras can know the epoch's length
    return ds.apply(tf.data.experimental.assert_cardinality(n if batch_size is None else math.ceil(n / batch_size)))


def _mark(complete: tf.Variable, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A placeholder example (label -1, for the filter to drop) whose making sets `complete`."""
    with tf.control_dependencies([complete.assign(True)]):
        return tf.zeros([image_size, image_size, 3]), tf.constant(-1, tf.int64)


def _allocate(store: tf.Variable, n: tf.Tensor, image_size: int) -> tf.Tensor:
    # Uninitialised memory (rows are read only once written), sized by a runtime tensor: zeros of a constant size
    # would be folded by the graph optimiser into a constant the store then shares, which makes every later read
    # of it two to three times slower.
    rows = tf.raw_ops.Empty(shape=tf.stack([n, image_size, image_size, 3]), dtype=tf.float32, init=False)
    with tf.control_dependencies([store.assign(rows)]):
        return tf.constant(True)


def cache_file_prefix(cache_dir: str | Path, split: Split, image_size: int, name: str) -> Path:
    """Where a split's tf.data file cache lives: named by its content and size, so a stale cache is never read."""

    key = cache_key({"split": split_fingerprint(split), "image_size": image_size, "resize": "bilinear-aa",
                     "decode": DECODE_VERSION})
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


def _shuffled_examples(split: Split, image_size: int, cache: str, shuffle_buffer: int, seed: int, name: str,
                       batch_size: int | None = None) -> tf.data.Dataset:
    """The split's examples in a new seeded random order every iteration (see the module docstring).

    Batched when given batch_size, else single examples.
    """
    order = _order(len(split), shuffle_buffer, seed)
    if cache == "memory" and not tf.distribute.has_strategy():
        return _stored(split, image_size, order, batch_size)
    batch = (lambda ds: ds) if batch_size is None else (lambda ds: ds.batch(batch_size))
    if cache == "none":
        return batch(_examples(split, image_size, order))
    # tf.data's file cache is sequential: it holds the source order, shuffled after it as before. So does its
    # memory cache, used inside a distribution strategy's scope, where the store's variables would be mirrored.
    examples = _cached(_examples(split, image_size), cache, split, image_size, name)
    return batch(examples.shuffle(min(shuffle_buffer, max(len(split), 1)), seed=seed, reshuffle_each_iteration=True))


def _balanced_examples(split: Split, image_size: int, cache: str, shuffle_buffer: int, seed: int,
                       name: str) -> tf.data.Dataset:
    """len(split) examples per epoch drawn with equal probability per class (rare ones repeat, common ones wait).

    Each class is its own shuffled, repeating stream; `rerandomize_each_iteration` gives every epoch new draws
    while the seed still reproduces the whole sequence.
    """
    streams = []
    for label in np.unique(split.labels):
        members = split.subset(np.flatnonzero(split.labels == label))
        ds = _shuffled_examples(members, image_size, cache, shuffle_buffer, seed + int(label),
                                f"{name}-class{int(label)}")
        streams.append(ds.repeat())
    mixed = tf.data.Dataset.sample_from_datasets(streams, weights=[1.0 / len(streams)] * len(streams), seed=seed,
                                                 rerandomize_each_iteration=True)
    return mixed.take(len(split))


def _augmented(ds: tf.data.Dataset, augmenter: keras.Sequential) -> tf.data.Dataset:
    """Batches through the augmenter: tftransfer's layers with one seed per batch, Keras' layers as they are."""
    layers = stateless_layers(augmenter)
    if layers is None:
        return ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=AUTOTUNE)
    # A new stream of seeds every iteration (epoch), the same streams again for the same seed.
    seeds = tf.data.Dataset.random(seed=layers[0].seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((ds, seeds)).map(lambda batch, seed: (augment_with_seed(layers, batch[0], seed),
                                                                     batch[1]), num_parallel_calls=AUTOTUNE)


def make_split_dataset(split: Split, image_size: int, batch_size: int, *, shuffle: bool, cache: str = "memory",
                       shuffle_buffer: int = 2048, seed: int = 0, augmenter: keras.Sequential | None = None,
                       balanced: bool = False, name: str = "split") -> tf.data.Dataset:
    """Batched, prefetched dataset of one split.

    Shuffled when `shuffle`, class-balanced sampling when `balanced` (implies shuffling), augmented when given an
    augmenter. `cache` is memory, none or a folder (see the module docstring); `name` names the cache files.
    """
    if balanced and len(split) > 0:
        ds = _balanced_examples(split, image_size, cache, shuffle_buffer, seed, name).batch(batch_size)
    elif shuffle:
        ds = _shuffled_examples(split, image_size, cache, shuffle_buffer, seed, name, batch_size)
    else:
        ds = _cached(_examples(split, image_size), cache, split, image_size, name).batch(batch_size)
    if augmenter is not None:
        ds = _augmented(ds, augmenter)
    return ds.prefetch(AUTOTUNE)


def make_datasets(cfg: DataConfig, source: DataSource, image_size: int, seed: int = 0, *,
                  shard: tuple[int, int] | None = None, has_gpu: bool = False) -> Datasets:
    """Train, validation and test pipelines for a resolved source.

    `shard=(num_workers, index)` keeps this worker's share of the training files before any decoding (for
    multi-worker training); tf.data's own auto-sharding is then switched off for that dataset.
    data.augment.placement is resolved here, against the augmenter it would move (`has_gpu`: the run trains on
    one); with placement model the training batches stay un-augmented and the training step augments them.
    """
    augmenter = build_augmenter(cfg.augment, seed)
    placement = None
    if augmenter is not None:  # tftransfer's layers XLA-compile in a training step; Keras' RandAugment does not
        placement = resolve_augment_placement(cfg.augment.placement, has_gpu,
                                              compilable=stateless_layers(augmenter) is not None)
    train_split = shard_split(source.train, *shard) if shard is not None else source.train
    if cfg.balanced_sampling:
        counts = train_split.class_counts(len(source.class_names))
        logger.info("balanced sampling over %d classes (train counts %d-%d)", int(np.sum(counts > 0)),
                    int(counts[counts > 0].min(initial=0)), int(counts.max(initial=0)))
    train = make_split_dataset(train_split, image_size, cfg.batch_size, shuffle=True, cache=cfg.cache,
                               shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                               augmenter=None if placement == "model" else augmenter,
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
                    test=evals.get("test"), test_examples=len(source.test) if source.test is not None else 0,
                    augment_placement=placement)


def take_pixels(ds: tf.data.Dataset, max_examples: int) -> np.ndarray:
    """Up to max_examples images from a batched dataset as a float32 array (for parity checks)."""
    out, n = [], 0
    for x, _ in ds:
        out.append(x.numpy())
        n += len(out[-1])
        if n >= max_examples:
            break
    return np.concatenate(out)[:max_examples] if out else np.zeros((0, 1, 1, 3), np.float32)
