"""tftransfer.data.specs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tftransfer.config.experiment import DataConfig
from tftransfer.core.errors import DataError
from tftransfer.data.manifest import load_manifest
from tftransfer.data.probe import ImageProbe
from tftransfer.data.sources import (
    BUILTIN_SOURCES,
    DataSource,
    SourceOptions,
    load_folder,
    load_npz,
    load_tfds,
)


def _parse_filters(spec: str, fragment: str) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for part in filter(None, fragment.split("&")):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise DataError(f"{spec}: bad filter {part!r}; use e.g. data.csv#domain=webcam")
        filters[key.strip()] = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(filters) - {"domain"})
    if unknown:
        raise DataError(f"{spec}: unknown filter {unknown}; only #domain=NAME[,NAME] is supported")
    return filters


def load_manifest_spec(path: str, fragment: str, opts: SourceOptions) -> DataSource:

    filters = _parse_filters(f"{path}#{fragment}", fragment)
    return load_manifest(path, opts.val_split, opts.strict, test_split=opts.test_split, stratify=opts.stratify,
                         domains=filters.get("domain"), probes=opts.probes,
                         allow_outside_paths=opts.allow_outside_paths)


def load_npz_spec(path: str, fragment: str, opts: SourceOptions) -> DataSource:
    if fragment:
        raise DataError(f"{path}#{fragment}: .npz files take no #filters")
    return load_npz(path, opts.val_split, test_split=opts.test_split, stratify=opts.stratify)


def load_builtin_spec(key: str, opts: SourceOptions) -> DataSource:
    if key not in BUILTIN_SOURCES:
        raise DataError(f"unknown built-in data set 'builtin:{key}'; available: "
                        + ", ".join(f"builtin:{k}" for k in BUILTIN_SOURCES))
    return BUILTIN_SOURCES[key](opts)


def load_tfds_spec(name: str, opts: SourceOptions) -> DataSource:
    return load_tfds(name, opts.tfds_data_dir, opts.val_split, test_split=opts.test_split, stratify=opts.stratify)


def load_source(spec: str, val_split: float = 0.2, strict: bool = False, tfds_data_dir: str = "", *,
                test_split: float = 0.0, stratify: bool = False,
                probes: dict[str, ImageProbe] | None = None, allow_outside_paths: bool = False) -> DataSource:
    """Resolves a `--data` spec: an image folder, a `.csv`/`.jsonl` manifest (optionally `#domain=NAME`), an
    `.npz` file, `tfds:<name>` or `builtin:<name>`."""
    if not spec:
        raise DataError("no data given: pass --data PATH (an image folder) or set data.path in the config")
    opts = SourceOptions(val_split=val_split, test_split=test_split, stratify=stratify, strict=strict,
                         tfds_data_dir=tfds_data_dir, probes=probes, allow_outside_paths=allow_outside_paths)
    scheme, sep, rest = spec.partition(":")
    if sep and scheme in SCHEMES:
        return SCHEMES[scheme](rest, opts)
    path, _, fragment = spec.partition("#")
    loader = FILE_SUFFIXES.get(Path(path).suffix.lower())
    if loader is not None:
        return loader(path, fragment, opts)
    return load_folder(Path(spec), opts)


def source_from_config(cfg: DataConfig, probes: dict[str, ImageProbe] | None = None) -> DataSource:
    """load_source with every data.* key that shapes the source (path, splits, stratify, strict, TFDS dir,
    allow_outside_paths)."""
    return load_source(cfg.path, cfg.val_split, cfg.strict, cfg.tfds_data_dir, test_split=cfg.test_split,
                       stratify=cfg.stratify, probes=probes, allow_outside_paths=cfg.allow_outside_paths)




SCHEMES: dict[str, Callable[[str, SourceOptions], DataSource]] = {
    "builtin": load_builtin_spec,
    "tfds": load_tfds_spec,
}


FILE_SUFFIXES: dict[str, Callable[[str, str, SourceOptions], DataSource]] = {
    ".csv": load_manifest_spec,
    ".jsonl": load_manifest_spec,
    ".npz": load_npz_spec,
}
