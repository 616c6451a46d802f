"""model_card.json: its typed record (`ModelCard`, one shape for every export, from `fit` or `export`) and the
run-specific part built from a run directory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tftransfer.config.experiment import read_yaml
from tftransfer.core.cache import file_hash
from tftransfer.core.errors import BackboneError, RunDirError
from tftransfer.core.io import read_json, write_json
from tftransfer.model import backbones
from tftransfer.runs.layout import RunDir
from tftransfer.runs.records import RunMetrics

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class ModelCard:
    """model_card.json beside a SavedModel version. Every key is always written; what does not apply is null
    (an export without a run behind it has no backbone or training data; no TFLite file, no `tflite`)."""

    classes: list[str] = field(default_factory=list)
    num_classes: int = 0
    top_k: int = 0
    input: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    name: str | None = None
    run_dir: str | None = None
    backbone: dict[str, Any] | None = None
    weights: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    validation_metrics: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    tflite: dict[str, Any] | None = None
    schema_version: int = 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model_card.json") -> ModelCard:
        """The record of a parsed card; keys a newer tftransfer added are left out."""
        if not isinstance(data, Mapping):
            raise RunDirError(f"{source} is not a model card (not a JSON object)")
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def read(cls, path: str | Path) -> ModelCard | None:
        """The card at `path`, None when there is none (a SavedModel tftransfer did not write)."""
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path)) if path.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, every key present."""
        return {f.name: getattr(self, f.name) for f in sorted(fields(self), key=lambda f: f.name != "schema_version")}

    def write(self, path: str | Path) -> None:
        """Writes the card atomically."""
        write_json(Path(path), self.to_dict())

    @property
    def image_size(self) -> int | None:
        """The square input size of the predict_pixels signature."""
        size = (self.input or {}).get("image_size")
        return size if isinstance(size, int) and size > 0 else None

    @property
    def val_accuracy(self) -> float | None:
        """The validation accuracy the model was published with."""
        return (self.validation_metrics or {}).get("accuracy")


# ---------------------------------------------------------------------------------------------------------------
# The run-specific part


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
        val_metrics = RunMetrics.read(run.metrics).val
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
