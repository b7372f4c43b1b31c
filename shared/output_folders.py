"""Output folders that are never clobbered: a command writes only into a folder that is new,
empty, or was written by the same command before (a marker file says so).

`decoder train/eval/predict/amg` call ``claim_output_folder`` before writing anything. A folder
that holds anything else (a user's files, another command's outputs) is refused with its
contents named, so a mistyped ``--out`` never overwrites a user's ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.files import atomic_write

MARKER = ".samcache-output.json"  # {"command": "decoder train"}; hidden from listings
_SHOWN = 5  # entries named in the refusal


class OutputFolderError(ValueError):
    """``--out`` holds files the command did not write."""


def claim_output_folder(folder: str | Path, command: str, *, adopt: bool = False) -> Path:
    """Create or reuse ``folder`` for ``command``; refuse a folder with foreign contents.

    Accepted: a missing or empty folder (created and marked), or one whose marker names the
    same command (a rerun or ``--resume`` overwrites only its own files). Refused, naming what
    is there: a file in place of the folder, a non-empty folder without the marker, or one
    marked by another command. ``adopt``: the caller has checked that the folder holds its own
    outputs (a run's ``last.pt`` for ``--resume``): mark it even without a marker.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"--out {folder} is a file, not a folder; choose a folder path")
    marker = folder / MARKER
    if marker.is_file():
        owner = _owner(marker)
        if owner != command:
            raise OutputFolderError(
                f"--out {folder} holds the output of `{owner}`; `{command}` writes into a "
                "folder of its own: choose another --out"
            )
        return folder
    entries = sorted(os.listdir(folder)) if folder.is_dir() else []
    if entries and not adopt:
        shown = ", ".join(entries[:_SHOWN]) + (
            f", … ({len(entries)} entries)" if len(entries) > _SHOWN else ""
        )
        raise OutputFolderError(
            f"--out {folder} is not empty and was not written by `{command}` ({shown}); "
            "choose a new or empty folder, nothing there was changed"
        )
    folder.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"command": command}).encode()
    atomic_write(marker, lambda handle: handle.write(payload))
    return folder


def _owner(marker: Path) -> str:
    try:
        owner = json.loads(marker.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        owner = None
    return owner if isinstance(owner, str) else "an unknown command"
