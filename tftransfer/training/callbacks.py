"""callbacks: moved from tftransfer.training.phases."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import (
    ExperimentConfig,
    config_to_dict,
    flatten,
)
from tftransfer.core.progress import Tracker
from tftransfer.training.adaptation.trainer import AdaptiveTrainer
from tftransfer.training.checkpoint import TrainState, save_checkpoint
from tftransfer.training.pruning import MagnitudePruning

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks


class StepCount(keras.callbacks.Callback):
    """Keeps optimizer.iterations, which drives the learning-rate schedule, at the training steps that really ran.

    Keras does not know the length of the file pipeline (its safety net drops a file only a full decode finds
    damaged), so every epoch ends with a call that finds the data exhausted; that call still adds one to
    `iterations` (the increment does not wait for the batch that never comes). Uncorrected, a phase of one step an
    epoch reached the end of its cosine schedule half way, and Adam's bias correction and the adaptation's
    progress ran ahead too. Must come before the callbacks that read the rate or save the optimizer at an
    epoch's end.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start = 0
        self._ran = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        self._start = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._ran = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:  # noqa: D102
        # `batch` is the last step of the execution; the call that ran out of data reports no end
        self._ran = batch + 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        iterations = self.model.optimizer.iterations
        if int(keras.ops.convert_to_numpy(iterations)) != self._start + self._ran:
            iterations.assign(self._start + self._ran)


class HistoryRecorder(keras.callbacks.Callback):
    """Collects per-epoch logs of every phase, with the phase name and learning rate, in one list."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.phase = ""
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        row = {"epoch": epoch + 1, "phase": self.phase}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        optimizer = self.model.optimizer
        row.setdefault("learning_rate", float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
        row["seconds"] = time.perf_counter() - self._epoch_start
        self.rows.append(row)
        shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in row)
        logger.info("epoch %d [%s] %s  lr %.2e  (%.1f s)", epoch + 1, self.phase, shown, row["learning_rate"],
                    row["seconds"])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        self._epoch_start = time.perf_counter()


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest monitored value; restores them when the phase ends."""

    def __init__(self, monitor: str = "val_loss") -> None:
        super().__init__()
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch: int | None = None
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(value) and value < self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.model.get_weights()

    def on_train_end(self, logs: dict | None = None) -> None:  # noqa: D102
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
            logger.info("restored weights of epoch %d (%s %.4f)", self.best_epoch, self.monitor, self.best)


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first non-finite loss; the epoch checkpoint of the last good epoch stays on disk."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_batch: int | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:  # noqa: D102
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_batch = batch
            self.model.stop_training = True


def tensorboard_hparams(log_dir: Path, cfg: ExperimentConfig) -> None:
    """Writes the run's hyperparameters for TensorBoard's HParams dashboard."""
    try:
        from tensorboard.plugins.hparams import api as hp
    except ImportError:  # tensorboard ships with tensorflow; be quiet if someone removed it
        return
    values = {}
    for key, value in flatten(config_to_dict(cfg)).items():
        values[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    with tf.summary.create_file_writer(str(log_dir / "hparams")).as_default():
        hp.hparams(values)



@dataclass
class Progress:
    """Mutable facts the per-epoch checkpoint needs about the phase in progress."""

    recorder: HistoryRecorder
    phase: str = ""
    phase_start: int = 0
    started: float = 0.0
    seconds_before: float = 0.0
    completed: list[dict[str, Any]] = field(default_factory=list)
    best: BestWeights | None = None
    pruning: MagnitudePruning | None = None  # the phase's pruning callback, whose masks are checkpointed

    def masks(self) -> dict[str, np.ndarray] | None:
        """The pruning masks to checkpoint, if the phase prunes."""
        return self.pruning.mask_arrays() if self.pruning is not None else None

    def state(self, epoch: int, phase_done: bool = False) -> TrainState:
        best = self.best
        return TrainState(epoch=epoch, phase=self.phase, phase_start=self.phase_start, phase_done=phase_done,
                          phase_seconds=self.seconds_before + time.perf_counter() - self.started,
                          completed=list(self.completed), history=list(self.recorder.rows),
                          best_value=best.best if best and best.best_epoch else None,
                          best_epoch=best.best_epoch if best else None,
                          prune_sparsity=self.pruning.sparsity if self.pruning is not None else None)


class EpochCheckpoint(keras.callbacks.Callback):
    """Checkpoints the full model, the optimizer and the training state after every epoch (last callback)."""

    def __init__(self, full_model: keras.Model, checkpoints: Path, progress: Progress) -> None:
        super().__init__()
        self.full_model = full_model
        self.checkpoints = checkpoints
        self.progress = progress

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        loss = (logs or {}).get("loss")
        if loss is None or not math.isfinite(float(loss)):
            return  # never overwrite the last good checkpoint with a diverged epoch
        best = self.progress.best
        save_checkpoint(self.checkpoints, self.full_model, self.model.optimizer, self.progress.state(epoch + 1),
                        best.best_weights if best else None, extra_weights=extra_weights(self.model),
                        masks=self.progress.masks())



def extra_weights(model: keras.Model) -> list[np.ndarray] | None:
    """An adaptive trainer's method weights (not part of the exported model), for checkpoints."""
    method = getattr(model, "method", None) if isinstance(model, AdaptiveTrainer) else None
    return method.get_weights() if method is not None and method.weights else None


class StepProgress(keras.callbacks.Callback):
    """Each epoch's training steps as one tracked step with its known total (tftransfer.core.progress): a bar on
    a terminal, a log line every few seconds when piped. The epoch's own summary line follows it, so no closing
    line is logged.

    No per-step hook: a watcher thread reads the optimizer's step counter every `poll_seconds` instead, so
    Keras has one callback fewer to call after every step, and the count is the steps that really ran (the
    optimizer's, which StepCount keeps exact at each epoch's end).
    """

    def __init__(self, phase: str, steps: int, first_epoch: int, epochs: int, poll_seconds: float = 0.5) -> None:
        super().__init__()
        self.phase, self.steps, self.first_epoch, self.epochs = phase, steps, first_epoch, epochs
        self.poll_seconds = poll_seconds
        self.current: Tracker | None = None
        self._start = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        self._finish()
        what = f"{self.phase} epoch {epoch - self.first_epoch + 1}/{self.epochs}"
        self._start = self._iterations()
        self.current = Tracker(what, self.steps, "steps", log_finish=False)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(self._stop,), daemon=True,
                                         name=f"tftransfer-progress-{self.phase}")
        self._watcher.start()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        self._finish()

    def on_train_end(self, logs: dict | None = None) -> None:  # noqa: D102
        self._finish()

    def _iterations(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_seconds):
            self._update()

    def _update(self) -> None:
        with self._lock:
            if self.current is not None:
                done = min(self._iterations() - self._start, self.steps)
                if done > self.current.done:
                    self.current.advance(done - self.current.done)

    def _finish(self) -> None:
        if self._watcher is not None:
            self._stop.set()
            self._watcher.join()
            self._watcher = None
        self._update()
        with self._lock:
            if self.current is not None:
                self.current.finish()
                self.current = None
