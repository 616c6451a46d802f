"""selection: moved from tftransfer.jobs.evaluate."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from tftransfer.core.errors import DataError
from tftransfer.data.sources import DataSource, Split

logger = logging.getLogger(__name__)


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
