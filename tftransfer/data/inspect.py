"""`tftransfer data inspect`: what is in a data set before training on it.

Resolves the spec exactly as `fit` would (same splits), probes every file once (Pillow decode, sha256, 64-bit
dHash) and reports: classes and counts per split, the imbalance ratio, the image size distribution, unreadable or
truncated files, files whose extension lies about their format, JPEGs with an EXIF rotation, exact duplicates
(same bytes) across classes and across splits, and near-duplicates (dHash within a few bits: re-encoded or
consecutive video frames) across splits, which leak validation images into training just as surely.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.config.experiment import DataConfig
from tftransfer.data.balance import imbalance_ratio
from tftransfer.data.probe import PROGRESS_EVERY, ImageProbe, count_colours, dhash, extension_mismatch, probe_images
from tftransfer.data.sources import DataSource
from tftransfer.data.specs import load_source

logger = logging.getLogger(__name__)

# dHash Hamming distance (of 256 bits) up to which two images are near-duplicate candidates. On Office-31 webcam,
# <= 24 bits are consecutive frames of one object (one pair of two similar pens in the same pose); cross-class
# look-alikes start above 35.
NEAR_DUPLICATE_BITS = 24
MAX_PAIRWISE = 20000  # above this many images only identical dHashes are compared (pairwise is O(n^2))
SMALL_IMAGE = 32  # images with a side below this many pixels are listed (placeholders, icons, thumbnails)
LOW_COLOURS = 64  # an image with at most this many colours in a 64x64 sample is a graphic, not a photo
RARE_SHARE = 0.02  # a format or a graphic-among-photos is an outlier when at most this share of images has it
MAX_LISTED = 50  # entries listed per finding in the report (counts are always complete)


@dataclass(frozen=True)
class _Example:
    key: str
    label: int
    split: str
    sha256: str
    dhash: bytes | None
    width: int
    height: int
    format: str
    colours: int | None
    domain: str = ""


def _array_probe(image: np.ndarray) -> ImageProbe:
    from PIL import Image

    data = np.ascontiguousarray(image)
    pil = Image.fromarray(data)
    return ImageProbe(problem=None, format="array", width=int(data.shape[1]), height=int(data.shape[0]),
                      mode="RGB", num_bytes=data.nbytes, sha256=hashlib.sha256(data.tobytes()).hexdigest(),
                      dhash=dhash(pil), colours=count_colours(pil))


def _examples(source: DataSource, probes: dict[str, ImageProbe]) -> list[_Example]:
    """Every listed example with its probe; in-memory images and unprobed files (TFDS) are fingerprinted here."""
    unprobed = [(key, path) for split in source.splits().values() if split.paths is not None
                for key, path in zip(split.keys, split.paths) if key not in probes]
    if unprobed:
        probes.update(zip([k for k, _ in unprobed], probe_images([p for _, p in unprobed], fingerprints=True)))
    out = []
    for split_name, split in source.splits().items():
        for i, (key, label) in enumerate(zip(split.keys, split.labels)):
            probe = probes.get(key)
            if probe is None and split.images is not None:
                probe = probes[key] = _array_probe(split.images[i])
            if probe is None:
                continue
            out.append(_Example(key, int(label), split_name, probe.sha256 or "", probe.dhash, probe.width,
                                probe.height, probe.format or "?", probe.colours,
                                split.domains[i] if split.domains is not None else ""))
            if len(out) % PROGRESS_EVERY == 0 and split.images is not None:
                logger.info("fingerprinted %d arrays", len(out))
    return out


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max()), "mean": float(arr.mean())}


def _counts(source: DataSource) -> dict[str, Any]:
    names = source.class_names
    splits = {}
    for split_name, split in source.splits().items():
        counts = split.class_counts(len(names))
        splits[split_name] = {"total": int(len(split)), "per_class": {n: int(c) for n, c in zip(names, counts)}}
    total = sum((source.splits()[s].class_counts(len(names)) for s in splits), np.zeros(len(names), np.int64))
    train_counts = source.train.class_counts(len(names))
    return {"splits": splits, "per_class": {n: int(c) for n, c in zip(names, total)},
            "imbalance_ratio": imbalance_ratio(total), "train_imbalance_ratio": imbalance_ratio(train_counts),
            "missing_classes": {s: [n for n, c in v["per_class"].items() if c == 0] for s, v in splits.items()
                                if any(c == 0 for c in v["per_class"].values())}}


def _describe(ex: _Example, names: list[str]) -> dict[str, str]:
    described = {"path": ex.key, "class": names[ex.label], "split": ex.split}
    if ex.domain:
        described["domain"] = ex.domain
    return described


def _exact_duplicates(examples: list[_Example], names: list[str]) -> dict[str, Any]:
    groups: dict[str, list[_Example]] = defaultdict(list)
    for ex in examples:
        if ex.sha256:
            groups[ex.sha256].append(ex)
    found = []
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        found.append({"sha256": digest, "files": [_describe(m, names) for m in members],
                      "cross_class": len({m.label for m in members}) > 1,
                      "cross_split": len({m.split for m in members}) > 1})
    found.sort(key=lambda g: (not g["cross_split"], not g["cross_class"], g["files"][0]["path"]))
    return {"groups": len(found), "files": sum(len(g["files"]) for g in found),
            "cross_class_groups": sum(g["cross_class"] for g in found),
            "cross_split_groups": sum(g["cross_split"] for g in found), "listed": found[:MAX_LISTED]}


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def _near_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j with Hamming distance <= max_bits; hashes are [N, words] uint64."""
    pairs = []
    chunk = 128  # rows per block: bounds memory at chunk * N * words * 8 bytes
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk, None, :] ^ hashes[None, :, :]
        dist = _popcount(block).sum(axis=-1)
        rows, cols = np.nonzero(dist <= max_bits)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if int(c) > i:
                pairs.append((i, int(c), int(dist[r, c])))
    return pairs


def _near_duplicates(examples: list[_Example], names: list[str], max_bits: int) -> dict[str, Any]:
    # a 16x16 gradient grid says nothing about images smaller than the grid's double (8x8 digits all look alike),
    # and flat images have no dHash (their gradients are compression noise)
    small = [ex for ex in examples if min(ex.width, ex.height) < SMALL_IMAGE]
    usable = [ex for ex in examples if ex.dhash is not None and min(ex.width, ex.height) >= SMALL_IMAGE]
    method = f"256-bit dHash, Hamming distance <= {max_bits}"
    if small:
        method += f", {len(small)} images under {SMALL_IMAGE} px not compared"
    if len(examples) - len(small) - len(usable):
        method += f", {len(examples) - len(small) - len(usable)} flat images not compared"
    if len(usable) > MAX_PAIRWISE:
        max_bits, method = 0, f"256-bit dHash, identical hashes only (more than {MAX_PAIRWISE} images)"
    if max_bits == 0:
        by_hash: dict[bytes, list[int]] = defaultdict(list)
        for i, ex in enumerate(usable):
            by_hash[ex.dhash].append(i)
        pairs = [(g[a], g[b], 0) for g in by_hash.values() for a in range(len(g)) for b in range(a + 1, len(g))]
    elif usable:
        hashes = np.frombuffer(b"".join(ex.dhash for ex in usable), dtype=np.uint64).reshape(len(usable), -1)
        pairs = _near_pairs(hashes, max_bits)
    else:
        pairs = []
    # identical bytes are already reported as exact duplicates
    pairs = [p for p in pairs if usable[p[0]].sha256 != usable[p[1]].sha256 or not usable[p[0]].sha256]
    listed = []
    for i, j, dist in pairs:
        a, b = usable[i], usable[j]
        listed.append({"a": _describe(a, names), "b": _describe(b, names), "distance": dist,
                       "cross_class": a.label != b.label, "cross_split": a.split != b.split,
                       "cross_domain": a.domain != b.domain})
    listed.sort(key=lambda p: (not p["cross_split"], not p["cross_class"], p["distance"], p["a"]["path"]))
    involved = {usable[i].key for i, j, _ in pairs} | {usable[j].key for i, j, _ in pairs}
    return {"method": method, "pairs": len(listed), "images": len(involved),
            "cross_class_pairs": sum(p["cross_class"] for p in listed),
            "cross_split_pairs": sum(p["cross_split"] for p in listed),
            "cross_domain_pairs": sum(p["cross_domain"] for p in listed), "listed": listed[:MAX_LISTED]}


def _file_findings(source: DataSource, probes: dict[str, ImageProbe], examples: list[_Example]) -> dict[str, Any]:
    listed = {ex.key for ex in examples}
    formats = Counter(p.format or "?" for k, p in probes.items() if k in listed)
    modes = Counter(p.mode or "?" for k, p in probes.items() if k in listed)
    mismatches = [{"path": k, "extension": Path(k).suffix.lower(), "format": fmt} for k, p in sorted(probes.items())
                  if p.problem is None and (fmt := extension_mismatch(k, p))]
    rotated = sorted(k for k, p in probes.items() if k in listed and p.orientation not in (0, 1))
    small = sorted((ex for ex in examples if min(ex.width, ex.height) < SMALL_IMAGE), key=lambda e: e.key)
    by_format = Counter(ex.format for ex in examples)
    rare = sorted((ex for ex in examples if by_format[ex.format] <= RARE_SHARE * len(examples)), key=lambda e: e.key)
    graphics = [ex for ex in examples if ex.colours is not None and ex.colours <= LOW_COLOURS]
    if len(graphics) > RARE_SHARE * len(examples):
        graphics = []  # many graphics mean a graphic data set (digits, icons), not odd files among photos
    return {
        "formats": dict(formats.most_common()), "modes": dict(modes.most_common()),
        "unreadable": [{"path": p, "reason": why} for p, why in source.skipped],
        "extension_mismatches": mismatches,
        "exif_rotated": {"count": len(rotated), "listed": rotated[:MAX_LISTED]},
        "small_images": {"count": len(small), "min_side": SMALL_IMAGE,
                         "outliers": 0 < len(small) <= RARE_SHARE * len(examples),
                         "listed": [{"path": e.key, "width": e.width, "height": e.height} for e in small][:MAX_LISTED]},
        "rare_format": [{"path": e.key, "format": e.format, "class": source.class_names[e.label]}
                        for e in rare][:MAX_LISTED],
        "low_colour": [{"path": e.key, "colours": e.colours, "class": source.class_names[e.label]}
                       for e in sorted(graphics, key=lambda e: e.key)][:MAX_LISTED],
    }


def _warnings(report: dict[str, Any]) -> list[str]:
    """One line per finding worth acting on."""
    out = []
    files = report["files"]
    if files["unreadable"]:
        out.append(f"{len(files['unreadable'])} unreadable file(s): fit skips them (data.strict=true refuses them)")
    if files["extension_mismatches"]:
        out.append(f"{len(files['extension_mismatches'])} file(s) whose extension does not match the format "
                   "(they still decode; rename them)")
    dup = report["duplicates"]
    if dup["cross_split_groups"]:
        out.append(f"{dup['cross_split_groups']} exact duplicate group(s) span splits: validation/test leakage")
    if dup["cross_class_groups"]:
        out.append(f"{dup['cross_class_groups']} exact duplicate group(s) carry different labels")
    if dup["groups"] - dup["cross_split_groups"] - dup["cross_class_groups"] > 0:
        out.append(f"{dup['groups']} exact duplicate group(s) in all ({dup['files']} files)")
    near = report["near_duplicates"]
    if near["cross_split_pairs"]:
        out.append(f"{near['cross_split_pairs']} near-duplicate pair(s) span splits: likely leakage "
                   f"({near['pairs']} near-duplicate pairs in all)")
    elif near["pairs"]:
        out.append(f"{near['pairs']} near-duplicate pair(s), none across splits")
    if near["cross_domain_pairs"]:
        out.append(f"{near['cross_domain_pairs']} near-duplicate pair(s) span domains: the same scene in source and "
                   "target makes adaptation look easier than it is")
    ratio = report["counts"]["imbalance_ratio"]
    if ratio is not None and ratio >= 3:
        out.append(f"class imbalance: the largest class has {ratio:.1f}x the images of the smallest "
                   "(consider data.class_weight=auto or data.balanced_sampling=true)")
    for split, missing in report["counts"]["missing_classes"].items():
        out.append(f"split {split} has no images of {len(missing)} class(es): {', '.join(missing[:10])}")
    odd = sorted({f["path"] for f in files["rare_format"] + files["low_colour"]})
    if odd:
        out.append(f"{len(odd)} image(s) unlike the rest (a rare format, or a flat graphic among photos): "
                   f"{', '.join(odd[:5])}: placeholders or mislabelled files? look at them")
    if files["small_images"]["outliers"]:
        out.append(f"{files['small_images']['count']} image(s) smaller than {SMALL_IMAGE} px on a side "
                   "(placeholders or icons?)")
    return out


def inspect_source(source: DataSource, probes: dict[str, ImageProbe] | None = None,
                   near_duplicate_bits: int = NEAR_DUPLICATE_BITS) -> dict[str, Any]:
    """The inspection report of a resolved source; `probes` are the fingerprinted probes load_source filled."""
    probes = dict(probes or {})
    examples = _examples(source, probes)
    names = source.class_names
    report: dict[str, Any] = {
        "source": source.root, "name": source.name, "split_method": source.split_method,
        "num_classes": len(names), "class_names": names, "num_examples": len(examples),
        "ignored_files": source.ignored, "domains": source.domain_names,
        "counts": _counts(source),
        "image_size": {"width": _stats([e.width for e in examples]), "height": _stats([e.height for e in examples])},
        "files": _file_findings(source, probes, examples),
        "duplicates": _exact_duplicates(examples, names),
        "near_duplicates": _near_duplicates(examples, names, near_duplicate_bits),
    }
    report["warnings"] = _warnings(report)
    return report


def inspect_data(spec: str, *, val_split: float | None = None, test_split: float | None = None,
                 stratify: bool | None = None, tfds_data_dir: str = "",
                 near_duplicate_bits: int | None = None, json_path: str | Path | None = None,
                 allow_outside_paths: bool = False) -> dict[str, Any]:
    """Inspects a `--data` spec (split as `fit` would with these settings; defaults from DataConfig).

    `allow_outside_paths` is data.allow_outside_paths: a manifest's rows may name files outside its folder.

    Writes the report as JSON to `json_path` when given, and returns it.
    """

    defaults = DataConfig()
    probes: dict[str, ImageProbe] = {}
    source = load_source(spec, defaults.val_split if val_split is None else val_split, False, tfds_data_dir,
                         test_split=defaults.test_split if test_split is None else test_split,
                         stratify=defaults.stratify if stratify is None else stratify, probes=probes,
                         allow_outside_paths=allow_outside_paths)
    report = inspect_source(source, probes,
                            NEAR_DUPLICATE_BITS if near_duplicate_bits is None else near_duplicate_bits)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_counts(report: dict[str, Any], w: Callable[..., Any]) -> None:
    """format_report's header, per-class and per-split table, imbalance and image sizes."""
    counts = report["counts"]
    w(f"data: {report['source']}  ({report['split_method']})")
    domains = f", domains: {', '.join(report['domains'])}" if report["domains"] else ""
    w(f"{report['num_examples']} images, {report['num_classes']} classes, {report['ignored_files']} other files "
      f"ignored{domains}")
    splits = list(counts["splits"])
    width = max([len(n) for n in report["class_names"]] + [5])
    w("")
    w(f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in splits) + f" {'total':>7}")
    for name in report["class_names"]:
        row = " ".join(f"{counts['splits'][s]['per_class'][name]:>7}" for s in splits)
        w(f"{name:<{width}} {row} {counts['per_class'][name]:>7}")
    w(f"{'all':<{width}} " + " ".join(f"{counts['splits'][s]['total']:>7}" for s in splits)
      + f" {report['num_examples']:>7}")
    ratio = counts["imbalance_ratio"]
    w(f"imbalance ratio (largest / smallest class): {ratio:.2f}" if ratio else "imbalance ratio: n/a")
    size = report["image_size"]
    if size["width"]:
        w("image size  width {min}/{median:g}/{max}  height ".format(**size["width"])
          + "{min}/{median:g}/{max}  (min/median/max px)".format(**size["height"]))


def _write_files(files: dict[str, Any], w: Callable[..., Any]) -> None:
    """format_report's file checks: formats, EXIF, unreadable, mismatched, small, rare and flat images."""
    w("formats: " + ", ".join(f"{k} {v}" for k, v in files["formats"].items())
      + "   modes: " + ", ".join(f"{k} {v}" for k, v in files["modes"].items()))
    w(f"EXIF-rotated JPEGs (decoded upright): {files['exif_rotated']['count']}")
    w("")
    w(f"unreadable files: {len(files['unreadable'])}")
    for item in files["unreadable"][:MAX_LISTED]:
        w(f"  {item['path']}: {item['reason']}")
    w(f"extension does not match format: {len(files['extension_mismatches'])}")
    for item in files["extension_mismatches"][:MAX_LISTED]:
        w(f"  {item['path']}: {item['extension']} file holds {item['format']}")
    small = files["small_images"]
    w(f"images under {small['min_side']} px: {small['count']}" + ("" if small["outliers"] or not small["count"]
                                                                  else " (most of the data: not listed)"))
    for item in small["listed"] if small["outliers"] else []:
        w(f"  {item['path']}: {item['width']}x{item['height']}")
    for item in files["rare_format"]:
        w(f"  rare format: {item['path']} ({item['format']})")
    for item in files["low_colour"]:
        w(f"  flat graphic among photos: {item['path']} ({item['colours']} colours in a 64x64 sample)")


def format_report(report: dict[str, Any]) -> str:
    """The report as text for people (the JSON has everything, including the full lists)."""
    out = io.StringIO()
    w = lambda line="": out.write(line + "\n")  # noqa: E731
    _write_counts(report, w)
    _write_files(report["files"], w)
    dup = report["duplicates"]
    w(f"exact duplicates (sha256): {dup['groups']} groups, {dup['files']} files, {dup['cross_class_groups']} across "
      f"classes, {dup['cross_split_groups']} across splits")
    for group in dup["listed"][:10]:
        w("  " + "  ==  ".join(f"{f['path']} [{f['split']}]" for f in group["files"]))
    near = report["near_duplicates"]
    w(f"near-duplicates ({near['method']}): {near['pairs']} pairs over {near['images']} images, "
      f"{near['cross_class_pairs']} across classes, {near['cross_split_pairs']} across splits"
      + (f", {near['cross_domain_pairs']} across domains" if report["domains"] else ""))
    for pair in near["listed"][:10]:
        w(f"  {pair['a']['path']} [{pair['a']['split']}] ~ {pair['b']['path']} [{pair['b']['split']}] "
          f"(distance {pair['distance']})")
    w("")
    if report["warnings"]:
        w("warnings:")
        for line in report["warnings"]:
            w(f"  - {line}")
    else:
        w("no problems found")
    return out.getvalue()
