"""The export gate: a model that is no better than guessing, or worse than the version TF Serving serves now, is not
published as a new version (TF Serving always serves the highest one)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tftransfer.core.errors import TfTransferError
from tftransfer.serving.contract import MODEL_CARD_FILE
from tftransfer.serving.model_card import ModelCard
from tftransfer.serving.savedmodel import next_version

logger = logging.getLogger(__name__)


class ExportGateError(TfTransferError):
    """The model is not good enough to become the served version; the message says why and how to force it."""


@dataclass(frozen=True)
class GateDecision:
    """Whether to publish, why, and the comparison recorded in the model card."""

    publish: bool
    reason: str
    record: dict[str, Any]


def majority_rate(val_metrics: dict[str, Any] | None) -> float | None:
    """The accuracy of always answering the most frequent validation class (the trivial baseline)."""
    per_class = (val_metrics or {}).get("per_class") or {}
    supports = [int(entry.get("support", 0)) for entry in per_class.values()]
    if not supports or sum(supports) == 0:
        return None
    return max(max(supports) / sum(supports), 1.0 / len(supports))


def newest_version_card(model_dir: Path) -> tuple[int, ModelCard] | None:
    """The highest published version under model_dir (what TF Serving serves) and its model card (empty when it
    has none)."""
    newest = next_version(model_dir) - 1
    if newest == 0:
        return None
    return newest, ModelCard.read(model_dir / str(newest) / MODEL_CARD_FILE) or ModelCard()


def _same_split(card: dict[str, Any], other: ModelCard) -> bool:
    mine, theirs = card.get("training_data") or {}, other.training_data or {}
    keys = ("fingerprint", "split_method", "val_examples")
    return mine.get("fingerprint") is not None and all(mine.get(k) == theirs.get(k) for k in keys)


def check_export(card: dict[str, Any], val_metrics: dict[str, Any] | None, model_dir: Path, min_gain: float,
                 max_regression: float) -> GateDecision:
    """Refuses a model below the majority-class rate plus `min_gain`, or below the newest version's validation
    accuracy minus `max_regression` when both were measured on the same split; no validation metrics: publish,
    recorded as unchecked."""
    accuracy = (val_metrics or {}).get("accuracy")
    chance = majority_rate(val_metrics)
    record: dict[str, Any] = {"val_accuracy": accuracy, "majority_class_rate": chance, "min_gain": min_gain,
                              "max_regression": max_regression, "previous_version": None}
    if accuracy is None:
        return GateDecision(True, "no validation metrics: the gate could not check this model", record)
    if chance is not None and accuracy < chance + min_gain:
        return GateDecision(False, f"validation accuracy {accuracy:.3f} is below the majority-class rate "
                                   f"{chance:.3f} + export.min_gain_over_chance {min_gain:g}", record)
    newest = newest_version_card(model_dir)
    if newest is not None:
        version, other = newest
        previous = other.val_accuracy
        comparable = previous is not None and _same_split(card, other)
        record["previous_version"] = {"version": version, "val_accuracy": previous, "same_split": comparable}
        if comparable and accuracy < previous - max_regression:
            return GateDecision(False, f"validation accuracy {accuracy:.3f} is below version {version}'s "
                                       f"{previous:.3f} on the same split (export.max_regression "
                                       f"{max_regression:g})", record)
    return GateDecision(True, "passed", record)


def gate_export(card: dict[str, Any], val_metrics: dict[str, Any] | None, model_dir: Path, min_gain: float,
                max_regression: float, force: bool) -> dict[str, Any]:
    """check_export's record with the decision; ExportGateError when refused and not `force`d."""
    decision = check_export(card, val_metrics, model_dir, min_gain, max_regression)
    record = {**decision.record, "passed": decision.publish, "reason": decision.reason, "forced": False}
    if not decision.publish:
        if not force:
            raise ExportGateError(f"not published to {model_dir}: {decision.reason}; the model stays in its run "
                                  f"(use --force to publish it anyway)")
        logger.warning("publishing despite the export gate (--force): %s", decision.reason)
        record["forced"] = True
    elif decision.reason != "passed":
        logger.warning("%s", decision.reason)
    return record
