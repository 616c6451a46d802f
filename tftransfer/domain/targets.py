"""A domain's images in memory for the domain report and adaptation: labeled specs, unlabeled folders, and a
run's own source splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.core.errors import DataError
from tftransfer.data.files import make_indexed_dataset
from tftransfer.data.selection import align_classes, select_split
from tftransfer.data.specs import load_source
from tftransfer.runs.finished import FinishedRun, load_run_source
from tftransfer.training.adaptation.target import unlabeled_folder

logger = logging.getLogger(__name__)


@dataclass
class DomainData:
    """One domain's images in memory (float32 [N, S, S, 3] in [0, 255]) with labels in the model's class ids."""

    spec: str
    split: str
    images: np.ndarray
    labels: np.ndarray | None
    files: list[str]
    skipped: list[tuple[str, str]]
    listed: int

    @property
    def labeled(self) -> bool:  # noqa: D102
        return self.labels is not None


def _held_out(source: Any) -> tuple[Any, str]:
    """The test split, else the validation split, else everything (with a warning)."""

    for name in ("test", "val"):
        split = getattr(source, name, None)
        if split is not None and len(split) > 0:
            return split, name
    logger.warning("%s has no held-out split: the source examples include the images the model was trained on, "
                   "so source accuracy is optimistic", source.root)
    return select_split(source, "all")


def _read_pixels(split: Any, image_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded, resized pixels of a split and the indices of the examples TensorFlow could decode."""

    index, pixels = [], []
    dataset = make_indexed_dataset(image_size, batch_size, paths=split.paths,
                                   images=split.images if split.paths is None else None)
    for idx, batch in dataset:
        index.append(idx.numpy())
        pixels.append(batch.numpy().astype(np.float32))
    if not pixels:
        return np.zeros((0, image_size, image_size, 3), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(pixels), np.concatenate(index)


def _cap(split: Any, max_images: int, seed: int, what: str) -> Any:
    if max_images and len(split) > max_images:
        logger.warning("%s: using a random %d of its %d images (max_images)", what, max_images, len(split))
        return split.subset(np.sort(np.random.default_rng(seed).choice(len(split), max_images, replace=False)))
    return split


def load_labeled_domain(spec: str, run: FinishedRun, *, held_out: bool, batch_size: int, max_images: int,
                        seed: int, what: str) -> DomainData:
    """A labeled data spec (folder, manifest, tfds:, builtin:) with labels mapped onto the model's classes.

    held_out: the run's own held-out split of the data (its val_split/test_split settings), else every example.
    """

    cfg = run.data_config
    if held_out:
        source = load_source(spec, cfg.val_split if cfg else 0.2, False, cfg.tfds_data_dir if cfg else "",
                             test_split=getattr(cfg, "test_split", 0.0), stratify=getattr(cfg, "stratify", False),
                             allow_outside_paths=bool(cfg and cfg.allow_outside_paths))
        split, name = _held_out(source)
    else:
        source = load_source(spec, 0.0, False, cfg.tfds_data_dir if cfg else "", test_split=0.0,
                             allow_outside_paths=bool(cfg and cfg.allow_outside_paths))
        split, name = select_split(source, "all")
    mapping = align_classes(run.class_names, source.class_names, f"{what} {spec}")
    split = _cap(split, max_images, seed, f"{what} {spec}")
    images, index = _read_pixels(split, run.image_size, batch_size)
    if len(images) == 0:
        raise DataError(f"{what} {spec}: none of its {len(split)} images could be decoded")
    labels = mapping[np.asarray(split.labels, np.int64)[index]]
    files = [split.keys[i] for i in index]
    return DomainData(spec=spec, split=name, images=images, labels=labels, files=files,
                      skipped=list(source.skipped), listed=len(split))


def load_unlabeled_domain(spec: str, run: FinishedRun, *, batch_size: int, max_images: int, seed: int,
                          what: str = "target") -> DomainData:
    """Every image file under a folder (any layout, labels ignored), or the examples of any other data spec."""

    if Path(spec).is_dir():
        split, skipped = unlabeled_folder(spec, what)
    else:
        source = load_source(spec, 0.0, False, run.data_config.tfds_data_dir if run.data_config else "")
        split, _ = select_split(source, "all")
        skipped = list(source.skipped)
    split = _cap(split, max_images, seed, f"{what} {spec}")
    images, index = _read_pixels(split, run.image_size, batch_size)
    if len(images) == 0:
        raise DataError(f"{what} {spec}: none of its {len(split)} images could be decoded")
    return DomainData(spec=spec, split="all", images=images, labels=None, files=[split.keys[i] for i in index],
                      skipped=skipped, listed=len(split))


def load_source_split(run: FinishedRun, which: str, *, batch_size: int, max_images: int, seed: int
                      ) -> DomainData | None:
    """The run's own training data ("train" or "val" split, as split when it was fitted), labeled; None when the
    data is no longer there or has no such split (load_run_source says why)."""
    source = load_run_source(run.path)
    split = getattr(source, which, None) if source is not None else None
    if split is None or len(split) == 0:
        return None
    split = _cap(split, max_images, seed, f"source {which}")
    images, index = _read_pixels(split, run.image_size, batch_size)
    if len(images) == 0:
        return None
    return DomainData(spec=str(source.root), split=which, images=images,
                      labels=np.asarray(split.labels, np.int64)[index], files=[split.keys[i] for i in index],
                      skipped=list(source.skipped), listed=len(split))
