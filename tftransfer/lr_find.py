"""Learning-rate range test (Smith 2017, fastai's lr_find) for the head phase and the fine-tune phase.

The learning rate grows exponentially from `min_lr` to `max_lr` over `steps` optimizer steps while the training
loss is recorded; the suggestion is the rate where the smoothed loss falls fastest. The model's weights are put
back afterwards, so the test changes nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config import ExperimentConfig
from tftransfer.freezing import freeze_backbone, unfreeze_top_blocks
from tftransfer.workdir import create_run_dir, write_json

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
    from tftransfer.train import SparseCrossentropy

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


def plot_range_test(test: RangeTest, path: Path) -> Path:
    """Loss against learning rate (log x), the suggestion marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    smoothed = smooth(test.losses)
    ax.plot(test.lrs[: len(smoothed)], smoothed, label="smoothed loss")
    ax.plot(test.lrs, test.losses, alpha=0.3, label="batch loss")
    if test.suggestion:
        ax.axvline(test.suggestion, color="red", linestyle="--", label=f"suggested {test.suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {test.phase} phase")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def run_lr_find(cfg: ExperimentConfig, phases: tuple[str, ...] = ("head", "finetune"), steps: int = 100,
                min_lr: float = 1e-7, max_lr: float = 1.0, overwrite: bool = False) -> dict[str, Any]:
    """`tftransfer lr-find`: range tests into runs/<name>-lr-find/ (JSON, PNG, TensorBoard scalars)."""
    from tftransfer.device_augment import AugmentingModel, step_augmenter
    from tftransfer.train import _head_on_features, feature_cache_spec, prepare_experiment

    exp = prepare_experiment(cfg)
    cfg = exp.cfg
    # With placement model the training batches come un-augmented: the ramp trains through the augmenter as fit does.
    augmenter = step_augmenter(exp.data)
    on_images = exp.model if augmenter is None else AugmentingModel(exp.model, augmenter)
    run = create_run_dir(cfg.runs_dir, f"{cfg.name}-lr-find", overwrite=overwrite)
    results: dict[str, Any] = {}
    num_classes = len(exp.source.class_names)
    for phase in phases:
        if phase == "head":
            freeze_backbone(exp.model)
            if cfg.phases.head.feature_cache:
                inputs = _head_on_features(exp.model, cfg.phases.head, exp.data,
                                           feature_cache_spec(cfg, exp.spec, exp.image_size), cfg.runtime.seed)
                model, train = inputs.model, inputs.train
            else:
                model, train = on_images, exp.data.train
        else:
            unfreeze_top_blocks(exp.model, exp.blocks, max(cfg.phases.finetune.unfreeze_blocks, 1))
            model, train = on_images, exp.data.train
        test = range_test(model, train, num_classes, phase, min_lr, max_lr, steps)
        plot_range_test(test, run.path / f"lr_find_{phase}.png")
        with tf.summary.create_file_writer(str(run.logs / f"lr_find_{phase}")).as_default():
            for step, (lr, loss) in enumerate(zip(test.lrs, test.losses)):
                if math.isfinite(loss):
                    tf.summary.scalar("lr_find/loss", loss, step=step)
                    tf.summary.scalar("lr_find/learning_rate", lr, step=step)
        results[phase] = test.to_dict()
    summary = {"config": cfg.name, "steps": steps, "min_lr": min_lr, "max_lr": max_lr,
               "suggested": {p: r["suggested_learning_rate"] for p, r in results.items()}, "phases": results}
    write_json(run.path / "lr_find.json", summary)
    summary["run_dir"] = str(run.path)
    return summary


def with_suggestions(cfg: ExperimentConfig, suggested: dict[str, float | None]) -> ExperimentConfig:
    """The config with each phase's learning rate replaced by the range test's suggestion (where there is one)."""
    phases = cfg.phases
    if suggested.get("head"):
        phases = replace(phases, head=replace(phases.head, learning_rate=suggested["head"]))
    if suggested.get("finetune"):
        phases = replace(phases, finetune=replace(phases.finetune, learning_rate=suggested["finetune"]))
    return replace(cfg, phases=phases)
