"""`decoder serve` in a subprocess on 127.0.0.1 for end-to-end tests and the benchmark.

``serving(args)`` starts ``python -m stage2_decoder.cli serve --port 0 …``, reads the URL it
prints, polls ``/api/info`` until it answers (bounded deadline), yields ``Served(url, pid)``
and always stops the process (SIGINT, then kill) when the ``with`` block ends.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class Served(NamedTuple):
    url: str  # http://127.0.0.1:PORT/
    pid: int


@contextmanager
def serving(args: list[str], deadline_s: float = 180.0) -> Iterator[Served]:
    """A running `decoder serve` with ``args``: its base URL and process id."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get(
        "PYTHONPATH", "")]), "COLUMNS": "200"}  # fmt: skip
    command = [sys.executable, "-m", "stage2_decoder.cli", "serve", "--port", "0", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        url = _wait_for_url(lines, output, time.monotonic() + deadline_s)
        _wait_ready(url, process, output, time.monotonic() + deadline_s)
        yield Served(url, process.pid)
    finally:
        _stop(process)


def _wait_for_url(lines: queue.Queue, output: list[str], deadline: float) -> str:
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError("decoder serve exited:\n" + "".join(output))
        output.append(line)
        found = re.search(r"open (http://\S+/)", line)
        if found:
            return found.group(1)
    raise TimeoutError("decoder serve printed no URL in time:\n" + "".join(output))


def _wait_ready(url: str, process: subprocess.Popen, output: list[str], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("decoder serve exited:\n" + "".join(output))
        try:
            with urllib.request.urlopen(url + "api/info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in time")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
