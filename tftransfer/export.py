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
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.data.images import decode_and_resize
from tftransfer.data.sources import DataSource, Split
from tftransfer.errors import DataError, RunDirError
from tftransfer.workdir import write_json

logger = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "predict_pixels"
SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE)
BYTES_INPUT = "images"
PIXELS_INPUT = "pixels"
OUTPUT_KEYS = ("probabilities", "classes", "scores", "class_names")
LABELS_FILE = "labels.txt"
MODEL_CARD_FILE = "model_card.json"
MODEL_CARD_SCHEMA_VERSION = 1

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
    *,
    version: int | None = None,
    model_card: Mapping[str, Any] | None = None,
) -> Path:
    """Writes model as the next version (or as `version`) under model_dir and returns the version directory.

    The SavedModel is written into a temporary directory inside model_dir and renamed into place, so TF
    Serving never sees a partial version and an existing version is never overwritten (an explicit `version`
    that exists is a RunDirError). A model_card.json goes inside: the input contract, classes and versions,
    plus whatever `model_card` adds (see `build_model_card`).
    """
    names = _validate_class_names(class_names)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if version is not None and version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    num_outputs = _num_model_outputs(model, image_size)
    if num_outputs != len(names):
        raise ValueError(
            f"the model outputs {num_outputs} classes but {len(names)} class names were given; "
            "class_names must list one name per model output, in output order"
        )

    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise RunDirError(f"export path {model_dir} exists and is not a folder; choose another export folder")
    fixed = version is not None
    if fixed and (model_dir / str(version)).exists():
        raise RunDirError(f"export path {model_dir / str(version)} already exists and exports never overwrite; "
                          f"leave out the version to write the next one ({next_version(model_dir)})")
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version if fixed else next_version(model_dir)
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
        card = {**base_model_card(names, image_size, min(top_k, len(names))), **dict(model_card or {})}
        write_json(tmp_dir / MODEL_CARD_FILE, card)
        version_dir = _publish(tmp_dir, model_dir, version, fixed=fixed)
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


def _publish(tmp_dir: Path, model_dir: Path, version: int, fixed: bool = False) -> Path:
    """Renames tmp_dir to the first free version >= version (exactly `version` when fixed) and returns it."""
    while True:
        # Another exporter may have published since we started; never reuse or go below its number.
        if not fixed:
            version = max(version, next_version(model_dir))
        target = model_dir / str(version)
        if not target.exists():
            try:
                # Linux's rename would also replace an *empty* directory created in the instant since the check
                # above; that loses nothing, and a non-empty one makes rename fail, handled below.
                os.rename(tmp_dir, target)
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


def _describe(spec: Any) -> list:
    """[dtype name, shape as a list with None for unknown dims] of a TensorSpec or symbolic tensor."""
    shape = spec.shape.as_list() if spec.shape.rank is not None else None
    return [spec.dtype.name, shape]


# ---------------------------------------------------------------------------------------------------------------
# Model card


def software_versions() -> dict[str, str]:
    """tftransfer, TensorFlow, Keras and Python versions."""
    import tftransfer

    return {"tftransfer": tftransfer.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def input_contract(image_size: int) -> dict[str, Any]:
    """What each signature takes and returns, and what happens to pixels inside the model."""
    return {
        "image_size": int(image_size),
        "signatures": {
            SERVING_SIGNATURE: {BYTES_INPUT: "tf.string [N]: encoded JPEG, PNG, GIF or BMP bytes (REST: "
                                             '{"instances": [{"b64": "<base64 bytes>"}]})'},
            PIXELS_SIGNATURE: {PIXELS_INPUT: "float32 [N, H, W, 3]: RGB pixels in [0, 255], any H and W"},
        },
        "resize": f"bilinear with antialiasing to {image_size} x {image_size}, inside the model",
        "preprocessing": "inside the model (the backbone's own, from raw [0, 255] pixels)",
        "outputs": {"probabilities": "float32 [N, C], softmax over the classes in label order",
                    "classes": "int32 [N, k], top-k class ids", "scores": "float32 [N, k], their probabilities",
                    "class_names": "string [N, k], their names"},
    }


def base_model_card(class_names: Sequence[str], image_size: int, top_k: int) -> dict[str, Any]:
    """The part of model_card.json every export has, with or without a run directory behind it."""
    return {
        "schema_version": MODEL_CARD_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(class_names),
        "num_classes": len(class_names),
        "top_k": int(top_k),
        "input": input_contract(image_size),
        "versions": software_versions(),
    }


def _weights_origin(weights: str) -> dict[str, Any]:
    """Where the backbone's starting weights came from; a local file is identified by its sha256."""
    from tftransfer.features import file_hash

    if weights.lower() == "imagenet":
        return {"value": weights, "origin": "keras.applications ImageNet weights (Keras cache or download)"}
    if weights.lower() == "none":
        return {"value": weights, "origin": "random initialisation (trained from scratch)"}
    path = Path(weights)
    return {"value": weights, "origin": "local weights file",
            "sha256": file_hash(path) if path.is_file() else None}


_CARD_METRICS = ("num_examples", "accuracy", "balanced_accuracy", "macro_f1", "top_k_accuracy", "log_loss", "ece",
                 "mean_confidence")


def build_model_card(run_dir: str | Path, val_metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run-specific part of model_card.json: backbone, weights origin, training data, validation metrics.

    Reads config.yaml, split.json and (for the metrics, unless `val_metrics` is given) metrics.json of the run.
    `fit` can call it before metrics.json exists by passing its final validation metrics.
    """
    from tftransfer import backbones
    from tftransfer.config import read_yaml
    from tftransfer.errors import BackboneError
    from tftransfer.workdir import RunDir, read_json

    run = RunDir(Path(run_dir))
    cfg = read_yaml(run.config)
    model_cfg = cfg.get("model") or {}
    split = read_json(run.split) if run.split.is_file() else {}
    if val_metrics is None and run.metrics.is_file():
        val_metrics = (read_json(run.metrics).get("final") or {}).get("val")
    name = str(model_cfg.get("backbone", ""))
    try:
        spec = backbones.get_backbone_spec(name)
        family, preprocess = spec.family, spec.preprocess_mode
    except BackboneError:
        family = preprocess = None
    return {
        "name": cfg.get("name") or run.path.name,
        "run_dir": str(run.path.resolve()),
        "backbone": {"name": name, "family": family, "preprocess": preprocess,
                     "kwargs": model_cfg.get("backbone_kwargs") or {}, "pooling": model_cfg.get("pooling"),
                     "dropout": model_cfg.get("dropout")},
        "weights": _weights_origin(str(model_cfg.get("weights", ""))),
        "training_data": {"source": split.get("source"), "split_method": split.get("method"),
                          "fingerprint": split.get("fingerprint"), "train_examples": len(split.get("train") or []),
                          "val_examples": len(split.get("val") or [])},
        "validation_metrics": ({key: val_metrics.get(key) for key in _CARD_METRICS if key in val_metrics}
                               if val_metrics else None),
    }


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


def _keras_probabilities(model: keras.Model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Softmax of the Keras model's logits, in float32, batch by batch."""
    return np.concatenate(
        [
            tf.nn.softmax(tf.cast(model(pixels[start : start + batch_size], training=False), tf.float32)).numpy()
            for start in range(0, len(pixels), batch_size)
        ],
        axis=0,
    )


def _probe_main(version_dir: str, work: str) -> None:
    """Runs in the fresh process: loads the export (no tftransfer.layers), lists and calls its signatures."""
    work_dir = Path(work)
    text = signature_defs_text(version_dir)
    loaded = load_exported(version_dir)
    summary = {name: {"inputs": {k: _describe(v) for k, v in sorted(sig.structured_input_signature[1].items())},
                      "outputs": {k: _describe(v) for k, v in sorted(sig.structured_outputs.items())}}
               for name, sig in sorted(loaded.signatures.items())}
    np.save(work_dir / "pixels_probs.npy", predict_exported_pixels(loaded, np.load(work_dir / "pixels.npy")))
    encoded = [p.read_bytes() for p in sorted(work_dir.glob("image_*"))]
    batches = [predict_exported_bytes(loaded, encoded[i : i + 32])["probabilities"] for i in range(0, len(encoded), 32)]
    np.save(work_dir / "bytes_probs.npy", np.concatenate(batches) if batches else np.zeros((0, 0), np.float32))
    (work_dir / "probe.json").write_text(json.dumps({
        "signatures_text": text, "signatures": summary,
        # The export must run on TensorFlow alone, as in TF Serving.
        "tftransfer_layers_imported": "tftransfer.layers" in sys.modules,
    }))


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
    with tempfile.TemporaryDirectory(prefix="tftransfer-parity-") as tmp:
        work = Path(tmp)
        np.save(work / "pixels.npy", pixels)
        for i, data in enumerate(encoded):
            (work / f"image_{i:06d}").write_bytes(data)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "tftransfer.export", "--probe", str(version_dir), tmp],
                                  capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RunDirError(f"checking the export {version_dir} in a fresh process took over {timeout:.0f} s") \
                from exc
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RunDirError(f"the export {version_dir} failed in a fresh process (exit {proc.returncode}):\n{tail}")
        probe = json.loads((work / "probe.json").read_text())
        pixel_probs = np.load(work / "pixels_probs.npy")
        bytes_probs = np.load(work / "bytes_probs.npy")
    seconds = time.perf_counter() - started
    pixel_diff = float(np.max(np.abs(pixel_probs - _keras_probabilities(model, pixels)))) if len(pixels) else 0.0
    bytes_diff = 0.0
    if encoded and image_size:
        decoded = tf.stack([decode_and_resize(tf.constant(data), image_size) for data in encoded]).numpy()
        bytes_diff = float(np.max(np.abs(bytes_probs - _keras_probabilities(model, decoded))))
    diff = max(pixel_diff, bytes_diff)
    logger.info("fresh-process parity for %s: max abs probability difference %.3g (%d pixel arrays, %d encoded "
                "images, %.1f s)", version_dir, diff, len(pixels), len(encoded), seconds)
    return {"fresh_process": True, "max_abs_diff": diff, "tolerance": float(tolerance), "ok": bool(diff <= tolerance),
            "predict_pixels": {"images": int(len(pixels)), "max_abs_diff": pixel_diff},
            "serving_default": {"images": len(encoded), "max_abs_diff": bytes_diff},
            "tftransfer_layers_imported": probe["tftransfer_layers_imported"], "seconds": seconds,
            "signatures": probe["signatures"], "signatures_text": probe["signatures_text"]}


# ---------------------------------------------------------------------------------------------------------------
# The `tftransfer export` job


@dataclass
class ExportResult:
    """What export_run wrote and measured."""

    version_dir: Path
    card: dict[str, Any]
    parity: dict[str, Any]
    tflite: dict[str, Any] | None = None

    @property
    def signatures_text(self) -> str:
        """The `saved_model_cli show --all`-style signature listing, made in the fresh process."""
        return self.parity["signatures_text"]


def saved_model_size(version_dir: str | Path) -> int:
    """Bytes of saved_model.pb plus the variables, what a server loads."""
    root = Path(version_dir)
    files = [root / "saved_model.pb", *(p for p in (root / "variables").rglob("*") if p.is_file())]
    return int(sum(p.stat().st_size for p in files if p.is_file()))


def _spread(n: int, count: int) -> np.ndarray:
    """Up to `count` indices spread evenly over range(n), so a sample covers every class of a class-sorted split."""
    if n == 0 or count <= 0:
        return np.zeros((0,), np.int64)
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def _split_batches(split: Split, image_size: int, batch_size: int) -> Any:
    """(indices, pixels) batches of a split, decoded and resized like training does."""
    from tftransfer.predict import make_indexed_dataset

    return make_indexed_dataset(image_size, batch_size, paths=split.paths, images=split.images)


def _parity_inputs(source: DataSource | None, image_size: int, count: int) -> tuple[np.ndarray, list[bytes], str]:
    """Real images for the parity check (validation, else training), as pixels and as encoded bytes."""
    split = None
    if source is not None:
        split = source.val if source.val is not None and len(source.val) else source.train
    if split is None or len(split) == 0:
        logger.warning("the run's images are not available; checking parity on random pixels instead")
        pixels = np.random.default_rng(0).integers(0, 256, (count, image_size, image_size, 3)).astype(np.uint8)
        encoded = [tf.io.encode_png(image).numpy() for image in pixels]
        return pixels.astype(np.float32), encoded, "random pixels (the run's data is not available)"
    sub = split.subset(_spread(len(split), count))
    index, pixels = next(iter(_split_batches(sub, image_size, max(len(sub), 1))))
    index = index.numpy()
    if sub.paths is not None:
        encoded = [Path(sub.paths[i]).read_bytes() for i in index]
    else:
        # Arrays have no file: PNG is lossless, so the bytes decode to exactly these pixels.
        encoded = [tf.io.encode_png(sub.images[i]).numpy() for i in index]
    which = "validation" if split is (source.val if source else None) else "training"
    return pixels.numpy(), encoded, f"{len(index)} {which} images of {source.root}"  # type: ignore[union-attr]


def export_tflite(model: keras.Model, version_dir: str | Path, image_size: int, mode: str,
                  source: DataSource | None, loaded: Any = None, representative_images: int = 100,
                  batch_size: int = 32) -> dict[str, Any]:
    """Writes <version_dir>/model_<mode>.tflite and compares it with the SavedModel on the validation split.

    int8 calibrates on `representative_images` training images spread over the split. Returns sizes, the
    conversion time and (when validation images exist) both accuracies, their difference, top-1 agreement and
    the max abs probability difference.
    """
    from tftransfer import tflite as tfl

    version_dir = Path(version_dir)
    representative = None
    used = 0
    if mode == "int8":
        if source is None or len(source.train) == 0:
            raise DataError("int8 quantization calibrates on training images, and the run's training data is not "
                            "available; restore it at the path in config.yaml or choose float32/float16/dynamic")
        sub = source.train.subset(_spread(len(source.train), representative_images))
        pixels = np.concatenate([p.numpy() for _, p in _split_batches(sub, image_size, batch_size)])
        representative = tfl.representative_from_pixels(pixels)
        used = len(pixels)
    started = time.perf_counter()
    flatbuffer = tfl.convert_to_tflite(model, image_size, mode, representative)
    seconds = time.perf_counter() - started
    path = version_dir / tfl.tflite_filename(mode)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(flatbuffer)
    os.replace(tmp, path)
    reference_size = saved_model_size(version_dir)
    entry: dict[str, Any] = {
        "mode": mode, "file": str(path), "size_bytes": len(flatbuffer), "saved_model_size_bytes": reference_size,
        "size_ratio": len(flatbuffer) / reference_size if reference_size else None,
        "conversion_seconds": seconds, "representative_images": used or None,
        "input": f"float32 [N, {image_size}, {image_size}, 3] RGB pixels in [0, 255], already resized "
                 "(bilinear with antialiasing); preprocessing is inside",
        "output": "float32 [N, C] probabilities",
        "comparison": None, "evaluated_on": None,
    }
    val = source.val if source is not None else None
    if val is None or len(val) == 0:
        logger.warning("no validation images: the TFLite model's accuracy was not measured")
        return entry
    loaded = loaded if loaded is not None else load_exported(version_dir)
    interpreter = tfl.load_interpreter(flatbuffer)
    labels, lite, reference = [], [], []
    for index, pixels in _split_batches(val, image_size, batch_size):
        labels.append(val.labels[index.numpy()])
        lite.append(tfl.predict_tflite(interpreter, pixels.numpy(), batch_size=batch_size))
        reference.append(predict_exported_pixels(loaded, pixels.numpy(), batch_size=batch_size))
    comparison = tfl.compare_with_reference(np.concatenate(lite), np.concatenate(reference), np.concatenate(labels))
    entry.update(comparison=comparison, evaluated_on=f"validation split of {source.root}")  # type: ignore[union-attr]
    logger.info("TFLite %s: %d bytes (SavedModel %d), accuracy %.4f vs SavedModel %.4f on %d validation images",
                mode, len(flatbuffer), reference_size, comparison["accuracy"], comparison["reference_accuracy"],
                comparison["examples"])
    return entry


def export_run(run_dir: str | Path, *, model_dir: str | Path | None = None, version: int | None = None,
               tflite: str | None = None, top_k: int | None = None, parity_images: int = 32,
               representative_images: int = 100, batch_size: int = 32) -> ExportResult:
    """The `tftransfer export` job: a finished run -> the next SavedModel version, checked and described.

    Writes <export.dir>/<name>/<version>/ (or under `model_dir`) with model_card.json, checks it against the
    run's model.keras in a fresh process on real validation images (pixels and encoded bytes), and with `tflite`
    adds model_<mode>.tflite with its size and accuracy against the SavedModel.
    """
    from tftransfer.config import read_yaml
    from tftransfer.predict import load_run_model, load_run_source, read_labels, run_image_size
    from tftransfer.tflite import TFLITE_MODES
    from tftransfer.workdir import RunDir, read_json

    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise RunDirError(f"run directory not found: {run.path}")
    if not run.config.is_file():
        raise RunDirError(f"{run.path} is not a tftransfer run directory (no config.yaml)")
    if tflite is not None and tflite not in TFLITE_MODES:
        raise ValueError(f"unknown TFLite mode {tflite!r}; choose one of {', '.join(TFLITE_MODES)}")
    cfg = read_yaml(run.config)
    export_cfg = cfg.get("export") or {}
    target = Path(model_dir) if model_dir is not None else \
        Path(export_cfg.get("dir") or "saved_models") / str(cfg.get("name") or run.path.name)
    if version is not None and (target / str(version)).exists():
        raise RunDirError(f"export path {target / str(version)} already exists and exports never overwrite; "
                          f"leave out --version to write the next one ({next_version(target)})")
    model = load_run_model(run.path)
    names = read_labels(run.labels)
    image_size = run_image_size(run.path)
    source = load_run_source(run.path)
    if tflite == "int8" and source is None:
        raise DataError(f"--tflite int8 calibrates on the run's training images, which are not available (see "
                        f"data.path in {run.config}); restore them or choose float32, float16 or dynamic")
    top_k = top_k or int(export_cfg.get("top_k", 5))
    tolerance = float(export_cfg.get("parity_tolerance", 1e-4))

    version_dir = export_saved_model(model, target, names, image_size, top_k, version=version,
                                     model_card=build_model_card(run.path))
    pixels, encoded, described = _parity_inputs(source, image_size, parity_images)
    parity = check_parity_fresh_process(model, version_dir, pixels, encoded, tolerance=tolerance)
    parity["data"] = described
    if not parity["ok"]:
        logger.error("the export %s disagrees with %s: max abs probability difference %.2e > %.0e", version_dir,
                     run.model, parity["max_abs_diff"], tolerance)
    tflite_entry = None
    if tflite is not None:
        tflite_entry = export_tflite(model, version_dir, image_size, tflite, source,
                                     representative_images=representative_images, batch_size=batch_size)
    card = read_json(version_dir / MODEL_CARD_FILE)
    card["export"] = {"path": str(version_dir), "version": int(version_dir.name),
                      "saved_model_size_bytes": saved_model_size(version_dir),
                      "parity": {k: v for k, v in parity.items() if k != "signatures_text"}}
    card["tflite"] = tflite_entry
    write_json(version_dir / MODEL_CARD_FILE, card)
    return ExportResult(version_dir, card, parity, tflite_entry)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        _probe_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m tftransfer.export --probe VERSION_DIR WORK_DIR (used by check_parity_fresh_process)")
