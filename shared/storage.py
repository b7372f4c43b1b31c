"""Where a cache lives (a local folder or an fsspec URL) and the one-writer lock on it."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_EXTRAS = {"s3": "samcache[s3] (s3fs)", "gs": "samcache[gcs] (gcsfs)", "gcs": "samcache[gcs]"}


@dataclass(frozen=True)
class Location:
    """A cache's root: ``fs`` is an fsspec filesystem, ``path`` the root inside it."""

    fs: Any
    path: str
    display: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        if self.is_local:
            return os.path.join(self.path, *parts)
        return "/".join([self.path.rstrip("/"), *parts])


def parse_location(target: str | Path, storage_options: dict[str, Any] | None = None) -> Location:
    """A local path (absolute, resolved) or a URL such as ``s3://bucket/cache.zarr``."""
    text = str(target)
    if "://" not in text or text.startswith("file://"):
        local = Path(text.removeprefix("file://")).expanduser().resolve()
        return Location(LocalFileSystem(), str(local), str(target))
    protocol = text.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(text, **(storage_options or {}))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol, f"the fsspec backend for {protocol}://")
        raise ValueError(f"{text}: install {extra} to use {protocol}:// URLs ({exc})") from exc
    return Location(fs, path, text)


class CacheLockedError(RuntimeError):
    """Another `embed run` is writing this cache."""


class CacheLock:
    """One writer per cache.

    Local folders: ``fcntl.flock`` on ``embed.lock``; the OS releases it when the holder dies, so
    a ``kill -9`` never leaves a stale lock. Object stores have no locks: a lease object holding
    host, pid and a heartbeat time is written; a lease younger than ``stale_after`` seconds
    refuses a second writer (best effort, documented in cache_layout.md).
    """

    def __init__(self, location: Location, name: str, stale_after: float = 600.0) -> None:
        self.location = location
        self.path = location.join(name)
        self.stale_after = stale_after
        self._fd: int | None = None
        self._held_remote = False

    def __enter__(self) -> CacheLock:
        if self.location.is_local:
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _holder(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})

    def _acquire_local(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CacheLockedError(self._busy_message(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._holder().encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        fs = self.location.fs
        if fs.exists(self.path):
            holder = fs.cat_file(self.path).decode(errors="replace")
            try:
                age = time.time() - float(json.loads(holder)["time"])
            except (ValueError, KeyError, TypeError):
                age = float("inf")
            if age < self.stale_after:
                raise CacheLockedError(self._busy_message(holder))
        fs.pipe_file(self.path, self._holder().encode())
        self._held_remote = True

    def _busy_message(self, holder: str) -> str:
        return (
            f"{self.location.display} is being written by another `embed run` ({holder or '?'}). "
            "Wait for it to finish (or stop it); runs never need to be merged by hand."
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (harmless)
            self._fd = None
        elif self._held_remote:
            self.location.fs.rm_file(self.path)
            self._held_remote = False
