"""at.console: `--log FILE` sends the process's output to FILE and keeps the watched lines on the
terminal. A subprocess, because log_to redirects file descriptors 1 and 2 of its process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_log_in_folders_not_made_yet_is_written_and_the_terminal_keeps_the_watched_lines(tmp_path):
    log = tmp_path / "logs" / "train" / "new-profile" / "teacher.log"
    script = ("import os, sys\nfrom at import console\n"
              f"console.log_to({str(log)!r})\n"
              "print('to the log'); sys.stdout.flush(); os.write(2, b'stderr too\\n')\n"
              "console.say('epoch 1/1 done')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # the watched line is in the log too, where it sits among the rest
    assert log.read_text() == "to the log\nstderr too\nepoch 1/1 done\n"
    assert done.stdout == "epoch 1/1 done\n" and done.stderr == ""
