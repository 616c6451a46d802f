"""A finished run read back from runs/<name>/: its model, class names, input size, config and data source.

Every job that starts from a fitted run (evaluate, export, predict, domain, adapt) reads it through this module,
so what "a finished run" means (model.keras present, labels.txt matching the model's outputs, the input size
from metrics.json or config.yaml) is written once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

import tftransfer.model.layers  # noqa: F401  (registers Preprocess and InferenceBackbone for deserialization)
from tftransfer.config.experiment import DataConfig, load_config, read_yaml
from tftransfer.core.errors import ConfigError, DataError, RunDirError
from tftransfer.core.io import read_json
from tftransfer.data.sources import DataSource
from tftransfer.data.specs import source_from_config
from tftransfer.runs.layout import RunDir, is_saved_model_dir
from tftransfer.runs.records import RunMetrics, read_run_metrics

logger = logging.getLogger(__name__)


@dataclass
class FinishedRun:
    """A fitted run: its Keras model, class names, input size and data settings."""

    path: Path
    model: Any
    class_names: list[str]
    image_size: int
    data_config: DataConfig | None  # None when config.yaml cannot be read

    @property
    def layout(self) -> RunDir:
        """The run directory's file layout."""
        return RunDir(self.path)

    def metrics(self) -> RunMetrics | None:
        """metrics.json, or None when the run has none."""
        return read_run_metrics(self.layout.metrics)

    def source(self) -> DataSource | None:
        """The run's training data listed again (see load_run_source)."""
        return load_run_source(self.path)


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
    run = RunDir(Path(run_dir))
    metrics = read_run_metrics(run.metrics)
    if metrics is not None and metrics.image_size is not None:
        return metrics.image_size
    size = (read_yaml(run.config).get("data") or {}).get("image_size") if run.config.is_file() else None
    if isinstance(size, int) and size > 0:
        return size
    raise RunDirError(f"{run.path}: cannot tell the input size (no run.image_size in metrics.json and no "
                      "data.image_size in config.yaml); pass --image-size")


def load_run_source(run_dir: str | Path) -> DataSource | None:
    """The run's data, listed again with its config's data settings; None, with a warning, when it cannot be.

    A split whose fingerprint differs from split.json (images added or removed since training) is still returned,
    with a warning; a data set whose classes differ from labels.txt is not.
    """
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


def _data_config(run: RunDir) -> DataConfig | None:
    if not run.config.is_file():
        return None
    try:
        return load_config(run.config).data
    except ConfigError as exc:
        logger.warning("cannot read the data settings of %s: %s", run.path, exc)
        return None


def load_run(path: str | Path, image_size: int | None = None) -> FinishedRun:
    """A run directory (or its model.keras) as a FinishedRun; RunDirError when it is not a finished run."""
    path = Path(path)
    if path.is_file() and path.suffix == ".keras":
        path = path.parent
    if not path.is_dir():
        raise RunDirError(f"model not found: {path} (pass a run directory, runs/<name>)")
    if is_saved_model_dir(path):
        raise RunDirError(f"{path} is an exported SavedModel; this needs the run directory it came from "
                          "(runs/<name>), whose Keras model exposes features and BatchNorm layers")
    run = RunDir(path)
    model = load_run_model(path)
    names = read_labels(run.labels)
    outputs = int(model.output_shape[-1])
    if outputs != len(names):
        raise RunDirError(f"{run.labels} lists {len(names)} classes but {run.model} outputs {outputs}")
    return FinishedRun(path=path, model=model, class_names=names, image_size=image_size or run_image_size(path),
                       data_config=_data_config(run))
