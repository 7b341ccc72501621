"""One run per output directory: `lock_dir(output_dir)` takes `output_dir/.lock` for this process.

The lock is a POSIX record lock on that file (`fcntl.lockf`, exclusive, non-blocking), owned by this
process alone (processes forked from it, e.g. data-loader workers, do not share it) and held until
`release()` or the end of the process: the kernel drops it however the process ends, SIGKILL
included, so a killed run never blocks the next one. The file names its holder as JSON
{"pid", "host", "started"}, which is what a refused run reports. `release()` deletes the file, so a
file found with a free lock was left by a run that did not exit normally; the new run takes it over
and says whose it was. A run that opened the file just before its holder deleted it checks, once it
has the lock, that the file it locked is still the one at the path (else it starts over), so two
runs never both hold it. (A process must not open the lock file elsewhere: closing any descriptor
of a file drops the process's record locks on it.)

Without `fcntl` (not POSIX) the file is created exclusively instead; one left behind must then be
deleted by hand (the refusal says so).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:      # not POSIX
    fcntl = None

LOCK_FILE = ".lock"


def _owner(fd: int) -> dict | None:
    """The holder recorded in an open lock file, or None (empty, cut short or not ours)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        d = json.loads(os.read(fd, 4096).decode())
        return d if isinstance(d, dict) and {"pid", "host", "started"} <= d.keys() else None
    except (OSError, ValueError):
        return None


def _describe(owner: dict | None) -> str:
    return (f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}" if owner
            else "its pid, host and start time not written yet")


class RunLock:
    """The held lock of one output directory (from `lock_dir`); `release()` it at the end."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Delete the lock file, then drop the lock; a second call does nothing."""
        if self.path is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            if self.fd is not None:
                os.close(self.fd)
            self.path = self.fd = None


def _write_owner(fd: int) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)


def lock_dir(output_dir) -> tuple[RunLock, str | None]:
    """Take `output_dir/.lock` (creating the directory) for this process. Returns the lock and, when
    a run that ended without releasing it (killed) had left its name there, a note saying whose lock
    was taken over. A ValueError naming the directory and the holder (pid, host, start time) if
    another run holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    if fcntl is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = os.open(path, os.O_RDONLY)
            owner = _owner(fd)
            os.close(fd)
            raise ValueError(f"{output_dir} is in use by another run ({_describe(owner)}); if that run has "
                             f"ended, delete {path}") from None
        _write_owner(fd)
        os.close(fd)
        return RunLock(path, None), None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _owner(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise ValueError(f"{output_dir} is in use by another run ({_describe(owner)})") from None
            raise OSError(e.errno, f"cannot lock {path}: {e.strerror}") from None
        try:
            locked, now = os.fstat(fd), os.stat(path)
            same = (locked.st_dev, locked.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)        # the holder deleted it after we opened it: lock the new file
    previous = _owner(fd)
    _write_owner(fd)
    note = (f"{output_dir}: took over the lock of run pid {previous['pid']} on host {previous['host']} started "
            f"{previous['started']} (no longer running)") if previous else None
    return RunLock(path, fd), note
