"""lr_range: moved from tftransfer.jobs.lr_find."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.training.schedule import SparseCrossentropy

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="tftransfer")
class ExponentialRamp(keras.optimizers.schedules.LearningRateSchedule):
    """min_lr * (max_lr / min_lr) ** (step / steps)."""

    def __init__(self, min_lr: float, max_lr: float, steps: int) -> None:
        self.min_lr, self.max_lr, self.steps = float(min_lr), float(max_lr), max(int(steps), 1)

    def __call__(self, step):  # noqa: D102
        fraction = keras.ops.cast(step, "float32") / float(self.steps)
        return self.min_lr * keras.ops.power(self.max_lr / self.min_lr, fraction)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {"min_lr": self.min_lr, "max_lr": self.max_lr, "steps": self.steps}


class _BatchLosses(keras.callbacks.Callback):
    """Per-batch losses (Keras logs a running mean) and an early stop once the loss explodes."""

    def __init__(self, schedule: ExponentialRamp, diverge_factor: float = 4.0) -> None:
        super().__init__()
        self.schedule = schedule
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.diverge_factor = diverge_factor
        self._mean = 0.0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:  # noqa: D102
        mean = float((logs or {}).get("loss", float("nan")))
        loss = mean * (batch + 1) - self._mean * batch
        self._mean = mean
        self.lrs.append(float(self.schedule(len(self.lrs))))
        self.losses.append(loss)
        # judged on the smoothed loss: one noisy batch (small batches, hard examples) is not a divergence
        smoothed = smooth(self.losses)
        if len(smoothed) < len(self.losses) or (len(smoothed) > 5 and smoothed[-1] > self.diverge_factor *
                                                 min(smoothed)):
            self.model.stop_training = True


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (non-finite values end the series)."""
    out, avg = [], 0.0
    for i, value in enumerate(values):
        if not math.isfinite(value):
            break
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def centered_smooth(values: list[float], window: int) -> np.ndarray:
    """Centred moving average (no lag, unlike the EMA), the window shrunk at both ends."""
    data = np.asarray(values, dtype=float)
    half = max(window // 2, 0)
    sums = np.concatenate([[0.0], np.cumsum(data)])
    lo = np.clip(np.arange(len(data)) - half, 0, len(data))
    hi = np.clip(np.arange(len(data)) + half + 1, 0, len(data))
    return (sums[hi] - sums[lo]) / (hi - lo)


@dataclass(frozen=True)
class Suggestion:
    """A range test's suggested rate, or None with the reason."""

    learning_rate: float | None
    reason: str


def _finite_prefix(lrs: list[float], losses: list[float]) -> tuple[np.ndarray, np.ndarray]:
    n = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    return np.asarray(lrs[:n], dtype=float), np.asarray(losses[:n], dtype=float)


def suggest(lrs: list[float], losses: list[float], edge: float = 0.1, min_drop: float = 0.02) -> Suggestion:
    """The steepest descent of the centred-smoothed loss between the range's low edge and the loss minimum.

    The first `edge` of the steps (start-up noise: one lucky batch made the first rate look best) is never picked;
    a steepest point on the edges of the usable stretch means the best rate lies outside the range, so there is
    no suggestion then, nor when the loss never fell by `min_drop` of its start.
    """
    rates, values = _finite_prefix(lrs, losses)
    n = len(values)
    if n < 10:
        return Suggestion(None, f"only {n} finite losses: run more --steps")
    curve = centered_smooth(list(values), max(5, n // 10) | 1)
    skip = max(2, math.ceil(n * edge))
    low = int(np.argmin(curve))
    if low <= skip + 1:
        return Suggestion(None, f"the loss was lowest at {rates[low]:.1e}, at the low edge: lower --min-lr")
    start = float(np.median(values[:skip]))
    if curve[low] > start * (1 - min_drop):
        return Suggestion(None, "the loss did not fall over the range: check the data or widen the range")
    slopes = np.gradient(curve, np.log10(rates))
    pick = skip + int(np.argmin(slopes[skip:low + 1]))
    if pick <= skip:
        return Suggestion(None, f"the loss fell fastest at the low edge ({rates[pick]:.1e}): lower --min-lr")
    # a steady fall over the whole stretch has no steepest point (its argmin is noise)
    steady = slopes[pick] > 2 * float(np.median(slopes[skip:low + 1]))
    if pick >= n - max(2, n // 20) or (steady and low >= n - max(2, n // 20)):
        return Suggestion(None, f"the loss still fell at the high edge ({rates[low]:.1e}): raise --max-lr")
    if steady:
        return Suggestion(None, "the loss fell at a steady rate, with no steepest stretch: widen the range")
    return Suggestion(float(rates[pick]), "steepest descent of the smoothed loss before its minimum")


def suggest_lr(lrs: list[float], losses: list[float]) -> float | None:
    """suggest(...)'s rate alone."""
    return suggest(lrs, losses).learning_rate


@dataclass
class RangeTest:
    """One phase's range test."""

    phase: str
    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"phase": self.phase, "suggested_learning_rate": self.suggestion, "reason": self.reason,
                "learning_rates": self.lrs,
                "losses": self.losses, "smoothed_losses": smooth(self.losses)}


def range_test(model: keras.Model, train: tf.data.Dataset, num_classes: int, phase: str, min_lr: float = 1e-7,
               max_lr: float = 1.0, steps: int = 100) -> RangeTest:
    """Runs the exponential ramp on `model` (whose trainable flags are already set) and restores its weights."""

    saved = model.get_weights()
    schedule = ExponentialRamp(min_lr, max_lr, steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss=SparseCrossentropy(num_classes))
    recorder = _BatchLosses(schedule)
    model.fit(train.repeat(), steps_per_epoch=steps, epochs=1, callbacks=[recorder], verbose=0, shuffle=False)
    model.set_weights(saved)
    found = suggest(recorder.lrs, recorder.losses)
    logger.info("lr-find %s: %d steps, suggested learning rate %s", phase, len(recorder.losses),
                f"{found.learning_rate:.2e}" if found.learning_rate else f"none ({found.reason})")
    return RangeTest(phase, recorder.lrs, recorder.losses, found.learning_rate, found.reason)
