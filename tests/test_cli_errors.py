"""`python -m at`: our error types become one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from at import models
from at.__main__ import _is_user_error
from at.params import ParamsError
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]


def _raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the exception itself is what the test inspects
        return e
    raise AssertionError(f"{call} raised nothing")


def test_our_errors_are_user_errors():
    assert _is_user_error(ParamsError("params.yaml: x: bad"))
    assert _is_user_error(_raised(lambda: models.build("wrn-7-1")))  # our validation's ValueError


def test_bugs_are_not_user_errors():
    assert not _is_user_error(_raised(lambda: {}["missing"]))
    assert not _is_user_error(_raised(lambda: np.zeros((2, 2)).reshape(3)))  # a library's ValueError
    assert not _is_user_error(_raised(lambda: None + 1))


def test_missing_params_file_is_one_line(tmp_path):
    result = run_cli(["--params", str(tmp_path / "nope.yaml"), "runs"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.yaml'} not found: "
                                                  f"run from the repository root or pass --params"]



def test_a_listing_piped_into_a_reader_that_leaves_early_ends_quietly():
    """`python -m at runs --profile paper | head` is how a user skims the grid: when the reader
    closes the pipe, the command stops without a traceback and exits 128 + SIGPIPE, as a Unix
    filter does. A real process: only a real pipe breaks. The read end is closed before the
    command starts writing, so every write finds it closed."""
    import signal
    import subprocess
    import sys

    command = subprocess.Popen([sys.executable, "-m", "at", "runs", "--profile", "paper"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()
    stderr = command.stderr.read().decode()
    assert command.wait(timeout=120) == 128 + signal.SIGPIPE, stderr
    assert stderr == ""
