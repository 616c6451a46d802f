"""Publishing a model as a TF Serving version, the one path `fit` and `export` share: the model card and quality gate
before anything is written, the SavedModel staged under a dot-name TF Serving ignores, its fresh-process parity
check (and TFLite), then the rename to its version."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tftransfer.config.commands import ExportCommandConfig
from tftransfer.config.experiment import ExportConfig
from tftransfer.core.progress import Tracker, track
from tftransfer.data.sources import DataSource
from tftransfer.runs.layout import RunDir
from tftransfer.serving.contract import MODEL_CARD_FILE
from tftransfer.serving.gate import gate_export
from tftransfer.serving.model_card import ModelCard, build_model_card
from tftransfer.serving.parity import FreshProcess, ParityError, check_parity_fresh_process, parity_inputs
from tftransfer.serving.savedmodel import (
    StagedExport,
    discard_export,
    publish_export,
    reject_export,
    saved_model_size,
    stage_export,
)
from tftransfer.serving.tflite import export_tflite

logger = logging.getLogger(__name__)


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


def publish_model(model: Any, run: RunDir, target: Path, class_names: list[str], image_size: int,
                  source: DataSource | None, cfg: ExportCommandConfig, settings: ExportConfig,
                  val_metrics: dict[str, Any] | None) -> ExportResult:
    """The one export path, for `fit` and `export`: the model card and the quality gate before anything is written,
    the SavedModel staged under a dot-name TF Serving ignores, its fresh-process parity check (and TFLite), then
    the rename to its version. ExportGateError or ParityError when refused (a rejected export is set aside)."""
    card = build_model_card(run.path, val_metrics=val_metrics)
    card["gate"] = gate_export(card, val_metrics, target, settings.min_gain_over_chance, settings.max_regression,
                               force=cfg.force)
    steps = 3 if cfg.tflite else 2
    with track("export: SavedModel, parity check" + (", TFLite" if cfg.tflite else ""), steps, "steps") as progress, \
            FreshProcess() as fresh:  # started now: it imports TensorFlow while the SavedModel is written
        staged = stage_export(model, target, class_names, image_size, cfg.top_k or settings.top_k,
                              version=cfg.version, model_card=card, max_pixels=settings.max_pixels)
        progress.advance()
        try:
            return _check_and_publish(staged, model, run, source, cfg, image_size, settings.parity_tolerance,
                                      progress, fresh)
        except BaseException:
            discard_export(staged)  # a rejected export was moved aside before: nothing left here to remove
            raise


def _check_and_publish(staged: StagedExport, model: Any, run: RunDir, source: DataSource | None,
                       cfg: ExportCommandConfig, image_size: int, tolerance: float,
                       progress: Tracker, fresh: FreshProcess) -> ExportResult:
    """The parity check (and TFLite) on the staged export, then the rename to its version; ParityError if it fails."""
    card = _staged_card(staged)
    pixels, encoded, described = parity_inputs(source, image_size, cfg.parity_images)
    parity = check_parity_fresh_process(model, staged.path, pixels, encoded, tolerance=tolerance, process=fresh)
    parity["data"] = described
    progress.advance()
    if not parity["ok"]:
        _reject(staged, run.model, parity)
    tflite_entry = None
    if cfg.tflite is not None:
        tflite_entry = export_tflite(model, staged.path, image_size, cfg.tflite, source,
                                     representative_images=cfg.representative_images, batch_size=cfg.batch_size,
                                     labels=list(card.classes))
        progress.advance()
    card = replace(card, tflite=tflite_entry)
    written: dict[str, Any] = {}
    version_dir = publish_export(staged, prepare=lambda final: written.update(_write_card(staged.path, card, final,
                                                                                       parity)))
    return ExportResult(version_dir, written, parity, written.get("tflite"))  # the TFLite file at its version


def _staged_card(staged: StagedExport) -> ModelCard:
    card = ModelCard.read(staged.path / MODEL_CARD_FILE)
    assert card is not None, "stage_export writes the model card"
    return card


def _write_card(folder: Path, card: ModelCard, version_dir: Path, parity: dict[str, Any]) -> dict[str, Any]:
    """The model card with the export's entry: the version folder it becomes, its size and its parity check."""
    tflite = card.tflite and {**card.tflite, "file": str(version_dir / Path(card.tflite["file"]).name)}
    card = replace(card, tflite=tflite, export={
        "path": str(version_dir), "version": int(version_dir.name), "published": True,
        "saved_model_size_bytes": saved_model_size(folder),
        "parity": {k: v for k, v in parity.items() if k != "signatures_text"}})
    card.write(folder / MODEL_CARD_FILE)
    return card.to_dict()


def _reject(staged: StagedExport, keras_model: Path, parity: dict[str, Any]) -> None:
    """Sets a staged export that failed the parity check aside (never a version) and raises ParityError."""
    card = replace(_staged_card(staged), export={
        "path": None, "version": None, "published": False,
        "parity": {k: v for k, v in parity.items() if k != "signatures_text"}})
    card.write(staged.path / MODEL_CARD_FILE)
    kept = reject_export(staged)
    message = (f"the export disagrees with {keras_model}: max abs probability difference "
               f"{parity['max_abs_diff']:.2e} > tolerance {parity['tolerance']:.0e} in a fresh process on "
               f"{parity['data']}; nothing was published, the rejected export is kept in {kept}")
    raise ParityError(message, parity, kept)
