"""Where every output is written: parents created, one run per output, staged and renamed when complete.

A run *claims* its output: it creates the missing parent folders (removed again if the run fails), holds
an exclusive lock file beside the output so a second run on the same output refuses at once, and — since
no other run can be writing there — removes staging folders that killed runs left behind (they can be as
large as the model). Folders are built under a hidden staging name and renamed into place only when
complete, with the permissions an ordinary folder gets (the umask's), not ``mkdtemp``'s owner-only ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from corda_surgery.errors import CordaSurgeryError
from corda_surgery.paths import resolved

log = logging.getLogger(__name__)

STAGING_MARK = ".partial-"  # .<name>.partial-XXXX: a folder being built
RETIRED_MARK = ".old-"  # .<name>.old-XXXX: the previous output, moved aside during --overwrite


class OutputError(CordaSurgeryError):
    """The output cannot be written (exists, busy, read-only, disk full); names the path."""


def _create_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; return those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_if_empty(missing)
            raise OutputError(f"{path}: cannot create the folder ({exc.strerror or exc})") from exc
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


def _size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_stale(out: Path) -> None:
    """Staging and retired folders of ``out``, and staging files (``convert``'s spilled block), left by runs that
    were killed (we hold the lock: none is live)."""
    for mark in (STAGING_MARK, RETIRED_MARK):
        for stale in out.parent.glob(f".{out.name}{mark}*"):
            if stale.is_symlink():
                continue
            size = _size_of(stale) if stale.is_dir() else stale.stat().st_size
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            log.warning("removed %s (%.1f MB) left by an interrupted run", stale, size / 1e6)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_disjoint(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is, contains or lies inside an input (links resolved), --overwrite or not.

    ``out``'s staging folder, lock and hidden store are its siblings: they are inside an input only if
    ``out`` is, so they need no check of their own.
    """
    target = resolved(out)
    for given in inputs:
        source = resolved(given)
        if _within(target, source) or _within(source, target):
            raise OutputError(f"{out}: output overlaps the input {given}; write it somewhere else")


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``out``; refuse at once if another process holds it."""
    path = _lock_path(out)
    while True:
        try:
            handle = path.open("a+")
        except OSError as exc:
            raise OutputError(f"{out}: cannot write in {out.parent} ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise OutputError(
                f"{out}: another corda-surgery run is writing this output (lock {path}); wait for it to finish"
            ) from exc
        try:  # the holder before us may have unlinked the file between our open and our lock: retry then
            current = path.stat().st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()


@contextlib.contextmanager
def claimed(out: str | Path, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Hold ``out`` for this run (disjoint from ``inputs``, parents made, lock held, stale leftovers removed);
    yields its resolved path."""
    out = resolved(out)
    check_disjoint(out, inputs)
    created = _create_parents(out.parent)
    try:
        with _exclusive_lock(out):
            _remove_stale(out)
            yield out
    except BaseException:
        _remove_if_empty(created)
        raise


@contextlib.contextmanager
def made_folder(folder: Path) -> Iterator[None]:
    """``folder`` and its missing parents made for the block; if the block fails, those it made go again once
    empty (a run of several steps, each claiming its own output inside, leaves no folder behind)."""
    created = _create_parents(folder)
    try:
        yield
    except BaseException:
        _remove_if_empty(created)
        raise


@contextlib.contextmanager
def new_files(folder: Path) -> Iterator[list[Path]]:
    """``folder`` (made with its missing parents) for files the block writes, each listed before it is written;
    if the block fails, those files and the folders made for them go: the folder keeps only what it held."""
    written: list[Path] = []
    with made_folder(folder):
        try:
            yield written
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists (use `overwrite` to replace it)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``, replacing a previous output only at the last moment."""
    mode = 0o777 & ~_umask()
    for path in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        path.chmod(mode)
    try:
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}{RETIRED_MARK}", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot move the finished output into place ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def staged_folder(
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    on_failure: Sequence[Callable[[BaseException], None]] = (),
) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``out``; it becomes ``out`` only if the block completes.

    A failure or kill leaves ``out`` as it was (absent, or the previous complete output), never a
    half-written folder under the final name; a killed run's staging folder is removed by the next run.
    ``on_failure`` (read when a failure happens, so it may grow in the block) cleans up what else the run
    made beside the output, before the parents it created are removed.
    """
    with claimed(out, inputs) as out:
        refuse_existing(out, overwrite)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from exc
        try:
            yield staging
            _publish(staging, out)
        except BaseException as failure:
            shutil.rmtree(staging, ignore_errors=True)
            for clean_up in on_failure:
                clean_up(failure)
            raise
