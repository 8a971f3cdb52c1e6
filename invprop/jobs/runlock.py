"""One writer per run directory: an exclusive lock that a launch (or, under SLURM, the training job's rank 0)
holds while it writes there, so a second launch on the same out_dir is refused instead of training beside it.

The lock is `flock` on `<run dir>/.writer.lock` (released by the kernel when the holder exits, however it
exits: a killed launch never leaves a stale lock); the file says who holds it, for the refusal's one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from invprop.config import ConfigError

LOCK_NAME = ".writer.lock"


class RunLock:
    """Held from `acquire` until `release` or the end of the process."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, role: str) -> RunLock:
        """Take the lock or raise ConfigError naming the holder (one line, before anything is written)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"out_dir={self.path.parent}: cannot write there ({exc.strerror or exc}); choose "
                              "another out_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise ConfigError(f"out_dir={self.path.parent} is in use by {holder}; wait for it to end (or stop "
                              "it), or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "role": role,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)[:300]}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another launch"
    return (f"another {info.get('role', 'launch')} (pid {info.get('pid')} on {info.get('host')} since "
            f"{info.get('since')})")
