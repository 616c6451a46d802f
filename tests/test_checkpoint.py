"""Checkpoint verification: checksums in state.json, a damaged newest checkpoint falls back to the previous one."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tftransfer.core.errors import RunDirError, StorageError
from tftransfer.training.checkpoint import FILES_KEY, TrainState, list_checkpoints, load_latest, save_checkpoint


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0)  # builds the optimizer's variables
    return model


def _save_epochs(checkpoints: Path, model: keras.Model, epochs: int) -> list[Path]:
    return [save_checkpoint(checkpoints, model, model.optimizer,
                            TrainState(epoch=e, phase="finetune", phase_start=0, phase_done=False),
                            best_weights=model.get_weights()) for e in range(1, epochs + 1)]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_state_file_records_the_checksum_of_every_file(tmp_path):
    path = _save_epochs(tmp_path / "ck", _model(), 1)[0]
    files = json.loads((path / "state.json").read_text())[FILES_KEY]
    assert set(files) == {"model.weights.h5", "optimizer.npz", "best.npz"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] == (path / n).stat().st_size for n, f in files.items())
    assert load_latest(tmp_path / "ck").state.epoch == 1


@pytest.mark.parametrize("damaged", ["model.weights.h5", "optimizer.npz", "best.npz"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damaged):
    model = _model()
    first, newest = _save_epochs(tmp_path / "ck", model, 2)
    _truncate(newest / damaged)
    with caplog.at_level(logging.WARNING, logger="tftransfer.training.checkpoint"):
        checkpoint = load_latest(tmp_path / "ck")
    assert checkpoint.path == first and checkpoint.state.epoch == 1
    assert f"{newest.name} ({damaged} has" in caplog.text and f"resuming from {first.name}" in caplog.text
    checkpoint.restore_model(model)  # the fallback really loads
    assert checkpoint.restore_optimizer(model.optimizer, model.trainable_variables)


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    model = _model()
    first, newest = _save_epochs(tmp_path / "ck", model, 2)
    _truncate(newest / "model.weights.h5")
    (first / "optimizer.npz").write_bytes(b"\0" * (first / "optimizer.npz").stat().st_size)  # same size, other bytes
    with pytest.raises(RunDirError, match="no intact checkpoint") as error:
        load_latest(tmp_path / "ck")
    message = str(error.value)
    assert "\n" not in message and "--overwrite" in message
    assert f"{newest.name} (model.weights.h5 has" in message
    assert f"{first.name} (optimizer.npz does not match" in message


def test_checkpoints_without_checksums_still_load_and_stale_ones_are_pruned(tmp_path):
    model = _model()
    first, second = _save_epochs(tmp_path / "ck", model, 2)
    state = json.loads((second / "state.json").read_text())
    del state[FILES_KEY]  # as written before checksums were recorded
    (second / "state.json").write_text(json.dumps(state))
    assert load_latest(tmp_path / "ck").path == second
    _truncate(second / "model.weights.h5")
    (second / "state.json").write_text(json.dumps({**state, FILES_KEY: {"model.weights.h5": {"bytes": 1}}}))
    assert load_latest(tmp_path / "ck").path == first
    # resuming from epoch 1 writes epoch 2 again; a damaged checkpoint newer than it never outlives it
    (tmp_path / "ck" / "epoch-0003").mkdir()
    (tmp_path / "ck" / "epoch-0003" / "state.json").write_text("{")
    _save_epochs(tmp_path / "ck", model, 2)
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["epoch-0001", "epoch-0002"]


def _fd_paths(monkeypatch: pytest.MonkeyPatch, fail: int | None = None) -> list[str]:
    """Records the path of every os.fsync'd descriptor; with `fail`, os.fsync raises that errno instead."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if fail is not None:
            raise OSError(fail, os.strerror(fail))
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_checkpoint_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    synced = _fd_paths(monkeypatch)
    path = _save_epochs(tmp_path / "ck", _model(), 1)[0]
    tmp = str(tmp_path / "ck" / f".tmp-{path.name}-{os.getpid()}")
    # Every file and the folder itself under their temporary name (before the rename), then the parent folder.
    assert {f"{tmp}/{name}" for name in ("model.weights.h5", "optimizer.npz", "best.npz", "state.json")} | {tmp} \
        <= set(synced)
    assert synced[-1] == str(tmp_path / "ck")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_is_one_error_naming_the_path_and_leaves_no_temporary_folder(
        tmp_path, monkeypatch, code):
    model = _model()
    first = _save_epochs(tmp_path / "ck", model, 1)[0]
    _fd_paths(monkeypatch, fail=code)  # fsync is where a full disk shows up on delayed allocation
    with pytest.raises(StorageError, match=rf"cannot write .*ck: .*{errno_reason(code)}") as raised:
        save_checkpoint(tmp_path / "ck", model, model.optimizer,
                        TrainState(epoch=2, phase="finetune", phase_start=0, phase_done=False))
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [first.name]  # nothing half-written is left
    assert load_latest(tmp_path / "ck").state.epoch == 1


def errno_reason(code: int) -> str:
    return {errno.ENOSPC: "no space left", errno.EROFS: "read-only", errno.EACCES: "permission denied"}[code]


def test_temporary_folders_of_dead_writers_are_removed_at_the_next_checkpoint(tmp_path):
    checkpoints = tmp_path / "ck"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = checkpoints / f".tmp-epoch-0003-{int(dead.stdout)}"
    running = checkpoints / f".tmp-epoch-0003-{os.getppid()}"  # a writer still alive: never touched
    for folder in (stale, running):
        (folder).mkdir(parents=True)
        (folder / "model.weights.h5").write_bytes(b"half")
    _save_epochs(checkpoints, _model(), 1)
    assert not stale.exists() and running.is_dir()
