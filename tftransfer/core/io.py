"""JSON files written atomically and read with errors that name the file; what publishing by rename needs
underneath: durable folders (fsync of files and folders), disk errors as one line, stale temporary folders removed.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.core.errors import RunDirError, StorageError

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (json.dump would write invalid JSON), numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Writes JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_errors(path), removed_on_failure(tmp):
        tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
        os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    """Reads a JSON file; errors name it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON: {exc}") from None


def versioned_dir(base: str | Path, taken: Callable[[Path], bool]) -> Path:
    """Creates and returns the first free folder of base, base-2, base-3, ...: one that did not exist (made with an
    exclusive mkdir, so two processes never get the same one) or an existing folder `taken` says holds nothing."""
    base = Path(base)
    number = 1
    while True:
        candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not taken(candidate):
                return candidate
        number += 1


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two data specs or paths name the same thing (equal, or the same file or folder once resolved)."""
    if str(a) == str(b):
        return True
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


# A full disk, a read-only mount, a folder of another user, a quota: the user must free or change the place.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EDQUOT: "disk quota exceeded"}


def storage_error(error: OSError, path: str | Path | None = None) -> StorageError | None:
    """The one-line StorageError of an OSError that is a storage problem (STORAGE_ERRNOS); None for another one."""
    reason = STORAGE_ERRNOS.get(error.errno or 0)
    if reason is None:
        return None
    where = error.filename if error.filename else path
    return StorageError(f"cannot write {where}: {reason}; free space or choose another folder")


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turns a storage OSError (full or read-only disk, no permission) inside the block into a StorageError naming
    the path (the error's own file when it has one, else `path`)."""
    try:
        yield
    except OSError as error:
        converted = storage_error(error, path)
        if converted is None:
            raise
        raise converted from error


@contextlib.contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Removes `path` (a temporary file or folder) when the block raises, then lets the error through."""
    try:
        yield
    except BaseException:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def fsync_tree(folder: Path) -> None:
    """fsyncs every file under `folder`, then every folder bottom-up, so a rename publishing it never shows a folder
    whose contents a crash could still lose."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def fsync_path(path: Path) -> None:
    """fsync of one file or folder (a folder's fsync makes the names in it, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts; a reused id keeps a folder, never loses one)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Removes the entries of `folder` whose name matches `pattern` (a regex whose group 1 is the writer's pid)
    when that process is gone: temporary folders of a writer killed or failed before it could clean up."""
    compiled = re.compile(pattern)
    removed = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        found = compiled.match(path.name)
        if found is None or process_alive(int(found.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
        logger.info("removed %s, left by a process that did not finish", path)
    return removed


def gzip_size(paths: Path | list[Path]) -> int:
    """Bytes of the file(s) after gzip -9, each compressed on its own: what zeros in the weights save in a
    download (a pruned model's weights compress, an unpruned one's hardly)."""
    files = paths if isinstance(paths, list) else [paths]
    return int(sum(len(gzip.compress(Path(f).read_bytes(), compresslevel=9, mtime=0)) for f in files))


def write_npz(path: Path, **arrays: Any) -> Path:
    """Writes arrays to an .npz atomically (temp file + rename): a reader never sees half a cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_npz(path: Path | None, what: str) -> dict[str, np.ndarray] | None:
    """All arrays of a cache .npz, or None when it is absent or damaged (logged: a cache is recomputed, not fatal)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring unreadable %s cache %s: %s", what, path, exc)
        return None
