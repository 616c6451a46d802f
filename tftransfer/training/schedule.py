"""schedule: moved from tftransfer.training.phases."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import keras

from tftransfer.config.experiment import PhaseConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Learning rate, optimizer, loss


@keras.saving.register_keras_serializable(package="tftransfer")
class PhaseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then constant, cosine decay to zero, or step decay, over one phase's steps."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "constant",
                 decay_rate: float = 0.1, decay_steps: int = 1) -> None:
        self.peak = float(peak)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.kind = kind
        self.decay_rate = float(decay_rate)
        self.decay_steps = max(int(decay_steps), 1)

    def __call__(self, step):  # noqa: D102
        step = keras.ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 1))
        warmup = self.peak * keras.ops.minimum((step + 1.0) / warm, 1.0)
        after = keras.ops.maximum(step - self.warmup_steps, 0.0)
        if self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = keras.ops.minimum(after / span, 1.0)
            value = 0.5 * self.peak * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.kind == "step":
            value = self.peak * keras.ops.power(self.decay_rate, keras.ops.floor(after / self.decay_steps))
        else:
            value = keras.ops.convert_to_tensor(self.peak, "float32")
        if self.warmup_steps == 0:
            return value
        return keras.ops.where(step < self.warmup_steps, warmup, value)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind, "decay_rate": self.decay_rate, "decay_steps": self.decay_steps}


def build_schedule(phase: PhaseConfig, steps_per_epoch: int) -> PhaseSchedule:
    """The phase's learning-rate schedule, with epochs converted to optimizer steps."""
    return PhaseSchedule(peak=phase.learning_rate, total_steps=phase.epochs * steps_per_epoch,
                         warmup_steps=round(phase.warmup_epochs * steps_per_epoch), kind=phase.schedule,
                         decay_rate=phase.decay_rate, decay_steps=round(phase.decay_epochs * steps_per_epoch))


def build_optimizer(phase: PhaseConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """A fresh optimizer for one phase (fresh state: phase 2 must not inherit phase 1's moments)."""
    return OPTIMIZERS[phase.optimizer](phase, build_schedule(phase, steps_per_epoch))


@keras.saving.register_keras_serializable(package="tftransfer")
class SparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels and logits, with optional label smoothing (Keras' sparse loss has none)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, name: str = "sparse_crossentropy",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):  # noqa: D102
        labels = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), self.num_classes)
        return keras.losses.categorical_crossentropy(labels, y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


def compile_for_phase(model: keras.Model, phase: PhaseConfig, steps_per_epoch: int, num_classes: int,
                      jit_compile: bool) -> None:
    """(Re)compiles the model; needed after every change of trainable flags."""
    model.compile(optimizer=build_optimizer(phase, steps_per_epoch),
                  loss=SparseCrossentropy(num_classes, phase.label_smoothing),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=jit_compile)



OPTIMIZERS: dict[str, Callable[[PhaseConfig, Any], keras.optimizers.Optimizer]] = {
    "adam": lambda p, lr: keras.optimizers.Adam(learning_rate=lr),
    "adamw": lambda p, lr: keras.optimizers.AdamW(learning_rate=lr, weight_decay=p.weight_decay),
    "sgd": lambda p, lr: keras.optimizers.SGD(learning_rate=lr, momentum=p.momentum, nesterov=p.nesterov,
                                              weight_decay=p.weight_decay or None),
}
