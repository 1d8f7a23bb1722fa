"""The lines a person watches: each finished epoch, a resume, a finish, an error.

``python -m at train --log FILE`` sends the whole output of the process (progress bars,
warnings, these lines) to FILE and keeps only these lines on the terminal, so that Snakemake's
console shows one line per finished epoch of each running job instead of minutes of silence,
while the job's log keeps everything. (The ranks of a data-parallel run are started by their
launcher, torchrun or srun, which passes on its output but no other file: their lines go to the
log only.)
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TextIO

_echo: TextIO | None = None   # the terminal, while the process's own output goes to a log file


def say(text: str) -> None:
    _write(sys.stdout, text)
    if _echo is not None:
        _write(_echo, text)


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text + "\n")
        stream.flush()
    except OSError as e:
        if e.errno not in (errno.EIO, errno.EPIPE):
            raise
        # the terminal closed (a write after its SIGHUP fails with EIO) or the reader of a pipe
        # went (EPIPE): nobody can read this stream any more. It is pointed at /dev/null, so that
        # neither this line nor the next (nor Python's flush at exit) stops a run that is saving
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
            stream.flush()
        except (OSError, ValueError):
            pass


def log_to(path: str | os.PathLike) -> None:
    """Redirect this process's stdout and stderr (file descriptors 1 and 2, so that what C
    libraries and child processes write goes there too) to ``path``, truncated; :func:`say`
    keeps writing to the terminal they were. Missing folders of ``path`` are created, as
    Snakemake does for a rule's log."""
    global _echo
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _echo = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
