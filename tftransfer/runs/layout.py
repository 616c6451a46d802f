"""Run-directory layout: resolved config, split, history, metrics, checkpoints, logs. Never deletes a run."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

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

    `name` must be one folder name (check_run_name): a ConfigError before anything is created otherwise. The run
    folder is made with one `mkdir` that fails when it exists: that is the lock, so of two processes started at
    the same instant with the same name exactly one gets the new folder and the other a RunDirError (checking
    first and then `mkdir(exist_ok=True)` gave both of them the same "new" folder). With overwrite, moving the old
    run aside and making the new folder happen under an exclusive lock on runs_dir, and only the run that was
    there when the call began is moved: never the new folder another process made meanwhile.
    """
    path = Path(runs_dir) / check_run_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        seen = _inode(path)
        with _folder_lock(path.parent):
            now = _inode(path)
            if now is not None and now != seen:
                raise RunDirError(f"run directory {path} was created by another process just now (a run started "
                                  "at the same moment with the same --name); choose another --name")
            if now is not None:
                _move_aside(path)
            _make_new(path)
    else:
        _make_new(path)
    run = RunDir(path)
    for sub in (run.logs, run.checkpoints):
        sub.mkdir(exist_ok=True)
    return run


def _inode(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`, or None when it does not exist: tells a folder from one made in its place."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself while the block runs (released by the OS if the process dies).

    Where there is no fcntl (Windows), no lock: the exclusive mkdir still gives a new folder to one process only.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _make_new(path: Path) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        raise RunDirError(f"run directory {path} already exists; choose another --name, or pass --overwrite "
                          f"(the old run is kept as {path}.replaced-<time>)") from None


def _move_aside(path: Path) -> None:
    """Renames a run to <name>.replaced-<time>[-n], a name no other folder has."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = path.with_name(f"{path.name}.replaced-{stamp}"), 1
    while _inode(backup) is not None:
        backup, n = path.with_name(f"{path.name}.replaced-{stamp}-{n}"), n + 1
    path.rename(backup)
    logger.warning("moved the previous run %s to %s", path, backup)


def is_saved_model_dir(path: str | Path) -> bool:
    """True for a SavedModel directory (saved_model.pb inside)."""
    return (Path(path) / "saved_model.pb").is_file()


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest integer-named child of model_dir holding a SavedModel, or None."""
    if not model_dir.is_dir():
        return None
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and is_saved_model_dir(p)]
    return max(versions, key=lambda p: int(p.name)) if versions else None
