"""The unlabeled target domain: listing it, and the tf.data streams the adaptive trainer draws from.

Target examples carry their index in place of a label: the trainer never sees target labels (pseudo-labels are
looked up by index), and the true labels, when the data has them, stay outside the graph for evaluation only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import DataConfig
from tftransfer.core.errors import DataError
from tftransfer.data.files import collect_images
from tftransfer.data.pipeline import make_split_dataset
from tftransfer.data.selection import align_classes, select_split
from tftransfer.data.sources import Split
from tftransfer.data.specs import load_source

logger = logging.getLogger(__name__)


@dataclass
class TargetDomain:
    """The target images (as a Split whose labels are the examples' indices) and their true labels, if known."""

    spec: str
    split: Split
    labels: np.ndarray | None
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.split)


def load_target(spec: str, class_names: list[str], cfg: DataConfig, *, max_images: int = 0,
                seed: int = 0) -> TargetDomain:
    """Every example of `spec`. Labels are kept (for evaluation) when its classes are among `class_names`.

    A folder whose subfolders are not the source's classes (or that has none) is read as unlabeled images.
    """

    if not spec:
        raise DataError("adapt.target: no target data given (--target DATA)")
    labels: np.ndarray | None = None
    try:
        source = load_source(spec, 0.0, cfg.strict, cfg.tfds_data_dir, test_split=0.0,
                             allow_outside_paths=cfg.allow_outside_paths)
    except DataError as exc:
        if not Path(spec).is_dir():
            raise DataError(f"adapt.target: {exc}") from None
        split, skipped = unlabeled_folder(spec)
    else:
        split, _ = select_split(source, "all")
        skipped = list(source.skipped)
        try:
            mapping = align_classes(class_names, source.class_names, f"target {spec}")
            labels = mapping[np.asarray(split.labels, np.int64)]
        except DataError:
            logger.info("target %s: its classes are not the source's; its images are used without labels", spec)
    if len(split) == 0:
        raise DataError(f"adapt.target: {spec} has no readable images")
    if max_images and len(split) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(split), max_images, replace=False))
        split = split.subset(keep)
        labels = labels[keep] if labels is not None else None
    indexed = Split(labels=np.arange(len(split), dtype=np.int64), keys=split.keys, paths=split.paths,
                    images=split.images, domains=split.domains, headers=split.headers)
    logger.info("target %s: %d images%s", spec, len(indexed), " (labels kept for evaluation only)"
                if labels is not None else " (unlabeled)")
    return TargetDomain(spec=spec, split=indexed, labels=labels, skipped=skipped)


def unlabeled_folder(spec: str, what: str = "adapt.target") -> tuple[Split, list[tuple[str, str]]]:
    """Every readable image under a folder, in any layout, as a Split with placeholder labels; and the skipped."""

    files, skipped = collect_images([spec])
    if not files:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped[:5])
        raise DataError(f"{what} {spec}: no readable images ({len(skipped)} skipped: {reasons})")
    root = Path(spec)
    keys = [f.relative_to(root).as_posix() for f in files]
    split = Split(labels=np.zeros(len(files), np.int64), keys=keys, paths=[str(f) for f in files])
    return split, [(str(p), why) for p, why in skipped]


def target_stream(target: TargetDomain, image_size: int, cfg: DataConfig, *, seed: int,
                  augmenter=None) -> tf.data.Dataset:
    """Endless shuffled (pixels, index) batches: zipped with the finite source batches, the shorter side repeats.

    Keras starts a new iterator every epoch and the source ends first, so a cache filled during training would be
    left incomplete, discarded and the target decoded again every epoch; one pass here completes it up front.
    """
    ds = make_split_dataset(target.split, image_size, cfg.batch_size, shuffle=True, cache=cfg.cache,
                            shuffle_buffer=cfg.shuffle_buffer, seed=seed + 1, augmenter=augmenter, name="target")
    if cfg.cache != "none":
        for _ in ds:
            pass
    return ds.repeat()


def target_ordered(target: TargetDomain, image_size: int, cfg: DataConfig) -> tf.data.Dataset:
    """(pixels, index) batches in order, un-augmented: for features and evaluation passes."""
    return make_split_dataset(target.split, image_size, cfg.batch_size, shuffle=False, cache=cfg.cache,
                              name="target-eval")


def feature_stream(features: np.ndarray, index: np.ndarray, batch_size: int, *, seed: int,
                   shuffle_buffer: int) -> tf.data.Dataset:
    """Endless shuffled (feature, index) batches from cached target features."""
    ds = tf.data.Dataset.from_tensor_slices((features, index))
    ds = ds.shuffle(min(shuffle_buffer, max(len(index), 1)), seed=seed + 1, reshuffle_each_iteration=True)
    return ds.repeat().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def feature_ordered(features: np.ndarray, index: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """(feature, index) batches in order."""
    return tf.data.Dataset.from_tensor_slices((features, index)).batch(4 * batch_size)
