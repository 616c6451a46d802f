"""CSV/JSONL manifests: relative paths, split and domain columns, errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, write_solid_images

from tftransfer.core.errors import DataError
from tftransfer.data.manifest import load_manifest, write_manifest
from tftransfer.data.pipeline import make_split_dataset
from tftransfer.data.specs import load_source


def _images(root: Path) -> list[dict[str, str]]:
    """Two domains (a: 8 images per colour, b: 4) of three colours; rows relative to root."""
    rows = []
    for domain, count in (("a", 8), ("b", 4)):
        for i, (name, colour) in enumerate(COLOURS.items()):
            for path in write_solid_images(root / "img" / domain / name, colour, count, seed=10 * i + len(domain)):
                rows.append({"path": path.relative_to(root).as_posix(), "label": name, "domain": domain})
    return rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_with_domains(tmp_path, suffix):
    rows = _images(tmp_path)
    manifest = write_manifest(tmp_path / f"data{suffix}", rows)
    src = load_source(str(manifest), val_split=0.25)
    assert src.class_names == sorted(COLOURS)
    assert len(src.train) + len(src.val) == 36
    assert src.domain_names == ["a", "b"]
    for key, label, domain in zip(src.train.keys, src.train.labels, src.train.domains):
        assert key.split("/")[2] == src.class_names[label] and key.split("/")[1] == domain
    target = load_source(f"{manifest}#domain=b", val_split=0.25)
    assert set(target.train.domains + target.val.domains) == {"b"}
    assert len(target.train) + len(target.val) == 12
    assert target.class_names == src.class_names  # label ids stay those of the whole file
    # the same row lands in the same split whether or not the file is filtered
    assert set(target.val.keys) == {k for k, d in zip(src.val.keys, src.val.domains) if d == "b"}
    # selecting rows in Python gives the same as the spec filter
    assert sorted(src.select_domains(["b"]).train.keys) == sorted(target.train.keys)
    # and the paths decode in the pipeline
    x, y = next(iter(make_split_dataset(target.train, 16, 4, shuffle=False, cache="none")))
    assert x.shape == (4, 16, 16, 3)


def test_split_column_and_absolute_paths(tmp_path):
    rows = _images(tmp_path)
    for i, row in enumerate(rows):
        row["split"] = ("train", "val", "validation", "test", "")[i % 5]
    rows[0]["path"] = str((tmp_path / rows[0]["path"]).resolve())
    for row in rows[1:]:
        row["path"] = "../" + row["path"]  # relative to the manifest's folder, not the working directory
    manifest = write_manifest(tmp_path / "sub" / "m.csv", rows)
    src = load_manifest(manifest, val_split=0.5, test_split=0.3, allow_outside_paths=True)
    given = {row["path"].removeprefix("../"): row["split"] for row in rows}
    for key in src.val.keys:
        assert given[key.removeprefix("../")] in ("val", "validation")
    for key in src.test.keys:
        assert given[key.removeprefix("../")] == "test"
    # split values the file names are never drawn again from the rows without one
    assert len(src.val) == sum(r["split"] in ("val", "validation") for r in rows)
    assert "manifest split column" in src.split_method


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("file,class\na.jpg,x\n", r"header naming the columns path,label.*missing \['path', 'label'\]"),
    ("path,label\n{img},cyan\nnope/missing.jpg,magenta\n", r"1 listed file\(s\) not found .*line 3: nope/missing.jpg"),
    ("path,label\n{img},\n", r"line 2: empty label"),
    ("path,label,split\n{img},cyan,holdout\n", r"line 2: split 'holdout' is not one of train, val, test"),
    ("path,label\n{img},cyan\n{img},magenta\n", r"listed twice .*lines 2 and 3 .* as 'cyan', .* as 'magenta'"),
    ("path,label\n{img},cyan\n", r"needs at least 2 classes"),
    ("path,label\n", "no rows"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    img = write_solid_images(tmp_path / "i", (0, 0, 0), 1)[0].relative_to(tmp_path).as_posix()
    manifest = _write(tmp_path / "m.csv", text.replace("{img}", img))
    with pytest.raises(DataError, match=message):
        load_source(str(manifest))


def test_paths_outside_the_manifest_folder_are_refused_before_they_are_read(tmp_path, monkeypatch):
    img = write_solid_images(tmp_path / "data" / "i", (0, 0, 0), 2)
    outside = write_solid_images(tmp_path / "elsewhere", (255, 0, 0), 1)[0]
    for escape in ("../elsewhere/" + outside.name, str(outside), "/etc/passwd"):
        manifest = _write(tmp_path / "data" / "m.csv",
                          f"path,label\ni/{img[0].name},a\ni/{img[1].name},b\n{escape},b\n")
        with pytest.raises(DataError, match=r"1 path\(s\) lead outside the manifest's folder .*line 4: .*"
                                            r"data.allow_outside_paths"):
            load_source(str(manifest))
    # Explicitly allowed, a file elsewhere is read like any other.
    manifest = _write(tmp_path / "data" / "m.csv",
                      f"path,label\ni/{img[0].name},a\ni/{img[1].name},b\n{outside},b\n")
    src = load_source(str(manifest), val_split=0.0, allow_outside_paths=True)
    assert len(src.train) == 3


def test_one_file_under_two_names_is_one_example_or_a_conflict(tmp_path, caplog):
    img = write_solid_images(tmp_path / "red", (255, 0, 0), 1)[0]
    blue = write_solid_images(tmp_path / "blue", (0, 0, 255), 1)[0]
    # red/x.png, red/../red/x.png and the absolute path are the same file.
    agreeing = _write(tmp_path / "m.csv", f"path,label\nred/{img.name},red\nred/../red/{img.name},red\n"
                                          f"{img},red\nblue/{blue.name},blue\n")
    with caplog.at_level("WARNING", logger="tftransfer.data.manifest"):
        src = load_source(str(agreeing), val_split=0.0)
    assert len(src.train) == 2
    assert "line 3: red/../red/" in caplog.text and "line 4: " in caplog.text and "the repeat is ignored" in caplog.text
    conflicting = _write(tmp_path / "m.csv", f"path,label\nred/{img.name},red\nblue/{blue.name},blue\n"
                                             f"blue/../red/{img.name},blue\n")
    with pytest.raises(DataError, match=r"1 file\(s\) listed twice .*lines 2 and 4 \('red/.*' as 'red', "
                                        r"'blue/../red/.*' as 'blue'\)"):
        load_source(str(conflicting))


@pytest.mark.parametrize("lines, message", [
    (['{"path": "{img}", "label": "a"}', "not json"], r"line 2: not valid JSON"),
    (['{"path": "{img}"}'], r"line 1: missing key\(s\) \['label'\]"),
    (['["{img}", "a"]'], r"line 1: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    img = write_solid_images(tmp_path / "i", (0, 0, 0), 1)[0].relative_to(tmp_path).as_posix()
    manifest = _write(tmp_path / "m.jsonl", "\n".join(lines).replace("{img}", img) + "\n")
    with pytest.raises(DataError, match=message):
        load_source(str(manifest))


def test_missing_files_are_listed_with_lines_and_counted(tmp_path):
    rows = [{"path": f"gone/{i}.jpg", "label": "ab"[i % 2]} for i in range(14)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(DataError, match=r"14 listed file\(s\) not found .*line 2: gone/0.jpg.*and 4 more"):
        load_source(str(manifest))


def test_unknown_domain_and_filter_errors(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", _images(tmp_path))
    with pytest.raises(DataError, match=r"no rows with domain \['c'\]; domains in the file: \['a', 'b'\]"):
        load_source(f"{manifest}#domain=c")
    with pytest.raises(DataError, match="unknown filter"):
        load_source(f"{manifest}#label=cyan")
    plain = load_source(str(manifest).replace(".csv", ".csv"))
    assert plain.name == "m"


def test_bad_files_in_a_manifest_are_skipped_or_strict(tmp_path):
    rows = _images(tmp_path)
    (tmp_path / "bad.jpg").write_text("not an image")
    rows.append({"path": "bad.jpg", "label": "cyan", "domain": "a"})
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    src = load_source(str(manifest))
    assert dict(src.skipped) == {"bad.jpg": "not an image (unrecognised format)"}
    with pytest.raises(DataError, match=r"(?s)1 bad files .*bad.jpg"):
        load_source(str(manifest), strict=True)


def test_numeric_labels_sort_numerically(tmp_path):
    paths = write_solid_images(tmp_path / "i", (10, 20, 30), 12)
    rows = [{"path": p.relative_to(tmp_path).as_posix(), "label": str([2, 10, 9][i % 3])} for i, p in enumerate(paths)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**r, "label": int(r["label"])}) + "\n" for r in rows))
    src = load_source(str(manifest), val_split=0.0)
    assert src.class_names == ["2", "9", "10"]
    assert np.array_equal(np.bincount(src.train.labels), [4, 4, 4])
