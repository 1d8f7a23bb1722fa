"""The lines a person watches: each finished epoch, a resume, a finish, an error.

``python -m at train --log FILE`` sends the whole output of the process (progress bars,
warnings, these lines) to FILE and keeps only these lines on the terminal, so that Snakemake's
console shows one line per finished epoch of each running job instead of minutes of silence,
while the job's log keeps everything. (The ranks of a data-parallel run are started by their
launcher, torchrun or srun, which passes on its output but no other file: their lines go to the
log only.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

_echo: TextIO | None = None   # the terminal, while the process's own output goes to a log file


def say(text: str) -> None:
    print(text, flush=True)
    if _echo is not None:
        _echo.write(text + "\n")
        _echo.flush()


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
