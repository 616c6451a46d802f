"""model_card: moved from tftransfer.serving.savedmodel."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tftransfer.config.experiment import read_yaml
from tftransfer.core.cache import file_hash
from tftransfer.core.errors import BackboneError
from tftransfer.core.io import read_json
from tftransfer.model import backbones
from tftransfer.runs.layout import RunDir

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Model card


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
