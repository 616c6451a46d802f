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
        finite = [v for v in self.losses if math.isfinite(v)]
        if not math.isfinite(loss) or (len(finite) > 5 and loss > self.diverge_factor * min(finite)):
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


def suggest_lr(lrs: list[float], losses: list[float]) -> float | None:
    """The rate where the smoothed loss falls fastest (steepest negative slope against log10(lr))."""
    smoothed = smooth(losses)
    n = len(smoothed)
    if n < 5:
        return None
    # Ignore the last points: near divergence the loss curve turns sharply and its slope is meaningless.
    usable = max(5, int(n * 0.9))
    slopes = np.gradient(np.asarray(smoothed[:usable]), np.log10(np.asarray(lrs[:usable])))
    return float(lrs[int(np.argmin(slopes))])


@dataclass
class RangeTest:
    """One phase's range test."""

    phase: str
    lrs: list[float]
    losses: list[float]
    suggestion: float | None

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"phase": self.phase, "suggested_learning_rate": self.suggestion, "learning_rates": self.lrs,
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
    suggestion = suggest_lr(recorder.lrs, recorder.losses)
    logger.info("lr-find %s: %d steps, suggested learning rate %s", phase, len(recorder.losses),
                f"{suggestion:.2e}" if suggestion else "none (too few steps)")
    return RangeTest(phase, recorder.lrs, recorder.losses, suggestion)
