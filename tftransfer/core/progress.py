"""Progress of long work: the library says what it is doing and how far it got; the caller decides how to show it.

Library code wraps a step with a known amount of work in `track(what, total, unit)` and calls `advance(n)` as it
goes. Within `report_progress_to(callback)` every update goes to `callback` (tftransfer's CLI draws a bar on a
terminal); without one the step logs a line every PROGRESS_LOG_SECONDS and one when it
ends, each with its total (piped output, log files, notebooks). No output of its own: a reporter never prints.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 10.0  # between two log lines of one unfinished step


@dataclass(frozen=True)
class ProgressEvent:
    """One update of a step: `done` of `total` `unit`s of `what`; `finished` on its last update."""

    what: str
    done: int
    total: int
    unit: str
    seconds: float
    finished: bool = False
    step: int = 0  # tells apart steps of the same name, and an inner step from the one around it

    def line(self) -> str:
        """'what: done/total unit (p%), s s' with the time left once known."""
        share = self.done / self.total if self.total else 1.0
        text = f"{self.what}: {self.done}/{self.total} {self.unit} ({share:.0%}), {self.seconds:.1f} s"
        if not self.finished and 0 < self.done < self.total:
            text += f", about {self.seconds * (self.total - self.done) / self.done:.0f} s left"
        return text


ProgressCallback = Callable[[ProgressEvent], None]

_callback: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("tftransfer_progress",
                                                                                    default=None)
_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("tftransfer_progress_enabled", default=True)


@contextlib.contextmanager
def report_progress_to(callback: ProgressCallback | None, enabled: bool = True) -> Iterator[None]:
    """Within the block, every tracked step reports to `callback` (None: log lines); `enabled` False: no progress
    at all (neither callback nor log lines)."""
    token, on = _callback.set(callback), _enabled.set(enabled)
    try:
        yield
    finally:
        _callback.reset(token)
        _enabled.reset(on)


class Tracker:
    """A step being tracked; made by `track`."""

    def __init__(self, what: str, total: int, unit: str, log_finish: bool = True) -> None:
        self.what, self.total, self.unit, self.done = what, max(int(total), 0), unit, 0
        self.started = self.last_log = time.perf_counter()
        self.callback = _callback.get() if _enabled.get() else None
        self.logs = _enabled.get() and self.callback is None
        self.log_finish = log_finish
        self.finished = False
        self._emit()

    def _event(self) -> ProgressEvent:
        return ProgressEvent(self.what, self.done, self.total, self.unit, time.perf_counter() - self.started,
                             self.finished, id(self))

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(self._event())
        elif self.logs:
            now = time.perf_counter()
            if (self.finished and self.log_finish) or (not self.finished and now - self.last_log
                                                       >= PROGRESS_LOG_SECONDS):
                logger.info("%s", self._event().line())
                self.last_log = now

    def advance(self, n: int = 1) -> None:
        """`n` more units done (the count stops at the total)."""
        self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
        self._emit()

    def finish(self) -> None:
        """The step ended (also when it did less than its total, e.g. an early stop); reported once."""
        if not self.finished:
            self.finished = True
            self._emit()


@contextlib.contextmanager
def track(what: str, total: int, unit: str = "images", log_finish: bool = True) -> Iterator[Tracker]:
    """A step of `total` units: `with track("features train", n) as p: ... p.advance(len(batch))`. `log_finish`
    False: no closing log line (for a step whose caller logs its own summary, such as an epoch)."""
    progress = Tracker(what, total, unit, log_finish)
    try:
        yield progress
    finally:
        progress.finish()


T = TypeVar("T")


def tracked(items: Iterable[T], what: str, total: int, unit: str = "steps") -> Iterator[T]:
    """`items`, one unit of progress each."""
    with track(what, total, unit) as progress:
        for item in items:
            yield item
            progress.advance()
