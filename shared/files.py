"""Atomic file writes: every file samcache writes locally appears whole or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], object], *, temp_prefix: str = "."
) -> Path:
    """Call ``write`` on a temp file beside ``path``, fsync it, ``os.replace`` it, fsync the folder.

    The temp file is named ``<temp_prefix><name>.<random>.tmp`` (a leading "." hides it from
    pyarrow datasets and globbing) and is removed if ``write`` raises. A crash at any moment
    leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{temp_prefix}{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
