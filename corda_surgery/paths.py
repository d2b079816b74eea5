"""Paths a user hands us, resolved with the operating system's refusals as input errors.

A symlink loop, a name too long or a folder we may not enter is a mistake in the input, not a bug: each is
one line naming the path. (Python before 3.13 reports a symlink loop from ``Path.resolve`` as RuntimeError.)
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from corda_surgery.errors import CordaSurgeryError


class PathError(CordaSurgeryError):
    """The operating system cannot resolve or open a path the user gave; names the path."""


def os_error_line(exc: OSError) -> str:
    """``path: reason`` for an OSError (both paths of a rename), without Python's ``[Errno n]`` prefix."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    second = f" → {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{second}: {reason}"


def resolved(path: str | Path) -> Path:
    """``path`` absolute with its links followed; a loop or an unusable name is a PathError naming it."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError as exc:  # "Symlink loop from ..." on Python < 3.13
        raise PathError(f"{path}: {os.strerror(errno.ELOOP)}") from exc
    except OSError as exc:
        raise PathError(f"{path}: {exc.strerror or exc}") from exc


def read_json(path: Path, error: type[CordaSurgeryError]) -> Any:
    """A JSON file that may come from a stranger: bytes that are no UTF-8 JSON raise ``error`` naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
