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
from tftransfer.data.sources import DataSource
from tftransfer.runs.finished import load_run_model, load_run_source, read_labels, run_image_size
from tftransfer.runs.layout import RunDir, check_run_name
from tftransfer.serving.contract import MODEL_CARD_FILE
from tftransfer.serving.gate import gate_export
from tftransfer.serving.model_card import build_model_card
from tftransfer.serving.parity import ParityError, check_parity_fresh_process, parity_inputs
from tftransfer.serving.savedmodel import (
    StagedExport,
    discard_export,
    next_version,
    publish_export,
    reject_export,
    saved_model_size,
    stage_export,
)
from tftransfer.serving.tflite import CALIBRATED_MODES, export_tflite

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
    if tflite in CALIBRATED_MODES and source is None:
        raise DataError(f"--tflite {tflite} calibrates on the run's training images, which are not available (see "
                        f"data.path in {run.config}); restore them or choose float32, float16 or dynamic")
    top_k = cfg.top_k or int(export_cfg.get("top_k", ExportConfig.top_k))
    tolerance = float(export_cfg.get("parity_tolerance", ExportConfig.parity_tolerance))

    card = build_model_card(run.path)
    # Before anything is written: a model worse than guessing or than the served version stays in its run.
    card["gate"] = gate_export(card, _val_metrics(run), target, _gate_setting(export_cfg, "min_gain_over_chance"),
                               _gate_setting(export_cfg, "max_regression"), force=cfg.force)
    # Written and checked under a dot-name TF Serving ignores; a version only once the check passed.
    staged = stage_export(model, target, names, image_size, top_k, version=version, model_card=card)
    try:
        return _check_and_publish(staged, model, run, source, cfg, tolerance)
    except BaseException:
        discard_export(staged)  # a rejected export was moved aside before: nothing left here to remove
        raise


def _val_metrics(run: RunDir) -> dict[str, Any] | None:
    return (read_json(run.metrics).get("final") or {}).get("val") if run.metrics.is_file() else None


def _gate_setting(export_cfg: dict[str, Any], key: str) -> float:
    return float(export_cfg.get(key, getattr(ExportConfig, key)))


def _check_and_publish(staged: StagedExport, model: Any, run: RunDir, source: DataSource | None,
                       cfg: ExportCommandConfig, tolerance: float) -> ExportResult:
    """The parity check (and TFLite) on the staged export, then the rename to its version; ParityError if it fails."""
    image_size = run_image_size(run.path)
    pixels, encoded, described = parity_inputs(source, image_size, cfg.parity_images)
    parity = check_parity_fresh_process(model, staged.path, pixels, encoded, tolerance=tolerance)
    parity["data"] = described
    if not parity["ok"]:
        _reject(staged, run.model, parity)
    tflite_entry = None
    if cfg.tflite is not None:
        tflite_entry = export_tflite(model, staged.path, image_size, cfg.tflite, source,
                                     representative_images=cfg.representative_images, batch_size=cfg.batch_size,
                                     labels=read_labels(run.labels))
    card = read_json(staged.path / MODEL_CARD_FILE)
    card["tflite"] = tflite_entry
    version_dir = publish_export(staged, prepare=lambda final: _write_card(staged.path, card, final, parity))
    return ExportResult(version_dir, card, parity, tflite_entry)


def _write_card(folder: Path, card: dict[str, Any], version_dir: Path, parity: dict[str, Any]) -> None:
    """The model card with the export's entry: the version folder it becomes, its size and its parity check."""
    card["export"] = {"path": str(version_dir), "version": int(version_dir.name),
                      "saved_model_size_bytes": saved_model_size(folder),
                      "parity": {k: v for k, v in parity.items() if k != "signatures_text"}}
    if card.get("tflite"):
        card["tflite"]["file"] = str(version_dir / Path(card["tflite"]["file"]).name)
    write_json(folder / MODEL_CARD_FILE, card)


def _reject(staged: StagedExport, keras_model: Path, parity: dict[str, Any]) -> None:
    """Sets a staged export that failed the parity check aside (never a version) and raises ParityError."""
    card = read_json(staged.path / MODEL_CARD_FILE)
    card["export"] = {"path": None, "version": None, "published": False,
                      "parity": {k: v for k, v in parity.items() if k != "signatures_text"}}
    write_json(staged.path / MODEL_CARD_FILE, card)
    kept = reject_export(staged)
    message = (f"the export disagrees with {keras_model}: max abs probability difference "
               f"{parity['max_abs_diff']:.2e} > tolerance {parity['tolerance']:.0e} in a fresh process on "
               f"{parity['data']}; nothing was published, the rejected export is kept in {kept}")
    raise ParityError(message, parity, kept)
