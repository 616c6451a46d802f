"""Per-epoch checkpoints that a killed run resumes from: weights, optimizer state, phase, epoch, history.

Each checkpoint is a folder `checkpoints/epoch-NNNN/` written under a temporary name and renamed when complete,
so a SIGKILL at any moment leaves either the previous or the new checkpoint, never half of one. `state.json` says
which phase the epoch belongs to and how far it got; the optimizer's variables (moments and step counter, which
drives the learning-rate schedule) are restored into a freshly built optimizer.

`state.json` also records the size and sha256 of every other file of the checkpoint (`files`). A resume verifies
them and takes the newest intact checkpoint, with a warning naming the damaged ones (a truncated weights file, a
disk error): the previous epoch's checkpoint is kept for that. Checkpoints written before checksums were recorded
are taken as they are.
"""

from __future__ import annotations

import hashlib
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
from tftransfer.core.io import disk_errors, fsync_path, fsync_tree, remove_stale, removed_on_failure

logger = logging.getLogger(__name__)

KEEP = 2
_PREFIX = "epoch-"
_TMP_PREFIX = ".tmp-"
_TMP_NAME = r"^\.tmp-epoch-\d+(?:-end)?-(\d+)$"  # .tmp-epoch-NNNN[-end]-<pid>
STATE_FILE = "state.json"
MASKS_FILE = "masks.npz"
_MASK_KEY = "m{:05d}"
FILES_KEY = "files"  # in state.json: {file name: {"bytes": n, "sha256": hex}} of the checkpoint's other files


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
    prune_sparsity: float | None = None  # the pruning schedule's sparsity at its last mask update (masks.npz)

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
                    extra_weights: list[np.ndarray] | None = None,
                    masks: dict[str, np.ndarray] | None = None) -> Path:
    """Writes checkpoints/epoch-NNNN/ atomically and keeps only the newest few.

    The files and the folder are fsync'd before the rename that publishes them, so a power loss cannot leave a
    checkpoint that looks complete but is not. A full or read-only disk is a StorageError naming the path, with the
    temporary folder removed (and those of writers that died, at the next checkpoint). `masks` (pruning masks by
    kernel variable path) are training state like the optimizer's: masks.npz.
    """
    final = checkpoints / f"{_PREFIX}{state.epoch:04d}{'-end' if state.phase_done else ''}"
    tmp = checkpoints / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    with disk_errors(checkpoints):
        checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale(checkpoints, _TMP_NAME)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with removed_on_failure(tmp):
            _write_checkpoint(tmp, model, optimizer, state, best_weights, extra_weights, masks)
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        fsync_path(checkpoints)
    found = list_checkpoints(checkpoints)
    newest = found.index(final) + 1
    # Newer ones than this are left from before a resume that fell back past them (damaged): stale, never resumed.
    for old in found[:max(newest - KEEP, 0)] + found[newest:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer | None,
                      state: TrainState, best_weights: list[np.ndarray] | None,
                      extra_weights: list[np.ndarray] | None, masks: dict[str, np.ndarray] | None) -> None:
    """The checkpoint's files in `folder`, state.json (with their sizes and checksums) last."""
    model.save_weights(str(folder / "model.weights.h5"))
    if optimizer is not None and optimizer.built:
        np.savez(folder / "optimizer.npz", **_weights_arrays(optimizer.variables))
    if best_weights is not None:
        np.savez(folder / "best.npz", **_weights_arrays(best_weights))
    if extra_weights:  # weights that live outside the model, e.g. DANN's domain classifier
        np.savez(folder / "extra.npz", **_weights_arrays(extra_weights))
    if masks:
        np.savez(folder / MASKS_FILE, **{_MASK_KEY.format(i): m for i, m in enumerate(masks.values())},
                 paths=np.array(list(masks), dtype=str))
    record = {**state.__dict__, FILES_KEY: _file_records(folder)}
    (folder / STATE_FILE).write_text(json.dumps(record, indent=1, default=float))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file of a checkpoint folder but state.json (which holds them)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
            if p.is_file() and p.name != STATE_FILE}


def _damage(path: Path, files: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's files against their records in state.json; None when all match."""
    for name, record in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != record.get("bytes"):
            return f"{name} has {size} bytes, {record.get('bytes')} were written"
        if _sha256(file) != record.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and (p / STATE_FILE).is_file()]
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

    def masks(self) -> dict[str, np.ndarray] | None:
        """Pruning masks by kernel variable path, if the checkpoint has them."""
        file = self.path / MASKS_FILE
        if not file.is_file():
            return None
        with np.load(file) as data:
            paths = [str(p) for p in data["paths"]]
            return {path: data[_MASK_KEY.format(i)].astype(bool) for i, path in enumerate(paths)}

    def best_weights(self) -> list[np.ndarray] | None:
        """The current phase's best weights so far, if any."""
        file = self.path / "best.npz"
        return _arrays_list(file) if file.is_file() else None


def read_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint folder, verified against the checksums in its state.json; RunDirError saying what is wrong."""
    try:
        record = json.loads((path / STATE_FILE).read_text())
        files = record.pop(FILES_KEY, None) if isinstance(record, dict) else None
        state = TrainState(**record)
    except (OSError, ValueError, TypeError) as exc:
        raise RunDirError(f"{STATE_FILE} is damaged: {exc}") from None
    damage = _damage(path, files) if isinstance(files, dict) else None
    if damage:
        raise RunDirError(damage)
    return Checkpoint(path, state)


def load_latest(checkpoints: Path) -> Checkpoint:
    """The newest intact checkpoint (see read_checkpoint), with a warning when newer ones are damaged.

    RunDirError when there is none, or when none is intact (one line naming each and what is wrong with it).
    """
    found = list_checkpoints(checkpoints)
    if not found:
        raise RunDirError(f"no checkpoint in {checkpoints}: the run stopped before its first checkpoint (a phase "
                          "on cached features is checkpointed when it ends); start it again with --overwrite")
    damaged: list[str] = []
    for path in reversed(found):
        try:
            checkpoint = read_checkpoint(path)
        except RunDirError as exc:
            damaged.append(f"{path.name} ({exc})")
            continue
        if damaged:
            logger.warning("checkpoint %s is damaged; resuming from %s, the newest intact one",
                           "; ".join(damaged), path.name)
        return checkpoint
    raise RunDirError(f"no intact checkpoint in {checkpoints}: {'; '.join(damaged)}; the run cannot be resumed, "
                      "start it again with --overwrite")
