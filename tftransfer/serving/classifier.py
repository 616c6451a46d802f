"""classifier: moved from tftransfer.jobs.predict."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.core.errors import RunDirError
from tftransfer.core.progress import track
from tftransfer.evaluation.inference import predict_probabilities
from tftransfer.runs.finished import load_run, read_labels
from tftransfer.runs.layout import RunDir, is_saved_model_dir, latest_version_dir
from tftransfer.serving import tflite as tfl
from tftransfer.serving.contract import LABELS_FILE, MODEL_CARD_FILE
from tftransfer.serving.model_card import ModelCard
from tftransfer.serving.savedmodel import load_exported, predict_exported_pixels

logger = logging.getLogger(__name__)


@dataclass
class Classifier:
    """A loaded model: `predict(pixels)` maps float32 [N, S, S, 3] pixels in [0, 255] to [N, C] probabilities."""

    kind: str  # "run", "saved_model" or "tflite"
    path: Path
    class_names: list[str]
    image_size: int
    predict: Callable[[np.ndarray], np.ndarray]
    run_dir: Path | None = None
    keras_model: Any = None  # the keras.Model of a run directory
    saved_model: Any = None  # the tf.saved_model.load object of an export
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """runs/<name> -> name; saved_models/<name>/<version> -> name/v<version>."""
        if self.kind == "saved_model":
            return f"{self.path.parent.name}/v{self.path.name}"
        if self.kind == "tflite":
            return f"{self.path.parent.parent.name}/v{self.path.parent.name}/{self.path.name}" \
                if self.path.parent.name.isdigit() else self.path.stem
        return self.path.name






def load_classifier(path: str | Path, image_size: int | None = None, batch_size: int = 32) -> Classifier:
    """Loads a run directory or an exported SavedModel; RunDirError says what is missing when it is neither.

    `image_size` overrides the size the model was trained at (needed only for a SavedModel without a
    model_card.json).
    """
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"model not found: {path} does not exist")
    if path.is_file() and path.suffix == ".tflite":
        return _load_tflite(path, image_size, batch_size)
    if not path.is_dir():
        raise RunDirError(f"{path} is a file; pass a run directory (runs/<name>), an exported SavedModel "
                          "directory (saved_models/<name>/<version>) or a .tflite file")
    if is_saved_model_dir(path):
        return _load_saved_model(path, image_size, batch_size)
    if RunDir(path).config.is_file():
        return _load_run(path, image_size)
    latest = latest_version_dir(path)
    if latest is not None:
        logger.info("using the newest export version %s", latest)
        return _load_saved_model(latest, image_size, batch_size)
    raise RunDirError(f"{path} is neither a run directory (no config.yaml) nor an exported SavedModel "
                      "(no saved_model.pb, no numbered version folders)")


def _load_tflite(path: Path, image_size: int | None, batch_size: int) -> Classifier:
    """A .tflite file tftransfer wrote (probabilities out; labels inside it, or labels.txt beside it), run by the
    TFLite interpreter as a device would, integer I/O (de)quantized."""
    try:
        interpreter = tfl.load_interpreter(path)
        names = tfl.read_labels(path)
    except (ValueError, RuntimeError) as exc:
        raise RunDirError(f"cannot load {path} as a TFLite model: {exc}") from exc
    if names is None:
        beside = path.parent / LABELS_FILE
        if not beside.is_file():
            raise RunDirError(f"{path} has no labels inside it and no {LABELS_FILE} beside it")
        names = read_labels(beside)
    shape = interpreter.get_input_details()[0]["shape"]
    size = int(shape[1])  # the file is converted at one input size; --image-size cannot change it
    card = ModelCard.read(path.parent / MODEL_CARD_FILE)
    run_dir = Path(card.run_dir) if card and card.run_dir and RunDir(Path(card.run_dir)).config.is_file() else None

    def predict(pixels: np.ndarray) -> np.ndarray:
        probs = np.clip(tfl.predict_tflite(interpreter, np.asarray(pixels, np.float32), batch_size=batch_size), 0, None)
        # An integer model's probabilities come in steps of 1/256 and need not sum to 1: renormalised, the
        # ranking (and so every prediction) is the file's own.
        return probs / np.maximum(probs.sum(axis=-1, keepdims=True), 1e-12)

    return Classifier(kind="tflite", path=path, class_names=names, image_size=size, predict=predict,
                      run_dir=run_dir, card=card.to_dict() if card else {})


def _load_run(path: Path, image_size: int | None) -> Classifier:
    run = load_run(path, image_size)

    def predict(pixels: np.ndarray) -> np.ndarray:
        return predict_probabilities(run.model, np.asarray(pixels, np.float32))

    return Classifier(kind="run", path=path, class_names=run.class_names, image_size=run.image_size, predict=predict,
                      run_dir=path, keras_model=run.model)


def _load_saved_model(path: Path, image_size: int | None, batch_size: int) -> Classifier:

    loaded = load_exported(path)  # RunDirError when a signature is missing
    card = ModelCard.read(path / MODEL_CARD_FILE) or ModelCard()
    labels = path / LABELS_FILE if (path / LABELS_FILE).is_file() else path / "assets" / LABELS_FILE
    names = read_labels(labels)
    size = image_size or card.image_size
    if not isinstance(size, int) or size < 1:
        raise RunDirError(f"{path} has no {MODEL_CARD_FILE} saying its input size; pass --image-size")
    run_dir = card.run_dir
    run_path = Path(run_dir) if run_dir and RunDir(Path(run_dir)).config.is_file() else None

    def predict(pixels: np.ndarray) -> np.ndarray:
        return predict_exported_pixels(loaded, pixels, batch_size=batch_size)

    return Classifier(kind="saved_model", path=path, class_names=names, image_size=size, predict=predict,
                      run_dir=run_path, saved_model=loaded, card=card.to_dict())


def predict_batches(classifier: Classifier, dataset: Any, total: int, unit: str = "images",
                    what: str = "predict") -> tuple[np.ndarray, np.ndarray, float]:
    """Runs the classifier over make_indexed_dataset batches: (indices, probabilities, seconds), its progress
    tracked (tftransfer.core.progress) as `what`."""
    indices: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    started = time.perf_counter()
    with track(what, total, unit) as progress:
        for index, pixels in dataset:
            indices.append(index.numpy())
            probs.append(np.asarray(classifier.predict(pixels.numpy()), np.float32))
            progress.advance(len(indices[-1]))
    seconds = time.perf_counter() - started
    if not indices:
        return np.zeros((0,), np.int64), np.zeros((0, len(classifier.class_names)), np.float32), seconds
    return np.concatenate(indices), np.concatenate(probs), seconds
