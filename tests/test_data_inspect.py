"""`tftransfer data inspect`: planted duplicates, leakage, corrupt and mislabelled files, near-duplicates, JSON."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_colour_folder
from PIL import Image

from tftransfer.cli import main
from tftransfer.data.inspect import format_report, inspect_data
from tftransfer.data.probe import probe_images


def _scene(seed: int, size: int = 64) -> Image.Image:
    """A smooth photo-like picture (upsampled random 4x4 colours): structure a dHash can see, unlike flat noise."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture
def planted(tmp_path):
    """train/val colour folders with one of each problem planted."""
    root = make_colour_folder(tmp_path / "d", per_class=6, splits=True)
    # exact duplicate across splits (same class): leakage
    shutil.copy(root / "train" / "cyan" / "img_000.jpg", root / "val" / "cyan" / "copy_of_train.jpg")
    # exact duplicate across classes (same split): a labelling problem
    shutil.copy(root / "train" / "magenta" / "img_001.jpg", root / "train" / "yellow" / "which_class.jpg")
    # a corrupt file, a truncated one, a PNG named .jpg
    (root / "train" / "cyan" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    good = (root / "train" / "yellow" / "img_000.jpg").read_bytes()
    (root / "train" / "yellow" / "cut.jpg").write_bytes(good[: len(good) // 2])
    Image.open(root / "train" / "magenta" / "img_002.jpg").save(root / "train" / "magenta" / "really_png.jpg", "PNG")
    # a near-duplicate in val: the same picture re-encoded smaller (different bytes, same content); other scenes
    # in the same class are not near-duplicates of it
    _scene(1).save(root / "train" / "yellow" / "scene.jpg", quality=95)
    buf = io.BytesIO()
    _scene(1).resize((48, 48)).save(buf, "JPEG", quality=60)
    (root / "val" / "yellow" / "reencoded.jpg").write_bytes(buf.getvalue())
    _scene(2).save(root / "val" / "yellow" / "other_scene.jpg", quality=95)
    return root


def test_inspect_finds_every_planted_problem(planted, tmp_path):
    report = inspect_data(str(planted), json_path=tmp_path / "out" / "report.json")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report))
    counts = report["counts"]
    assert counts["splits"]["train"]["per_class"] == {"cyan": 6, "magenta": 7, "yellow": 8}
    assert counts["splits"]["val"]["per_class"] == {"cyan": 3, "magenta": 2, "yellow": 4}
    assert counts["imbalance_ratio"] == pytest.approx(12 / 9)
    files = report["files"]
    assert {u["path"] for u in files["unreadable"]} == {"train/cyan/broken.jpg", "train/yellow/cut.jpg"}
    assert files["extension_mismatches"] == [{"path": "train/magenta/really_png.jpg", "extension": ".jpg",
                                              "format": "PNG"}]
    dup = report["duplicates"]
    assert dup["groups"] == 2 and dup["cross_split_groups"] == 1 and dup["cross_class_groups"] == 1
    leak = next(g for g in dup["listed"] if g["cross_split"])
    assert {f["path"] for f in leak["files"]} == {"train/cyan/img_000.jpg", "val/cyan/copy_of_train.jpg"}
    near = report["near_duplicates"]
    assert near["pairs"] == 2 and near["cross_split_pairs"] == 1
    pairs = [{p["a"]["path"], p["b"]["path"]} for p in near["listed"]]
    assert pairs[0] == {"train/yellow/scene.jpg", "val/yellow/reencoded.jpg"}  # leakage is listed first
    assert pairs[1] == {"train/magenta/img_002.jpg", "train/magenta/really_png.jpg"}  # same pixels, new bytes
    assert report["image_size"]["width"]["min"] == 32 and report["image_size"]["width"]["max"] == 64
    warnings = "\n".join(report["warnings"])
    for expected in ("2 unreadable", "extension does not match", "span splits: validation/test leakage",
                     "carry different labels", "near-duplicate pair(s) span splits"):
        assert expected in warnings
    text = format_report(report)
    assert "train/cyan/broken.jpg" in text and "really_png.jpg: .jpg file holds PNG" in text


def test_clean_data_has_no_warnings(tmp_path):
    report = inspect_data(str(make_colour_folder(tmp_path / "clean", per_class=6)), val_split=0.3)
    assert report["warnings"] == [] and "no problems found" in format_report(report)
    assert report["duplicates"]["groups"] == 0 and report["near_duplicates"]["pairs"] == 0
    assert set(report["counts"]["splits"]) == {"train", "val"}


def test_imbalance_missing_classes_and_odd_images_are_reported(tmp_path):
    root = tmp_path / "d"
    for name, count in (("many", 60), ("few", 5)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _scene(1000 * len(name) + i).save(root / name / f"{i}.jpg")
    # a flat placeholder graphic among photos (the hymenoptera imageNotFound.gif kind)
    Image.new("RGB", (40, 40), (240, 240, 240)).save(root / "many" / "placeholder.gif")
    report = inspect_data(str(root), val_split=0.0, test_split=0.2)
    assert report["counts"]["imbalance_ratio"] == pytest.approx(61 / 5)
    assert report["files"]["rare_format"][0]["path"] == "many/placeholder.gif"
    assert [g["path"] for g in report["files"]["low_colour"]] == ["many/placeholder.gif"]
    warnings = "\n".join(report["warnings"])
    assert "class imbalance" in warnings and "unlike the rest" in warnings


def test_inspect_arrays_and_manifests(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (30, 40, 40, 3), dtype=np.uint8)
    x[29] = x[0]  # an exact duplicate inside the arrays
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(30) % 3)
    report = inspect_data(str(tmp_path / "a.npz"))
    assert report["num_examples"] == 30 and report["duplicates"]["groups"] == 1
    assert report["files"]["formats"] == {"array": 30}


def test_inspect_tfds_files(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setenv("TFTRANSFER_CACHE", str(tmp_path / "cache"))
    with tfds.testing.mock_data(num_examples=10):
        report = inspect_data("tfds:tf_flowers")
    assert report["num_examples"] == sum(v["total"] for v in report["counts"]["splits"].values()) > 0
    assert report["files"]["formats"] and not report["files"]["unreadable"]


def test_manifest_near_duplicates_across_domains(tmp_path):
    from tftransfer.data.manifest import write_manifest

    rows = []
    for domain, size in (("dslr", 64), ("webcam", 40)):  # the same scenes, shot smaller by the other camera
        for i in range(6):
            path = tmp_path / domain / f"{i}.jpg"
            path.parent.mkdir(exist_ok=True)
            _scene(i if i < 2 else 100 * size + i).resize((size, size)).save(path)
            rows.append({"path": f"{domain}/{i}.jpg", "label": "ab"[i % 2], "domain": domain})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    report = inspect_data(str(manifest))
    assert report["domains"] == ["dslr", "webcam"]
    near = report["near_duplicates"]
    assert near["cross_domain_pairs"] == 2 and near["pairs"] == 2
    assert {p["a"]["domain"] for p in near["listed"]} | {p["b"]["domain"] for p in near["listed"]} == {"dslr", "webcam"}
    assert any("span domains" in w for w in report["warnings"])
    assert "2 across domains" in format_report(report)


def test_cli_data_inspect(planted, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["data", "inspect", str(planted), "--json", str(out), "--test-split", "0.1"])
    assert result.exit_code == 0, result.output
    assert "exact duplicates (sha256): 2 groups" in result.output and "warnings:" in result.output
    assert json.loads(out.read_text())["duplicates"]["groups"] == 2
    missing = CliRunner().invoke(main, ["data", "inspect", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "data folder not found" in missing.output
    assert "Traceback" not in missing.output


def test_cli_data_inspect_manifest_outside_its_folder_needs_the_flag(tmp_path):
    from tftransfer.data.manifest import write_manifest

    images = make_colour_folder(tmp_path / "d", per_class=4)
    rows = [{"path": str(p), "label": p.parent.name} for p in sorted(images.rglob("*.jpg"))]
    manifest = write_manifest(tmp_path / "lists" / "m.csv", rows)
    refused = CliRunner().invoke(main, ["data", "inspect", str(manifest)])
    assert refused.exit_code == 1 and "lead outside the manifest's folder" in refused.output
    assert "Traceback" not in refused.output
    out = tmp_path / "r.json"
    allowed = CliRunner().invoke(main, ["data", "inspect", str(manifest), "--allow-outside-paths", "--json", str(out)])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(out.read_text())["num_examples"] == len(rows) > 0


@pytest.mark.slow
def test_inspect_real_data(shared_data, tmp_path):
    hymenoptera = inspect_data(str(shared_data / "datasets" / "hymenoptera"))
    assert hymenoptera["counts"]["splits"]["train"]["total"] == 245
    assert hymenoptera["counts"]["splits"]["val"]["total"] == 153
    assert hymenoptera["duplicates"]["groups"] == 0 and not hymenoptera["files"]["unreadable"]
    assert hymenoptera["image_size"]["width"]["max"] == 2592
    odd = {f["path"] for f in hymenoptera["files"]["rare_format"] + hymenoptera["files"]["low_colour"]}
    assert odd == {"train/ants/imageNotFound.gif"}  # the placeholder in the original zip
    webcam = inspect_data(str(shared_data / "datasets" / "office31" / "webcam" / "images"))
    assert webcam["num_examples"] == 795 and webcam["num_classes"] == 31
    assert webcam["counts"]["imbalance_ratio"] > 3
    # consecutive video frames of one object: near-duplicates that a hash split puts in train and val
    assert webcam["near_duplicates"]["cross_split_pairs"] >= 3
    assert webcam["near_duplicates"]["cross_class_pairs"] == 0
    # one manifest for both domains: dslr and webcam photographed (at least) one bookcase scene alike
    from tftransfer.data.manifest import write_manifest

    office = shared_data / "datasets" / "office31"
    rows = [{"path": str(p), "label": p.parent.name, "domain": domain}
            for domain in ("dslr", "webcam") for p in sorted((office / domain / "images").rglob("*.jpg"))]
    # the rows name files outside the manifest's folder, which must be allowed in so many words
    both = inspect_data(str(write_manifest(tmp_path / "office31.csv", rows)), allow_outside_paths=True)
    assert both["num_examples"] == 1293 and both["domains"] == ["dslr", "webcam"]
    assert both["near_duplicates"]["cross_domain_pairs"] >= 1


# ---------------------------------------------------------------------------------------------------------------
# Progress while files are probed


def _tiny_images(folder, count: int) -> list:
    """`count` distinct 8x8 PNGs (fast to write and to probe)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", (8, 8), (i % 256, 7 * i % 256, 13 * i % 256)).save(path)
        paths.append(path)
    return paths


def test_probe_images_reports_progress_to_the_callback(tmp_path, caplog):
    from tftransfer.data.probe import report_progress

    paths = _tiny_images(tmp_path / "imgs", 12)
    paths.append(tmp_path / "missing.png")  # a bad file still counts as checked
    calls: list[tuple[int, int, str]] = []
    with caplog.at_level("INFO", logger="tftransfer.data.probe"), report_progress(lambda *a: calls.append(a)):
        probes = probe_images(paths, progress_every=3, what="imgs")
    assert len(probes) == 13 and probes[-1].problem is not None
    assert calls[0] == (0, 13, "imgs") and calls[-1] == (13, 13, "imgs")
    done = [c[0] for c in calls]
    assert done == sorted(set(done)), "done must strictly increase"
    assert {c[1:] for c in calls} == {(13, "imgs")}
    assert caplog.records == []  # the callback replaces the log lines, so a bar is not interleaved with them

    # outside the block: no callback, the log lines are back, nothing breaks; no files: no calls at all
    with caplog.at_level("INFO", logger="tftransfer.data.probe"):
        assert len(probe_images(paths, progress_every=5)) == 13
    assert [r.getMessage().split(" files")[0] for r in caplog.records] == ["checked 5/13", "checked 10/13",
                                                                          "checked 13/13"]
    calls.clear()
    with report_progress(lambda *a: calls.append(a)):
        assert probe_images([]) == []
    assert calls == []


def test_probe_progress_is_throttled_on_big_lists(tmp_path):
    from tftransfer.data.probe import PROGRESS_STEPS, report_progress

    path = _tiny_images(tmp_path, 1)[0]
    calls: list[int] = []
    with report_progress(lambda done, total, what: calls.append(done)):
        probe_images([path] * 1005)
    assert calls[0] == 0 and calls[-1] == 1005
    assert len(calls) <= PROGRESS_STEPS + 2  # about once per percent, plus the first and the last


def test_cli_data_inspect_keeps_stdout_clean_without_a_terminal(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b"):
        _tiny_images(root / name, 40)  # 80 files: above the bar's threshold
    runner = CliRunner()
    plain = runner.invoke(main, ["data", "inspect", str(root), "--no-progress"])
    result = runner.invoke(main, ["data", "inspect", str(root)])
    assert result.exit_code == 0 and plain.exit_code == 0, result.output
    assert result.stdout == plain.stdout and "classes" in result.stdout.lower()
    assert "checking" not in result.output and "\r" not in result.output and "#" not in result.output


def test_cli_probe_progress_draws_one_bar_per_pass_on_stderr(tmp_path, monkeypatch):
    import tftransfer.cli as cli

    root = tmp_path / "d"
    for name in ("a", "b"):
        _tiny_images(root / name, 40)
    small = _tiny_images(tmp_path / "small", 5)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with cli._probe_progress(enabled=True, file=screen):
        probe_images(sorted(root.rglob("*.png")), what=str(root))
        probe_images(small, what="small")  # at most PROBE_BAR_MIN_FILES files: no bar
        probe_images(sorted(root.rglob("*.png")), what="again")
    text = screen.getvalue()
    assert cli._probe_label(str(root)) in text and "checking again" in text
    assert "checking small" not in text
    assert "80/80" in text and "100%" in text and "#" * 10 in text
    assert text.count("\x1b[?25h") == 2  # each bar finished (cursor shown again)

    # through the command line, with the TTY check forced: the bar goes to stderr, never stdout
    monkeypatch.setattr(cli, "_stderr_is_tty", lambda: True)
    result = CliRunner().invoke(main, ["data", "inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert "checking" in result.stderr and "checking" not in result.stdout
    off = CliRunner().invoke(main, ["data", "inspect", str(root), "--no-progress"])
    assert "checking" not in off.stderr and off.stdout == result.stdout


def test_cli_probe_progress_finishes_the_bar_on_errors(tmp_path, monkeypatch):
    import tftransfer.cli as cli
    import tftransfer.data.probe as probe

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    paths = _tiny_images(tmp_path, 60)
    real = probe.probe_image

    def probe_or_fail(path, fingerprints=False):
        if path == paths[45]:
            raise RuntimeError("boom")
        return real(path, fingerprints)

    monkeypatch.setattr(probe, "probe_image", probe_or_fail)
    screen = Terminal()
    with pytest.raises(RuntimeError, match="boom"), cli._probe_progress(enabled=True, file=screen):
        probe_images(paths, what="x")
    text = screen.getvalue()
    assert "checking x" in text and "60/60" not in text
    assert text.endswith("\x1b[?25h\n")  # finished: cursor back, the error starts on its own line
