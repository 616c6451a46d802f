"""CSV and JSONL manifests: one example per row, `path,label[,split][,domain]`.

Paths are relative to the manifest's folder and must stay inside it (`../x.png` or an absolute path elsewhere is
refused, unless data.allow_outside_paths); the check is on the normalised path, so a symlink the folder holds is
followed wherever it points. Rows are compared by their fully resolved file: two rows naming one file (`red/x.png`
and `red/../red/x.png`, or a symlink and its target) are one example, the repeat dropped with a warning when the rows
agree, an error naming both lines when their label, split or domain differ. `split` is train, val (validation, valid,
dev) or test; rows without one are assigned by the hash of their path, like image folders. `domain` names where a
row comes from (e.g. amazon, webcam), so one file can describe the source and target domains of a
domain-adaptation experiment; `data.csv#domain=webcam` selects rows. Class names (and so label ids) always come
from every row of the file, so a domain-filtered source keeps the label ids of the full manifest.

Every problem names the file and line: a missing column, an empty label, a label with a control character (a
newline would break labels.txt), an unknown split, a path outside the manifest's folder, one file listed with two
labels, and a path that does not exist. Files that exist but are not decodable images are skipped and listed (or an
error with data.strict), exactly as in image folders.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tftransfer.core.errors import DataError
from tftransfer.core.names import class_name_problem
from tftransfer.data.probe import ImageProbe
from tftransfer.data.sources import (
    SPLIT_ALIASES,
    UNASSIGNED,
    DataSource,
    SourceOptions,
    build_source,
    probe_listed,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("split", "domain")
MAX_LISTED_ERRORS = 10  # missing files named in one error message


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row; `line` is its 1-based line number in the file."""

    line: int
    path: str
    label: str
    split: str = ""
    domain: str = ""


def _cell(value: object) -> str:
    return "" if value is None else str(value).strip()


def _read_csv(path: Path) -> Iterator[ManifestRow]:
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a byte-order mark
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: the first line must be a header naming the columns path,label[,split]"
                            f"[,domain]; missing {missing}, found {header or 'an empty file'}")
        reader.fieldnames = header
        for record in reader:
            if not any(_cell(v) for k, v in record.items() if k is not None):
                continue  # blank line
            yield ManifestRow(reader.line_num, _cell(record.get("path")), _cell(record.get("label")),
                              _cell(record.get("split")).lower(), _cell(record.get("domain")))


def _read_jsonl(path: Path) -> Iterator[ManifestRow]:
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object with keys path and label")
            missing = [c for c in REQUIRED_COLUMNS if c not in record]
            if missing:
                raise DataError(f"{path} line {line_no}: missing key(s) {missing}")
            yield ManifestRow(line_no, _cell(record.get("path")), _cell(record.get("label")),
                              _cell(record.get("split")).lower(), _cell(record.get("domain")))


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl}


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parses a .csv or .jsonl manifest and checks each row's own fields (not whether its file exists)."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: a manifest must be .csv or .jsonl")
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    rows = []
    for row in reader(path):
        if not row.path:
            raise DataError(f"{path} line {row.line}: empty path")
        if not row.label:
            raise DataError(f"{path} line {row.line}: empty label for {row.path}")
        problem = class_name_problem(row.label)
        if problem:
            raise DataError(f"{path} line {row.line}: label {row.label!r} of {row.path!r}: {problem}")
        if row.split and row.split not in SPLIT_ALIASES:
            raise DataError(f"{path} line {row.line}: split {row.split!r} is not one of train, val, test "
                            "(or empty to assign it by hash)")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _confined(path: Path, rows: list[ManifestRow], allow_outside: bool) -> list[Path]:
    """Each row's file (joined to the manifest's folder, normalised); a DataError for one outside that folder."""
    base = Path(os.path.abspath(path.parent))
    files = [Path(os.path.normpath(base / r.path)) for r in rows]
    if not allow_outside:
        outside = [(r, f) for r, f in zip(rows, files) if not f.is_relative_to(base)]
        if outside:
            listing = "; ".join(f"line {r.line}: {r.path}" for r, _ in outside[:MAX_LISTED_ERRORS])
            raise DataError(f"{path}: {len(outside)} path(s) lead outside the manifest's folder {base} ({listing}); "
                            "move the manifest up or set data.allow_outside_paths=true")
    return files


def _drop_repeats(path: Path, rows: list[ManifestRow], files: list[Path]) -> list[ManifestRow]:
    """One row per resolved file: agreeing repeats dropped with a warning, disagreeing ones a DataError."""
    first: dict[Path, ManifestRow] = {}
    kept: list[ManifestRow] = []
    conflicts: list[str] = []
    for row, file in zip(rows, files):
        real = file.resolve()
        earlier = first.get(real)
        if earlier is None:
            first[real] = row
            kept.append(row)
        elif (earlier.label, earlier.split, earlier.domain) != (row.label, row.split, row.domain):
            conflicts.append(f"lines {earlier.line} and {row.line} ({earlier.path!r} as {earlier.label!r}, "
                             f"{row.path!r} as {row.label!r})")
        else:
            logger.warning("%s line %d: %s is the file of line %d again; the repeat is ignored", path, row.line,
                           row.path, earlier.line)
    if conflicts:
        raise DataError(f"{path}: {len(conflicts)} file(s) listed twice with a different label, split or domain: "
                        + "; ".join(conflicts[:MAX_LISTED_ERRORS]))
    return kept


def _class_names(labels: Sequence[str]) -> list[str]:
    """Sorted label names; numerically when every label is an integer (so "10" comes after "9")."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def load_manifest(path: str | Path, val_split: float = 0.2, strict: bool = False, *, test_split: float = 0.0,
                  stratify: bool = False, domains: Sequence[str] | None = None,
                  probes: dict[str, ImageProbe] | None = None, allow_outside_paths: bool = False) -> DataSource:
    """Reads a manifest into a DataSource; `domains` keeps only rows of those domains (label ids unchanged)."""
    path = Path(path)
    opts = SourceOptions(val_split=val_split, test_split=test_split, stratify=stratify, strict=strict,
                         probes=probes)
    rows = read_manifest(path)
    # Before any file is opened: a path outside the folder is never read, and one file is one example.
    rows = _drop_repeats(path, rows, _confined(path, rows, allow_outside_paths))
    class_names = _class_names([r.label for r in rows])
    if len(class_names) < 2:
        raise DataError(f"{path}: needs at least 2 classes in the label column, found {class_names}")
    has_domains = any(r.domain for r in rows)
    if domains:
        known = sorted({r.domain for r in rows if r.domain})
        unknown = sorted(set(domains) - set(known))
        if unknown:
            raise DataError(f"{path}: no rows with domain {unknown}; domains in the file: {known or 'none'}")
        rows = [r for r in rows if r.domain in set(domains)]
    base = path.parent
    resolved = [base / r.path for r in rows]
    missing = [(r, p) for r, p in zip(rows, resolved) if not p.is_file()]
    if missing:
        listing = "; ".join(f"line {r.line}: {r.path}" for r, _ in missing[:MAX_LISTED_ERRORS])
        more = f" and {len(missing) - MAX_LISTED_ERRORS} more" if len(missing) > MAX_LISTED_ERRORS else ""
        raise DataError(f"{path}: {len(missing)} listed file(s) not found (paths are relative to {base}): "
                        f"{listing}{more}")
    keys = [Path(r.path).as_posix() for r in rows]
    skipped: list[tuple[str, str]] = []
    good, headers = probe_listed(path, resolved, keys, opts, skipped)
    index = {name: i for i, name in enumerate(class_names)}
    idx = np.flatnonzero(good)
    labels = np.array([index[rows[i].label] for i in idx], dtype=np.int64)
    fixed = np.array([SPLIT_ALIASES.get(rows[i].split, UNASSIGNED) for i in idx], dtype=np.int8)
    given = f"manifest split column ({path.name})" if np.any(fixed != UNASSIGNED) else ""
    name = path.stem + (f"#domain={','.join(domains)}" if domains else "")
    return build_source(name, str(path), class_names, labels, [keys[i] for i in idx], fixed, opts,
                         paths=[str(resolved[i]) for i in idx], headers=headers[idx],
                         domains=[rows[i].domain for i in idx] if has_domains else None,
                         skipped=skipped, given=given)


def write_manifest(path: str | Path, rows: Sequence[dict[str, str]]) -> Path:
    """Writes rows ({path, label[, split][, domain]}) as a .csv or .jsonl manifest (e.g. to merge two folders)."""
    path = Path(path)
    columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if any(c in r for r in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps({c: r[c] for c in columns if c in r}) + "\n" for r in rows))
    elif path.suffix.lower() == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])
    else:
        raise DataError(f"{path}: a manifest must be .csv or .jsonl")
    return path
