"""Data sources: resolve a `--data` spec into labelled examples split into train, validation and test.

A spec is an image folder, a CSV/JSONL manifest (`data.csv`, `data.csv#domain=webcam`), a `.npz` file,
`tfds:<name>` or `builtin:<name>`. A source yields either file paths (decoded in the tf.data pipeline) or in-memory
uint8 arrays. Splits come from the data when it has them (train/val/test folders, a manifest's split column, TFDS
splits); the others are assigned by a hash of each example's stable key (its path relative to the data root), so
adding images never moves an existing image between splits, and a run can be reproduced from the saved split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tftransfer.core.cache import default_cache_dir
from tftransfer.core.errors import ConfigError, DataError
from tftransfer.core.names import class_name_problem
from tftransfer.data.probe import DECODABLE_FORMATS, IMAGE_EXTENSIONS, ImageProbe, probe_images

logger = logging.getLogger(__name__)

__all__ = ["DECODABLE_FORMATS", "IMAGE_EXTENSIONS", "DataSource", "Split", "SourceOptions", "assign_splits",
           "hash_fraction", "load_arrays", "load_image_folder", "load_npz", "load_tfds", "shard_split"]

VAL_DIR_NAMES = ("val", "validation", "valid")
SPLIT_NAMES = ("train", "val", "test")
TRAIN, VAL, TEST, UNASSIGNED = 0, 1, 2, -1
HEADER_COLUMNS = ("width", "height", "orientation", "jpeg")  # Split.headers
# Names a split may have in folders and manifest columns.
SPLIT_ALIASES = {"train": TRAIN, "training": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "dev": VAL,
                 "test": TEST, "testing": TEST}


@dataclass
class Split:
    """One split's examples: `paths` (files) or `images` (uint8 [N, H, W, 3]), with int labels and stable keys.

    `domains` names each example's domain when the source has them (a manifest's domain column), else None.
    `headers` holds what the listing's probe read from each file's header, int32 [N, 4]: stored width, height,
    EXIF orientation and 1 for a JPEG (see HEADER_COLUMNS); the pipeline then needs not parse them again per
    decode. None when unknown (the decoder reads them from the bytes, as the serving graph does).
    """

    labels: np.ndarray
    keys: list[str]
    paths: list[str] | None = None
    images: np.ndarray | None = None
    domains: list[str] | None = None
    headers: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        """The examples at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(labels=np.asarray(self.labels)[idx], keys=[self.keys[i] for i in idx],
                     paths=[self.paths[i] for i in idx] if self.paths is not None else None,
                     images=self.images[idx] if self.images is not None else None,
                     domains=[self.domains[i] for i in idx] if self.domains is not None else None,
                     headers=self.headers[idx] if self.headers is not None else None)

    def select_domains(self, domains: Sequence[str]) -> Split:
        """The examples whose domain is one of `domains` (e.g. the target rows of a domain-adaptation manifest)."""
        if self.domains is None:
            raise DataError("this data has no domains: add a `domain` column to the manifest")
        wanted = set(domains)
        return self.subset([i for i, d in enumerate(self.domains) if d in wanted])

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Examples per class id, [num_classes] int64."""
        return np.bincount(np.asarray(self.labels, np.int64), minlength=num_classes)[:num_classes]


@dataclass
class DataSource:
    """A resolved data set: class names, train/validation/test splits, and what was skipped on the way.

    `skipped` lists (key, reason) for files that are not usable images; `ignored` counts files that were never
    candidates (hidden files, other extensions).
    """

    name: str
    class_names: list[str]
    train: Split
    val: Split | None
    root: str
    split_method: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    test: Split | None = None
    ignored: int = 0

    def splits(self) -> dict[str, Split]:
        """The splits that exist, by name (train first)."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: split for name, split in named.items() if split is not None}

    @property
    def domain_names(self) -> list[str]:
        """Sorted domain names over all splits; empty when the source has no domains."""
        found: set[str] = set()
        for split in self.splits().values():
            found.update(split.domains or [])
        return sorted(found)

    def select_domains(self, domains: Sequence[str]) -> DataSource:
        """This source restricted to `domains` in every split; class names (and so label ids) stay the same."""
        picked = {name: split.select_domains(domains) for name, split in self.splits().items()}
        return replace(self, train=picked["train"], val=picked.get("val"), test=picked.get("test"),
                       name=f"{self.name}#domain={','.join(domains)}")

    def split_record(self) -> dict:
        """What is needed to reproduce the split: the method and every example key per split."""
        record = {"source": self.root, "method": self.split_method, "class_names": self.class_names,
                  "train": sorted(self.train.keys)}
        record["val"] = sorted(self.val.keys) if self.val is not None else []
        record["test"] = sorted(self.test.keys) if self.test is not None else []
        parts = record["train"] + ["--"] + record["val"]
        if record["test"]:  # without a test split the fingerprint is the one earlier versions wrote
            parts += ["--"] + record["test"]
        record["fingerprint"] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return record


@dataclass(frozen=True)
class SourceOptions:
    """How a spec is resolved: split fractions, stratification, bad-file policy, and an optional probe sink.

    When `probes` is a dict, every listed file's ImageProbe (with sha256 and dHash) is stored in it by key; this is
    how `tftransfer data inspect` sees each file without decoding it twice.
    """

    val_split: float = 0.2
    test_split: float = 0.0
    stratify: bool = False
    strict: bool = False
    tfds_data_dir: str = ""
    probes: dict[str, ImageProbe] | None = None
    allow_outside_paths: bool = False  # manifests: rows may name files outside the manifest's folder

    def __post_init__(self) -> None:
        for key, value in (("val_split", self.val_split), ("test_split", self.test_split)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{key}: must be in [0, 1), got {value}")
        if self.val_split + self.test_split >= 1.0:
            raise ConfigError(f"data.val_split + data.test_split must be below 1 (nothing would be left to train "
                              f"on), got {self.val_split} + {self.test_split}")


# ---------------------------------------------------------------------------------------------------------------
# Split assignment


def hash_fraction(key: str) -> float:
    """Maps a key to a stable number in [0, 1) (the retrain.py idea: the split survives dataset growth)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(labels: Sequence[int] | np.ndarray, keys: Sequence[str], val_fraction: float,
                  test_fraction: float = 0.0, stratify: bool = False) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test) from the key hashes.

    Plain: hash < val -> val, val <= hash < val + test -> test. Adding files never moves an existing one, and
    adding a test split only takes files from train. Stratified: within each class, the files with the lowest
    hashes go to val (round(n * val) of them), the next ones to test, keeping at least one for training; every
    class then has its exact share, and growth can only move files near a class's boundary.
    """
    fractions = np.array([hash_fraction(k) for k in keys], dtype=np.float64)
    codes = np.full(len(fractions), TRAIN, dtype=np.int8)
    if not stratify:
        codes[fractions < val_fraction] = VAL
        codes[(fractions >= val_fraction) & (fractions < val_fraction + test_fraction)] = TEST
        return codes
    labels = np.asarray(labels)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(fractions[members], kind="stable")]
        n = len(members)
        n_val = int(np.floor(n * val_fraction + 0.5))
        n_test = int(np.floor(n * test_fraction + 0.5))
        n_test = min(n_test, max(n - 1 - n_val, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
        codes[members[:n_val]] = VAL
        codes[members[n_val:n_val + n_test]] = TEST
    return codes


def shard_split(split: Split, num_workers: int, index: int) -> Split:
    """Every num_workers-th example starting at `index`: one worker's share, chosen before any decoding."""
    if num_workers < 1 or not 0 <= index < num_workers:
        raise ValueError(f"shard index {index} is not in [0, {num_workers})")
    return split.subset(np.arange(index, len(split), num_workers))


def build_source(name: str, root: str, class_names: list[str], labels: np.ndarray, keys: list[str],
                  fixed: np.ndarray, opts: SourceOptions, *, paths: list[str] | None = None,
                  images: np.ndarray | None = None, domains: list[str] | None = None,
                  headers: np.ndarray | None = None,
                  skipped: list[tuple[str, str]] | None = None, ignored: int = 0,
                  given: str = "") -> DataSource:
    """Splits the examples and checks the result: `fixed` holds split codes the data gives (or UNASSIGNED).

    A split the data names for any example is never also drawn by hash from the unassigned ones.
    """
    check_class_names(root, class_names)
    labels = np.asarray(labels, dtype=np.int64)
    codes = np.asarray(fixed, dtype=np.int8).copy()
    present = set(np.unique(codes[codes != UNASSIGNED]).tolist())
    val_fraction = 0.0 if VAL in present else opts.val_split
    test_fraction = 0.0 if TEST in present else opts.test_split
    free = np.flatnonzero(codes == UNASSIGNED)
    if len(free):
        codes[free] = assign_splits(labels[free], [keys[i] for i in free], val_fraction, test_fraction,
                                    opts.stratify)
    drawn = [f"{n}_split={f}" for n, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
    by_path = paths is not None and not root.startswith("tfds:")
    how = ("stratified " if opts.stratify else "") + f"hash of {'relative path' if by_path else 'example key'}"
    method = "; ".join(m for m in (given, f"{how}, {', '.join(drawn)}" if drawn and len(free) else "") if m)
    if not method:
        method = "all examples in train"
    split = Split(labels=labels, keys=list(keys), paths=paths, images=images, domains=domains, headers=headers)
    parts = {code: split.subset(np.flatnonzero(codes == code)) for code in (TRAIN, VAL, TEST)}
    has_val = VAL in present or val_fraction > 0
    has_test = TEST in present or test_fraction > 0
    source = DataSource(name=name, class_names=list(class_names), train=parts[TRAIN],
                        val=parts[VAL] if has_val else None, root=root, split_method=method,
                        skipped=list(skipped or []), test=parts[TEST] if has_test else None, ignored=ignored)
    for key, why in source.skipped:
        logger.warning("skipping %s: %s", key, why)
    _check_nonempty(root, source)
    return source


def _check_nonempty(root: str, source: DataSource) -> None:
    if len(source.train) == 0:
        raise DataError(f"{root}: no training images")
    counts = source.train.class_counts(len(source.class_names))
    missing = [source.class_names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(f"{root}: no training images left for classes {missing} after the validation/test split; "
                        "add images, lower data.val_split / data.test_split, or set data.stratify=true")
    for name in ("val", "test"):
        split = getattr(source, name)
        if split is not None and len(split) == 0:
            logger.warning("%s: the %s split is empty; add images or raise data.%s_split", root, name, name)


# ---------------------------------------------------------------------------------------------------------------
# Files


def check_image_files(paths: Sequence[Path]) -> list[str | None]:
    """For each file, None when TensorFlow can decode it, else the reason it cannot (see probe.probe_image)."""
    return [p.problem for p in probe_images(paths)]


def file_headers(probes: Sequence[ImageProbe]) -> np.ndarray:
    """Split.headers rows for probed files: width, height, EXIF orientation, is-JPEG (int32 [N, 4])."""
    rows = [(p.width, p.height, p.orientation if p.orientation in range(1, 9) else 1,
             int(p.format in ("JPEG", "MPO"))) for p in probes]
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), len(HEADER_COLUMNS))


def probe_listed(root: Path, files: Sequence[Path], keys: Sequence[str], opts: SourceOptions,
                  skipped: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Probes the files; returns a mask of the good ones and every file's headers row (see Split.headers),
    appends the bad ones to `skipped`, honours strict."""
    probes = probe_images(files, fingerprints=opts.probes is not None, what=str(root))
    good = np.ones(len(files), dtype=bool)
    for i, (key, probe) in enumerate(zip(keys, probes)):
        if opts.probes is not None:
            opts.probes[key] = probe
        if probe.problem is not None:
            skipped.append((key, probe.problem))
            good[i] = False
    if skipped and opts.strict:
        listing = "\n".join(f"  {p}: {why}" for p, why in skipped)
        raise DataError(f"{len(skipped)} bad files in {root} (data.strict is on):\n{listing}")
    return good, file_headers(probes)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folder_names(class_root: Path) -> list[str]:
    """The class names of a folder of class folders; DataError naming the folder when one is no class name."""
    names = [p.name for p in _class_dirs(class_root)]
    for name in names:
        problem = class_name_problem(name)
        if problem:
            raise DataError(f"class folder {name!r} in {class_root}: {problem}; rename the folder")
    return names


def check_class_names(where: str, class_names: Sequence[str]) -> None:
    """DataError naming the source when a class name cannot be one line of labels.txt (see core.names)."""
    for name in class_names:
        problem = class_name_problem(name)
        if problem:
            raise DataError(f"{where}: class name {name!r}: {problem}")


def _list_class_files(class_dir: Path, ignored: Counter) -> list[Path]:
    """Image files under a class folder, recursively (nested folders belong to the class), in a stable order.

    Hidden files and folders and files with other extensions are counted in `ignored` by extension.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        hidden_dirs = sum(1 for d in dirnames if d.startswith("."))
        if hidden_dirs:
            ignored["hidden"] += hidden_dirs
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                ignored["hidden"] += 1
            elif suffix in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
            else:
                ignored[suffix or "(no extension)"] += 1
    return files


def _describe_ignored(ignored: Counter) -> str:
    return ", ".join(f"{ext} {n}" for ext, n in ignored.most_common())


def _nested_hint(folder: Path) -> str:
    """A pointer at the one subfolder that looks like the real class root (office31/webcam -> images/)."""
    subs = _class_dirs(folder)
    if len(subs) == 1 and len(_class_dirs(subs[0])) >= 2:
        return f"; the classes look like they are one level down: pass {subs[0]}"
    return ""


def load_image_folder(root: str | Path, val_split: float = 0.2, strict: bool = False, *, test_split: float = 0.0,
                      stratify: bool = False, probes: dict[str, ImageProbe] | None = None) -> DataSource:
    """Lists `root/<class>/...` or `root/{train,val,test}/<class>/...` image folders (any depth below a class).

    Splits without a folder are drawn from train/ by hash (val_split, test_split).
    """
    opts = SourceOptions(val_split=val_split, test_split=test_split, stratify=stratify, strict=strict,
                         probes=probes)
    return load_folder(Path(root), opts)


def load_folder(root: Path, opts: SourceOptions) -> DataSource:
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    test_dir = root / "test" if (root / "test").is_dir() else None
    only_train = [p.name for p in _class_dirs(root)] == ["train"]
    has_splits = train_dir.is_dir() and (val_dir is not None or test_dir is not None or only_train)
    class_root = train_dir if has_splits else root
    class_names = class_folder_names(class_root)
    if len(class_names) < 2:
        found = f"found {len(class_names)}: {class_names}" if class_names else "found none"
        raise DataError(f"{class_root} needs at least 2 class subfolders (one per class), {found}"
                        f"{_nested_hint(class_root)}")
    split_dirs = [(TRAIN, class_root)] if not has_splits else \
        [(code, d) for code, d in ((TRAIN, train_dir), (VAL, val_dir), (TEST, test_dir)) if d is not None]
    files: list[Path] = []
    labels: list[int] = []
    codes: list[int] = []
    class_dirs: list[Path] = []
    ignored: Counter = Counter()
    for code, split_dir in split_dirs:
        if code != TRAIN:
            extra = sorted({p.name for p in _class_dirs(split_dir)} - set(class_names))
            if extra:
                raise DataError(f"{split_dir} has class folders missing from {train_dir}: {extra}")
        for index, name in enumerate(class_names):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                continue  # a val/test folder may lack a class: it is only measured there, not learned
            found = _list_class_files(class_dir, ignored)
            files += found
            labels += [index] * len(found)
            # train/ files stay unassigned: val and test are drawn from them when there is no folder for them
            codes += [UNASSIGNED if code == TRAIN else code] * len(found)
            class_dirs += [class_dir] * len(found)
    if ignored:
        logger.info("%s: ignored %d files that are not listed images (%s)", root, sum(ignored.values()),
                    _describe_ignored(ignored))
    keys = [p.relative_to(root).as_posix() for p in files]
    skipped: list[tuple[str, str]] = []
    good, headers = probe_listed(root, files, keys, opts, skipped)
    readable = Counter(d for d, ok in zip(class_dirs, good) if ok)
    for _, split_dir in split_dirs:
        for name in class_names:
            class_dir = split_dir / name
            if class_dir.is_dir() and readable[class_dir] == 0:
                raise DataError(f"class folder {class_dir} has no readable images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    idx = np.flatnonzero(good)
    given = ""
    if has_splits:
        given = "folders: " + " and ".join(f"{d.name}/" for _, d in split_dirs)
    return build_source(root.name or str(root), str(root), class_names, np.asarray(labels, np.int64)[idx],
                         [keys[i] for i in idx], np.asarray(codes, np.int8)[idx], opts,
                         paths=[str(files[i]) for i in idx], headers=headers[idx], skipped=skipped,
                         ignored=sum(ignored.values()), given=given)


# ---------------------------------------------------------------------------------------------------------------
# Arrays: in memory, .npz, built-in, TFDS


def load_arrays(images: np.ndarray, labels: np.ndarray, class_names: list[str], name: str,
                val_split: float = 0.2, *, test_split: float = 0.0, stratify: bool = False) -> DataSource:
    """Wraps in-memory images [N, H, W(, C)] (C in 1, 3, 4; uint8, uint16 or float) and int labels as a source.

    Floats in [0, 1] are scaled to [0, 255]; uint16 is scaled down to 8 bits; alpha is dropped.
    """
    opts = SourceOptions(val_split=val_split, test_split=test_split, stratify=stratify)
    images = _to_uint8_rgb(np.asarray(images), name)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: labels must be a 1-D array of integer class ids, got {labels.dtype} "
                        f"shape {labels.shape}")
    labels = labels.astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(class_names):
        raise DataError(f"{name}: labels must be in [0, {len(class_names)})")
    keys = [f"{name}/{i}" for i in range(len(images))]
    return build_source(name, name, list(class_names), labels, keys, np.full(len(labels), UNASSIGNED, np.int8),
                         opts, images=images)


def _to_uint8_rgb(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(f"{name}: images must be [N, H, W] or [N, H, W, 1|3|4], got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images[..., :3]
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.uint16:
        return np.round(images / 257.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating) and images.size and float(np.nanmax(images)) <= 1.0:
        logger.info("%s: float images in [0, 1]; scaled to [0, 255]", name)
        images = images * 255.0
    return np.clip(np.nan_to_num(images), 0, 255).round().astype(np.uint8)


def load_npz(path: str | Path, val_split: float = 0.2, *, test_split: float = 0.0,
             stratify: bool = False) -> DataSource:
    """A NumPy `.npz` with `x` (images) and `y` (int ids, or strings naming the classes), optional `class_names`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: needs arrays 'x' (images) and 'y' (labels); missing {missing}, "
                        f"found {sorted(arrays)}")
    y = arrays["y"].reshape(-1) if arrays["y"].ndim == 2 and arrays["y"].shape[1] == 1 else arrays["y"]
    if "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"].reshape(-1)]
    elif y.dtype.kind in "US":
        class_names = sorted({str(v) for v in y})
    else:
        class_names = [str(i) for i in range(int(y.max(initial=0)) + 1)]
    if y.dtype.kind in "US":
        index = {n: i for i, n in enumerate(class_names)}
        unknown = sorted({str(v) for v in y} - set(index))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not in class_names")
        y = np.array([index[str(v)] for v in y], dtype=np.int64)
    return load_arrays(arrays["x"], y, class_names, path.name, val_split, test_split=test_split,
                       stratify=stratify)


def _builtin_digits(opts: SourceOptions) -> DataSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): needs no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch to the 0..255 range every backbone's preprocessing assumes.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return load_arrays(images, digits.target, [str(i) for i in range(10)], "builtin:digits", opts.val_split,
                       test_split=opts.test_split, stratify=opts.stratify)


BUILTIN_SOURCES: dict[str, Callable[[SourceOptions], DataSource]] = {"digits": _builtin_digits}


def _tfds_split_arrays(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size TFDS split (CIFAR-10, MNIST) as uint8 arrays in memory."""
    import tensorflow_datasets as tfds

    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True)
    images, labels = [], []
    for image, label in tfds.as_numpy(ds):
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


_MAGIC_SUFFIXES = ((b"\xff\xd8", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def _tfds_split_files(name: str, split: str, data_dir: str | None, version: str,
                      image_key: str) -> tuple[list[str], np.ndarray]:
    """A variable-size TFDS split (tf_flowers) as files: the original encoded images, extracted once.

    Images of different sizes do not stack into one array; their encoded bytes (no decode, no re-encode) go to
    <feature cache dir>/tfds/<name>-<version>/<split>/ and are decoded in the pipeline like any image file.
    """
    import shutil

    import tensorflow_datasets as tfds


    folder = default_cache_dir() / "tfds" / f"{name}-{version}" / split
    if not (folder / "labels.npy").is_file():
        tmp = folder.with_name(f".{split}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True,
                       decoders={image_key: tfds.decode.SkipDecoding()})
        labels = []
        for i, (data, label) in enumerate(tfds.as_numpy(ds)):
            suffix = next((s for magic, s in _MAGIC_SUFFIXES if data.startswith(magic)), ".img")
            (tmp / f"{i:07d}{suffix}").write_bytes(data)
            labels.append(int(label))
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))  # written last: marks the folder complete
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        logger.info("tfds:%s/%s: extracted %d images to %s", name, split, len(labels), folder)
    labels = np.load(folder / "labels.npy")
    files = sorted(str(f) for f in folder.iterdir() if f.suffix != ".npy")
    return files, labels


def load_tfds(name: str, data_dir: str = "", val_split: float = 0.2, *, test_split: float = 0.0,
              stratify: bool = False) -> DataSource:
    """A TFDS image-classification data set already on disk (this loader never downloads).

    Its own validation split (else its test split) becomes validation; its test split becomes test when it also
    has a validation split. Splits it lacks are drawn from train by hash. Fixed-size images are held in memory
    (CIFAR-10 is 180 MB); variable-size ones (tf_flowers) are extracted once to files (see _tfds_split_files).
    """
    import tensorflow_datasets as tfds

    opts = SourceOptions(val_split=val_split, test_split=test_split, stratify=stratify)
    where = data_dir or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise DataError(f"tfds:{name}: no such TFDS data set ({str(exc).splitlines()[0]})") from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    label = features[label_key] if label_key in features else None
    class_names = list(label.names) if label is not None and hasattr(label, "names") else []
    shape = tuple(getattr(features[image_key], "shape", ())) if image_key in features else ()
    variable = len(shape) == 3 and None in shape[:2]
    available = list(builder.info.splits.keys()) or ["train", "test"]
    val_name = next((s for s in ("validation", "test") if s in available), None)
    test_name = "test" if val_name == "validation" and "test" in available else None
    parts: dict[int, tuple[np.ndarray | list[str], np.ndarray]] = {}
    try:
        for code, split_name in ((TRAIN, "train"), (VAL, val_name), (TEST, test_name)):
            if split_name and variable:
                parts[code] = _tfds_split_files(name, split_name, data_dir or None, str(builder.info.version),
                                                image_key)
            elif split_name:
                parts[code] = _tfds_split_arrays(name, split_name, data_dir or None)
    except AssertionError as exc:  # TFDS signals "not downloaded" with a bare AssertionError
        raise DataError(f"tfds:{name} is not on disk in {where}, and tftransfer does not download. On a machine "
                        f"with internet run `tfds build {name}` (or tfds.load('{name}')), then copy the data "
                        f"folder here and set data.tfds_data_dir ({exc})") from None
    if not class_names:
        class_names = [str(i) for i in range(int(max(p[1].max(initial=0) for p in parts.values())) + 1)]
    names = {TRAIN: "train", VAL: val_name, TEST: test_name}
    labels = np.concatenate([p[1] for p in parts.values()])
    keys = [f"tfds:{name}/{names[code]}/{i}" for code, p in parts.items() for i in range(len(p[1]))]
    fixed = np.concatenate([np.full(len(p[1]), code if code != TRAIN else UNASSIGNED, np.int8)
                            for code, p in parts.items()])
    given = "TFDS splits: train / " + " / ".join(n for n in (val_name, test_name) if n) if val_name else ""
    if variable:
        paths = [path for p in parts.values() for path in p[0]]
        return build_source(name, f"tfds:{name}", class_names, labels, keys, fixed, opts, paths=paths, given=given)
    images = _to_uint8_rgb(np.concatenate([p[0] for p in parts.values()]), f"tfds:{name}")
    return build_source(name, f"tfds:{name}", class_names, labels, keys, fixed, opts, images=images, given=given)


# ---------------------------------------------------------------------------------------------------------------
# Spec resolution: registries of schemes (`tfds:`) and file suffixes (`.csv`); anything else is a folder





















logger = logging.getLogger(__name__)


def split_fingerprint(split: Split) -> str:
    """Identifies a split's examples and their content: keys plus file size/mtime, or the array bytes."""
    digest = hashlib.sha256()
    digest.update(np.asarray(split.labels, np.int64).tobytes())
    if split.images is not None:
        digest.update(np.ascontiguousarray(split.images).tobytes())
    for i, key in enumerate(split.keys):
        digest.update(key.encode())
        if split.paths is not None:
            stat = os.stat(split.paths[i])
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
