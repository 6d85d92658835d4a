"""One process at a time in a run directory: an exclusive ``flock`` on ``<run>/.lock``.

The kernel drops the lock when its holder exits (even by SIGKILL), so a crashed run never
leaves a stale lock. The file names the holder (pid, host, command, start time) for the
error the second run prints. A process may take the same directory's lock again (the
count is kept here), so building two objects over one run in one process works.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from .errors import OmnimaskError

LOCK_NAME = ".lock"
_held: dict[str, list[int]] = {}  # realpath -> [fd, count]


class RunDirectoryBusy(OmnimaskError):
    """Another process holds the run directory's lock."""


class RunLock:
    def __init__(self, directory: str | os.PathLike, command: str | None = None) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / LOCK_NAME
        self.key = os.path.realpath(self.path)
        self.held = False
        if self.key in _held:
            _held[self.key][1] += 1
            self.held = True
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunDirectoryBusy(f"{d} is in use by {holder or 'another process'}; wait for "
                                   "it to finish or choose another output directory") from None
        what = command or " ".join(["omnimask", *sys.argv[1:]])[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({what})\n").encode(), 0)
        _held[self.key] = [fd, 1]
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.key]
            os.close(entry[0])  # closing the descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
