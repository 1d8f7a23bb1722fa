"""One writer per run folder: an OS lock held for as long as a process trains the run.

Two processes training one run (two ``python -m at train --cohort`` typed in two terminals, a
Snakemake job and a hand-started run) would each take the other's live MLflow run for an orphan
and interleave their states. Each run folder therefore has a lock file, ``.lock``, locked with
``flock`` (exclusive, non-blocking) before anything in the folder is read or written. The kernel
releases the lock when its process ends, however it ends: a SIGKILL leaves the file, never a
stale lock. The file holds the holder's pid and host, so the second process can say who has it.

The lock file is opened without following a symbolic link and must be a plain file with no
other name: a ``.lock`` that links to (or is a hard link of) a file elsewhere would have that
file truncated and overwritten with the pid; a folder or a FIFO cannot be a lock. Each is
refused in one line, and the file as it was is left alone.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """A run's lock cannot be taken: nothing in its folder was read or written."""


class RunLocked(LockError):
    """Another process holds a run's lock."""


def _open(run_id: str, path: Path) -> int:
    """The lock file's descriptor, opened without following a link; LockError unless ``path``
    is (or can be created as) a plain file of one name."""
    refused = f"run {run_id}: its lock file {path}"
    try:
        # O_NONBLOCK: a FIFO in its place opens at once (and is refused below) instead of waiting
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise LockError(f"{refused} is a symbolic link (to {os.readlink(path)}): a lock is never "
                            f"followed, and its target was left as it is; remove the link") from None
        if os.path.isdir(path):
            raise LockError(f"{refused} is a folder: move it aside (the run's lock is a file)") from None
        raise LockError(f"{refused} cannot be opened: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a plain file: move it aside (the run's lock is a file)"
    elif info.st_nlink > 1:
        problem = (f"is a hard link ({info.st_nlink} names for one file): writing the lock would change "
                   f"the other names' file too, which was left as it is; remove {path}")
    else:
        return fd
    os.close(fd)
    raise LockError(f"{refused} {problem}")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        return f"pid {text[0]} on host {text[1]}" if len(text) >= 2 else "another process"
    except OSError:
        return "another process"


@contextmanager
def hold(run_dirs: dict[str, Path]):
    """Lock every run folder of ``run_dirs`` ({run id: folder}) for the ``with`` block, or raise
    :class:`RunLocked` naming the first run that another process holds, :class:`LockError` for a
    lock file that is not a plain file (and nothing is locked)."""
    held: list[int] = []
    try:
        for run_id, folder in run_dirs.items():
            path = Path(folder) / LOCK_NAME
            fd = _open(run_id, path)
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
