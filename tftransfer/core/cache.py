"""cache: moved from tftransfer.model.features."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

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
