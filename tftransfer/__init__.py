"""tftransfer: transfer learning for keras.applications backbones, from a folder of images to TF Serving.

The public Python API (each returns the same typed result the matching command prints):

    import tftransfer
    result = tftransfer.fit("configs/smoke.yaml", values={"data.path": "images/", "phases.head.epochs": 3})
    report = tftransfer.evaluate(result.run_dir, "images/", split="val")
    exported = tftransfer.export(result.run_dir, tflite="int8")
    preds = tftransfer.predict(result.run_dir, ["photo.jpg"])
    shift = tftransfer.domain_report(result.run_dir, target="other_domain/", adapt="all")
    small = tftransfer.distill(result.run_dir, "mobilenet", values={"model.weights": "w.h5"}, train_baseline=True)
    table = tftransfer.compress_report([result.run_dir, small.run_dir], tflite=("float32", "int8-uint8"))

Importing tftransfer does not import TensorFlow; each function imports its job on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tftransfer.config.commands import (
    AdaptCommandConfig,
    CompressReportCommandConfig,
    DomainCommandConfig,
    EvaluateCommandConfig,
    ExportCommandConfig,
    PredictCommandConfig,
)
from tftransfer.config.experiment import ExperimentConfig, load_config
from tftransfer.core.lazy import resolve

__version__ = "0.1.0"

# public name -> the library function behind it (module:attribute), imported when first looked up
_JOBS = {
    "evaluate": "tftransfer.jobs.evaluate:run_evaluation",
    "export": "tftransfer.jobs.export:export_run",
    "compress_report": "tftransfer.jobs.compress_report:run_compress_report",
    "predict": "tftransfer.jobs.predict:predict_files",
    "domain_report": "tftransfer.jobs.domain:run_domain",
    "adapt": "tftransfer.jobs.adapt:run_adapt",
    "inspect": "tftransfer.data.inspect:inspect_data",
    "lr_find": "tftransfer.jobs.lr_find:run_lr_find",
    "select": "tftransfer.jobs.select:run_select",
    "distill": "tftransfer.jobs.distill:run_distill",
}

# ExportCommandConfig and the like: the settings of a job besides fit as one frozen dataclass (tftransfer.config.
# commands); each job takes one, or its fields as keywords.
__all__ = ["ExperimentConfig", "AdaptCommandConfig", "CompressReportCommandConfig", "DomainCommandConfig",
           "EvaluateCommandConfig", "ExportCommandConfig", "PredictCommandConfig", "fit", "load_config", *_JOBS]


def fit(config: str | Path | ExperimentConfig | None = None, *, values: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (), recipe: str | None = None, overwrite: bool = False,
        resume: str | Path | None = None) -> Any:
    """Trains a run as `tftransfer fit` does and returns its FitResult (run_dir, metrics, model).

    `config` is a YAML path or an ExperimentConfig; `values` are dotted keys ({"data.path": ...}) and `overrides`
    `key=value` strings, applied on top, as --set does. With `resume`, the run continues with its saved config.
    """
    if resume is not None:
        return resolve("tftransfer.jobs.fit:run_fit")(None, resume=resume)
    if isinstance(config, ExperimentConfig):
        if values or overrides or recipe:
            raise TypeError("pass values/overrides/recipe with a YAML path, not with an ExperimentConfig")
        cfg = config
    else:
        cfg = load_config(config, overrides=overrides, values=values, recipe=recipe)
    # resolved after the config is valid, so a bad key is reported before TensorFlow is imported
    return resolve("tftransfer.jobs.fit:run_fit")(cfg, overwrite=overwrite)


def __getattr__(name: str) -> Any:
    if name in _JOBS:
        return resolve(_JOBS[name])
    raise AttributeError(f"module 'tftransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_JOBS])
