"""sha256 of files, streamed (checkpoints are GBs; images are hashed on every run)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB blocks (memory does not grow with size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of bytes already in memory (an image read once for hashing and decoding)."""
    return hashlib.sha256(data).hexdigest()
