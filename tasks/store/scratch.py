"""Per-run local scratch folders that never outlive their run for long, even when the run is SIGKILLed.

A run spills its listing and state buckets to a local folder (`TMPDIR`). A context manager removes it on every exit
that runs code, but SIGKILL, the OOM killer or a lost node run nothing, and such a folder would stay forever. So
each folder holds an OS lock that the kernel drops when its process dies — `flock` on a lock file inside it, kept
open for the folder's life — and the next run sweeps every `docroute-run-*` folder whose lock it can take: the
owner is gone. A live run's lock cannot be taken, so its folder is never touched, whichever process sweeps.

`flock` (not `fcntl`/`lockf` record locks) on purpose: its locks belong to the open file, so a sweep in the very
process that owns a folder also sees it as held, and the lock is released only when the last descriptor closes.
The lock file is created under a temporary name, locked, then renamed into place, so no sweeper can ever find the
lock file unlocked while its owner lives; a folder without one is either being created right now (skipped while
young) or was left by a version before these locks (stale).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt locks instead
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "docroute-run-"
LOCK_NAME = ".docroute-run.lock"
UNLOCKED_GRACE_S = 60.0
"""A folder without a lock file younger than this may be one whose owner is between creating it and locking it."""
CAN_LOCK = fcntl is not None or msvcrt is not None
"""Without any OS lock a dead owner cannot be told from a live one: folders are then removed on exit, never swept."""
_DELETE_WHILE_OPEN = os.name != "nt"
"""POSIX removes a folder while we still hold its lock file open (and locked); Windows refuses to delete open files."""


def _lock_nonblocking(fd: int) -> bool:
    """Take the exclusive lock on an open lock file without waiting; False when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            return False  # no OS lock to tell a dead owner from a live one: never claim a folder
    except OSError:
        return False
    return True


def _remove_tree(path: Path) -> bool:
    """Remove a folder, tolerating entries that vanish meanwhile (a racing sweep); True when it is gone.

    Never raises: cleanup must not turn a finished run into a failed one, and whatever stays is swept later.
    """

    def report(function: Callable[..., object], name: str, error: BaseException) -> None:
        if not isinstance(error, FileNotFoundError):
            log.warning("could not remove %s from scratch folder %s: %s", name, path, error)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=report)
    else:  # onerror is deprecated from 3.12 on
        shutil.rmtree(path, onerror=lambda function, name, info: report(function, name, info[1]))
    return not path.exists()


def _create_locked(root: Path) -> tuple[Path, int]:
    """Create a scratch folder under root whose lock file is locked by the returned descriptor before it appears."""
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=root))
    fd = -1
    try:
        staging = folder / f"{LOCK_NAME}.{os.getpid()}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if CAN_LOCK and not _lock_nonblocking(fd):
            raise OSError(f"could not lock the new scratch folder {folder}")
        staging.replace(folder / LOCK_NAME)  # a sweeper sees the lock file only once it is locked
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _remove_tree(folder)
        raise
    return folder, fd


@contextlib.contextmanager
def run_scratch(root: Path | None = None) -> Iterator[Path]:
    """A fresh `docroute-run-*` folder under root (default: the temporary folder) for one run's local spills.

    The folder is removed on every exit that runs code (return, exception, KeyboardInterrupt, SystemExit); when the
    process is killed outright, its lock dies with it and `sweep_stale_scratch` removes the folder later.
    """
    folder, fd = _create_locked(Path(root) if root is not None else Path(tempfile.gettempdir()))
    try:
        yield folder
    finally:
        try:
            if _DELETE_WHILE_OPEN:
                _remove_tree(folder)  # still locked: no sweep can work on it at the same time
        finally:
            os.close(fd)
            if folder.exists():
                _remove_tree(folder)


def _remove_if_stale(folder: Path, now: float) -> bool:
    """Remove one scratch folder if no live process holds its lock; True when this call removed it."""
    try:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            return False  # not a folder we made (a file, a symlink) or another user's run
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if not CAN_LOCK or not folder.exists() or now - info.st_mtime < UNLOCKED_GRACE_S:
                return False  # vanished, or its owner is between creating and locking it
            return _remove_tree(folder)  # left by a version without locks: its run is long over
        try:
            if not _lock_nonblocking(fd):
                return False  # a live run
            if _DELETE_WHILE_OPEN:
                _remove_tree(folder)  # while we hold the lock, so no other sweep works on it at the same time
        finally:
            os.close(fd)
        return _remove_tree(folder) if folder.exists() else True
    except FileNotFoundError:
        return False  # removed by its owner or another sweep meanwhile
    except OSError as error:  # permissions, a lock file that is not a file…: not ours to judge
        log.warning("left scratch folder %s alone: %s", folder, error)
        return False


def sweep_stale_scratch(root: Path | None = None) -> int:
    """Remove the scratch folders of runs that died without cleaning up; returns how many were removed.

    Never raises: a failed sweep costs disk space, not the run that calls it.
    """
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    try:
        candidates = [Path(e.path) for e in os.scandir(base) if e.name.startswith(SCRATCH_PREFIX)]
    except OSError as error:
        log.warning("could not sweep stale scratch folders in %s: %s", base, error)
        return 0
    now = time.time()
    removed = sum(_remove_if_stale(folder, now) for folder in candidates)
    if removed:
        log.info("removed %d scratch folder(s) of dead docroute runs from %s", removed, base)
    return removed
