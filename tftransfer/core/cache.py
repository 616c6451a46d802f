"""Cache locations and content digests: where cached features live and the keys they are stored by."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CACHE_ENV = "TFTRANSFER_CACHE"


def default_cache_dir() -> Path:
    """$TFTRANSFER_CACHE, else ~/.cache/tftransfer."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tftransfer")


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A stable short key for a JSON-able description of everything the features depend on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def arrays_digest(arrays: Iterable[Any]) -> str:
    """A short sha256 of arrays' dtypes, shapes and bytes, in order: equal digests mean bit-identical arrays (e.g.
    the final weights every worker of a multi-worker run logs, to show they trained in lockstep)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
