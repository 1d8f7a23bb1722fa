"""One writer per run folder: an OS lock held for as long as a process trains the run.

Two processes training one run (two ``python -m at train --cohort`` typed in two terminals, a
Snakemake job and a hand-started run) would each take the other's live MLflow run for an orphan
and interleave their states. Each run folder therefore has a lock file, ``.lock``, locked with
``flock`` (exclusive, non-blocking) before anything in the folder is read or written. The kernel
releases the lock when its process ends, however it ends: a SIGKILL leaves the file, never a
stale lock. The file holds the holder's pid and host, so the second process can say who has it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another process holds a run's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        return f"pid {text[0]} on host {text[1]}" if len(text) >= 2 else "another process"
    except OSError:
        return "another process"


@contextmanager
def hold(run_dirs: dict[str, Path]):
    """Lock every run folder of ``run_dirs`` ({run id: folder}) for the ``with`` block, or raise
    :class:`RunLocked` naming the first run that another process holds (and nothing is locked)."""
    held: list[int] = []
    try:
        for run_id, folder in run_dirs.items():
            path = Path(folder) / LOCK_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLocked(f"run {run_id} is being trained by {holder} (lock {path}): wait for it "
                                f"to end, or stop it; this process changed nothing") from None
            held.append(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        for fd in held:
            os.close(fd)   # closing the last descriptor releases the flock
