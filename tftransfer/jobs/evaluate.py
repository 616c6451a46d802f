"""Prediction over a tf.data pipeline and JSON-ready classification metrics, calibration included."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer.config.commands import EvaluateCommandConfig, command_config
from tftransfer.config.experiment import DataConfig, load_config
from tftransfer.core.errors import ConfigError, DataError, RunDirError
from tftransfer.core.io import same_path, versioned_dir, write_json
from tftransfer.data.files import make_indexed_dataset
from tftransfer.data.images import decode_and_resize
from tftransfer.data.selection import align_classes, select_split
from tftransfer.data.sources import DataSource, Split
from tftransfer.data.specs import load_source
from tftransfer.evaluation.metrics import (
    calibration_metrics,
    classification_metrics,
    confident_mistakes,
    fit_temperature,
    measure_latency,
)
from tftransfer.reporting import grids
from tftransfer.reporting import run_summary as report
from tftransfer.runs.finished import load_run_source
from tftransfer.runs.layout import RunDir
from tftransfer.serving.classifier import Classifier, load_classifier, predict_batches

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The `tftransfer evaluate` job

EVALUATION_SCHEMA_VERSION = 1
EVALUATION_KIND = "evaluation"


@dataclass
class EvaluationResult:
    """Where an evaluation wrote its files, and its metrics.json content."""

    output_dir: Path
    metrics: dict[str, Any]


def load_evaluation_source(data: str, split: str, classifier: Classifier, val_split: float | None = None,
                           test_split: float | None = None, tfds_data_dir: str = "") -> DataSource:
    """Lists `data` for evaluation. "auto" and "all" draw no hash split; "train", "val" and "test" draw the one
    the classifier's run used (its val_split, test_split, stratify), so `--split val` on the run's data is exactly
    its validation split. Explicit fractions override.
    """
    cfg = _run_data_config(classifier)
    cfg = cfg if cfg is not None else DataConfig()
    # a manifest the run was allowed to read outside its folder may be evaluated the same way
    outside = cfg.allow_outside_paths
    if split in ("auto", "all"):
        return load_source(data, 0.0, False, tfds_data_dir, test_split=0.0, allow_outside_paths=outside)
    val = val_split if val_split is not None else cfg.val_split
    test = test_split if test_split is not None else cfg.test_split
    stratify = bool(getattr(cfg, "stratify", False))
    return load_source(data, val, False, tfds_data_dir, test_split=test, stratify=stratify,
                       allow_outside_paths=outside)


def _run_data_config(classifier: Classifier) -> Any:
    """The data section of the classifier's run config, or None without a (loadable) run."""

    if classifier.run_dir is None:
        return None
    try:
        return load_config(RunDir(classifier.run_dir).config).data
    except ConfigError as exc:
        logger.warning("cannot read the data settings of %s: %s", classifier.run_dir, exc)
        return None


OWN_HELD_OUT = "own-held-out"  # the split resolve_evaluation_data gives "auto" on a run's own data


def resolve_evaluation_data(classifier: Classifier, data: str | None, split: str, tfds_data_dir: str = ""
                            ) -> tuple[str, str, str]:
    """(data, split, tfds_data_dir) to evaluate on. `data` None is the classifier's run's own data (config.yaml's
    data.path and tfds_data_dir); there "auto" becomes OWN_HELD_OUT: the run's test split if it had one, else its
    validation split, drawn with the run's own fractions, never every example (that would score the training
    images). "all" on the run's own data is allowed, with a warning that it includes the training images.
    """
    own = _run_data_config(classifier)
    if data is None:
        if own is None or not own.path:
            raise ConfigError(f"{classifier.path} is not a run directory whose config.yaml names its data; give "
                              "--data")
        data, tfds_data_dir = own.path, tfds_data_dir or own.tfds_data_dir
        logger.info("evaluating on the run's own data %s", data)
        if split == "auto":
            split = OWN_HELD_OUT
    if split == "all" and own is not None and own.path and same_path(data, own.path):
        logger.warning("--split all on the run's own data %s includes the images it was trained on: the score is "
                       "not a held-out estimate (--split val or --split test is)", data)
    return data, split, tfds_data_dir


def _safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def default_evaluation_dir(classifier: Classifier, data_label: str) -> Path:
    """<run>/eval/<data>-<split> for a run; evaluations/<name>-v<version>/<data>-<split> for an export."""
    if classifier.kind == "run":
        return classifier.path / "eval" / data_label
    return Path("evaluations") / _safe_label(classifier.name.replace("/v", "-v")) / data_label


def _holds_evaluation(folder: Path) -> bool:
    return (folder / "metrics.json").exists()


def evaluation_output_dir(wanted: Path, overwrite: bool) -> Path:
    """The folder an evaluation is written to: `wanted`, or (when it holds an earlier evaluation and not
    `overwrite`) the next free wanted-2, wanted-3, ..., so a second evaluation never replaces the first.

    A run directory or an export version is refused even with `overwrite`: its metrics.json and summary.md (or
    its SavedModel) are not an evaluation's to replace.
    """
    if RunDir(wanted).config.is_file() or (wanted / "saved_model.pb").is_file():
        raise RunDirError(f"{wanted} is a run directory or an exported model, whose own files an evaluation must "
                          "not replace; give another --output (the default is RUN/eval/<data>-<split>)")
    if overwrite and wanted.is_dir():
        if _holds_evaluation(wanted):
            logger.info("replacing the evaluation in %s (--overwrite)", wanted)
        return wanted
    out = versioned_dir(wanted, _holds_evaluation)
    if out != wanted:
        logger.info("%s holds an earlier evaluation, kept; writing this one to %s", wanted, out)
    return out


def _predict_split(classifier: Classifier, examples: Split, labels: np.ndarray, batch_size: int, what: str
                   ) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(labels, probabilities, file names, seconds) of the examples TensorFlow could decode, in data order."""
    dataset = make_indexed_dataset(classifier.image_size, batch_size, paths=examples.paths, images=examples.images)
    for _, pixels in dataset.take(1):
        # Untimed warm-up on a full batch: the first call traces the model, which is not throughput.
        classifier.predict(pixels.numpy())
    indices, probs, seconds = predict_batches(classifier, dataset, len(examples), what=what)
    names = examples.paths if examples.paths is not None else examples.keys
    if len(indices) < len(examples):
        lost = sorted(set(range(len(examples))) - set(indices.tolist()))
        logger.warning("%d images could not be decoded by TensorFlow and were left out: %s", len(lost),
                       ", ".join(str(names[i]) for i in lost[:10]))
    return labels[indices], probs, [str(names[i]) for i in indices], seconds


def _run_validation_set(classifier: Classifier) -> tuple[Split, np.ndarray, str] | None:
    """The validation split of the classifier's run, re-listed from its data, with labels in model ids."""
    assert classifier.run_dir is not None
    source = load_run_source(classifier.run_dir)
    if source is None or source.val is None or len(source.val) == 0:
        return None
    mapping = align_classes(classifier.class_names, source.class_names, source.root)
    return source.val, mapping[source.val.labels], source.root


def _calibration(classifier: Classifier, y: np.ndarray, probs: np.ndarray, eval_root: str, eval_split: Split,
                 batch_size: int, ece_bins: int) -> dict[str, Any]:
    """Fits a temperature on the run's validation split (or, lacking one, the evaluated data) and reports both."""
    val = _run_validation_set(classifier) if classifier.run_dir is not None else None
    if val is not None and not (Path(val[2]).resolve() == Path(eval_root).resolve()
                                and sorted(val[0].keys) == sorted(eval_split.keys)):
        split, labels, root = val
        y_fit, p_fit, _, _ = _predict_split(classifier, split, labels, batch_size,
                                        "temperature fit on the run's validation split")
        fitted_on, in_sample = f"validation split of run {classifier.run_dir} ({root})", False
    else:
        y_fit, p_fit = y, probs
        in_sample = True
        fitted_on = ("the evaluated data, which is the run's validation split" if val is not None
                     else "the evaluated data (no separate validation data was available)")
    temperature = fit_temperature(y_fit, p_fit)
    result = calibration_metrics(y, probs, temperature, ece_bins=ece_bins)
    result.update(fitted_on=fitted_on, fit_examples=int(len(y_fit)), in_sample=in_sample)
    logger.info("temperature %.3f (fitted on %s): ECE %.4f -> %.4f, NLL %.4f -> %.4f", temperature, fitted_on,
                result["before"]["ece"], result["after"]["ece"], result["before"]["log_loss"],
                result["after"]["log_loss"])
    return result


def run_evaluation(model: str | Path, data: str | None = None, config: EvaluateCommandConfig | None = None,
                   **settings: Any) -> EvaluationResult:
    """The `tftransfer evaluate` job: a run directory or SavedModel on any data source -> metrics, summary, plots.

    `data` None is a run's own data (see resolve_evaluation_data). Settings come as an EvaluateCommandConfig or
    as its fields by keyword (`split="val"`); an unknown or ill-typed one is a ConfigError naming it. Writes
    metrics.json (schema: docs/metrics_schema.md), summary.md, confusion_matrix.png and reliability.png to
    `output` (default `default_evaluation_dir`), and for a run directory the plots as TensorBoard images under
    <run>/logs/eval/<data>-<split>. The prediction pass reports its progress (tftransfer.core.progress).
    """
    cfg = command_config(EvaluateCommandConfig, config, settings)
    started = time.perf_counter()
    batch_size, ece_bins = cfg.batch_size, cfg.ece_bins
    if data is None and not RunDir(Path(model)).config.is_file():
        raise ConfigError(f"{model} is not a run directory (no config.yaml), so it has no data of its own; give "
                          "--data")
    classifier = load_classifier(model, image_size=cfg.image_size, batch_size=batch_size)
    data, split, tfds_data_dir = resolve_evaluation_data(classifier, data, cfg.split, cfg.tfds_data_dir)
    source = load_evaluation_source(data, split, classifier, cfg.val_split, cfg.test_split, tfds_data_dir)
    if split == OWN_HELD_OUT:
        split = "test" if source.test is not None and len(source.test) > 0 else "val"
    examples, split_name = select_split(source, split)
    mapping = align_classes(classifier.class_names, source.class_names, f"{data} ({split_name})")
    label = _safe_label(f"{source.name}-{split_name}")
    out = evaluation_output_dir(cfg.output if cfg.output is not None else default_evaluation_dir(classifier, label),
                                cfg.overwrite)
    logger.info("evaluating %s (%s) on %d %s examples of %s", classifier.path, classifier.kind, len(examples),
                split_name, data)

    y, probs, files, seconds = _predict_split(classifier, examples, mapping[examples.labels], batch_size,
                                              f"evaluate {split_name}")
    if len(y) == 0:
        raise DataError(f"none of the {len(examples)} examples of {data} could be decoded")
    metrics = classification_metrics(y, probs, classifier.class_names, top_k=cfg.top_k, ece_bins=ece_bins)
    sample = next(iter(make_indexed_dataset(classifier.image_size, max(cfg.latency_runs, 1),
                                            paths=examples.paths, images=examples.images)))[1].numpy()
    latency = measure_latency(classifier.predict, sample, runs=cfg.latency_runs)
    calibration = _calibration(classifier, y, probs, source.root, examples, batch_size, ece_bins) \
        if cfg.temperature else None

    result = _evaluation_record(classifier, data, source, split_name, examples, y, probs, files, metrics,
                                calibration, batch_size, seconds, latency, cfg.mistakes)
    _write_evaluation(result, out, classifier, label, started)
    logger.info("accuracy %.4f, macro-F1 %.4f, ECE %.4f on %d images (%.1f images/s); wrote %s",
                metrics["accuracy"], metrics["macro_f1"], metrics["ece"], len(y),
                result["timing"]["images_per_second"] or 0.0, out)
    return EvaluationResult(out, result)


def _evaluation_record(classifier: Classifier, data: str, source: DataSource, split_name: str, examples: Split,
                       y: np.ndarray, probs: np.ndarray, files: list[str], metrics: dict[str, Any],
                       calibration: dict[str, Any] | None, batch_size: int, seconds: float, latency: Any,
                       mistakes: int) -> dict[str, Any]:
    """The evaluation's metrics.json, without its total time."""
    return {
        "schema_version": EVALUATION_SCHEMA_VERSION,
        "kind": EVALUATION_KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": str(classifier.path), "kind": classifier.kind, "name": classifier.name,
                  "class_names": classifier.class_names, "image_size": classifier.image_size,
                  "run_dir": str(classifier.run_dir) if classifier.run_dir else None},
        "data": {"spec": data, "name": source.name, "root": source.root, "split": split_name,
                 "split_method": source.split_method, "class_names": source.class_names,
                 "num_examples": int(len(y)), "listed_examples": len(examples),
                 "skipped_files": [{"file": f, "reason": r} for f, r in source.skipped]},
        "metrics": metrics,
        "calibration": calibration,
        "timing": {"batch_size": batch_size, "seconds": seconds,
                   "images_per_second": len(y) / seconds if seconds > 0 else None,
                   "latency": latency},
        "mistakes": confident_mistakes(y, probs, files, classifier.class_names, n=mistakes),
        "versions": {"tftransfer": tftransfer.__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
    }


def _write_evaluation(result: dict[str, Any], out: Path, classifier: Classifier, label: str, started: float) -> None:
    """Plots, metrics.json and summary.md in `out`; for a run directory, the plots as TensorBoard images too."""
    metrics = result["metrics"]
    out.mkdir(parents=True, exist_ok=True)
    _write_evaluation_plots(report, out, metrics)
    _write_top_losses(result, out, classifier.image_size)
    result["timing"]["total_seconds"] = time.perf_counter() - started
    write_json(out / "metrics.json", result)
    report.write_evaluation_summary(result, out)
    if classifier.kind == "run":
        report.write_tensorboard_images(
            RunDir(classifier.path).logs / "eval" / label,
            {name: out / name for name in (report.CONFUSION_MATRIX_PNG, report.RELIABILITY_PNG)
             if (out / name).is_file()},
            scalars={"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"],
                     "log_loss": metrics["log_loss"]})


def _write_top_losses(result: dict[str, Any], out: Path, image_size: int) -> None:
    """top_losses.png: the most confident mistakes as pictures (data in memory has no files: no grid)."""
    def load(file: str) -> np.ndarray | None:
        path = Path(file)
        if not path.is_file():
            return None
        try:
            return decode_and_resize(tf.constant(path.read_bytes()), image_size).numpy()
        except tf.errors.OpError:
            return None

    try:
        drawn = grids.plot_top_losses(result.get("mistakes") or [], load, out / grids.TOP_LOSSES_PNG)
    except Exception:  # noqa: BLE001  (a picture must not cost the evaluation its metrics)
        logger.exception("could not draw %s", out / grids.TOP_LOSSES_PNG)
        return
    if drawn is not None:
        logger.info("wrote %s", drawn)


def _write_evaluation_plots(report: Any, out: Path, metrics: dict[str, Any]) -> None:
    """Confusion matrix and reliability diagram; a plotting failure must not cost the evaluation its metrics."""
    try:
        report.plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"],
                                     out / report.CONFUSION_MATRIX_PNG)
        report.plot_reliability_diagram(metrics["reliability"], out / report.RELIABILITY_PNG)
    except Exception:  # noqa: BLE001
        logger.exception("could not draw the plots in %s", out)
