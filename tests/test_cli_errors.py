"""`python -m at`: our error types become one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from at import models
from at.__main__ import _is_user_error
from at.params import ParamsError

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
    result = subprocess.run([sys.executable, "-m", "at", "--params", str(tmp_path / "nope.yaml"), "runs"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.yaml'} not found: "
                                                  f"run from the repository root or pass --params"]

