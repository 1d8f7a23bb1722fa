"""A data-parallel run as a real SLURM job: two tasks, started by `python -m at train` with srun.

The job is what the profile submits for a cohort with `processes: 2` (at.grid.job_resources:
`--ntasks=2`, the command run in the batch script itself): its one process finds no srun step
around it, starts `srun --ntasks=2 ...`, and the two tasks meet at the rendezvous they compute
from SLURM's variables (first host of SLURM_STEP_NODELIST, a port from the job id), then train
one run with gloo on the CPU. Opt-in (AT_TEST_SLURM=1, root): see conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from at import checkpoint, params as params_io

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AT_SHARED_DIR", REPO.parent / "shared"))


def test_a_two_task_job_trains_one_run_data_parallel_through_srun(slurm_cluster, tmp_path):
    from at.data import cifar

    cifar.prepare(tmp_path / "cifar", url=str(SHARED / "data" / "cifar10-mini-python.tar.gz"),
                  md5="1c190744c9595cc62078be24b4b038fb", progress=False)
    params = params_io.load(REPO / "params.yaml")
    protocol = params_io.protocol(params, "cifar")
    protocol.update({"epochs": 1, "batch_size": 16, "train_subset": 64, "test_subset": 32, "lr_drops": [],
                     "precision": "float32", "processes": 2, "sync_bn": True})
    out = tmp_path / "run"
    spec = {"id": "slurm/ddp", "dataset": "cifar10", "data_dir": str(tmp_path / "cifar"), "student": "wrn-10-1",
            "method_name": "baseline", "method": params_io.method(params, "baseline"), "seed": 0,
            "out_dir": str(out), "num_classes": 10, "protocol": protocol}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump([spec]))
    env = {**slurm_cluster.env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
           "PYTHONPATH": str(REPO)}
    command = (f"exec {sys.executable} -m at --params {REPO / 'params.yaml'} train --spec {tmp_path / 'spec.yaml'} "
               f"--device cpu --threads 1 --no-progress")
    done = subprocess.run(["sbatch", "--wait", "--parsable", "--ntasks=2", "--cpus-per-task=1", "-t", "10",
                           "-p", slurm_cluster.partition, f"--output={tmp_path / 'job.log'}", "--wrap", command],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert done.returncode == 0, f"{done.stderr}\n{log[-4000:]}"
    assert "srun --ntasks=2 --kill-on-bad-exit=1" in log, log[-4000:]
    job_id = done.stdout.strip().split(";")[0]
    steps = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,NTasks,State"], env=env,
                           capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert any(line.startswith(f"{job_id}.0|2|COMPLETED") for line in steps), steps
    state = checkpoint.load(out / "last.pt")
    assert len(state["ranks"]) == 2 and state["spec"]["protocol"]["processes"] == 2
    assert (out / "metrics.json").is_file() and (out / "checkpoint.pt").is_file()
