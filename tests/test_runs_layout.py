"""runs.layout: a run name is one safe folder name; run folders are created atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from tftransfer.core.errors import ConfigError
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
