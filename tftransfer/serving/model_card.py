"""model_card: moved from tftransfer.serving.savedmodel."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

import tftransfer
from tftransfer.config.experiment import read_yaml
from tftransfer.core.cache import file_hash
from tftransfer.core.errors import BackboneError
from tftransfer.core.io import read_json
from tftransfer.model import backbones
from tftransfer.runs.layout import RunDir
from tftransfer.serving.contract import BYTES_INPUT, PIXELS_INPUT, PIXELS_SIGNATURE, SERVING_SIGNATURE

logger = logging.getLogger(__name__)
MODEL_CARD_FILE = "model_card.json"
MODEL_CARD_SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Model card


def software_versions() -> dict[str, str]:
    """tftransfer, TensorFlow, Keras and Python versions."""

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
