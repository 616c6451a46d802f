"""Checkpoint verification: checksums in state.json, a damaged newest checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from tftransfer.core.errors import RunDirError
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
