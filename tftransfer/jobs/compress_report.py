"""compress-report: accuracy, parameters, size and latency of several models on the same images.

Each MODEL is a run directory (its Keras model, plus a TFLite conversion per `tflite` mode), an exported SavedModel
version (plus every model_*.tflite beside it) or model folder (its newest version), or a .tflite file. All are
scored on one split of one dataset (by default the first run's validation split), timed at batch 1 and at
`batch_size` on this CPU (the TFLite interpreter with its default XNNPACK delegate), and written to
compress_report.json, compress_report.md and pareto.png.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.config.commands import CompressReportCommandConfig, command_config
from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.core.io import gzip_size, write_json
from tftransfer.data.files import make_indexed_dataset
from tftransfer.data.selection import align_classes, select_split
from tftransfer.data.specs import load_source
from tftransfer.evaluation.metrics import measure_latency
from tftransfer.jobs.evaluate import load_evaluation_source, resolve_evaluation_data
from tftransfer.reporting.compress import format_compress_markdown, pareto_flags, plot_compress_pareto
from tftransfer.runs.finished import load_run_source
from tftransfer.runs.layout import RunDir
from tftransfer.serving.classifier import Classifier, load_classifier
from tftransfer.serving.parity import spread_indices
from tftransfer.serving.savedmodel import saved_model_files
from tftransfer.serving.tflite import (
    CALIBRATED_MODES,
    TflitePredictor,
    convert_to_tflite,
    embed_labels,
    load_interpreter,
    read_labels,
    representative_from_source,
    tflite_filename,
    tflite_parameters,
)

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1


@dataclass
class Candidate:
    """One model under comparison: how to call it and what to weigh."""

    name: str
    kind: str  # keras, saved_model, tflite
    mode: str | None  # the TFLite mode, when known
    files: list[Path]  # what is measured for size
    class_names: list[str]
    image_size: int
    predict: Callable[[np.ndarray], np.ndarray]
    parameters: int
    nonzero: int


@dataclass
class CompressReport:
    """Where the report went, and its content."""

    output_dir: Path
    report: dict[str, Any]


def _count(arrays: list[np.ndarray]) -> tuple[int, int]:
    return int(sum(a.size for a in arrays)), int(sum(np.count_nonzero(a) for a in arrays))


def _from_classifier(classifier: Classifier) -> Candidate:
    if classifier.kind == "run":
        arrays = [np.asarray(w) for w in classifier.keras_model.get_weights()]
        files, kind = [RunDir(classifier.path).model], "keras"
    else:
        arrays = [v.numpy() for v in classifier.saved_model.variables]
        files, kind = saved_model_files(classifier.path), "saved_model"
    total, nonzero = _count(arrays)
    return Candidate(classifier.name, kind, None, files, classifier.class_names, classifier.image_size,
                     classifier.predict, total, nonzero)


def _tflite_candidate(path: Path, name: str, class_names: list[str] | None, threads: int) -> Candidate:
    """A .tflite file; its labels are the embedded ones, else `class_names` (its export's), else an error."""
    labels = read_labels(path) or class_names
    if not labels:
        raise RunDirError(f"{path}: no labels inside the file and no export beside it; re-export it with "
                          "`tftransfer export RUN --tflite MODE` (which embeds them)")
    interpreter = load_interpreter(path, num_threads=threads)
    size = int(interpreter.get_input_details()[0]["shape_signature"][1])
    total, nonzero = tflite_parameters(path)
    mode = path.stem.removeprefix("model_") if path.stem.startswith("model_") else None
    return Candidate(name, "tflite", mode, [path], list(labels), size, TflitePredictor(interpreter), total, nonzero)


def _converted(classifier: Classifier, mode: str, cfg: CompressReportCommandConfig, threads: int) -> Candidate:
    """The run's model converted to TFLite `mode` (int8 modes calibrated on its training images), written to the
    output folder."""
    representative = None
    if mode in CALIBRATED_MODES:
        source = load_run_source(classifier.path)
        if source is None or len(source.train) == 0:
            raise RunDirError(f"{classifier.path}: --tflite {mode} calibrates on the run's training images, which "
                              "are not available (see data.path in its config.yaml)")
        representative, _ = representative_from_source(source, classifier.image_size, cfg.representative_images)
    flatbuffer = convert_to_tflite(classifier.keras_model, classifier.image_size, mode, representative)
    path = cfg.output / f"{classifier.name}_{tflite_filename(mode)}"
    path.write_bytes(embed_labels(flatbuffer, classifier.class_names))
    candidate = _tflite_candidate(path, f"{classifier.name} tflite {mode}", None, threads)
    candidate.mode = mode
    return candidate


def _candidates(path: Path, cfg: CompressReportCommandConfig, threads: int
                ) -> tuple[list[Candidate], Classifier | None]:
    """The models one MODEL argument stands for, and its classifier (None for a .tflite file)."""
    if path.is_file():
        if path.suffix != ".tflite":
            raise RunDirError(f"{path}: a file must be a .tflite model; pass runs and exports as folders")
        return [_tflite_candidate(path, path.name, None, threads)], None
    classifier = load_classifier(path)
    found = [_from_classifier(classifier)]
    if classifier.kind == "run":
        found += [_converted(classifier, mode, cfg, threads) for mode in cfg.tflite]
    else:
        found += [_tflite_candidate(lite, f"{classifier.name} tflite {lite.stem.removeprefix('model_')}",
                                    classifier.class_names, threads)
                  for lite in sorted(classifier.path.glob("model_*.tflite"))]
    return found, classifier


def _pixels(examples: Any, image_size: int, batch_size: int) -> np.ndarray:
    return np.concatenate([p.numpy() for _, p in make_indexed_dataset(
        image_size, batch_size, paths=examples.paths, images=examples.images)])


def _measure(candidate: Candidate, pixels: np.ndarray, labels: np.ndarray, cfg: CompressReportCommandConfig
             ) -> dict[str, Any]:
    """The candidate's row: accuracy on the images, parameters, file sizes and both latencies."""
    started = time.perf_counter()
    probs = np.concatenate([candidate.predict(pixels[i:i + cfg.batch_size])
                            for i in range(0, len(pixels), cfg.batch_size)])
    seconds = time.perf_counter() - started
    batch1 = measure_latency(candidate.predict, pixels, runs=cfg.latency_runs)
    batched = measure_latency(candidate.predict, pixels, runs=cfg.latency_runs, batch_size=cfg.batch_size)
    size = int(sum(f.stat().st_size for f in candidate.files))
    row = {"name": candidate.name, "kind": candidate.kind, "mode": candidate.mode,
           "files": [str(f) for f in candidate.files], "image_size": candidate.image_size,
           "accuracy": float(np.mean(probs.argmax(axis=1) == labels)), "examples": int(len(labels)),
           "parameters": candidate.parameters, "nonzero_parameters": candidate.nonzero,
           "sparsity": 1.0 - candidate.nonzero / candidate.parameters if candidate.parameters else None,
           "size_bytes": size, "gzip_bytes": gzip_size(candidate.files),
           "latency_batch1_ms": batch1["p50_ms"], "latency_batch1": batch1,
           f"latency_batch{cfg.batch_size}_ms": batched["p50_ms"], "latency_batched": batched,
           "scoring_seconds": seconds}
    logger.info("%s: accuracy %.4f, %d parameters (%d nonzero), %d bytes (gzip %d), batch 1 %.2f ms, batch %d "
                "%.2f ms", candidate.name, row["accuracy"], candidate.parameters, candidate.nonzero, size,
                row["gzip_bytes"], batch1["p50_ms"], cfg.batch_size, batched["p50_ms"])
    return row


def run_compress_report(models: list[str | Path], config: CompressReportCommandConfig | None = None,
                        **settings: Any) -> CompressReport:
    """Scores `models` (runs, exports, .tflite files) on the same images and writes the comparison to cfg.output.

    Settings come as a CompressReportCommandConfig or as its fields by keyword; an unknown or ill-typed one is a
    ConfigError naming it.
    """
    cfg = command_config(CompressReportCommandConfig, config, settings)
    if not models:
        raise ConfigError("compress-report: give at least one run, export or .tflite file")
    cfg.output.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or os.cpu_count() or 1
    candidates: list[Candidate] = []
    anchor: Classifier | None = None  # the model whose run gives the default data and split
    for model in models:
        found, classifier = _candidates(Path(model), cfg, threads)
        candidates += found
        if anchor is None and classifier is not None and classifier.run_dir is not None:
            anchor = classifier
    if anchor is None and not cfg.data:
        raise ConfigError("compress-report: no run among the models to take the data from; pass --data")
    if anchor is not None:
        data, split, tfds_dir = resolve_evaluation_data(anchor, cfg.data or None, cfg.split)
        source = load_evaluation_source(data, split, anchor, tfds_data_dir=tfds_dir)
    else:  # .tflite files alone: the data's own val/ or test/ folder, no hash split
        data, split = cfg.data, cfg.split
        source = load_source(data, 0.0, False, test_split=0.0)
    examples, split_name = select_split(source, split)
    if cfg.max_images:
        examples = examples.subset(spread_indices(len(examples), cfg.max_images))
    pixels: dict[int, np.ndarray] = {}
    rows = []
    for candidate in candidates:
        if candidate.image_size not in pixels:
            pixels[candidate.image_size] = _pixels(examples, candidate.image_size, cfg.batch_size)
        mapping = align_classes(candidate.class_names, source.class_names, f"{data} ({split_name})")
        rows.append(_measure(candidate, pixels[candidate.image_size], mapping[examples.labels], cfg))
    pareto_flags(rows)
    report = {"schema_version": REPORT_SCHEMA_VERSION, "data": str(data), "split": split_name,
              "examples": int(len(examples)), "batch_size": cfg.batch_size, "latency_runs": cfg.latency_runs,
              "tflite_threads": threads, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
              "models": rows}
    plot = plot_compress_pareto(rows, cfg.output / "pareto.png")
    report["plot"] = plot.name if plot is not None else None
    write_json(cfg.output / "compress_report.json", report)
    (cfg.output / "compress_report.md").write_text(format_compress_markdown(report))
    return CompressReport(cfg.output, report)
