"""parity: moved from tftransfer.serving.savedmodel."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.core.errors import RunDirError, TfTransferError
from tftransfer.core.io import disk_errors, remove_stale
from tftransfer.data.files import make_indexed_dataset
from tftransfer.data.images import decode_and_resize
from tftransfer.data.sources import DataSource, Split
from tftransfer.evaluation.inference import predict_probabilities
from tftransfer.serving.savedmodel import (
    load_exported,
    predict_exported_pixels,
)

logger = logging.getLogger(__name__)

# The fresh-process check's copies of the parity images: <system temp>/tftransfer-parity-<pid>-<random>/
PARITY_TMP_PREFIX = "tftransfer-parity-"
PARITY_TMP_NAME = rf"^{PARITY_TMP_PREFIX}(\d+)-"


class ParityError(TfTransferError):
    """An export disagreed with the Keras model: it was not published; `kept` is where it was set aside."""

    def __init__(self, message: str, parity: dict[str, Any], kept: Path) -> None:
        super().__init__(message)
        self.parity = parity
        self.kept = kept


def check_parity(model: keras.Model, version_dir: str | Path, pixels: np.ndarray, batch_size: int = 64) -> float:
    """Reloads the export and returns the max abs difference between its and the Keras model's probabilities."""
    pixels = np.asarray(pixels, dtype=np.float32)
    exported = predict_exported_pixels(load_exported(version_dir), pixels, batch_size=batch_size)
    if len(pixels) == 0:
        return 0.0
    expected = predict_probabilities(model, pixels, batch_size)
    diff = float(np.max(np.abs(exported - expected)))
    logger.info("export parity for %s: max abs probability difference %.3g", version_dir, diff)
    return diff


def check_parity_fresh_process(model: keras.Model, version_dir: str | Path, pixels: np.ndarray,
                               encoded: Sequence[bytes] = (), tolerance: float = 1e-4,
                               timeout: float = 600) -> dict[str, Any]:
    """Loads the export in a new Python process and compares it with the in-memory Keras model.

    The new process gets `pixels` (through predict_pixels) and `encoded` image bytes (through serving_default);
    here the Keras model sees the same pixels, and the bytes decoded and resized by the training pipeline's
    function. Returns the max abs probability differences, whether they are within `tolerance`, and the
    signature listing (`signature_defs_text`) made in the new process. RunDirError if that process fails.
    """
    pixels = np.asarray(pixels, np.float32)
    encoded = list(encoded)
    image_size = int(pixels.shape[1]) if pixels.ndim == 4 and len(pixels) else None
    # The pid in the name lets the next check remove the copies of one that was killed (SIGKILL skips cleanup).
    remove_stale(Path(tempfile.gettempdir()), PARITY_TMP_NAME)
    with tempfile.TemporaryDirectory(prefix=f"{PARITY_TMP_PREFIX}{os.getpid()}-") as tmp:
        work = Path(tmp)
        with disk_errors(work):
            np.save(work / "pixels.npy", pixels)
            for i, data in enumerate(encoded):
                (work / f"image_{i:06d}").write_bytes(data)
        started = time.perf_counter()
        keras_pixels, keras_bytes = _probe_beside_keras(model, version_dir, work, pixels, encoded, image_size,
                                                        timeout)
        probe = json.loads((work / "probe.json").read_text())
        pixel_probs = np.load(work / "pixels_probs.npy")
        bytes_probs = np.load(work / "bytes_probs.npy")
        bytes_valid = np.load(work / "bytes_valid.npy")
    seconds = time.perf_counter() - started
    pixel_diff = float(np.max(np.abs(pixel_probs - keras_pixels))) if len(pixels) else 0.0
    # Compared where both sides read the image: serving_default refuses what is over export.max_pixels or broken
    compared = bytes_valid.astype(bool) if keras_bytes is not None else np.zeros((0,), bool)
    if keras_bytes is not None:
        compared &= np.isfinite(keras_bytes).all(axis=-1)
    refused = int(np.sum(~bytes_valid.astype(bool)))
    if refused:
        logger.warning("serving_default refused %d of the %d parity images (over export.max_pixels, or not "
                       "decodable); they are left out of its comparison", refused, len(encoded))
    bytes_diff = float(np.max(np.abs(bytes_probs[compared] - keras_bytes[compared]))) if compared.any() else 0.0
    diff = max(pixel_diff, bytes_diff)
    logger.info("fresh-process parity for %s: max abs probability difference %.3g (%d pixel arrays, %d encoded "
                "images, %.1f s)", version_dir, diff, len(pixels), len(encoded), seconds)
    return {"fresh_process": True, "max_abs_diff": diff, "tolerance": float(tolerance), "ok": bool(diff <= tolerance),
            "predict_pixels": {"images": int(len(pixels)), "max_abs_diff": pixel_diff},
            "serving_default": {"images": len(encoded), "refused": refused, "max_abs_diff": bytes_diff},
            "tftransfer_layers_imported": probe["tftransfer_layers_imported"], "seconds": seconds,
            "signatures": probe["signatures"], "signatures_text": probe["signatures_text"]}


def _probe_beside_keras(model: keras.Model, version_dir: str | Path, work: Path, pixels: np.ndarray,
                        encoded: Sequence[bytes], image_size: int | None, timeout: float
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """Runs the probe process on `work` and, while it imports TensorFlow and loads the export, the Keras side
    here; returns the Keras side. RunDirError when the process fails or runs past `timeout`."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "tftransfer.serving.probe", "--probe", str(version_dir), str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        keras_side = _keras_side(model, pixels, encoded, image_size)
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RunDirError(f"checking the export {version_dir} in a fresh process took over {timeout:.0f} s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise RunDirError(f"the export {version_dir} failed in a fresh process (exit {proc.returncode}):\n{tail}")
    return keras_side


def _keras_side(model: keras.Model, pixels: np.ndarray, encoded: Sequence[bytes],
                image_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The Keras model's probabilities on the pixels, and on the bytes decoded by the training pipeline's function."""
    on_pixels = predict_probabilities(model, pixels) if len(pixels) else np.zeros((0,), np.float32)
    if not (encoded and image_size):
        return on_pixels, None
    decoded, readable = [], []
    for data in encoded:
        try:
            decoded.append(decode_and_resize(tf.constant(data), image_size).numpy())
            readable.append(True)
        except tf.errors.OpError:  # serving_default flags it invalid; nothing to compare
            decoded.append(np.zeros((image_size, image_size, 3), np.float32))
            readable.append(False)
    on_bytes = predict_probabilities(model, np.stack(decoded))
    on_bytes[~np.asarray(readable)] = np.nan
    return on_pixels, on_bytes


def spread_indices(n: int, count: int) -> np.ndarray:
    """Up to `count` indices spread evenly over range(n), so a sample covers every class of a class-sorted split."""
    if n == 0 or count <= 0:
        return np.zeros((0,), np.int64)
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def split_batches(split: Split, image_size: int, batch_size: int) -> Any:
    """(indices, pixels) batches of a split, decoded and resized like training does."""

    return make_indexed_dataset(image_size, batch_size, paths=split.paths, images=split.images)


def parity_inputs(source: DataSource | None, image_size: int, count: int) -> tuple[np.ndarray, list[bytes], str]:
    """Real images for the parity check (validation, else training), as pixels and as encoded bytes."""
    split = None
    if source is not None:
        split = source.val if source.val is not None and len(source.val) else source.train
    if split is None or len(split) == 0:
        logger.warning("the run's images are not available; checking parity on random pixels instead")
        pixels = np.random.default_rng(0).integers(0, 256, (count, image_size, image_size, 3)).astype(np.uint8)
        encoded = [tf.io.encode_png(image).numpy() for image in pixels]
        return pixels.astype(np.float32), encoded, "random pixels (the run's data is not available)"
    sub = split.subset(spread_indices(len(split), count))
    index, pixels = next(iter(split_batches(sub, image_size, max(len(sub), 1))))
    index = index.numpy()
    if sub.paths is not None:
        encoded = [Path(sub.paths[i]).read_bytes() for i in index]
    else:
        # Arrays have no file: PNG is lossless, so the bytes decode to exactly these pixels.
        encoded = [tf.io.encode_png(sub.images[i]).numpy() for i in index]
    which = "validation" if split is (source.val if source else None) else "training"
    return pixels.numpy(), encoded, f"{len(index)} {which} images of {source.root}"  # type: ignore[union-attr]

