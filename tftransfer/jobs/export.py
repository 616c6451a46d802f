"""The `tftransfer export` job: a finished run read back, then published through serving.publish (the path `fit`
takes too)."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from tftransfer.config.commands import ExportCommandConfig, command_config
from tftransfer.config.experiment import ExportConfig, build_config, read_yaml
from tftransfer.core.errors import ConfigError, DataError, RunDirError
from tftransfer.runs.finished import load_run
from tftransfer.runs.layout import RunDir, check_run_name
from tftransfer.serving.publish import ExportResult, publish_model
from tftransfer.serving.savedmodel import next_version
from tftransfer.serving.tflite import CALIBRATED_MODES

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The `tftransfer export` job


def export_run(run_dir: str | Path, config: ExportCommandConfig | None = None, **settings: Any) -> ExportResult:
    """The `tftransfer export` job: a finished run -> the next SavedModel version, checked, then published.

    Settings come as an ExportCommandConfig or as its fields by keyword (`export_run(run, tflite="int8")`); an
    unknown or ill-typed one is a ConfigError naming it. Writes the SavedModel with model_card.json into a
    dot-named folder of <export.dir>/<name>/ (or of `model_dir`), which TF Serving ignores, checks it against
    the run's model.keras in a fresh process on real validation images (pixels and encoded bytes), with `tflite`
    adds model_<mode>.tflite with its size and accuracy against the SavedModel, and only then renames it to
    <version>/. A failed check publishes nothing: the export is set aside as .rejected-<time>-<random>/ and
    ParityError says where; a process killed before the rename leaves no version (its .tmp-* folder is removed
    by the next export).
    """
    cfg = command_config(ExportCommandConfig, config, settings)
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise RunDirError(f"run directory not found: {run.path}")
    if not run.config.is_file():
        raise RunDirError(f"{run.path} is not a tftransfer run directory (no config.yaml)")
    run_cfg = read_yaml(run.config)
    export_cfg = run_export_settings(run_cfg.get("export") or {}, run.config)
    # The run's name is one folder name under export.dir (check_run_name: a config edited to `..` is refused).
    target = cfg.model_dir if cfg.model_dir is not None else Path(export_cfg.dir) / \
        check_run_name(str(run_cfg.get("name") or run.path.resolve().name), "export folder name")
    if cfg.version is not None and (target / str(cfg.version)).exists():
        raise RunDirError(f"export path {target / str(cfg.version)} already exists and exports never overwrite; "
                          f"leave out --version to write the next one ({next_version(target)})")
    finished = load_run(run.path)
    source = finished.source()
    if cfg.tflite in CALIBRATED_MODES and source is None:
        raise DataError(f"--tflite {cfg.tflite} calibrates on the run's training images, which are not available (see "
                        f"data.path in {run.config}); restore them or choose float32, float16 or dynamic")
    metrics = finished.metrics()
    return publish_model(finished.model, run, target, finished.class_names, finished.image_size, source, cfg,
                         export_cfg, metrics.val if metrics is not None else None)


def run_export_settings(values: dict[str, Any], config_path: Path) -> ExportConfig:
    """A run's `export:` config section, its missing keys at today's defaults (older runs lack newer keys)."""
    known = {f.name for f in fields(ExportConfig)}
    try:  # as strict as load_config on the keys this version knows: a bad type or range names the key
        return build_config(ExportConfig, {key: value for key, value in values.items() if key in known}, "export.")
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
