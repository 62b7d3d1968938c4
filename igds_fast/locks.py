"""One writer per output folder: an OS file lock on FOLDER/.igds_lock, held for the whole run.

    with hold_folder(out, "--out", log):     # refused in one line while another process holds it
        ...                                  # every write into `out`

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on FOLDER/.igds_lock, whose content is the holder's PID
and start time. The kernel drops a flock when the process ends, however it ends (SIGKILL, an
out-of-memory kill, a power cut's reboot), so a lock can never outlive its holder:

* a second writer is refused at once: "FOLDER is being written by process PID (started ...)";
* a clean release removes the file (while still locked), so a finished folder holds no lock file;
* a file left with a PID in it is the lock of a holder that was killed: the next run gets the lock
  (the kernel released it), says in one line that it takes it over, and writes its own PID.

Removing the file on release is safe against a writer that opened it just before: after its flock
succeeds, a writer checks that the name still points at the file it locked, and starts again if not.

Within one process the lock is re-entrant (a registry by real path): `distill --select s3` holds the
candidates folder and then runs distill() on it, which takes the same lock again. Under torchrun,
rank 0 takes the lock (distill prepares the folder on rank 0 while the others wait) and the other
ranks work under it without taking it. Forked children (DataLoader workers) share the lock's open
file, so it stays held while they live; they end with their parent.

Where fcntl does not exist (Windows), `msvcrt.locking` locks the file's first byte instead; there the
file is emptied rather than removed on release.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

from .errors import IGDSDiskFullError, IGDSInputError
from .imageio import DISK_FULL_ERRNOS

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

LOCK_NAME = ".igds_lock"

# real path of the folder -> [file descriptor, holds, created the folder]
_HELD: dict[str, list] = {}


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _read_holder(fd: int) -> str:
    """The holder record in the lock file ("PID started ..."), "" when empty or unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _describe(record: str) -> str:
    """'process 1234 (started 2026-01-02 03:04:05)' from a lock record."""
    pid, _, started = record.partition(" ")
    return f"process {pid} (started {started})" if pid.isdigit() else "another process"


def _make_folder(folder: str) -> bool:
    """Create `folder` (and its parents) if missing; True when this call created it."""
    if os.path.isdir(folder):
        return False
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise IGDSDiskFullError(os.path.dirname(os.path.abspath(folder))) from exc
        raise  # cli.main says it in one line, with what to do for the common errnos
    return True


def _acquire(folder: str, flag: str, log: Callable[[str], None] | None) -> int:
    """The locked file descriptor of FOLDER/.igds_lock, holding this process's record."""
    path = os.path.join(folder, LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise IGDSDiskFullError(folder) from exc
            raise IGDSInputError(f"cannot write in {folder}: {exc.strerror}") from exc
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise IGDSInputError(f"{folder} is being written by {_describe(holder)}; wait for it to end or choose "
                                 f"another {flag} (one writer per folder)")
        if fcntl is not None:
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file on release between our open and our lock: start again
                os.close(fd)
                continue
        left = _read_holder(fd)
        if left and log is not None:
            log(f"{folder}: taking over the lock of {_describe(left)}, which ended without releasing it")
        record = f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, record)
        os.fsync(fd)
        return fd


def _release(folder: str, fd: int, created: bool) -> None:
    path = os.path.join(folder, LOCK_NAME)
    if fcntl is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still locked: no other writer can hold this file now
        os.close(fd)  # drops the flock
    else:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)
    if created:  # a run refused after it made the folder leaves nothing behind (rmdir: only when empty)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def hold_folder(folder: str, flag: str = "--out", log: Callable[[str], None] | None = None) -> Iterator[str]:
    """Hold the write lock of `folder` (created if missing) for the `with` block; yields the folder.

    A one-line IGDSInputError naming the holder's PID when another process holds it. Re-entrant in
    one process. A folder this call created is removed again at release when it is still empty.
    """
    key = os.path.realpath(folder)
    entry = _HELD.get(key)
    if entry is not None:
        entry[1] += 1
    else:
        created = _make_folder(folder)
        try:
            fd = _acquire(folder, flag, log)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise
        entry = _HELD[key] = [fd, 1, created]
    try:
        yield folder
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            _release(folder, entry[0], entry[2])


def holds(folder: str) -> bool:
    """Whether this process holds the lock of `folder`."""
    return os.path.realpath(folder) in _HELD


__all__ = ["LOCK_NAME", "hold_folder", "holds"]
