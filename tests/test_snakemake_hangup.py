"""Snakemake in a terminal that closes (a lost SSH session, a closed window): the login shell
gets SIGHUP and passes it to its foreground job, Snakemake and the training process it runs.
Snakemake leaves no lock behind (workflow/Snakefile takes SIGHUP as Ctrl-C), the training
process saves its position (at.train), and the same command resumes the run in the same MLflow
run. A real interactive bash in a real pseudo-terminal, real Snakemake, in a copy of the
repository (tests/pipeline_repo.py)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import time
from pathlib import Path

import pytest
import yaml

from at import checkpoint
from in_process import default_signals
from pipeline_repo import _env, _sh, copy_repository

TEACHER = "runs/ci/cifar10/wrn-16-2/baseline/seed0"
# the teacher of the ci profile and the download before it, as a user asks for one target
COMMAND = ["snakemake", "--snakefile", "workflow/Snakefile", "--cores", "1", f"{TEACHER}/checkpoint.pt",
           "--config", "profile=ci"]


def _take_terminal() -> None:
    default_signals()   # a suite run under nohup or in the background ignores SIGHUP/SIGINT
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)   # after setsid: the pseudo-terminal is the session's


@pytest.mark.slow
def test_a_closed_terminal_leaves_no_snakemake_lock_and_the_same_command_resumes(tmp_path):
    root = copy_repository(tmp_path / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    # a teacher long enough to be caught training: 64 steps of 32 images, two epochs
    params["profiles"]["ci"]["protocol"].update(epochs=2, batch_size=32, train_subset=2048)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    master, child = pty.openpty()
    shell = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], cwd=root, env={**_env(root), "PS1": "$ "},
                             stdin=child, stdout=child, stderr=child, start_new_session=True,
                             preexec_fn=_take_terminal)
    os.close(child)
    os.write(master, (" ".join(COMMAND) + "\n").encode())
    shown = bytearray()

    def show(until, seconds):
        # what the terminal shows, read so that nothing writing to it ever blocks
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline and shell.poll() is None, shown.decode(errors="replace")
            if select.select([master], [], [], 0.05)[0]:
                shown.extend(os.read(master, 65536))

    show((root / TEACHER / "mlflow_run_id").exists, 300)   # the teacher is about to train
    moment = time.monotonic() + 0.5
    show(lambda: time.monotonic() > moment, 5)
    os.close(master)
    shell.wait(timeout=30)
    end = time.monotonic() + 120
    while _running(root):   # Snakemake and its job end by themselves, in seconds
        assert time.monotonic() < end, "Snakemake or its job still runs 2 min after the terminal closed"
        time.sleep(0.5)
    locks = root / ".snakemake" / "locks"
    assert not locks.exists() or not list(locks.iterdir()), list(locks.iterdir())
    saved = checkpoint.load(root / TEACHER / "last.pt")
    assert saved["epoch"] == 0 and 0 < saved["step"] < 64, "the teacher saved its position mid-epoch"
    run_id = (root / TEACHER / "mlflow_run_id").read_text().strip()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=_env(root)["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "KILLED"
    # (Snakemake's own "Terminating processes on user request" line is not checked: under load its
    # log may end before it is written; the lock, the saved position and KILLED are the claims)

    again = _sh(COMMAND, root, timeout=600)
    assert "cannot be locked" not in again.stdout + again.stderr
    log = (root / "logs" / "train" / "ci" / "cifar10" / "wrn-16-2" / "seed0" / "cohort0.log").read_text()
    assert f"resuming from {TEACHER}/last.pt at epoch 1, step {saved['step']}" in log, log
    assert (root / TEACHER / "mlflow_run_id").read_text().strip() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"


def _running(root: Path) -> bool:
    """Whether a process still runs in ``root`` (Snakemake or its job), by /proc's working folders."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == root:
                return True
        except OSError:
            continue
    return False
