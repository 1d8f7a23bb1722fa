"""`python -m at` in the test's own process (a helper module, not conftest: tests/slurm has a
conftest of its own, which a plain `from conftest import` picks up there)."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Ran:
    """What a command left: its exit status and what it printed (as subprocess.run's result)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], cwd: Path | None = None) -> Ran:
    """`python -m at ARGS` in this process, through the command's own `main`, from ``cwd``.

    The same code as the command without a process per call; tests that need a real process (a
    kill, a signal, a fresh interpreter importing the user's plugins) start one instead."""
    from at.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(args))
            except SystemExit as e:   # argparse's refusals
                status = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(before)
    return Ran(status, out.getvalue(), err.getvalue())


STOP_SIGNALS = ("SIGINT", "SIGHUP", "SIGTERM")


def default_signals() -> None:
    """A child process's stop signals as a terminal's foreground process has them (a
    ``preexec_fn``): a test suite started under ``nohup`` or as a background job has SIGHUP or
    SIGINT ignored, a child inherits that, and a run keeps a signal ignored at its start (as
    ``nohup`` asks), so a test of what a signal does must undo it."""
    import signal

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
