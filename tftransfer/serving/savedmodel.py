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
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import ExportConfig
from tftransfer.core.errors import RunDirError, StorageError
from tftransfer.core.io import disk_errors, fsync_path, fsync_tree, process_alive, removed_on_failure, write_json
from tftransfer.serving.contract import (
    BYTES_INPUT,
    LABELS_FILE,
    MESSAGE_OUTPUT,
    MODEL_CARD_FILE,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    SIGNATURES,
    VALID_OUTPUT,
    base_model_card,
)
from tftransfer.serving.inputs import decode_checked

logger = logging.getLogger(__name__)


# TF Serving only loads children whose names parse as integers, so a dot-prefixed name keeps a half-written
# export invisible to it until the final rename.
_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(rf"^{re.escape(_TMP_PREFIX)}\d+-(\d+)-")  # .tmp-<version>-<pid>-<random>
# An export that failed its check, kept for a look (never cleaned: the user removes it).
_REJECTED_PREFIX = ".rejected-"


def next_version(model_dir: Path) -> int:
    """Returns the largest integer-named subdirectory of model_dir plus one, or 1 if there is none."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return 1
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return max(versions, default=0) + 1


@dataclass(frozen=True)
class StagedExport:
    """A SavedModel written under a dot-name inside its model folder: TF Serving ignores it until it is published."""

    path: Path  # the temporary folder, .tmp-<version>-<pid>-<random>
    model_dir: Path
    version: int  # the number it is published as (or, unless fixed, the first one tried)
    fixed: bool  # an explicit version: published exactly as that or not at all


def export_saved_model(
    model: keras.Model,
    model_dir: str | Path,
    class_names: Sequence[str],
    image_size: int,
    top_k: int = 5,
    *,
    version: int | None = None,
    model_card: Mapping[str, Any] | None = None,
    max_pixels: int = ExportConfig.max_pixels,
) -> Path:
    """Writes model as the next version (or as `version`) under model_dir and returns the version directory.

    `stage_export` and `publish_export` in one step, for a caller that checks nothing in between (the jobs check
    the staged folder before publishing it). An existing version is never overwritten (an explicit `version`
    that exists is a RunDirError).
    """
    staged = stage_export(model, model_dir, class_names, image_size, top_k, version=version, model_card=model_card,
                          max_pixels=max_pixels)
    return publish_export(staged)


def stage_export(
    model: keras.Model,
    model_dir: str | Path,
    class_names: Sequence[str],
    image_size: int,
    top_k: int = 5,
    *,
    version: int | None = None,
    model_card: Mapping[str, Any] | None = None,
    max_pixels: int = ExportConfig.max_pixels,
) -> StagedExport:
    """Writes the SavedModel into a temporary dot-named folder inside model_dir, not yet a version.

    TF Serving loads any integer-named folder as soon as it appears, so the export is checked here and only then
    renamed into place (`publish_export`), or set aside (`reject_export`). A model_card.json goes inside: the input
    contract, classes and versions, plus whatever `model_card` adds (see `build_model_card`). Temporary folders
    left by exporters that died (killed during a check) are removed first. serving_default refuses, per image, one
    whose header declares more than `max_pixels` pixels (see serving.inputs).
    """
    names = _check_export_arguments(model, class_names, image_size, top_k, version, max_pixels)
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise RunDirError(f"export path {model_dir} exists and is not a folder; choose another export folder")
    fixed = version is not None
    if fixed and (model_dir / str(version)).exists():
        raise RunDirError(f"export path {model_dir / str(version)} already exists and exports never overwrite; "
                          f"leave out the version to write the next one ({next_version(model_dir)})")
    with disk_errors(model_dir):
        model_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_exports(model_dir)
        version = version if fixed else next_version(model_dir)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and lock out a TF Serving running as
        # another user. The random suffix keeps a stale temp dir of a crashed run with a reused pid from colliding.
        tmp_dir = model_dir / f"{_TMP_PREFIX}{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp_dir.mkdir()
    with removed_on_failure(tmp_dir):
        k = min(top_k, len(names))
        _write_archive(_build_archive(model, names, image_size, k, int(max_pixels)), tmp_dir)
        labels_text = "".join(f"{name}\n" for name in names)
        with disk_errors(tmp_dir):
            (tmp_dir / "assets").mkdir(exist_ok=True)
            (tmp_dir / "assets" / LABELS_FILE).write_text(labels_text, encoding="utf-8")
            (tmp_dir / LABELS_FILE).write_text(labels_text, encoding="utf-8")
        write_json(tmp_dir / MODEL_CARD_FILE,
                   {**base_model_card(names, image_size, k, int(max_pixels)), **dict(model_card or {})})
    return StagedExport(tmp_dir, model_dir, int(version), fixed)


def _check_export_arguments(model: keras.Model, class_names: Sequence[str], image_size: int, top_k: int,
                            version: int | None, max_pixels: int) -> tuple[str, ...]:
    """The class names, after a ValueError for any argument stage_export cannot use."""
    names = _validate_class_names(class_names)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if version is not None and version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    num_outputs = _num_model_outputs(model, image_size)
    if num_outputs != len(names):
        raise ValueError(
            f"the model outputs {num_outputs} classes but {len(names)} class names were given; "
            "class_names must list one name per model output, in output order"
        )
    return names


def _write_archive(archive: Any, folder: Path) -> None:
    """ExportArchive.write_out, a full or read-only disk a StorageError naming the folder.

    TensorFlow reports a failed write as an OSError or as a ResourceExhausted/PermissionDenied OpError without an
    errno; a write that failed for another reason stays what it was.
    """
    try:
        with disk_errors(folder):
            archive.write_out(str(folder), verbose=False)
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as error:
        raise StorageError(f"cannot write the SavedModel to {folder}: {error.message.splitlines()[0]}; free space "
                           "or choose another export folder") from error


def publish_export(staged: StagedExport, prepare: Callable[[Path], None] | None = None) -> Path:
    """Renames a staged export to its version (the first free one unless fixed) and returns the version folder.

    `prepare(version_dir)` runs on the staged folder before each rename attempt, with the folder it is about to
    become (to write that path into the model card while TF Serving cannot see it yet). On failure the staged
    folder is removed.
    """
    try:
        with disk_errors(staged.model_dir):
            version_dir = _publish(staged.path, staged.model_dir, staged.version, fixed=staged.fixed,
                                   prepare=prepare)
    except BaseException:
        discard_export(staged)
        raise
    logger.info("exported SavedModel version %s to %s", version_dir.name, version_dir)
    return version_dir


def reject_export(staged: StagedExport) -> Path:
    """Moves a staged export that failed its check aside, to a dot-name TF Serving ignores, and returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = staged.model_dir / f"{_REJECTED_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
    os.rename(staged.path, aside)
    return aside


def discard_export(staged: StagedExport) -> None:
    """Removes a staged export (nothing was published)."""
    shutil.rmtree(staged.path, ignore_errors=True)


def clean_stale_exports(model_dir: Path) -> list[Path]:
    """Removes the temporary folders of exporters that no longer run (their pid is gone); returns them."""
    removed = []
    for path in sorted(Path(model_dir).glob(f"{_TMP_PREFIX}*")):
        found = _TMP_NAME.match(path.name)
        if found is None or not path.is_dir() or process_alive(int(found.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.info("removed %s, left by an export that did not finish", path)
    return removed


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
    """Runs encoded JPEG/PNG/GIF/BMP images through serving_default; class_names and message come back as str.

    Each image is judged alone: `valid[i]` False (with zero scores and `message[i]` saying why) for one the export
    refused; the batch itself never fails on a bad image.
    """
    encoded = list(encoded)
    signature = _signature(loaded, SERVING_SIGNATURE)
    if not encoded:
        return _empty_outputs(signature)
    outputs = signature(**{BYTES_INPUT: tf.constant(encoded, dtype=tf.string)})
    result = {key: value.numpy() for key, value in outputs.items()}
    result["class_names"] = np.char.decode(result["class_names"].astype(bytes), "utf-8")
    if MESSAGE_OUTPUT in result:  # absent from exports made before per-image checks
        result[MESSAGE_OUTPUT] = np.char.decode(result[MESSAGE_OUTPUT].astype(bytes), "utf-8")
    return result


def signature_summary(version_dir: str | Path) -> dict[str, dict]:
    """Maps each signature to {"inputs": {name: [dtype, shape]}, "outputs": {...}}; unknown dims are None."""
    loaded = _load(version_dir, required=())
    summary: dict[str, dict] = {}
    for name, signature in sorted(loaded.signatures.items()):
        _, input_specs = signature.structured_input_signature
        summary[name] = {
            "inputs": {key: describe_tensor_spec(spec) for key, spec in sorted(input_specs.items())},
            "outputs": {key: describe_tensor_spec(spec) for key, spec in sorted(signature.structured_outputs.items())},
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


def _build_archive(model: keras.Model, names: tuple[str, ...], image_size: int, k: int, max_pixels: int) -> Any:
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
        # Each image is checked and decoded alone (serving.inputs): a bad one is flagged, the others scored.
        pixels, valid, messages = decode_checked(images, image_size, max_pixels)
        outputs = heads(model(pixels, training=False))
        keep = tf.reshape(valid, [-1, 1])
        return {
            "probabilities": tf.where(keep, outputs["probabilities"], 0.0),
            "classes": tf.where(keep, outputs["classes"], -1),
            "scores": tf.where(keep, outputs["scores"], 0.0),
            "class_names": tf.where(keep, outputs["class_names"], ""),
            VALID_OUTPUT: valid,
            MESSAGE_OUTPUT: messages,
        }

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


def _publish(tmp_dir: Path, model_dir: Path, version: int, fixed: bool = False,
             prepare: Callable[[Path], None] | None = None) -> Path:
    """Renames tmp_dir to the first free version >= version (exactly `version` when fixed) and returns it."""
    while True:
        # Another exporter may have published since we started; never reuse or go below its number.
        if not fixed:
            version = max(version, next_version(model_dir))
        target = model_dir / str(version)
        if not target.exists():
            if prepare is not None:
                prepare(target)
            # What TF Serving loads the moment the name appears must be on the disk, not only in the page cache.
            fsync_tree(tmp_dir)
            try:
                # Linux's rename would also replace an *empty* directory created in the instant since the check
                # above; that loses nothing, and a non-empty one makes rename fail, handled below.
                os.rename(tmp_dir, target)
                fsync_path(model_dir)
                return target
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if fixed:
            raise RunDirError(f"export path {target} already exists and exports never overwrite")
        version += 1


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


def describe_tensor_spec(spec: Any) -> list:
    """[dtype name, shape as a list with None for unknown dims] of a TensorSpec or symbolic tensor."""
    shape = spec.shape.as_list() if spec.shape.rank is not None else None
    return [spec.dtype.name, shape]


# ---------------------------------------------------------------------------------------------------------------
# Signature listing and the fresh-process check


def signature_defs_text(version_dir: str | Path) -> str:
    """The SignatureDef part of `saved_model_cli show --dir DIR --all`, read from saved_model.pb in the same format.

    Reading the protocol buffer shows what TF Serving sees (tensor names, dtypes, shapes, method names) without
    loading the model.
    """
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(version_dir) / "saved_model.pb"
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from exc

    def tensor_lines(kind: str, tensors: Any) -> list[str]:
        lines = [f"  The given SavedModel SignatureDef contains the following {kind}(s):"]
        for key in sorted(tensors):
            info = tensors[key]
            shape = ("unknown_rank" if info.tensor_shape.unknown_rank
                     else "(" + ", ".join(str(d.size) for d in info.tensor_shape.dim) + ")")
            lines += [f"    {kind}s['{key}'] tensor_info:", f"        dtype: {types_pb2.DataType.Name(info.dtype)}",
                      f"        shape: {shape}", f"        name: {info.name}"]
        return lines

    lines: list[str] = []
    for meta in saved.meta_graphs:
        tags = ", ".join(meta.meta_info_def.tags)
        lines += ["", f"MetaGraphDef with tag-set: '{tags}' contains the following SignatureDefs:"]
        for name in sorted(meta.signature_def):
            signature = meta.signature_def[name]
            lines += ["", f"signature_def['{name}']:", *tensor_lines("input", signature.inputs),
                      *tensor_lines("output", signature.outputs), f"  Method name is: {signature.method_name}"]
    return "\n".join(lines) + "\n"


def saved_model_files(version_dir: str | Path) -> list[Path]:
    """saved_model.pb and the variables' files, what a server loads."""
    root = Path(version_dir)
    files = [root / "saved_model.pb", *(p for p in (root / "variables").rglob("*") if p.is_file())]
    return [p for p in files if p.is_file()]


def saved_model_size(version_dir: str | Path) -> int:
    """Bytes of saved_model.pb plus the variables, what a server loads."""
    return int(sum(p.stat().st_size for p in saved_model_files(version_dir)))
