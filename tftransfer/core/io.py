"""JSON files written atomically and read with errors that name the file."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
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


def gzip_size(paths: Path | list[Path]) -> int:
    """Bytes of the file(s) after gzip -9, each compressed on its own: what zeros in the weights save in a
    download (a pruned model's weights compress, an unpruned one's hardly)."""
    files = paths if isinstance(paths, list) else [paths]
    return int(sum(len(gzip.compress(Path(f).read_bytes(), compresslevel=9, mtime=0)) for f in files))
