"""distill: a new run whose small student backbone learns from a finished teacher run's soft targets.

The job only builds the config: the student's settings on top of the teacher run's data settings, with the
`distill:` section naming the teacher; `run_fit` does the rest (tftransfer.training.distill), so the run has a fit's
folder, metrics.json, checkpoints, resume and export. `train_baseline` first trains the same config without the
teacher (`<name>_baseline`) and names it in distill.baseline, so summary.md compares the two.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tftransfer.config.experiment import DistillConfig, ExperimentConfig, flatten, load_config, read_yaml
from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.data.specs import source_from_config
from tftransfer.jobs.fit import FitResult, run_fit
from tftransfer.runs.finished import read_labels
from tftransfer.runs.layout import RunDir
from tftransfer.training.distill import check_distill_config

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """The distilled run, and the baseline run trained alongside it (if any)."""

    fit: FitResult
    baseline: FitResult | None

    @property
    def run_dir(self) -> Path:  # noqa: D102
        return self.fit.run_dir

    @property
    def metrics(self) -> dict[str, Any]:  # noqa: D102
        return self.fit.metrics


def _teacher_data(teacher: Path) -> dict[str, Any]:
    """The teacher run's data settings as dotted keys, its input size left out (the student has its own)."""
    run = RunDir(teacher)
    if not teacher.is_dir():
        raise RunDirError(f"teacher run not found: {teacher} (give a finished run directory, runs/<name>)")
    if not run.config.is_file() or not run.metrics.is_file():
        missing = run.config if not run.config.is_file() else run.metrics
        raise RunDirError(f"{teacher} is not a finished run ({missing.name} is missing)")
    data = load_config(run.config).data
    found = flatten({"data": {k: v for k, v in data.__dict__.items() if k != "augment"}})
    found.update(flatten({"data": {"augment": data.augment.__dict__}}))
    found.pop("data.image_size")
    return found


def distill_config(teacher: str | Path, student: str, *, config: str | Path | None = None,
                   values: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The distilled run's config: defaults <- the teacher's data settings <- `config` <- `values` <- `overrides`,
    with model.backbone = `student` and distill.teacher = `teacher`."""
    teacher = Path(teacher)
    inherited = _teacher_data(teacher)
    if config is not None:  # the config file's own data keys win over the teacher's
        for key in flatten(read_yaml(config)):
            inherited.pop(key, None)
    given = {**inherited, "model.backbone": student, "distill.teacher": str(teacher), **(values or {})}
    cfg = load_config(config, overrides=overrides, values=given)
    if not cfg.name:
        cfg = replace(cfg, name=re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{student}_from_{teacher.name}"))
    return cfg


def baseline_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same student without the teacher, trained on as many views of each image as the distilled one.

    The distilled student's phase 1 trains on `distill.views` cached views of every image; a baseline that saw
    only the clean image would credit the teacher with what the extra augmented views do.
    """
    head = cfg.phases.head
    views = max(head.feature_cache_views, cfg.distill.views)
    phases = replace(cfg.phases, head=replace(head, feature_cache_views=views))
    return replace(cfg, name=f"{cfg.name}_baseline", distill=DistillConfig(), phases=phases)


def run_distill(teacher: str | Path, student: str, *, config: str | Path | None = None,
                values: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                train_baseline: bool = False, overwrite: bool = False, verbose: int = 0) -> DistillResult:
    """The `tftransfer distill` job: optionally the no-teacher baseline, then the distilled student run."""
    cfg = distill_config(teacher, student, config=config, values=values, overrides=overrides)
    baseline = None
    if train_baseline:  # what would stop the distilled run, found before the baseline trains
        check_distill_config(cfg)
        labels = RunDir(Path(teacher)).labels
        if source_from_config(cfg.data).class_names != read_labels(labels):
            raise ConfigError(f"distill.teacher: the classes of {labels} are not the data's ({cfg.data.path})")
        base_cfg = baseline_config(cfg)
        logger.info("training the baseline %s: the same student without the teacher", base_cfg.name)
        baseline = run_fit(base_cfg, overwrite=overwrite, verbose=verbose)
        cfg = replace(cfg, distill=replace(cfg.distill, baseline=str(baseline.run_dir)))
    result = run_fit(cfg, overwrite=overwrite, verbose=verbose)
    return DistillResult(fit=result, baseline=baseline)
