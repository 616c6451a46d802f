"""export: moved from tftransfer.serving.savedmodel."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tftransfer.config.commands import ExportCommandConfig, command_config
from tftransfer.config.experiment import ExportConfig, read_yaml
from tftransfer.core.errors import DataError, RunDirError
from tftransfer.core.io import read_json, write_json
from tftransfer.runs.finished import load_run_model, load_run_source, read_labels, run_image_size
from tftransfer.runs.layout import RunDir, check_run_name
from tftransfer.serving.contract import MODEL_CARD_FILE
from tftransfer.serving.model_card import build_model_card
from tftransfer.serving.parity import check_parity_fresh_process, parity_inputs
from tftransfer.serving.savedmodel import export_saved_model, next_version, saved_model_size
from tftransfer.serving.tflite import export_tflite

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The `tftransfer export` job


@dataclass
class ExportResult:
    """What export_run wrote and measured."""

    version_dir: Path
    card: dict[str, Any]
    parity: dict[str, Any]
    tflite: dict[str, Any] | None = None

    @property
    def signatures_text(self) -> str:
        """The `saved_model_cli show --all`-style signature listing, made in the fresh process."""
        return self.parity["signatures_text"]


def export_run(run_dir: str | Path, config: ExportCommandConfig | None = None, **settings: Any) -> ExportResult:
    """The `tftransfer export` job: a finished run -> the next SavedModel version, checked and described.

    Settings come as an ExportCommandConfig or as its fields by keyword (`export_run(run, tflite="int8")`); an
    unknown or ill-typed one is a ConfigError naming it. Writes <export.dir>/<name>/<version>/ (or under
    `model_dir`) with model_card.json, checks it against the run's model.keras in a fresh process on real
    validation images (pixels and encoded bytes), and with `tflite` adds model_<mode>.tflite with its size and
    accuracy against the SavedModel.
    """
    cfg = command_config(ExportCommandConfig, config, settings)
    tflite, version = cfg.tflite, cfg.version
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise RunDirError(f"run directory not found: {run.path}")
    if not run.config.is_file():
        raise RunDirError(f"{run.path} is not a tftransfer run directory (no config.yaml)")
    run_cfg = read_yaml(run.config)
    export_cfg = run_cfg.get("export") or {}
    # The run's name is one folder name under export.dir (check_run_name: a config edited to `..` is refused).
    target = cfg.model_dir if cfg.model_dir is not None else Path(export_cfg.get("dir") or ExportConfig.dir) / \
        check_run_name(str(run_cfg.get("name") or run.path.resolve().name), "export folder name")
    if version is not None and (target / str(version)).exists():
        raise RunDirError(f"export path {target / str(version)} already exists and exports never overwrite; "
                          f"leave out --version to write the next one ({next_version(target)})")
    model = load_run_model(run.path)
    names = read_labels(run.labels)
    image_size = run_image_size(run.path)
    source = load_run_source(run.path)
    if tflite == "int8" and source is None:
        raise DataError(f"--tflite int8 calibrates on the run's training images, which are not available (see "
                        f"data.path in {run.config}); restore them or choose float32, float16 or dynamic")
    top_k = cfg.top_k or int(export_cfg.get("top_k", ExportConfig.top_k))
    tolerance = float(export_cfg.get("parity_tolerance", ExportConfig.parity_tolerance))

    version_dir = export_saved_model(model, target, names, image_size, top_k, version=version,
                                     model_card=build_model_card(run.path))
    pixels, encoded, described = parity_inputs(source, image_size, cfg.parity_images)
    parity = check_parity_fresh_process(model, version_dir, pixels, encoded, tolerance=tolerance)
    parity["data"] = described
    if not parity["ok"]:
        logger.error("the export %s disagrees with %s: max abs probability difference %.2e > %.0e", version_dir,
                     run.model, parity["max_abs_diff"], tolerance)
    tflite_entry = None
    if tflite is not None:
        tflite_entry = export_tflite(model, version_dir, image_size, tflite, source,
                                     representative_images=cfg.representative_images,
                                     batch_size=cfg.batch_size)
    card = read_json(version_dir / MODEL_CARD_FILE)
    card["export"] = {"path": str(version_dir), "version": int(version_dir.name),
                      "saved_model_size_bytes": saved_model_size(version_dir),
                      "parity": {k: v for k, v in parity.items() if k != "signatures_text"}}
    card["tflite"] = tflite_entry
    write_json(version_dir / MODEL_CARD_FILE, card)
    return ExportResult(version_dir, card, parity, tflite_entry)
