"""Finished models as classifiers: load a run directory or an exported SavedModel, classify image files.

`load_classifier` accepts both ends of a model's life behind one interface, so `evaluate`, `export` and `predict`
never care which one they were given:

- a run directory (`runs/<name>/`, with `model.keras`, `labels.txt`, `config.yaml`);
- an exported SavedModel version (`saved_models/<name>/<version>/`), or its model folder
  (`saved_models/<name>/`, whose newest version is used).

Pixels reach either model through `tftransfer.data.images`, the functions the training pipeline and the serving
graph share, so a prediction here is the prediction TF Serving would return for the same file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.config.commands import PredictCommandConfig, command_config
from tftransfer.core.errors import DataError
from tftransfer.data.files import collect_images, make_indexed_dataset
from tftransfer.serving.classifier import Classifier, load_classifier, predict_batches

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# predict


@dataclass
class Prediction:
    """Top-k classes of one file."""

    file: str
    classes: list[str]
    scores: list[float]


@dataclass
class PredictionResult:
    """What `predict_files` found: predictions in input order, skipped files with reasons, the model used."""

    model: str
    model_kind: str
    predictions: list[Prediction]
    skipped: list[tuple[str, str]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"model", "model_kind", "predictions": [{"file", "top_k": [{"class", "score"}]}], ...}."""
        return {
            "model": self.model,
            "model_kind": self.model_kind,
            "predictions": [{"file": p.file, "top_k": [{"class": c, "score": s} for c, s in zip(p.classes, p.scores)]}
                            for p in self.predictions],
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "seconds": self.seconds,
        }


def predict_files(model: str | Path | Classifier, items: Sequence[str], config: PredictCommandConfig | None = None,
                  **settings: Any) -> PredictionResult:
    """Classifies image files, folders and globs with a run directory or SavedModel; unreadable files are skipped.

    Settings come as a PredictCommandConfig or as its fields by keyword (`top_k=2`); an unknown or ill-typed one
    is a ConfigError naming it. DataError when nothing readable is left.
    """
    cfg = command_config(PredictCommandConfig, config, settings)
    top_k, batch_size = cfg.top_k, cfg.batch_size
    classifier = model if isinstance(model, Classifier) else load_classifier(model, cfg.image_size, batch_size)
    files, skipped = collect_images(items, min_side=cfg.min_side)
    for file, reason in skipped:
        logger.warning("skipping %s: %s", file, reason)
    if not files:
        raise DataError("no readable images to classify" + (f" ({len(skipped)} skipped, see above)" if skipped
                                                              else ""))
    dataset = make_indexed_dataset(classifier.image_size, batch_size, paths=[str(f) for f in files])
    indices, probs, seconds = predict_batches(classifier, dataset, len(files))
    decoded = set(indices.tolist())
    for i, file in enumerate(files):
        if i not in decoded:
            skipped.append((str(file), "TensorFlow could not decode it"))
            logger.warning("skipping %s: TensorFlow could not decode it", file)
    k = min(top_k, len(classifier.class_names))
    predictions = []
    for i, p in zip(indices.tolist(), probs):
        # Stable sort on -p: ties go to the lower class id, as argmax and the serving signature's top_k do.
        order = np.argsort(-p, kind="stable")[:k]
        predictions.append(Prediction(str(files[i]), [classifier.class_names[j] for j in order],
                                      [float(p[j]) for j in order]))
    logger.info("classified %d images in %.2f s", len(predictions), seconds)
    return PredictionResult(str(classifier.path), classifier.kind, predictions, skipped, seconds)


def format_table(result: PredictionResult) -> str:
    """A fixed-width table: file, then `class (score)` for each of the top k."""
    if not result.predictions:
        return ""
    k = len(result.predictions[0].classes)
    cells = [[p.file] + [f"{c} ({s:.3f})" for c, s in zip(p.classes, p.scores)] for p in result.predictions]
    header = ["file"] + [f"top {i + 1}" for i in range(k)]
    widths = [max(len(row[col]) for row in [header, *cells]) for col in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [header, *cells]]
    return "\n".join(lines) + "\n"


def format_csv(result: PredictionResult) -> str:
    """CSV with columns file, class_1, score_1, ..., class_k, score_k."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    k = len(result.predictions[0].classes) if result.predictions else 0
    writer.writerow(["file"] + [f"{what}_{i + 1}" for i in range(k) for what in ("class", "score")])
    for p in result.predictions:
        writer.writerow([p.file] + [v for c, s in zip(p.classes, p.scores) for v in (c, f"{s:.6f}")])
    return out.getvalue()


def format_json(result: PredictionResult) -> str:
    """PredictionResult.to_dict() as indented JSON."""
    return json.dumps(result.to_dict(), indent=2) + "\n"


FORMATS: dict[str, Callable[[PredictionResult], str]] = {"table": format_table, "csv": format_csv,
                                                         "json": format_json}
