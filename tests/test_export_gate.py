"""The export gate: below chance plus margin, or worse than the served version on the same split, is not published."""

from __future__ import annotations

import json

import pytest

from tftransfer.serving.gate import ExportGateError, check_export, gate_export, majority_rate


def _val(accuracy, supports=(30, 10)):
    return {"accuracy": accuracy, "per_class": {f"c{i}": {"support": s} for i, s in enumerate(supports)}}


def _card(accuracy, fingerprint="abc"):
    return {"validation_metrics": {"accuracy": accuracy},
            "training_data": {"fingerprint": fingerprint, "split_method": "folders", "val_examples": 40}}


def _publish(model_dir, version, card):
    (model_dir / str(version)).mkdir(parents=True)
    (model_dir / str(version) / "model_card.json").write_text(json.dumps(card))


def test_majority_rate_is_the_trivial_baseline():
    assert majority_rate(_val(0.5)) == pytest.approx(0.75)
    assert majority_rate(None) is None


def test_a_chance_level_model_is_refused_unless_forced(tmp_path):
    # 0.78 beats 1/K but not "always say c0" (0.75) + 0.05
    with pytest.raises(ExportGateError, match="majority-class rate 0.750"):
        gate_export(_card(0.78), _val(0.78), tmp_path / "m", 0.05, 0.0, force=False)
    record = gate_export(_card(0.78), _val(0.78), tmp_path / "m", 0.05, 0.0, force=True)
    assert record["forced"] and not record["passed"]
    assert gate_export(_card(0.9), _val(0.9), tmp_path / "m", 0.05, 0.0, force=False)["passed"]


def test_worse_than_the_newest_version_on_the_same_split_is_refused(tmp_path):
    model_dir = tmp_path / "m"
    _publish(model_dir, 1, _card(0.99))
    _publish(model_dir, 2, _card(0.95))
    refused = check_export(_card(0.9), _val(0.9), model_dir, 0.05, 0.0)
    assert not refused.publish and "version 2" in refused.reason
    assert refused.record["previous_version"] == {"version": 2, "val_accuracy": 0.95, "same_split": True}
    assert check_export(_card(0.9), _val(0.9), model_dir, 0.05, 0.06).publish  # within the allowed regression
    # another split: not comparable, so not refused, and the card says so
    other = check_export(_card(0.9, fingerprint="xyz"), _val(0.9), model_dir, 0.05, 0.0)
    assert other.publish and other.record["previous_version"]["same_split"] is False


def test_no_validation_metrics_publishes_unchecked(tmp_path):
    decision = check_export(_card(None), None, tmp_path, 0.05, 0.0)
    assert decision.publish and "could not check" in decision.reason
