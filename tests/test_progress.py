"""tftransfer.core.progress (the library's progress reports) and the CLI's bars for it; no TensorFlow needed."""

from __future__ import annotations

import io
import logging

import pytest

from tftransfer import cli
from tftransfer.core import progress as progress_mod
from tftransfer.core.progress import report_progress_to, track, tracked


def test_a_callback_gets_every_update_with_the_total():
    events = []
    with report_progress_to(events.append):
        with track("features train", 5) as step:
            step.advance(2)
            step.advance(9)  # stops at the total
    assert [(e.what, e.done, e.total, e.finished) for e in events] == [
        ("features train", 0, 5, False), ("features train", 2, 5, False), ("features train", 5, 5, False),
        ("features train", 5, 5, True)]
    assert len({e.step for e in events}) == 1


def test_without_a_callback_steps_log_lines_with_totals(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="tftransfer.core.progress")
    list(tracked(range(3), "adaptation", 3, "adaptations"))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["adaptation: 3/3 adaptations (100%)"]
    caplog.clear()
    monkeypatch.setattr(progress_mod, "PROGRESS_LOG_SECONDS", 0.0)  # every update is "a few seconds later"
    with track("phase finetune epoch 1/2", 4, "steps", log_finish=False) as step:
        step.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("phase finetune epoch 1/2: 1/4 steps (25%)") and "left" in lines[-1]
    assert not any("4/4" in line for line in lines)  # the epoch's own line closes it, not a progress line


def test_disabled_progress_reports_nothing(caplog):
    caplog.set_level(logging.INFO, logger="tftransfer.core.progress")
    events = []
    with report_progress_to(events.append, enabled=False):
        list(tracked(range(3), "corruptions", 3))
    assert events == [] and caplog.records == []


def test_cli_bars_draw_the_innermost_step_and_close_every_bar():
    out = io.StringIO()
    bars = cli._ProgressBars(out)
    with report_progress_to(bars):
        with track("corruptions", 2, "passes") as outer:
            with track("evaluate val", 4) as inner:
                inner.advance(4)
                outer.advance()  # not drawn over the inner bar
            assert [b.label for _, b, _ in bars.open] == ["corruptions"]
            outer.advance()
        assert bars.open == []
    text = out.getvalue()
    assert "evaluate val" in text and "corruptions" in text


@pytest.mark.parametrize("command", ["fit", "evaluate", "distill"])
def test_progress_flags_share_one_default_and_help(command):
    option = next(p for p in cli.main.commands[command].params if p.name == "progress")
    assert option.default is True and option.help == cli.PROGRESS_HELP and option.secondary_opts == ["--no-progress"]
