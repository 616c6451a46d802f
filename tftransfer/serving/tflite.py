"""tflite: moved from tftransfer.serving.savedmodel."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema_fb
from tensorflow.lite.tools import flatbuffer_utils

from tftransfer.core.errors import DataError
from tftransfer.data.sources import DataSource
from tftransfer.serving import tflite as tfl
from tftransfer.serving.parity import split_batches, spread_indices
from tftransfer.serving.savedmodel import load_exported, predict_exported_pixels, saved_model_size

logger = logging.getLogger(__name__)


def export_tflite(model: keras.Model, version_dir: str | Path, image_size: int, mode: str,
                  source: DataSource | None, loaded: Any = None, representative_images: int = 100,
                  batch_size: int = 32, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes <version_dir>/model_<mode>.tflite and compares it with the SavedModel on the validation split.

    int8 modes calibrate on `representative_images` training images spread over the split; `labels` are embedded
    in the file (embed_labels). Returns sizes, the conversion time, the input and output tensors and (when
    validation images exist) both accuracies, their difference, top-1 agreement and the max abs probability
    difference.
    """

    version_dir = Path(version_dir)
    representative = None
    used = 0
    if mode in CALIBRATED_MODES:
        if source is None or len(source.train) == 0:
            raise DataError(f"{mode} quantization calibrates on training images, and the run's training data is "
                            "not available; restore it at the path in config.yaml or choose float32/float16/dynamic")
        representative, used = representative_from_source(source, image_size, representative_images, batch_size)
    started = time.perf_counter()
    flatbuffer = tfl.convert_to_tflite(model, image_size, mode, representative)
    if labels is not None:
        flatbuffer = embed_labels(flatbuffer, labels)
    seconds = time.perf_counter() - started
    path = version_dir / tfl.tflite_filename(mode)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(flatbuffer)
    os.replace(tmp, path)
    reference_size = saved_model_size(version_dir)
    interpreter = tfl.load_interpreter(flatbuffer)
    entry: dict[str, Any] = {
        "mode": mode, "file": str(path), "size_bytes": len(flatbuffer), "saved_model_size_bytes": reference_size,
        "size_ratio": len(flatbuffer) / reference_size if reference_size else None,
        "conversion_seconds": seconds, "representative_images": used or None,
        "input": _describe(interpreter.get_input_details()[0], f"[N, {image_size}, {image_size}, 3] RGB pixels in "
                           "[0, 255], already resized (bilinear with antialiasing); preprocessing is inside"),
        "output": _describe(interpreter.get_output_details()[0], "[N, C] probabilities"),
        "labels": f"{LABELS_METADATA} metadata entry and {LABELS_FILE} appended as a zip" if labels else None,
        "comparison": None, "evaluated_on": None,
    }
    val = source.val if source is not None else None
    if val is None or len(val) == 0:
        logger.warning("no validation images: the TFLite model's accuracy was not measured")
        return entry
    loaded = loaded if loaded is not None else load_exported(version_dir)
    labels, lite, reference = [], [], []
    for index, pixels in split_batches(val, image_size, batch_size):
        labels.append(val.labels[index.numpy()])
        lite.append(tfl.predict_tflite(interpreter, pixels.numpy(), batch_size=batch_size))
        reference.append(predict_exported_pixels(loaded, pixels.numpy(), batch_size=batch_size))
    comparison = tfl.compare_with_reference(np.concatenate(lite), np.concatenate(reference), np.concatenate(labels))
    entry.update(comparison=comparison, evaluated_on=f"validation split of {source.root}")  # type: ignore[union-attr]
    logger.info("TFLite %s: %d bytes (SavedModel %d), accuracy %.4f vs SavedModel %.4f on %d validation images",
                mode, len(flatbuffer), reference_size, comparison["accuracy"], comparison["reference_accuracy"],
                comparison["examples"])
    return entry






logger = logging.getLogger(__name__)

RepresentativeData = Callable[[], Iterable[list[np.ndarray]]]


def _float32(converter: Any, representative: RepresentativeData | None) -> None:
    """No optimization: the float32 graph as it is."""


def _float16(converter: Any, representative: RepresentativeData | None) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _dynamic(converter: Any, representative: RepresentativeData | None) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _int8(converter: Any, representative: RepresentativeData | None) -> None:
    if representative is None:
        raise ValueError("int8 quantization needs a representative dataset of training images")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    # Builtin int8 kernels only: a float fallback op would silently make "int8" a mixed model.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def _with_full_pixel_range(representative: RepresentativeData) -> RepresentativeData:
    """The calibration images with one black and one white pixel in the first: the input's range is then exactly
    [0, 255], so its uint8 quantization has scale 1 and zero point 0 and a uint8 input is the raw pixel."""

    def generate() -> Iterable[list[np.ndarray]]:
        for i, batch in enumerate(representative()):
            if i == 0:
                image = np.array(batch[0], np.float32, copy=True)
                image[0, 0, 0, :], image[0, 0, 1, :] = 0.0, 255.0
                batch = [image, *batch[1:]]
            yield batch

    return generate


def _int8_uint8(converter: Any, representative: RepresentativeData | None) -> None:
    """Full integer with uint8 input and output, what Edge TPU and microcontroller runtimes take: uint8 pixels in,
    uint8 probabilities out (q / 256, the int8 softmax's fixed scale)."""
    if representative is None:
        raise ValueError("int8 quantization needs a representative dataset of training images")
    _int8(converter, _with_full_pixel_range(representative))
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8


TFLITE_MODES: dict[str, Callable[[Any, RepresentativeData | None], None]] = {
    "float32": _float32,
    "float16": _float16,
    "dynamic": _dynamic,
    "int8": _int8,
    "int8-uint8": _int8_uint8,
}
CALIBRATED_MODES = ("int8", "int8-uint8")  # the modes that calibrate on training images
LABELS_METADATA = "labels"  # the name of the Model.metadata entry that holds the labels, one per line
LABELS_FILE = "labels.txt"  # the same labels as an associated file in the zip appended to the flatbuffer


def embed_labels(flatbuffer: bytes, labels: Sequence[str]) -> bytes:
    """The model with its labels inside, twice, since tflite_support (the official metadata writer) does not install
    beside TF 2.21 (it pins protobuf 3): a `labels` entry of the flatbuffer's Model.metadata table (read it with
    read_labels or any flatbuffer reader) and labels.txt in a zip appended to the file, TFLite Model Maker's
    associated-file layout (`unzip -l model.tflite` lists it). The interpreter ignores both."""
    text = "".join(f"{label}\n" for label in labels).encode("utf-8")
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    model.buffers.append(schema_fb.BufferT())
    model.buffers[-1].data = np.frombuffer(text, np.uint8)
    entry = schema_fb.MetadataT()
    entry.name, entry.buffer = LABELS_METADATA, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != LABELS_METADATA.encode()] + [entry]
    packed = io.BytesIO(flatbuffer_utils.convert_object_to_bytearray(model))
    with zipfile.ZipFile(packed, "a") as archive:  # "a" on a non-zip appends one, offsets from the file start
        archive.writestr(LABELS_FILE, text)
    return packed.getvalue()


def read_labels(model: bytes | str | Path) -> list[str] | None:
    """The labels of a .tflite file's `labels` metadata entry (embed_labels), or None when it has none."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    root = schema_fb.Model.GetRootAsModel(data, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() == LABELS_METADATA.encode():
            return root.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8").splitlines()
    return None


def _describe(detail: dict[str, Any], what: str) -> str:
    """A tensor's dtype, and its quantization when integer, before what it holds."""
    dtype = np.dtype(detail["dtype"]).name
    if np.issubdtype(detail["dtype"], np.floating):
        return f"{dtype} {what}"
    scale, zero = detail["quantization"]
    return f"{dtype} {what}, quantized: real = {scale:g} * (q - {zero})"


def tflite_filename(mode: str) -> str:
    """model_<mode>.tflite."""
    return f"model_{mode}.tflite"


def build_fixed_size_model(model: keras.Model, image_size: int) -> keras.Model:
    """The model from after its Resizing layer (inputs [N, S, S, 3]) to softmax probabilities.

    A model without a Resizing layer is used whole; the result shares the model's weights.
    """
    resize = next((layer for layer in model.layers if isinstance(layer, keras.layers.Resizing)), None)
    if resize is not None:
        start = resize.output
    else:
        start = model.inputs[0]
    if start.shape[1:3] not in ((image_size, image_size), (None, None)):
        raise ValueError(f"the model's resize layer outputs {tuple(start.shape[1:3])}, not {image_size} x {image_size}")
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(model.output)
    return keras.Model(start, probabilities, name=f"{model.name}_fixed_size")


def convert_to_tflite(model: keras.Model, image_size: int, mode: str = "float32",
                      representative: RepresentativeData | None = None) -> bytes:
    """Converts a tftransfer model (raw pixels in, logits out) to a .tflite flatbuffer; see the module docstring.

    `representative` yields lists holding one float32 [1, S, S, 3] batch each (int8 calibration).
    """
    if mode not in TFLITE_MODES:
        raise ValueError(f"unknown TFLite mode {mode!r}; choose one of {', '.join(TFLITE_MODES)}")
    fixed = build_fixed_size_model(model, image_size)
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    TFLITE_MODES[mode](converter, representative)
    # The converter prints its temporary SavedModel's signatures to stdout, which would land in CLI output.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flatbuffer = converter.convert()
    logger.info("converted to TFLite (%s): %d bytes", mode, len(flatbuffer))
    return flatbuffer


def representative_from_source(source: DataSource, image_size: int, count: int, batch_size: int = 32
                               ) -> tuple[RepresentativeData, int]:
    """Calibration data of up to `count` training images spread over the split, and how many there are."""
    sub = source.train.subset(spread_indices(len(source.train), count))
    pixels = np.concatenate([p.numpy() for _, p in split_batches(sub, image_size, batch_size)])
    return representative_from_pixels(pixels), len(pixels)


def representative_from_pixels(pixels: np.ndarray) -> RepresentativeData:
    """A representative-dataset callable yielding each image as its own [1, S, S, 3] float32 batch."""
    pixels = np.asarray(pixels, np.float32)

    def generate() -> Iterable[list[np.ndarray]]:
        for image in pixels:
            yield [image[None]]

    return generate


def load_interpreter(model: bytes | str | Path, num_threads: int | None = None) -> Any:
    """A TFLite interpreter for flatbuffer bytes or a .tflite path (LiteRT's when installed, else tf.lite's), with
    its default delegate, XNNPACK, on `num_threads` threads (None: the runtime's default)."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-not-found]
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806  (deprecated in favour of LiteRT, still in TF 2.21)
    kwargs: dict[str, Any] = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    if num_threads is not None:
        kwargs["num_threads"] = num_threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice, once per load
        return Interpreter(**kwargs)


def _quantized(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float values as an integer input tensor wants them (its scale and zero point); float inputs unchanged."""
    if np.issubdtype(detail["dtype"], np.floating):
        return values.astype(detail["dtype"])
    scale, zero = detail["quantization"]
    bounds = np.iinfo(detail["dtype"])
    return np.clip(np.round(values / scale + zero), bounds.min, bounds.max).astype(detail["dtype"])


def _dequantized(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        return values
    scale, zero = detail["quantization"]
    return (values.astype(np.float32) - zero) * scale


class TflitePredictor:
    """Calls a single-input, single-output TFLite model on float32 [N, S, S, 3] pixels, resizing its input only
    when the batch shape changes (what a latency measure must not count); integer I/O is (de)quantized."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.input = interpreter.get_input_details()[0]
        self.shape: tuple[int, ...] | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """[N, C] float32 outputs of one batch."""
        batch = np.asarray(batch, np.float32)
        if self.shape != batch.shape:
            self.interpreter.resize_tensor_input(self.input["index"], list(batch.shape))
            self.interpreter.allocate_tensors()
            self.shape = batch.shape
        self.interpreter.set_tensor(self.input["index"], _quantized(batch, self.input))
        self.interpreter.invoke()
        out = self.interpreter.get_output_details()[0]
        # Copy: get_tensor returns a view into the interpreter's buffer, overwritten by the next invoke.
        return _dequantized(np.array(self.interpreter.get_tensor(out["index"])), out).astype(np.float32)


def predict_tflite(interpreter: Any, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """[N, C] outputs of a single-input, single-output TFLite model for float32 [N, S, S, 3] pixels (an integer
    model's input is quantized, its output dequantized)."""
    predictor = TflitePredictor(interpreter)
    outputs = [predictor(pixels[start:start + batch_size]) for start in range(0, len(pixels), batch_size)]
    if not outputs:
        return np.zeros((0, int(interpreter.get_output_details()[0]["shape"][-1])), np.float32)
    return np.concatenate(outputs)


def tflite_parameters(model: bytes | str | Path) -> tuple[int, int]:
    """(parameters, nonzero parameters) of a .tflite model: the values of its constant tensors (weights, biases,
    folded BatchNorm), float or quantized; not shape constants."""
    interpreter = load_interpreter(model)  # not allocated: only constant tensors hold data
    total = nonzero = 0
    for detail in interpreter.get_tensor_details():
        try:
            values = interpreter.get_tensor(detail["index"])
        except ValueError:  # an activation
            continue
        if not np.issubdtype(values.dtype, np.number):
            continue
        quantized = np.size(detail["quantization_parameters"]["scales"]) > 0  # per-tensor or per-channel
        if np.issubdtype(values.dtype, np.integer) and not quantized:
            continue  # a shape or axis constant; an integer model's weights and biases are quantized
        total += int(values.size)
        nonzero += int(np.count_nonzero(values))
    return total, nonzero


def compare_with_reference(tflite_probs: np.ndarray, reference_probs: np.ndarray, labels: np.ndarray
                           ) -> dict[str, Any]:
    """Accuracy of both, their difference, top-1 agreement and the max abs probability difference."""
    tflite_probs = np.asarray(tflite_probs, np.float64)
    reference_probs = np.asarray(reference_probs, np.float64)
    labels = np.asarray(labels)
    if tflite_probs.shape != reference_probs.shape or len(labels) != len(tflite_probs):
        raise ValueError(f"shapes differ: tflite {tflite_probs.shape}, reference {reference_probs.shape}, "
                         f"labels {labels.shape}")
    if len(labels) == 0:
        return {"examples": 0, "accuracy": None, "reference_accuracy": None, "accuracy_delta": None,
                "top1_agreement": None, "max_abs_diff": None}
    accuracy = float(np.mean(tflite_probs.argmax(axis=1) == labels))
    reference = float(np.mean(reference_probs.argmax(axis=1) == labels))
    return {"examples": int(len(labels)), "accuracy": accuracy, "reference_accuracy": reference,
            "accuracy_delta": accuracy - reference,
            "top1_agreement": float(np.mean(tflite_probs.argmax(axis=1) == reference_probs.argmax(axis=1))),
            "max_abs_diff": float(np.max(np.abs(tflite_probs - reference_probs)))}
