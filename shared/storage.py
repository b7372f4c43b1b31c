"""Where a cache lives (a local folder or an fsspec URL) and the one-writer lock on it."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
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
    host, pid, a token and a heartbeat time is written and renewed every ``stale_after / 4``
    seconds by a thread. A second writer is refused while the lease is younger than
    ``stale_after`` seconds, unless its holder is a dead process on this host. Best effort: two
    runs started within the same few milliseconds can both pass (documented in cache_layout.md).
    """

    def __init__(
        self,
        location: Location,
        name: str,
        stale_after: float = 120.0,
        *,
        writer: str = "`embed run`",
        hint: str = "Wait for it to finish (or stop it); runs never need to be merged by hand.",
    ) -> None:
        self.location = location
        self.path = location.join(name)
        self.stale_after = stale_after
        self.writer, self.hint = writer, hint
        self._fd: int | None = None
        self._held_remote = False
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> CacheLock:
        if self.location.is_local:
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _holder(self) -> str:
        return json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
             "token": self._token}
        )  # fmt: skip

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
        fs.invalidate_cache(self.path)  # another process may have written or removed it
        if fs.exists(self.path):
            holder = fs.cat_file(self.path).decode(errors="replace")
            if self._lease_alive(holder):
                raise CacheLockedError(self._busy_message(holder))
        fs.pipe_file(self.path, self._holder().encode())
        fs.invalidate_cache(self.path)
        found = fs.cat_file(self.path).decode(errors="replace")
        if _lease_field(found, "token") != self._token:  # lost a race with another writer
            raise CacheLockedError(self._busy_message(found))
        self._held_remote = True
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew, name="samcache-lease", daemon=True)
        self._heartbeat.start()

    def _lease_alive(self, holder: str) -> bool:
        """Fresh, and not held by a process of this host that no longer exists."""
        stamp = _lease_field(holder, "time")
        age = time.time() - float(stamp) if isinstance(stamp, (int, float)) else float("inf")
        if age >= self.stale_after:
            return False
        pid = _lease_field(holder, "pid")
        if _lease_field(holder, "host") == socket.gethostname() and isinstance(pid, int):
            return _pid_alive(pid)
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            try:
                self.location.fs.pipe_file(self.path, self._holder().encode())
            except Exception as exc:  # a transient store error must not kill the run
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def _busy_message(self, holder: str) -> str:
        return (
            f"{self.location.display} is being written by another {self.writer} "
            f"({holder or '?'}). {self.hint}"
        )

    def holder(self) -> str | None:
        """Who holds the lock now (its record), or None when nobody does; takes nothing.

        Local: a non-blocking ``flock`` probe, released at once (an ``embed run`` starting in
        that instant would be refused once, with the usual message). Object stores: a fresh
        lease."""
        if not self.location.is_local:
            fs = self.location.fs
            fs.invalidate_cache(self.path)
            if not fs.exists(self.path):
                return None
            text = fs.cat_file(self.path).decode(errors="replace")
            return text if self._lease_alive(text) else None
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)  # closing releases a probe that succeeded
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (harmless)
            self._fd = None
        elif self._held_remote:
            self._release_remote()

    def _release_remote(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        fs = self.location.fs
        fs.invalidate_cache(self.path)
        if fs.exists(self.path) and _lease_field(fs.cat_file(self.path), "token") == self._token:
            fs.rm_file(self.path)  # never remove a lease another writer took over
        self._held_remote = False


def _lease_field(holder: str | bytes, key: str) -> Any:
    try:
        return json.loads(holder).get(key)
    except (ValueError, AttributeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
