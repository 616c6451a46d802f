"""JSON files written atomically and read with errors that name the file."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tftransfer.core.errors import RunDirError

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
