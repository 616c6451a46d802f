"""TFLite conversion of the tiny-backbone model in every mode, int8 really integer, accuracy against the SavedModel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_colour_folder

from tftransfer.config.experiment import ModelConfig
from tftransfer.data.specs import load_source
from tftransfer.model import backbones
from tftransfer.model.classifier import build_model
from tftransfer.serving.parity import split_batches
from tftransfer.serving.savedmodel import export_saved_model
from tftransfer.serving.tflite import (
    CALIBRATED_MODES,
    LABELS_FILE,
    TFLITE_MODES,
    build_fixed_size_model,
    compare_with_reference,
    convert_to_tflite,
    export_tflite,
    load_interpreter,
    predict_tflite,
    read_labels,
    representative_from_pixels,
)

SIZE = 32
# Max abs probability difference to the Keras model allowed per mode: float32 is the same arithmetic; float16
# rounds the weights; dynamic and int8 quantize to 8 bits.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "dynamic": 0.05, "int8": 0.1, "int8-uint8": 0.1}


@pytest.fixture(scope="module")
def tiny() -> keras.Model:
    """tftransfer's real model layout (resize, preprocess, BatchNorm backbone, head) on the tiny backbone."""
    keras.utils.set_random_seed(0)
    spec = backbones.get_backbone_spec("tiny")
    return build_model(ModelConfig(backbone="tiny", weights="none", dropout=0.0), spec, 3, SIZE)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (24, SIZE, SIZE, 3)).astype(np.float32)


def _keras_probs(model: keras.Model, pixels: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(pixels, training=False), axis=-1))


@pytest.mark.parametrize("mode", list(TFLITE_MODES))
def test_tiny_model_converts_in_every_mode_and_agrees_with_keras(tiny, pixels, mode):
    representative = representative_from_pixels(pixels[:16]) if mode in CALIBRATED_MODES else None
    flatbuffer = convert_to_tflite(tiny, SIZE, mode, representative)
    interpreter = load_interpreter(flatbuffer)

    inp = interpreter.get_input_details()[0]
    assert list(inp["shape_signature"]) == [-1, SIZE, SIZE, 3]
    assert inp["dtype"] == (np.uint8 if mode == "int8-uint8" else np.float32)
    # batch_size 5 over 8 images: a resized last batch.
    probs = predict_tflite(interpreter, pixels[16:], batch_size=5)
    assert probs.shape == (8, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-2)
    assert np.max(np.abs(probs - _keras_probs(tiny, pixels[16:]))) <= TOLERANCE[mode]
    integer = any(d["dtype"] == np.int8 for d in interpreter.get_tensor_details())
    assert integer == (mode in ("dynamic", "int8", "int8-uint8"))


def test_int8_needs_representative_data_and_modes_are_checked(tiny):
    with pytest.raises(ValueError, match="representative"):
        convert_to_tflite(tiny, SIZE, "int8")
    with pytest.raises(ValueError, match="unknown TFLite mode"):
        convert_to_tflite(tiny, SIZE, "int4")


def test_fixed_size_model_starts_after_the_resize_layer(tiny, pixels):
    fixed = build_fixed_size_model(tiny, SIZE)
    assert tuple(fixed.input.shape) == (None, SIZE, SIZE, 3)
    assert "resize" not in [layer.name for layer in fixed.layers]  # antialiased resize is no TFLite builtin
    np.testing.assert_allclose(fixed(pixels[:4]), _keras_probs(tiny, pixels[:4]), atol=1e-6)
    with pytest.raises(ValueError, match="not 48 x 48"):
        build_fixed_size_model(tiny, 48)


def test_compare_with_reference_hand_values():
    labels = np.array([0, 1, 1, 0])
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])  # 3 of 4 right
    lite = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])  # 3 of 4 right, differs on the last two
    result = compare_with_reference(lite, reference, labels)
    assert result["accuracy"] == 0.75 and result["reference_accuracy"] == 0.75
    assert result["accuracy_delta"] == 0.0
    assert result["top1_agreement"] == 0.5
    assert result["max_abs_diff"] == pytest.approx(0.25)


def _colour_model() -> keras.Model:
    """Logits = 10 x the mean of each channel / 255: classifies solid colours perfectly with no training."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Resizing(SIZE, SIZE)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.Identity(10.0 / 255.0), dtype="float32")(x)
    return keras.Model(inputs, outputs)


def test_export_tflite_reports_size_and_accuracy_against_the_saved_model(tmp_path: Path):
    # Class folders named after the dominant channel of their images, with train/ and val/ splits.
    data = make_colour_folder(tmp_path / "colours", per_class=6, splits=True)
    for split in ("train", "val"):
        for old, new in (("cyan", "a_green_blue"), ("magenta", "b_red_blue"), ("yellow", "c_red_green")):
            (data / split / old).rename(data / split / new)
    source = load_source(str(data), 0.0)
    # cyan = G+B, magenta = R+B, yellow = R+G: a channel-sum model needs a mixing matrix to tell them apart.
    model = _colour_model()
    mixing = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], np.float32).T * (10.0 / 255.0)
    model.layers[-1].set_weights([mixing, np.zeros(3, np.float32)])
    version_dir = export_saved_model(model, tmp_path / "saved_models" / "colours", source.class_names, SIZE)

    entry = export_tflite(model, version_dir, SIZE, "int8", source, representative_images=9)

    tflite_file = version_dir / "model_int8.tflite"
    assert entry["file"] == str(tflite_file) and tflite_file.stat().st_size == entry["size_bytes"]
    assert entry["representative_images"] == 9
    assert entry["saved_model_size_bytes"] > 0
    comparison = entry["comparison"]
    assert comparison["examples"] == len(source.val)
    assert comparison["reference_accuracy"] == 1.0
    assert abs(comparison["accuracy_delta"]) <= 0.05 and comparison["top1_agreement"] >= 0.95
    assert comparison["max_abs_diff"] < 0.1


def test_full_integer_uint8_model_takes_raw_pixels_agrees_with_the_float_one_and_carries_its_labels(tmp_path: Path):
    data = make_colour_folder(tmp_path / "colours", per_class=6, splits=True)
    source = load_source(str(data), 0.0)
    model = _colour_model()
    mixing = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], np.float32).T * (10.0 / 255.0)  # cyan, magenta, yellow
    model.layers[-1].set_weights([mixing, np.zeros(3, np.float32)])
    version_dir = export_saved_model(model, tmp_path / "saved_models" / "colours", source.class_names, SIZE)

    entry = export_tflite(model, version_dir, SIZE, "int8-uint8", source, representative_images=9,
                          labels=source.class_names)

    interpreter = load_interpreter(entry["file"])
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    assert inp["quantization"] == (1.0, 0)  # a uint8 input is the raw pixel value
    assert entry["input"].startswith("uint8") and entry["output"].startswith("uint8")
    # raw uint8 pixels straight into the interpreter: its argmax is the float model's
    pixels = np.concatenate([np.asarray(p) for _, p in split_batches(source.val, SIZE, 32)])
    interpreter.resize_tensor_input(inp["index"], list(pixels.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.round(pixels).astype(np.uint8))
    interpreter.invoke()
    agree = np.mean(interpreter.get_tensor(out["index"]).argmax(1) == _keras_probs(model, pixels).argmax(1))
    assert agree >= 0.9 and entry["comparison"]["top1_agreement"] >= 0.9
    assert entry["comparison"]["accuracy"] >= 0.9
    assert read_labels(entry["file"]) == source.class_names
    with zipfile.ZipFile(entry["file"]) as archive:
        assert archive.read(LABELS_FILE).decode().splitlines() == source.class_names
    assert read_labels(convert_to_tflite(model, SIZE, "float32")) is None
