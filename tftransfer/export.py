"""Exports trained models as versioned SavedModels that TF Serving can load, and checks them after reloading.

Layout written by `export_saved_model` (what TF Serving's file-system source polls):

    saved_models/<name>/<version>/saved_model.pb
                                 /variables/...
                                 /assets/labels.txt
                                 /labels.txt

Two signatures are exported: "serving_default" takes encoded image bytes (what the REST API's
`{"b64": ...}` instances turn into) and "predict_pixels" takes float32 pixels in [0, 255]. Both return
probabilities, top-k class ids, top-k scores and top-k class names; the class names are a constant inside the
graph, so a served model never depends on a labels file being found at run time.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.data.images import decode_and_resize
from tftransfer.errors import RunDirError

logger = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "predict_pixels"
SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE)
BYTES_INPUT = "images"
PIXELS_INPUT = "pixels"
OUTPUT_KEYS = ("probabilities", "classes", "scores", "class_names")
LABELS_FILE = "labels.txt"

# TF Serving only loads children whose names parse as integers, so a dot-prefixed name keeps a half-written
# export invisible to it until the final rename.
_TMP_PREFIX = ".tmp-"


def next_version(model_dir: Path) -> int:
    """Returns the largest integer-named subdirectory of model_dir plus one, or 1 if there is none."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return 1
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return max(versions, default=0) + 1


def export_saved_model(
    model: keras.Model,
    model_dir: str | Path,
    class_names: Sequence[str],
    image_size: int,
    top_k: int = 5,
) -> Path:
    """Writes model as the next version under model_dir and returns the version directory.

    The SavedModel is written into a temporary directory inside model_dir and renamed into place, so TF
    Serving never sees a partial version and an existing version is never overwritten.
    """
    names = _validate_class_names(class_names)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    num_outputs = _num_model_outputs(model, image_size)
    if num_outputs != len(names):
        raise ValueError(
            f"the model outputs {num_outputs} classes but {len(names)} class names were given; "
            "class_names must list one name per model output, in output order"
        )

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and lock out a TF Serving running as
    # another user. The random suffix keeps a stale temp dir of a crashed run with a reused pid from colliding.
    tmp_dir = model_dir / f"{_TMP_PREFIX}{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        archive = _build_archive(model, names, image_size, min(top_k, len(names)))
        archive.write_out(str(tmp_dir), verbose=False)
        labels_text = "".join(f"{name}\n" for name in names)
        (tmp_dir / "assets").mkdir(exist_ok=True)
        (tmp_dir / "assets" / LABELS_FILE).write_text(labels_text, encoding="utf-8")
        (tmp_dir / LABELS_FILE).write_text(labels_text, encoding="utf-8")
        version_dir = _publish(tmp_dir, model_dir, version)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("exported SavedModel version %s to %s", version_dir.name, version_dir)
    return version_dir


def load_exported(version_dir: str | Path) -> Any:
    """Loads an exported version with tf.saved_model.load; RunDirError if it is missing or lacks a signature."""
    return _load(version_dir, required=SIGNATURES)


def predict_exported_pixels(loaded: Any, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Returns float32 [N, C] probabilities for [N, H, W, 3] pixels in [0, 255] via the predict_pixels signature."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must have shape [N, H, W, 3], got {pixels.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    signature = _signature(loaded, PIXELS_SIGNATURE)
    if len(pixels) == 0:
        # TF's CPU Conv2D mis-shapes empty batches, so an empty call would fail inside the graph.
        return _empty_outputs(signature)["probabilities"]
    batches = [
        signature(**{PIXELS_INPUT: tf.constant(pixels[start : start + batch_size])})["probabilities"].numpy()
        for start in range(0, len(pixels), batch_size)
    ]
    return np.concatenate(batches, axis=0)


def predict_exported_bytes(loaded: Any, encoded: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Runs encoded JPEG/PNG/GIF/BMP images through serving_default; class_names come back as str."""
    encoded = list(encoded)
    signature = _signature(loaded, SERVING_SIGNATURE)
    if not encoded:
        return _empty_outputs(signature)
    outputs = signature(**{BYTES_INPUT: tf.constant(encoded, dtype=tf.string)})
    result = {key: value.numpy() for key, value in outputs.items()}
    result["class_names"] = np.char.decode(result["class_names"].astype(bytes), "utf-8")
    return result


def check_parity(model: keras.Model, version_dir: str | Path, pixels: np.ndarray, batch_size: int = 64) -> float:
    """Reloads the export and returns the max abs difference between its and the Keras model's probabilities."""
    pixels = np.asarray(pixels, dtype=np.float32)
    exported = predict_exported_pixels(load_exported(version_dir), pixels, batch_size=batch_size)
    if len(pixels) == 0:
        return 0.0
    expected = np.concatenate(
        [
            tf.nn.softmax(tf.cast(model(pixels[start : start + batch_size], training=False), tf.float32)).numpy()
            for start in range(0, len(pixels), batch_size)
        ],
        axis=0,
    )
    diff = float(np.max(np.abs(exported - expected)))
    logger.info("export parity for %s: max abs probability difference %.3g", version_dir, diff)
    return diff


def signature_summary(version_dir: str | Path) -> dict[str, dict]:
    """Maps each signature to {"inputs": {name: [dtype, shape]}, "outputs": {...}}; unknown dims are None."""
    loaded = _load(version_dir, required=())
    summary: dict[str, dict] = {}
    for name, signature in sorted(loaded.signatures.items()):
        _, input_specs = signature.structured_input_signature
        summary[name] = {
            "inputs": {key: _describe(spec) for key, spec in sorted(input_specs.items())},
            "outputs": {key: _describe(spec) for key, spec in sorted(signature.structured_outputs.items())},
        }
    return summary


def _validate_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Checks that class names can be stored in the graph and in a one-per-line labels file."""
    if isinstance(class_names, (str, bytes)):
        raise TypeError("class_names must be a sequence of names, not a single string")
    names = tuple(class_names)
    if not names:
        raise ValueError("class_names is empty; an export needs one name per model output")
    for name in names:
        if not isinstance(name, str) or not name or "\n" in name or "\r" in name:
            raise ValueError(f"class names must be non-empty single-line strings, got {name!r}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"class_names has duplicates: {duplicates}")
    return names


def _num_model_outputs(model: keras.Model, image_size: int) -> int:
    """Returns the size of the model's last output axis."""
    try:
        return int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError):
        # Subclassed models have no static output_shape; one small call answers the question.
        logits = model(np.zeros((1, image_size, image_size, 3), np.float32), training=False)
        return int(logits.shape[-1])


def _build_archive(model: keras.Model, names: tuple[str, ...], image_size: int, k: int) -> Any:
    """Builds an ExportArchive with the serving_default (bytes) and predict_pixels endpoints.

    Typed Any: keras.export.ExportArchive() returns a backend class (TFExportArchive) that is not a subclass
    of keras.export.ExportArchive.
    """

    def heads(logits: tf.Tensor) -> dict[str, tf.Tensor]:
        # Softmax in float32 even for mixed-precision models, so probabilities sum to 1 within 1e-6.
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=k)
        # Created inside the trace, so the labels are a Const node of each signature's graph.
        labels = tf.constant(names, dtype=tf.string, name="class_names")
        return {
            "probabilities": probabilities,
            "classes": tf.cast(classes, tf.int32),
            "scores": scores,
            "class_names": tf.gather(labels, classes),
        }

    def serve_bytes(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # map_fn because a batch mixes image sizes; each is resized exactly like the training pipeline does.
        pixels = tf.map_fn(
            lambda encoded: decode_and_resize(encoded, image_size),
            images,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return heads(model(pixels, training=False))

    def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return heads(model(pixels, training=False))

    archive = keras.export.ExportArchive()
    archive.track(model)
    # Naming the bytes endpoint "serving_default" stops ExportArchive from aliasing the first endpoint to it.
    archive.add_endpoint(
        SERVING_SIGNATURE,
        serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
    )
    archive.add_endpoint(
        PIXELS_SIGNATURE,
        serve_pixels,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name=PIXELS_INPUT)],
    )
    return archive


def _publish(tmp_dir: Path, model_dir: Path, version: int) -> Path:
    """Renames tmp_dir to the first free version >= version and returns it."""
    while True:
        # Another exporter may have published since we started; never reuse or go below its number.
        version = max(version, next_version(model_dir))
        target = model_dir / str(version)
        if target.exists():
            version += 1
            continue
        try:
            # Linux's rename would also replace an *empty* directory created in the instant since the check
            # above; that loses nothing, and a non-empty one makes rename fail, handled below.
            os.rename(tmp_dir, target)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                version += 1
                continue
            raise
        return target


def _load(version_dir: str | Path, required: Sequence[str]) -> Any:
    """Loads a SavedModel directory, turning the ways it can be missing into RunDirError."""
    path = Path(version_dir)
    if not path.is_dir():
        raise RunDirError(f"exported model not found: {path} is not a directory")
    if not (path / "saved_model.pb").is_file():
        raise RunDirError(f"{path} is not a SavedModel: saved_model.pb is missing")
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise RunDirError(f"cannot load the SavedModel at {path}: {error}") from error
    for name in required:
        if name not in loaded.signatures:
            raise RunDirError(
                f"the SavedModel at {path} has no {name!r} signature (found {sorted(loaded.signatures)}); "
                "re-export it with tftransfer"
            )
    return loaded


def _signature(loaded: Any, name: str) -> Any:
    """Returns a signature of a loaded SavedModel or raises RunDirError naming it."""
    signatures = getattr(loaded, "signatures", {})
    if name not in signatures:
        raise RunDirError(f"the loaded SavedModel has no {name!r} signature (found {sorted(signatures)})")
    return signatures[name]


def _empty_outputs(signature: Any) -> dict[str, np.ndarray]:
    """Zero-row outputs shaped from the signature's static output shapes."""
    result = {}
    for key, spec in signature.structured_outputs.items():
        shape = [0] + [dim or 0 for dim in spec.shape.as_list()[1:]]
        dtype = str if spec.dtype == tf.string else spec.dtype.as_numpy_dtype
        result[key] = np.zeros(shape, dtype=dtype)
    return result


def _describe(spec: Any) -> list:
    """[dtype name, shape as a list with None for unknown dims] of a TensorSpec or symbolic tensor."""
    shape = spec.shape.as_list() if spec.shape.rank is not None else None
    return [spec.dtype.name, shape]
