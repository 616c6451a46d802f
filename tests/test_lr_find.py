"""Learning-rate range test: the ramp, the suggestion, and the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from tftransfer.cli import main
from tftransfer.training.lr_range import ExponentialRamp, smooth, suggest_lr


def test_exponential_ramp_spans_the_range():
    ramp = ExponentialRamp(1e-6, 1.0, 60)
    assert float(ramp(0)) == pytest.approx(1e-6)
    assert float(ramp(30)) == pytest.approx(1e-3, rel=1e-4)
    assert float(ramp(60)) == pytest.approx(1.0, rel=1e-4)


def test_suggestion_is_where_the_loss_falls_fastest():
    lrs = list(np.logspace(-6, 0, 61))
    # a loss that is flat, drops steeply around 1e-3, then flattens: the suggestion must sit near 1e-3
    losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) for lr in lrs]
    suggested = suggest_lr(lrs, losses)
    assert 10 ** -3.6 < suggested < 10 ** -2.4
    assert suggest_lr(lrs[:3], losses[:3]) is None
    assert smooth([1.0, float("nan"), 2.0]) == [1.0]


def test_lr_find_command_writes_json_and_plots(tmp_path):
    args = ["lr-find", "--config", "configs/smoke.yaml", "--steps", "30", "--set", f"runs_dir={tmp_path}",
            "--set", f"runtime.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "smoke-lr-find"
    found = json.loads((out / "lr_find.json").read_text())
    for phase in ("head", "finetune"):
        assert (out / f"lr_find_{phase}.png").stat().st_size > 5000
        entry = found["phases"][phase]
        assert 0 < len(entry["losses"]) <= 30
        assert found["suggested"][phase] is None or 1e-7 <= found["suggested"][phase] <= 1.0
        assert entry["learning_rates"] == sorted(entry["learning_rates"])
    assert "suggested learning rate" in result.output
    bad = CliRunner().invoke(main, args[:1] + ["--min-lr", "1", "--max-lr", "0.1"])
    assert bad.exit_code != 0 and "--min-lr" in bad.output
