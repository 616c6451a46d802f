"""Run-directory layout: resolved config, split, history, metrics, checkpoints, logs. Never deletes a run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.core.names import path_component_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """Paths inside runs/<name>/."""

    path: Path

    @property
    def config(self) -> Path:  # noqa: D102
        return self.path / "config.yaml"

    @property
    def history(self) -> Path:  # noqa: D102
        return self.path / "history.json"

    @property
    def metrics(self) -> Path:  # noqa: D102
        return self.path / "metrics.json"

    @property
    def summary(self) -> Path:  # noqa: D102
        return self.path / "summary.md"

    @property
    def split(self) -> Path:  # noqa: D102
        return self.path / "split.json"

    @property
    def skipped(self) -> Path:  # noqa: D102
        return self.path / "skipped_files.txt"

    @property
    def logs(self) -> Path:  # noqa: D102
        return self.path / "logs"

    @property
    def checkpoints(self) -> Path:  # noqa: D102
        return self.path / "checkpoints"

    @property
    def model(self) -> Path:
        """The final Keras model (preprocessing included), loadable with keras.models.load_model."""
        return self.path / "model.keras"

    @property
    def labels(self) -> Path:  # noqa: D102
        return self.path / "labels.txt"


def check_run_name(name: str, what: str = "run name") -> str:
    """`name` when it is one safe folder name (see core.names.path_component_problem), else a one-line ConfigError.

    A run name becomes runs/<name>/ and saved_models/<name>/: `.`, `..`, `../../X` or `a/b` would be a path.
    """
    problem = path_component_problem(name)
    if problem:
        raise ConfigError(f"{what} {name!r} is not usable: {problem}; a {what} becomes one folder "
                          "(runs/<name>/, saved_models/<name>/): use letters, digits, '-', '_' and '.'")
    return name


def create_run_dir(runs_dir: str | Path, name: str, overwrite: bool = False) -> RunDir:
    """Makes runs/<name>/; an existing one is refused, or with overwrite moved aside (never deleted).

    `name` must be one folder name (check_run_name): a ConfigError before anything is created otherwise.
    """
    path = Path(runs_dir) / check_run_name(name)
    if path.exists():
        if not overwrite:
            raise RunDirError(f"run directory {path} already exists; choose another --name, or pass --overwrite "
                              f"(the old run is kept as {path}.replaced-<time>)")
        backup = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(backup)
        logger.warning("moved the previous run %s to %s", path, backup)
    run = RunDir(path)
    for sub in (run.path, run.logs, run.checkpoints):
        sub.mkdir(parents=True, exist_ok=True)
    return run


def is_saved_model_dir(path: str | Path) -> bool:
    """True for a SavedModel directory (saved_model.pb inside)."""
    return (Path(path) / "saved_model.pb").is_file()


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest integer-named child of model_dir holding a SavedModel, or None."""
    if not model_dir.is_dir():
        return None
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and is_saved_model_dir(p)]
    return max(versions, key=lambda p: int(p.name)) if versions else None
