"""Run-directory layout: resolved config, split, history, metrics, checkpoints, logs. Never deletes a run."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tftransfer.errors import RunDirError

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


def create_run_dir(runs_dir: str | Path, name: str, overwrite: bool = False) -> RunDir:
    """Makes runs/<name>/; an existing one is refused, or with overwrite moved aside (never deleted)."""
    path = Path(runs_dir) / name
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


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (json.dump would write invalid JSON), numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Writes JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    """Reads a JSON file; errors name it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON: {exc}") from None
