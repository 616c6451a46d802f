"""The typed record of a run's metrics.json: one shape, written and read here only.

Every reader of a fitted run's figures (the export gate, seeds, distillation's teacher, the model card, the CLI
summary) goes through `RunMetrics` rather than string key paths, so the file's layout (docs/metrics_schema.md)
is stated once. The nested blocks stay plain JSON values: they are produced by `classification_metrics` and
the phase runner, and documented field by field in the schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tftransfer.core.errors import RunDirError
from tftransfer.core.io import read_json, write_json

logger = logging.getLogger(__name__)

RUN_METRICS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunMetrics:
    """metrics.json of a `fit` or `distill` run. Every key is always written; a part that does not apply is null."""

    run: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    adapt: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    schema_version: int = RUN_METRICS_SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "metrics.json") -> RunMetrics:
        """The record of a parsed metrics.json; RunDirError naming `source` when it is not one."""
        if not isinstance(data, Mapping):
            raise RunDirError(f"{source} is not a tftransfer run's metrics (not a JSON object)")
        names = {f.name for f in fields(cls)}
        extra = sorted(set(data) - names)
        if extra:  # a newer tftransfer adds fields within a schema version; they are kept out, not an error
            logger.debug("%s: ignoring keys this version does not know: %s", source, ", ".join(extra))
        values = {key: data[key] for key in names if key in data}
        values.setdefault("run", {})
        values.setdefault("phases", [])
        values.setdefault("final", {})
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> RunMetrics:
        """metrics.json at `path`; RunDirError when missing or not a run's metrics."""
        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"{path} does not exist: the run has not finished")
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the documented order."""
        values = asdict(self)
        return {"schema_version": values.pop("schema_version"), **values}

    def write(self, path: str | Path) -> None:
        """Writes metrics.json atomically."""
        write_json(Path(path), self.to_dict())

    @property
    def val(self) -> dict[str, Any] | None:
        """The final validation classification block (docs/metrics_schema.md), None without validation data."""
        return (self.final or {}).get("val")

    @property
    def val_accuracy(self) -> float | None:
        """final.val.accuracy."""
        return (self.val or {}).get("accuracy")

    @property
    def target_accuracy(self) -> float | None:
        """The adapted run's accuracy on its labelled target domain."""
        return ((self.adapt or {}).get("final") or {}).get("accuracy")

    @property
    def total_seconds(self) -> float | None:
        """The whole run's wall time."""
        return (self.timings or {}).get("total_seconds")

    @property
    def image_size(self) -> int | None:
        """The square input size the run trained at."""
        size = self.run.get("image_size")
        return size if isinstance(size, int) and size > 0 else None

    @property
    def backbone(self) -> str | None:
        """The backbone's registry name."""
        return self.run.get("backbone")

    @property
    def run_dir(self) -> Path | None:
        """Where the run was written."""
        return Path(self.run["run_dir"]) if self.run.get("run_dir") else None


def read_run_metrics(path: str | Path) -> RunMetrics | None:
    """metrics.json at `path`, or None when the run has none (an unfinished run)."""
    return RunMetrics.read(path) if Path(path).is_file() else None
