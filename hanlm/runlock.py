"""One writer per run directory: a lock file that names its holder.

`<run_dir>/.lock` is held with `flock` for as long as a training run writes there, and holds
the writer's pid, host and start time so that a second `hanlm train` on the same directory can
say who has it. The kernel drops an flock when its process dies, so a lock left by a killed
run is simply taken over; the file's text is only for the message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hanlm.errors import HanlmError

LOCK_NAME = ".lock"


class RunLockedError(HanlmError):
    """Another live process is writing into the same run directory."""


class RunLock:
    """The lock of one run directory, held from `acquire()` until `release()` or process exit."""

    def __init__(self, run_dir: str | os.PathLike, key: str = "train.run_dir"):
        self.path = Path(run_dir) / LOCK_NAME
        self.key = key  # the config key that named the directory, for messages
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunLockedError naming the holder, at once (no waiting)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise HanlmError(f"cannot create the run's lock file {self.path} ({e.strerror}); is {self.key} "
                             "a writable directory?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                                 f"finish or stop it, or give this run another {self.key}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up; the file stays (removing it would race with a process about to lock it)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:  # a run object dropped without release() gives its lock up too
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(text: bytes) -> str:
    try:
        info = json.loads(text)
        return f"pid {int(info['pid'])} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError, RecursionError):
        return "holder unknown"
