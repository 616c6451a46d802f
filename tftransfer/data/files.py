"""files: moved from tftransfer.jobs.predict."""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.config.commands import MIN_IMAGE_SIDE
from tftransfer.data.images import decode_and_resize, resize_image
from tftransfer.data.probe import IMAGE_EXTENSIONS, probe_images

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Image files


def _expand(item: str) -> tuple[list[Path], str | None]:
    """Image files named by a file, a folder (searched recursively) or a glob; (files, problem)."""
    path = Path(item)
    if path.is_file():
        return [path], None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return files, None if files else f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}"
    if glob.has_magic(item):
        matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
        files: list[Path] = []
        for match in matches:
            files += [match] if match.is_file() else _expand(str(match))[0]
        return files, None if files else f"the pattern {item!r} matches no files"
    return [], f"no such file or folder: {path}"


def collect_images(items: Sequence[str], min_side: int = MIN_IMAGE_SIDE) -> tuple[list[Path], list[tuple[str, str]]]:
    """Resolves files, folders and globs to readable image files; the rest comes back as (path, reason).

    Every file is decoded once with Pillow (as the data listing does), so a text file named .jpg, a truncated
    JPEG or a 1x1 pixel image is skipped with its reason instead of failing a batch.
    """
    seen: set[Path] = set()
    candidates: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        files, problem = _expand(item)
        if problem:
            skipped.append((item, problem))
        for file in files:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                candidates.append(file)
    good: list[Path] = []
    for file, probe in zip(candidates, probe_images(candidates)):
        reason = probe.problem
        if reason is None and min(probe.width, probe.height) < min_side:
            reason = f"image is {probe.width}x{probe.height} px, smaller than the {min_side} px minimum"
        if reason:
            skipped.append((str(file), reason))
        else:
            good.append(file)
    return good, skipped


def make_indexed_dataset(image_size: int, batch_size: int, *, paths: Sequence[str] | None = None,
                         images: np.ndarray | None = None) -> Any:
    """Batches of (example index, float32 pixels) from files or uint8 arrays, resized like training does.

    The index survives a file that only TensorFlow fails to decode (it is dropped), so every prediction stays
    tied to its file.
    """
    import tensorflow as tf


    if (paths is None) == (images is None):
        raise ValueError("pass exactly one of paths and images")
    n = len(paths) if paths is not None else len(images)  # type: ignore[arg-type]
    index = tf.range(n, dtype=tf.int64)
    if paths is not None:
        ds = tf.data.Dataset.from_tensor_slices((index, tf.constant([str(p) for p in paths], tf.string)))
        ds = ds.map(lambda i, p: (i, decode_and_resize(tf.io.read_file(p), image_size)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.ignore_errors()
    else:
        ds = tf.data.Dataset.from_tensor_slices((index, images))
        ds = ds.map(lambda i, x: (i, resize_image(tf.cast(x, tf.float32), image_size)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
