"""The contract an export keeps with TF Serving and its clients: signature, input and output names, the files
beside the SavedModel, and the serving-independent part of model_card.json."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

import tftransfer

SERVING_SIGNATURE = "serving_default"


PIXELS_SIGNATURE = "predict_pixels"


SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE)


BYTES_INPUT = "images"


PIXELS_INPUT = "pixels"


OUTPUT_KEYS = ("probabilities", "classes", "scores", "class_names")


# serving_default's per-image verdict: False (and zero scores) for an image it refused, with the reason.
VALID_OUTPUT = "valid"


MESSAGE_OUTPUT = "message"


LABELS_FILE = "labels.txt"




MODEL_CARD_FILE = "model_card.json"


MODEL_CARD_SCHEMA_VERSION = 1


def software_versions() -> dict[str, str]:
    """tftransfer, TensorFlow, Keras and Python versions."""

    return {"tftransfer": tftransfer.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def input_contract(image_size: int, max_pixels: int) -> dict[str, Any]:
    """What each signature takes and returns, and what happens to pixels inside the model."""
    return {
        "image_size": int(image_size),
        "max_pixels": int(max_pixels),
        "signatures": {
            SERVING_SIGNATURE: {BYTES_INPUT: "tf.string [N]: encoded JPEG, PNG, GIF, BMP or WebP bytes (REST: "
                                             '{"instances": [{"b64": "<base64 bytes>"}]})'},
            PIXELS_SIGNATURE: {PIXELS_INPUT: "float32 [N, H, W, 3]: RGB pixels in [0, 255], any H and W"},
        },
        "resize": f"bilinear with antialiasing to {image_size} x {image_size}, inside the model",
        "preprocessing": "inside the model (the backbone's own, from raw [0, 255] pixels)",
        "outputs": {"probabilities": "float32 [N, C], softmax over the classes in label order",
                    "classes": "int32 [N, k], top-k class ids", "scores": "float32 [N, k], their probabilities",
                    "class_names": "string [N, k], their names"},
        "per_image_checks": {
            SERVING_SIGNATURE: (
                f"each image is judged alone and a bad one never fails the request: {VALID_OUTPUT} bool [N] is false "
                f"and {MESSAGE_OUTPUT} string [N] says why for an empty input, a format other than JPEG, PNG, GIF or "
                f"BMP, a header declaring more than {int(max_pixels)} pixels (refused before decoding), or bytes "
                f"that do not decode; such a row has zero probabilities and scores, classes -1 and empty "
                f"class_names. Valid rows have {VALID_OUTPUT} true and an empty {MESSAGE_OUTPUT}"),
        },
    }


def base_model_card(class_names: Sequence[str], image_size: int, top_k: int, max_pixels: int) -> dict[str, Any]:
    """The part of model_card.json every export has, with or without a run directory behind it."""
    return {
        "schema_version": MODEL_CARD_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(class_names),
        "num_classes": len(class_names),
        "top_k": int(top_k),
        "input": input_contract(image_size, max_pixels),
        "versions": software_versions(),
    }
