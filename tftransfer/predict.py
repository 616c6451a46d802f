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
import glob
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.data.probe import IMAGE_EXTENSIONS, probe_images
from tftransfer.data.sources import DataSource, source_from_config
from tftransfer.errors import DataError, RunDirError
from tftransfer.workdir import RunDir, read_json

logger = logging.getLogger(__name__)

MODEL_CARD_FILE = "model_card.json"
# A picture a few pixels wide carries no content a classifier can use (a 1x1 image upsampled to 224 px is one
# flat colour), so its "prediction" would be noise presented as an answer.
MIN_IMAGE_SIDE = 8


@dataclass
class Classifier:
    """A loaded model: `predict(pixels)` maps float32 [N, S, S, 3] pixels in [0, 255] to [N, C] probabilities."""

    kind: str  # "run" or "saved_model"
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
        return self.path.name


def is_saved_model_dir(path: str | Path) -> bool:
    """True for a SavedModel directory (saved_model.pb inside)."""
    return (Path(path) / "saved_model.pb").is_file()


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest integer-named child of model_dir holding a SavedModel, or None."""
    if not model_dir.is_dir():
        return None
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and is_saved_model_dir(p)]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def load_classifier(path: str | Path, image_size: int | None = None, batch_size: int = 32) -> Classifier:
    """Loads a run directory or an exported SavedModel; RunDirError says what is missing when it is neither.

    `image_size` overrides the size the model was trained at (needed only for a SavedModel without a
    model_card.json).
    """
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"model not found: {path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file; pass a run directory (runs/<name>) or an exported SavedModel "
                          "directory (saved_models/<name>/<version>)")
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


def read_labels(path: Path) -> list[str]:
    """Class names of a labels.txt, one per line; RunDirError when missing or empty."""
    if not path.is_file():
        raise RunDirError(f"missing labels file: {path}")
    names = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if len(names) < 2:
        raise RunDirError(f"{path} lists {len(names)} class names; a classifier needs at least 2")
    return names


def load_run_model(run_dir: str | Path) -> Any:
    """The run's model.keras (preprocessing included), loaded without its training configuration."""
    import keras

    import tftransfer.layers  # noqa: F401  (registers Preprocess and InferenceBackbone for deserialization)

    run = RunDir(Path(run_dir))
    if not run.model.is_file():
        raise RunDirError(f"{run.path} has no finished model ({run.model.name} is missing): the run did not "
                          f"finish; continue it with `tftransfer fit --resume {run.path}`")
    try:
        # compile=False: the optimizer and loss are training state; inference needs neither.
        return keras.models.load_model(run.model, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RunDirError(f"cannot load {run.model}: {exc}") from exc


def run_image_size(run_dir: str | Path) -> int:
    """The input size a run trained at: metrics.json's run.image_size, else config.yaml's data.image_size."""
    from tftransfer.config import read_yaml

    run = RunDir(Path(run_dir))
    if run.metrics.is_file():
        size = (read_json(run.metrics).get("run") or {}).get("image_size")
        if isinstance(size, int) and size > 0:
            return size
    size = (read_yaml(run.config).get("data") or {}).get("image_size")
    if isinstance(size, int) and size > 0:
        return size
    raise RunDirError(f"{run.path}: cannot tell the input size (no run.image_size in metrics.json and "
                      "data.image_size is 0 in config.yaml); pass --image-size")


def load_run_source(run_dir: str | Path) -> DataSource | None:
    """The run's data, listed again with its config's data settings; None, with a warning, when it cannot be.

    A split whose fingerprint differs from split.json (images added or removed since training) is still returned,
    with a warning; a data set whose classes differ from labels.txt is not.
    """
    from tftransfer.config import load_config
    from tftransfer.errors import ConfigError

    run = RunDir(Path(run_dir))
    try:
        source = source_from_config(load_config(run.config).data)
    except (ConfigError, DataError) as exc:
        logger.warning("the training data of %s is not available: %s", run.path, exc)
        return None
    names = read_labels(run.labels)
    if source.class_names != names:
        logger.warning("the data of %s now has classes %s, but the model was trained on %s; not using it", run.path,
                       source.class_names, names)
        return None
    if run.split.is_file() and read_json(run.split).get("fingerprint") != source.split_record()["fingerprint"]:
        logger.warning("the data of %s changed since training (split fingerprint differs from %s)", run.path,
                       run.split)
    return source


def _load_run(path: Path, image_size: int | None) -> Classifier:
    from tftransfer.evaluate import stable_softmax

    run = RunDir(path)
    model = load_run_model(path)
    names = read_labels(run.labels)
    size = image_size or run_image_size(path)
    outputs = int(model.output_shape[-1])
    if outputs != len(names):
        raise RunDirError(f"{run.labels} lists {len(names)} classes but {run.model} outputs {outputs}")

    def predict(pixels: np.ndarray) -> np.ndarray:
        # predict_on_batch reuses one compiled inference step instead of an eager call per batch.
        return stable_softmax(np.asarray(model.predict_on_batch(np.asarray(pixels, np.float32))))

    return Classifier(kind="run", path=path, class_names=names, image_size=size, predict=predict, run_dir=path,
                      keras_model=model)


def _load_saved_model(path: Path, image_size: int | None, batch_size: int) -> Classifier:
    from tftransfer.export import LABELS_FILE, load_exported, predict_exported_pixels

    loaded = load_exported(path)  # RunDirError when a signature is missing
    card_path = path / MODEL_CARD_FILE
    card = read_json(card_path) if card_path.is_file() else {}
    labels = path / LABELS_FILE if (path / LABELS_FILE).is_file() else path / "assets" / LABELS_FILE
    names = read_labels(labels)
    size = image_size or (card.get("input") or {}).get("image_size")
    if not isinstance(size, int) or size < 1:
        raise RunDirError(f"{path} has no {MODEL_CARD_FILE} saying its input size; pass --image-size")
    run_dir = card.get("run_dir")
    run_path = Path(run_dir) if run_dir and RunDir(Path(run_dir)).config.is_file() else None

    def predict(pixels: np.ndarray) -> np.ndarray:
        return predict_exported_pixels(loaded, pixels, batch_size=batch_size)

    return Classifier(kind="saved_model", path=path, class_names=names, image_size=size, predict=predict,
                      run_dir=run_path, saved_model=loaded, card=card)


# ---------------------------------------------------------------------------------------------------------------
# Image files


def _expand(item: str) -> tuple[list[Path], str | None]:
    """Image files named by a file, a folder (searched recursively) or a glob; (files, problem)."""
    path = Path(item)
    if path.is_file():
        return [path], None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return files, None if files else f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}"
    if glob.has_magic(item):
        matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
        files: list[Path] = []
        for match in matches:
            files += [match] if match.is_file() else _expand(str(match))[0]
        return files, None if files else f"the pattern {item!r} matches no files"
    return [], f"no such file or folder: {path}"


def collect_images(items: Sequence[str], min_side: int = MIN_IMAGE_SIDE) -> tuple[list[Path], list[tuple[str, str]]]:
    """Resolves files, folders and globs to readable image files; the rest comes back as (path, reason).

    Every file is decoded once with Pillow (as the data listing does), so a text file named .jpg, a truncated
    JPEG or a 1x1 pixel image is skipped with its reason instead of failing a batch.
    """
    seen: set[Path] = set()
    candidates: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        files, problem = _expand(item)
        if problem:
            skipped.append((item, problem))
        for file in files:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                candidates.append(file)
    good: list[Path] = []
    for file, probe in zip(candidates, probe_images(candidates)):
        reason = probe.problem
        if reason is None and min(probe.width, probe.height) < min_side:
            reason = f"image is {probe.width}x{probe.height} px, smaller than the {min_side} px minimum"
        if reason:
            skipped.append((str(file), reason))
        else:
            good.append(file)
    return good, skipped


def make_indexed_dataset(image_size: int, batch_size: int, *, paths: Sequence[str] | None = None,
                         images: np.ndarray | None = None) -> Any:
    """Batches of (example index, float32 pixels) from files or uint8 arrays, resized like training does.

    The index survives a file that only TensorFlow fails to decode (it is dropped), so every prediction stays
    tied to its file.
    """
    import tensorflow as tf

    from tftransfer.data.images import decode_and_resize, resize_image

    if (paths is None) == (images is None):
        raise ValueError("pass exactly one of paths and images")
    n = len(paths) if paths is not None else len(images)  # type: ignore[arg-type]
    index = tf.range(n, dtype=tf.int64)
    if paths is not None:
        ds = tf.data.Dataset.from_tensor_slices((index, tf.constant([str(p) for p in paths], tf.string)))
        ds = ds.map(lambda i, p: (i, decode_and_resize(tf.io.read_file(p), image_size)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.ignore_errors()
    else:
        ds = tf.data.Dataset.from_tensor_slices((index, images))
        ds = ds.map(lambda i, x: (i, resize_image(tf.cast(x, tf.float32), image_size)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict_batches(classifier: Classifier, dataset: Any, total: int, progress: bool = False,
                    unit: str = "image") -> tuple[np.ndarray, np.ndarray, float]:
    """Runs the classifier over make_indexed_dataset batches: (indices, probabilities, seconds)."""
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(total, unit_name=unit)
    indices: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    seen = 0
    started = time.perf_counter()
    for index, pixels in dataset:
        indices.append(index.numpy())
        probs.append(np.asarray(classifier.predict(pixels.numpy()), np.float32))
        seen += len(indices[-1])
        if bar is not None:
            bar.update(seen)
    seconds = time.perf_counter() - started
    if not indices:
        return np.zeros((0,), np.int64), np.zeros((0, len(classifier.class_names)), np.float32), seconds
    return np.concatenate(indices), np.concatenate(probs), seconds


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


def predict_files(model: str | Path | Classifier, items: Sequence[str], top_k: int = 3, batch_size: int = 32,
                  min_side: int = MIN_IMAGE_SIDE, image_size: int | None = None) -> PredictionResult:
    """Classifies image files, folders and globs with a run directory or SavedModel; unreadable files are skipped.

    DataError when nothing readable is left.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    classifier = model if isinstance(model, Classifier) else load_classifier(model, image_size, batch_size)
    files, skipped = collect_images(items, min_side=min_side)
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

