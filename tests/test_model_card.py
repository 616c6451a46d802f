"""model_card.json: the input contract every export carries, and the run facts build_model_card adds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from conftest import make_colour_folder

from tftransfer.config.experiment import ExperimentConfig, ModelConfig, save_config
from tftransfer.data.specs import load_source
from tftransfer.model import backbones
from tftransfer.serving.contract import MODEL_CARD_FILE, PIXELS_SIGNATURE, SERVING_SIGNATURE
from tftransfer.serving.model_card import build_model_card
from tftransfer.serving.savedmodel import export_saved_model

NAMES = ["cyan", "magenta", "yellow"]


def _model() -> keras.Model:
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Resizing(16, 16)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(x))


def _run_dir(tmp_path: Path, weights: str, val_metrics: dict | None = None) -> tuple[Path, dict]:
    """A run directory's config.yaml, split.json and metrics.json as `fit` writes them."""
    source = load_source(str(make_colour_folder(tmp_path / "colours", per_class=4, splits=True)), 0.0)
    run = tmp_path / "runs" / "colours"
    run.mkdir(parents=True)
    save_config(ExperimentConfig(name="colours", model=ModelConfig(backbone="tiny", weights=weights)),
                run / "config.yaml")
    record = source.split_record()
    (run / "split.json").write_text(json.dumps(record))
    if val_metrics is not None:
        (run / "metrics.json").write_text(json.dumps({"final": {"val": val_metrics}}))
    return run, record


def test_every_export_carries_its_input_contract(tmp_path):
    version_dir = export_saved_model(_model(), tmp_path / "m", NAMES, 16, top_k=2, model_card={"name": "extra"})
    card = json.loads((version_dir / MODEL_CARD_FILE).read_text())

    assert card["classes"] == NAMES and card["num_classes"] == 3 and card["top_k"] == 2
    assert card["input"]["image_size"] == 16
    assert set(card["input"]["signatures"]) == {SERVING_SIGNATURE, PIXELS_SIGNATURE}
    assert "b64" in card["input"]["signatures"][SERVING_SIGNATURE]["images"]
    assert card["versions"]["tensorflow"] == tf.__version__ and card["versions"]["keras"] == keras.__version__
    assert card["name"] == "extra"  # model_card entries are merged in


def test_build_model_card_from_a_run(tmp_path):
    weights = tmp_path / "backbone.weights.h5"
    weights.write_bytes(b"pretend weights")
    val = {"num_examples": 6, "accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1, "per_class": {"cyan": {}}}
    run, record = _run_dir(tmp_path, str(weights), val)

    card = build_model_card(run)

    spec = backbones.get_backbone_spec("tiny")
    assert card["name"] == "colours" and card["run_dir"] == str(run.resolve())
    assert card["backbone"]["name"] == "tiny" and card["backbone"]["preprocess"] == spec.preprocess_mode
    assert card["weights"]["origin"] == "local weights file"
    assert card["weights"]["sha256"] == hashlib.sha256(b"pretend weights").hexdigest()
    assert card["training_data"]["fingerprint"] == record["fingerprint"]
    assert card["training_data"]["train_examples"] == 12 and card["training_data"]["val_examples"] == 6
    # Headline metrics only; the per-class table stays in metrics.json.
    assert card["validation_metrics"] == {"num_examples": 6, "accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1}
    # fit can pass its metrics before metrics.json exists.
    assert build_model_card(run, val_metrics={"accuracy": 0.9})["validation_metrics"] == {"accuracy": 0.9}


@pytest.mark.parametrize("weights, origin", [("imagenet", "ImageNet"), ("none", "random initialisation")])
def test_weights_origin_without_a_file(tmp_path, weights, origin):
    run, _ = _run_dir(tmp_path, weights)
    card = build_model_card(run)
    assert origin in card["weights"]["origin"] and "sha256" not in card["weights"]
    assert card["validation_metrics"] is None  # no metrics.json yet
