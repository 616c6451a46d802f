"""Data sources: resolve a `--data` spec into labelled examples split into train and validation.

A source yields either file paths (decoded in the tf.data pipeline) or in-memory uint8 arrays. Splits are
assigned by a hash of each example's stable key (its path relative to the data root), so adding images never
moves an existing image between train and validation, and a run can be reproduced from the saved split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tftransfer.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp"})
# Formats tf.io.decode_image reads; anything else would fail inside the pipeline mid-epoch.
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "MPO"})
VAL_DIR_NAMES = ("val", "validation", "valid")


@dataclass
class Split:
    """One split's examples: `paths` (files) or `images` (uint8 [N, H, W, 3]), with int labels and stable keys."""

    labels: np.ndarray
    keys: list[str]
    paths: list[str] | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataSource:
    """A resolved data set: class names, train and validation splits, and what was skipped on the way."""

    name: str
    class_names: list[str]
    train: Split
    val: Split | None
    root: str
    split_method: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def split_record(self) -> dict:
        """What is needed to reproduce the split: the method and every example key per split."""
        record = {"source": self.root, "method": self.split_method, "class_names": self.class_names,
                  "train": sorted(self.train.keys)}
        record["val"] = sorted(self.val.keys) if self.val is not None else []
        digest = hashlib.sha256("\n".join(record["train"] + ["--"] + record["val"]).encode()).hexdigest()
        record["fingerprint"] = digest
        return record


def hash_fraction(key: str) -> float:
    """Maps a key to a stable number in [0, 1) (the retrain.py idea: the split survives dataset growth)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_image_file(path: Path) -> str | None:
    """Returns None when the file is an image TensorFlow can decode, else the reason it is not.

    The pixel data is decoded too (JPEGs at 1/8 scale via draft mode, which still reads the whole entropy-coded
    stream), so truncated files are caught here rather than as a TensorFlow op error in the middle of an epoch.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            fmt = im.format
            if fmt not in DECODABLE_FORMATS:
                return f"format {fmt} cannot be decoded by TensorFlow"
            if fmt == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image: {exc}"
    return None


def check_image_files(paths: Sequence[Path]) -> list[str | None]:
    """_check_image_file over many files in threads (Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        return list(pool.map(_check_image_file, paths))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_class_files(class_dir: Path) -> tuple[list[Path], int]:
    """Image files under a class folder (recursively), and how many other files were ignored."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
            else:
                ignored += 1
    return files, ignored


def _scan_split(root: Path, split_dir: Path, class_names: list[str], strict: bool,
                skipped: list[tuple[str, str]]) -> tuple[list[str], list[int], list[str]]:
    paths, labels, keys = [], [], []
    for index, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        files, ignored = _list_class_files(class_dir)
        if ignored:
            logger.info("%s: ignored %d non-image files", class_dir, ignored)
        good = 0
        for path, reason in zip(files, check_image_files(files)):
            rel = path.relative_to(root).as_posix()
            if reason is not None:
                skipped.append((rel, reason))
                continue
            paths.append(str(path))
            labels.append(index)
            keys.append(rel)
            good += 1
        if good == 0:
            raise DataError(f"class folder {class_dir} has no readable images (.jpg, .jpeg, .png, .gif, .bmp)")
    if skipped and strict:
        listing = "\n".join(f"  {p}: {why}" for p, why in skipped)
        raise DataError(f"{len(skipped)} bad files in {root} (data.strict is on):\n{listing}")
    return paths, labels, keys


def _split(labels: list[int], keys: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) from the key hashes."""
    is_val = np.array([hash_fraction(k) < val_fraction for k in keys], dtype=bool)
    return ~is_val, is_val


def _take(split_paths: list[str] | None, images: np.ndarray | None, labels: np.ndarray, keys: list[str],
          mask: np.ndarray) -> Split:
    idx = np.flatnonzero(mask)
    return Split(
        labels=labels[idx],
        keys=[keys[i] for i in idx],
        paths=[split_paths[i] for i in idx] if split_paths is not None else None,
        images=images[idx] if images is not None else None,
    )


def load_image_folder(root: str | Path, val_split: float = 0.2, strict: bool = False) -> DataSource:
    """Lists `root/<class>/...` or `root/train/<class>/...` + `root/val/<class>/...` image folders."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    has_splits = train_dir.is_dir() and val_dir is not None
    class_root = train_dir if has_splits else root
    class_names = [p.name for p in _class_dirs(class_root)]
    if len(class_names) < 2:
        found = f"found {len(class_names)}: {class_names}" if class_names else "found none"
        raise DataError(f"{class_root} needs at least 2 class subfolders (one per class), {found}")
    skipped: list[tuple[str, str]] = []
    paths, labels, keys = _scan_split(root, class_root, class_names, strict, skipped)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if has_splits:
        assert val_dir is not None
        extra = sorted({p.name for p in _class_dirs(val_dir)} - set(class_names))
        if extra:
            raise DataError(f"{val_dir} has class folders missing from {train_dir}: {extra}")
        vpaths, vlabels, vkeys = _scan_split_lenient(root, val_dir, class_names, strict, skipped)
        train = Split(labels=labels_arr, keys=keys, paths=paths)
        val = Split(labels=np.asarray(vlabels, dtype=np.int64), keys=vkeys, paths=vpaths)
        method = f"folders: {train_dir.name}/ and {val_dir.name}/"
    else:
        tmask, vmask = _split(labels, keys, val_split)
        train = _take(paths, None, labels_arr, keys, tmask)
        val = _take(paths, None, labels_arr, keys, vmask) if val_split > 0 else None
        method = f"hash of relative path, val_split={val_split}"
    for path, why in skipped:
        logger.warning("skipping %s: %s", path, why)
    _check_nonempty(root, class_names, train, val)
    return DataSource(name=root.name or str(root), class_names=class_names, train=train, val=val,
                      root=str(root), split_method=method, skipped=skipped)


def _scan_split_lenient(root: Path, split_dir: Path, class_names: list[str], strict: bool,
                        skipped: list[tuple[str, str]]) -> tuple[list[str], list[int], list[str]]:
    """Like _scan_split, but a validation split may lack some classes (it is only measured, not learned)."""
    present = [n if (split_dir / n).is_dir() else None for n in class_names]
    paths, labels, keys = [], [], []
    for index, name in enumerate(present):
        if name is None:
            continue
        p, _, k = _scan_split(root, split_dir, [name], strict, skipped)
        paths += p
        keys += k
        labels += [index] * len(p)
    return paths, labels, keys


def _check_nonempty(root: Path | str, class_names: list[str], train: Split, val: Split | None) -> None:
    if len(train) == 0:
        raise DataError(f"{root}: no training images")
    missing = [class_names[i] for i in range(len(class_names)) if not np.any(train.labels == i)]
    if missing:
        raise DataError(f"{root}: no training images left for classes {missing} after the validation split; "
                        "add images or lower data.val_split")
    if val is not None and len(val) == 0:
        logger.warning("%s: the validation split is empty; add images or raise data.val_split", root)


def load_arrays(images: np.ndarray, labels: np.ndarray, class_names: list[str], name: str,
                val_split: float = 0.2) -> DataSource:
    """Wraps in-memory uint8 images [N, H, W, C] (C in 1, 3, 4) and int labels as a source."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(f"{name}: images must be [N, H, W] or [N, H, W, 1|3|4], got shape {images.shape}")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(class_names):
        raise DataError(f"{name}: labels must be in [0, {len(class_names)})")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images[..., :3]
    if images.dtype != np.uint8:
        images = np.clip(images, 0, 255).astype(np.uint8)
    keys = [f"{name}/{i}" for i in range(len(images))]
    tmask, vmask = _split(list(labels), keys, val_split)
    train = _take(None, images, labels, keys, tmask)
    val = _take(None, images, labels, keys, vmask) if val_split > 0 else None
    _check_nonempty(name, class_names, train, val)
    return DataSource(name=name, class_names=list(class_names), train=train, val=val, root=name,
                      split_method=f"hash of example index, val_split={val_split}")


def _builtin_digits(val_split: float) -> DataSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): needs no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch to the 0..255 range every backbone's preprocessing assumes.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return load_arrays(images, digits.target, [str(i) for i in range(10)], "builtin:digits", val_split)


BUILTIN_SOURCES: dict[str, Callable[[float], DataSource]] = {"digits": _builtin_digits}


def _tfds_split_arrays(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True)
    images, labels = [], []
    for image, label in tfds.as_numpy(ds):
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_tfds(name: str, data_dir: str = "", val_split: float = 0.2) -> DataSource:
    """A TFDS image-classification data set already on disk (this loader never downloads).

    Its own validation split (else its test split) becomes validation; without either, a hash split is drawn.
    Examples are held in memory, which suits the small benchmarks (CIFAR-10 is 180 MB).
    """
    import tensorflow_datasets as tfds

    where = data_dir or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise DataError(f"tfds:{name}: no such TFDS data set ({str(exc).splitlines()[0]})") from None
    label = builder.info.features["label"] if "label" in builder.info.features else None
    class_names = list(label.names) if label is not None else []
    available = list(builder.info.splits.keys()) or ["train", "test"]
    val_name = next((s for s in ("validation", "test") if s in available), None)
    try:
        x, y = _tfds_split_arrays(name, "train", data_dir or None)
        val = _tfds_split_arrays(name, val_name, data_dir or None) if val_name else None
    except AssertionError as exc:  # TFDS signals "not downloaded" with a bare AssertionError
        raise DataError(f"tfds:{name} is not on disk in {where}, and tftransfer does not download. On a machine "
                        f"with internet run `tfds build {name}` (or tfds.load('{name}')), then copy the data "
                        f"folder here and set data.tfds_data_dir ({exc})") from None
    if not class_names:
        class_names = [str(i) for i in range(int(y.max()) + 1)]
    if val is None:
        return load_arrays(x, y, class_names, f"tfds:{name}", val_split)
    train_src = load_arrays(x, y, class_names, f"tfds:{name}/train", 0.0)
    val_src = load_arrays(val[0], val[1], class_names, f"tfds:{name}/{val_name}", 0.0)
    return DataSource(name=name, class_names=class_names, train=train_src.train, val=val_src.train,
                      root=f"tfds:{name}", split_method=f"TFDS splits: train / {val_name}")


def load_source(spec: str, val_split: float = 0.2, strict: bool = False, tfds_data_dir: str = "") -> DataSource:
    """Resolves a `--data` spec: an image folder path, `tfds:<name>` or `builtin:<name>`."""
    if not spec:
        raise DataError("no data given: pass --data PATH (an image folder) or set data.path in the config")
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTIN_SOURCES:
            raise DataError(f"unknown built-in data set {spec!r}; available: "
                            + ", ".join(f"builtin:{k}" for k in BUILTIN_SOURCES))
        return BUILTIN_SOURCES[key](val_split)
    if spec.startswith("tfds:"):
        return load_tfds(spec.split(":", 1)[1], tfds_data_dir, val_split)
    return load_image_folder(spec, val_split=val_split, strict=strict)
