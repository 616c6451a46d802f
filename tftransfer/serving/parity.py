"""Export parity: the SavedModel against the Keras model, in this process or in a fresh one with TensorFlow alone."""

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


class FreshProcess:
    """The fresh Python process of the parity check, started before the export is written: it imports TensorFlow
    while the SavedModel is traced and saved, then waits for the export's path. The check stays as strict (a new
    process with TensorFlow alone); only TensorFlow's import no longer adds to the export's wall time."""

    def __init__(self) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self._proc = subprocess.Popen([sys.executable, "-m", "tftransfer.serving.probe", "--wait"],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env=env)

    def probe(self, version_dir: str | Path, work: Path, timeout: float) -> None:
        """Has the process check `version_dir` into `work`; RunDirError if it fails or runs past `timeout`."""
        try:
            _, stderr = self._proc.communicate(input=f"{version_dir}\n{work}\n", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RunDirError(f"checking the export {version_dir} in a fresh process took over {timeout:.0f} s"
                              ) from exc
        finally:
            self.close()
        if self._proc.returncode != 0:
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            raise RunDirError(f"the export {version_dir} failed in a fresh process (exit {self._proc.returncode}):"
                              f"\n{tail}")

    def close(self) -> None:
        """Stops the process if it still runs (an export that failed before its check)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> FreshProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_parity_fresh_process(model: keras.Model, version_dir: str | Path, pixels: np.ndarray,
                               encoded: Sequence[bytes] = (), tolerance: float = 1e-4,
                               timeout: float = 600, process: FreshProcess | None = None) -> dict[str, Any]:
    """Loads the export in a new Python process and compares it with the in-memory Keras model.

    The new process gets `pixels` (through predict_pixels) and `encoded` image bytes (through serving_default);
    here the Keras model sees the same pixels, and the bytes decoded and resized by the training pipeline's
    function. `process` is one started earlier (FreshProcess), else one starts now. Returns the max abs
    probability differences, whether they are within `tolerance`, and the signature listing
    (`signature_defs_text`) made in the new process. RunDirError if that process fails.
    """
    pixels = np.asarray(pixels, np.float32)
    encoded = list(encoded)
    image_size = int(pixels.shape[1]) if pixels.ndim == 4 and len(pixels) else None
    # The pid in the name lets the next check remove the copies of one that was killed (SIGKILL skips cleanup).
    remove_stale(Path(tempfile.gettempdir()), PARITY_TMP_NAME)
    with tempfile.TemporaryDirectory(prefix=f"{PARITY_TMP_PREFIX}{os.getpid()}-") as tmp, \
            (process or FreshProcess()) as fresh:
        work = Path(tmp)
        with disk_errors(work):
            np.save(work / "pixels.npy", pixels)
            for i, data in enumerate(encoded):
                (work / f"image_{i:06d}").write_bytes(data)
        started = time.perf_counter()
        # The Keras side runs here while the process loads the export and calls it.
        keras_pixels, keras_bytes = _keras_side(model, pixels, encoded, image_size)
        fresh.probe(version_dir, work, timeout)
        probe = json.loads((work / "probe.json").read_text())
        pixel_probs = np.load(work / "pixels_probs.npy")
        bytes_probs = np.load(work / "bytes_probs.npy")
        bytes_valid = np.load(work / "bytes_valid.npy")
    seconds = time.perf_counter() - started
    return _compare(probe, pixel_probs, bytes_probs, bytes_valid, keras_pixels, keras_bytes, len(encoded),
                    tolerance, seconds, version_dir)


def _compare(probe: dict[str, Any], pixel_probs: np.ndarray, bytes_probs: np.ndarray, bytes_valid: np.ndarray,
             keras_pixels: np.ndarray, keras_bytes: np.ndarray | None, n_encoded: int, tolerance: float,
             seconds: float, version_dir: str | Path) -> dict[str, Any]:
    """The parity entry: both sides' max abs probability differences, and what the fresh process listed."""
    pixel_diff = float(np.max(np.abs(pixel_probs - keras_pixels))) if len(keras_pixels) else 0.0
    # Compared where both sides read the image: serving_default refuses what is over export.max_pixels or broken
    compared = bytes_valid.astype(bool) if keras_bytes is not None else np.zeros((0,), bool)
    if keras_bytes is not None:
        compared &= np.isfinite(keras_bytes).all(axis=-1)
    refused = int(np.sum(~bytes_valid.astype(bool)))
    if refused:
        logger.warning("serving_default refused %d of the %d parity images (over export.max_pixels, or not "
                       "decodable); they are left out of its comparison", refused, n_encoded)
    bytes_diff = float(np.max(np.abs(bytes_probs[compared] - keras_bytes[compared]))) if compared.any() else 0.0
    diff = max(pixel_diff, bytes_diff)
    logger.info("fresh-process parity for %s: max abs probability difference %.3g (%d pixel arrays, %d encoded "
                "images, %.1f s)", version_dir, diff, len(keras_pixels), n_encoded, seconds)
    return {"fresh_process": True, "max_abs_diff": diff, "tolerance": float(tolerance), "ok": bool(diff <= tolerance),
            "predict_pixels": {"images": int(len(keras_pixels)), "max_abs_diff": pixel_diff},
            "serving_default": {"images": n_encoded, "refused": refused, "max_abs_diff": bytes_diff},
            "tftransfer_layers_imported": probe["tftransfer_layers_imported"], "seconds": seconds,
            "signatures": probe["signatures"], "signatures_text": probe["signatures_text"]}


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

