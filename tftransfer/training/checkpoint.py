"""Per-epoch checkpoints that a killed run resumes from: weights, optimizer state, phase, epoch, history.

Each checkpoint is a folder `checkpoints/epoch-NNNN/` written under a temporary name and renamed when complete,
so a SIGKILL at any moment leaves either the previous or the new checkpoint, never half of one. `state.json` says
which phase the epoch belongs to and how far it got; the optimizer's variables (moments and step counter, which
drives the learning-rate schedule) are restored into a freshly built optimizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tftransfer.core.errors import RunDirError

logger = logging.getLogger(__name__)

KEEP = 2
_PREFIX = "epoch-"


@dataclass
class TrainState:
    """Where training stands after the checkpointed epoch."""

    epoch: int  # epochs completed over all phases (the continuous axis)
    phase: str  # the phase this checkpoint belongs to
    phase_start: int  # global epoch at which that phase began
    phase_done: bool  # True once the phase has ended (best weights restored, evaluated)
    phase_seconds: float = 0.0
    completed: list[dict[str, Any]] = field(default_factory=list)  # finished phases (PhaseResult fields)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None

    @property
    def phase_epochs_done(self) -> int:  # noqa: D102
        return self.epoch - self.phase_start


def _weights_arrays(weights: list[Any]) -> dict[str, np.ndarray]:
    return {f"w{i:05d}": np.asarray(keras.ops.convert_to_numpy(w)) for i, w in enumerate(weights)}


def _arrays_list(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[k] for k in sorted(data.files)]


def save_checkpoint(checkpoints: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer | None,
                    state: TrainState, best_weights: list[np.ndarray] | None = None,
                    extra_weights: list[np.ndarray] | None = None) -> Path:
    """Writes checkpoints/epoch-NNNN/ atomically and keeps only the newest few."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"{_PREFIX}{state.epoch:04d}{'-end' if state.phase_done else ''}"
    tmp = checkpoints / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_weights(str(tmp / "model.weights.h5"))
    if optimizer is not None and optimizer.built:
        np.savez(tmp / "optimizer.npz", **_weights_arrays(optimizer.variables))
    if best_weights is not None:
        np.savez(tmp / "best.npz", **_weights_arrays(best_weights))
    if extra_weights:  # weights that live outside the model, e.g. DANN's domain classifier
        np.savez(tmp / "extra.npz", **_weights_arrays(extra_weights))
    (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=1, default=float))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(checkpoints)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: (int(p.name[len(_PREFIX):].split("-")[0]), p.name.endswith("-end")))


@dataclass
class Checkpoint:
    """A loaded checkpoint: its state, and where its arrays are."""

    path: Path
    state: TrainState

    def restore_model(self, model: keras.Model) -> None:
        """Loads the full model's weights."""
        model.load_weights(str(self.path / "model.weights.h5"))

    def restore_optimizer(self, optimizer: keras.optimizers.Optimizer, variables: list[Any]) -> bool:
        """Builds the optimizer for `variables` and assigns the saved state; False if there is none."""
        file = self.path / "optimizer.npz"
        if not file.is_file():
            return False
        values = _arrays_list(file)
        if not optimizer.built:
            optimizer.build(variables)
        if len(values) != len(optimizer.variables):
            raise RunDirError(f"{file}: optimizer state has {len(values)} variables, the rebuilt optimizer "
                              f"{len(optimizer.variables)}; the run's config or code changed since it was saved")
        for var, value in zip(optimizer.variables, values):
            var.assign(value)
        return True

    def extra_weights(self) -> list[np.ndarray] | None:
        """Training-only weights saved beside the model (an adaptation method's), if any."""
        file = self.path / "extra.npz"
        return _arrays_list(file) if file.is_file() else None

    def best_weights(self) -> list[np.ndarray] | None:
        """The current phase's best weights so far, if any."""
        file = self.path / "best.npz"
        return _arrays_list(file) if file.is_file() else None


def load_latest(checkpoints: Path) -> Checkpoint:
    """The newest complete checkpoint; RunDirError when there is none."""
    found = list_checkpoints(checkpoints)
    if not found:
        raise RunDirError(f"no checkpoint in {checkpoints}: the run stopped before its first checkpoint (a phase "
                          "on cached features is checkpointed when it ends); start it again with --overwrite")
    path = found[-1]
    try:
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except (ValueError, TypeError) as exc:
        raise RunDirError(f"{path / 'state.json'} is damaged: {exc}") from None
    return Checkpoint(path, state)
