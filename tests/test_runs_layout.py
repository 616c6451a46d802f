"""runs.layout: a run name is one safe folder name; run folders are created atomically."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.jobs.export import export_run
from tftransfer.runs.layout import check_run_name, create_run_dir

BAD_NAMES = [".", "..", "../../X", "a/b", "a\\b", "", "new\nline", "tab\there", "nul\x00", ".hidden", "x" * 256]


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_that_is_a_path_is_refused_before_anything_is_created(tmp_path, name):
    runs = tmp_path / "work" / "runs"
    (runs / "kept").mkdir(parents=True)
    before = _tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"run name .* is not usable") as error:
            create_run_dir(runs, name, overwrite=overwrite)
        assert "\n" not in str(error.value)
    assert _tree(tmp_path) == before  # runs/ was not moved aside, nothing was written outside it


@pytest.mark.parametrize("name", ["colours", "mobilenetv2_office.csv_domain_webcam", "run-1.2", "Bienen_äöü"])
def test_ordinary_run_names_are_accepted(tmp_path, name):
    assert check_run_name(name) == name
    assert create_run_dir(tmp_path / "runs", name).path == tmp_path / "runs" / name


@pytest.mark.parametrize("name", ["..", "../../X", "a/b", "line\nbreak"])
def test_an_export_folder_name_that_is_a_path_is_refused(tmp_path, name):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: {name!r}\nexport:\n  dir: {tmp_path / 'saved_models'}\n".replace(
        "'", '"'))
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=r"export folder name .* is not usable"):
        export_run(run)
    assert _tree(tmp_path) == before


def _race(runs: Path, name: str, overwrite: bool, contenders: int = 2) -> tuple[list[Path], list[Exception]]:
    """`contenders` threads call create_run_dir at once (the test slows down every look at a folder: 50 ms)."""
    barrier = threading.Barrier(contenders)
    won: list[Path] = []
    lost: list[Exception] = []

    def contend() -> None:
        barrier.wait()
        try:
            won.append(create_run_dir(runs, name, overwrite=overwrite).path)
        except RunDirError as exc:
            lost.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return won, lost


def test_two_runs_started_at_once_never_share_a_new_folder(tmp_path, monkeypatch):
    real_stat = os.stat

    def slow_stat(path, *args, **kwargs) -> os.stat_result:  # Path.exists and Path.stat call it too
        try:
            return real_stat(path, *args, **kwargs)
        finally:
            time.sleep(0.05)  # widens the check-then-create window

    monkeypatch.setattr(os, "stat", slow_stat)
    runs = tmp_path / "runs"
    won, lost = _race(runs, "same", overwrite=False)
    assert len(won) == 1 and len(lost) == 1, (won, lost)
    assert "already exists" in str(lost[0])
    (won[0] / "config.yaml").write_text("first\n")
    won, lost = _race(runs, "same", overwrite=True)  # both move the old run aside; one gets the new folder
    assert len(won) == 1 and len(lost) == 1, (won, lost)
    kept = sorted(p.name for p in runs.iterdir())
    assert kept[0] == "same" and len(kept) == 2 and kept[1].startswith("same.replaced-")
    assert (runs / kept[1] / "config.yaml").read_text() == "first\n" and not (runs / "same" / "config.yaml").exists()


def test_two_processes_racing_for_a_run_name_get_one_folder_each_or_an_error(tmp_path):
    code = ("import sys, time\nfrom tftransfer.runs.layout import create_run_dir\n"
            "start = float(sys.argv[2])\ntime.sleep(max(0.0, start - time.time() - 0.01))\n"
            "while time.time() < start: pass\n"
            "won = 0\nfor i in range(30):\n"
            "    try:\n        create_run_dir(sys.argv[1], f'r{i}'); won += 1\n"
            "    except Exception as exc:\n        assert 'already exists' in str(exc), exc\n"
            "print(won)")
    # both start at the same instant: each sleeps until 10 ms before it (3 s of spinning burned a core each)
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "runs"), start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sum(int(out) for out, _ in outs) == 30  # every name went to exactly one process
