"""The pipeline itself on a real SLURM cluster, through the repository's unchanged `slurm` profile.

- End to end: the `ci` grid (the smallest smoke grid) with `snakemake --cores 8 --profile slurm`
  from the root of a copy of the repository; every training job is a SLURM job with a GPU
  (sacct), the results and the report are there, MLflow holds one finished run per run.
- Preemption, in the same Snakemake run: the teacher's job gets SIGTERM from
  `scancel --signal=TERM` inside its epoch; it saves its position, exits non-zero, Snakemake's
  retry resumes it mid-epoch, and nothing is lost or counted twice (the epoch once in the
  history and in the one MLflow run).

Opt-in (AT_TEST_SLURM=1, root): see conftest.py.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from at import checkpoint, grid, params as params_io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_repo import _env, copy_repository  # noqa: E402  (the same copy as the local e2e)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _env_for(cluster, root: Path) -> dict:
    env = _env(root)
    env["AT_SLURM_PARTITION"] = cluster.partition
    return env


def _jobs_since(cluster, start: str) -> list[dict]:
    fields = "JobID,JobName,State,ExitCode,AllocTRES"
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", start, "-o", fields],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    jobs = [dict(zip(fields.split(","), line.split("|"))) for line in out.splitlines() if line]
    # the Snakemake SLURM plugin names every job of a workflow run after the run's UUID; other
    # jobs (the harness's start-up probe) are not ours
    return [j for j in jobs if re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", j["JobName"])]


def _mlflow_runs(root: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("attention-transfer/ci")
    return client, client.search_runs([experiment.experiment_id], "tags.`at.run_id` != ''", max_results=1000)


def test_ci_grid_runs_as_slurm_gpu_jobs_and_a_preempted_job_resumes_without_loss_or_double_count(
        slurm_cluster, tmp_path):
    """One Snakemake run of the ci grid through SLURM (each SLURM job costs tens of seconds of
    scheduling and polling, so both claims share it): every training job is a SLURM job with a
    GPU, and the teacher's job, preempted inside its second epoch, is retried and resumes."""
    root = copy_repository(tmp_path / "repo")
    # an epoch long enough to be caught inside it: 32 steps of 16 images (several seconds; short
    # enough that the jobs end between the SLURM plugin's early status checks, which back off by
    # 10 s each)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profiles"]["ci"]["protocol"].update({"epochs": 1, "train_subset": 512, "batch_size": 16})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the grid as `python -m at runs --profile ci [--cohorts]` lists it, read in this process
    copied = params_io.load(root / "params.yaml")
    runs, cohorts = grid.runs(copied, "ci"), grid.cohorts(copied, "ci")
    # the WRN-16-2 teacher, then its five students together
    assert [len(c.runs) for c in cohorts] == [5, 1], cohorts
    teacher_id = "cifar10/wrn-16-2/baseline/seed0"
    teacher_dir = root / "runs" / "ci" / teacher_id
    start = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    time.sleep(1)
    proc = slurm_cluster.snakemake(root, "--config", "profile=ci", timeout_s=900, env=_env_for(slurm_cluster, root))

    # wait until the teacher's job is about to train (its MLflow run id is written right before
    # the first step; the SIGTERM handler is in place by then), then preempt it a moment later,
    # inside the epoch
    deadline = time.time() + 600
    while not (teacher_dir / "mlflow_run_id").exists():
        assert proc.poll() is None, (root / "snakemake.out").read_text()[-4000:]
        assert time.time() < deadline, "the training job never started training"
        time.sleep(0.2)
    time.sleep(1.0)
    running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(running) == 1, running
    subprocess.run(["scancel", "--signal=TERM", running[0]], check=True)

    rc = proc.wait(timeout=960)
    out = (root / "snakemake.out").read_text()
    assert rc == 0, out[-6000:]
    # download and report are local rules; every training job went through SLURM, with a GPU:
    # the teacher's (preempted: FAILED), its retry, then the students' cohort
    jobs = _jobs_since(slurm_cluster, start)
    assert [j["State"] for j in jobs] == ["FAILED", "COMPLETED", "COMPLETED"], jobs
    for job in jobs:
        assert "gres/gpu=1" in job["AllocTRES"].split(","), job
    for run in runs:
        assert (root / run.out_dir / "metrics.json").is_file(), run.id
        assert checkpoint.load(root / run.out_dir / "last.pt")["epoch"] == 1, "the final state stays"
    assert (root / "results" / "ci" / "table2.md").is_file()

    log = (root / "logs" / "train" / "ci" / "cifar10" / "wrn-16-2" / "seed0" / "cohort0.log").read_text()
    # Snakemake deletes the failed attempt's log; the retry's says where it resumed: inside the
    # epoch (step > 0), where SIGTERM saved it; never from scratch
    assert re.search(r"resuming from .*last\.pt at epoch 1, step [1-9]\d*", log), log[-3000:]
    with open(teacher_dir / "history.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [1], "the epoch exactly once"

    client, mlflow_runs = _mlflow_runs(root)
    assert sorted(r.data.tags["at.run_id"] for r in mlflow_runs) == sorted(r.id for r in runs)
    assert all(r.info.status == "FINISHED" for r in mlflow_runs)
    teacher = [r for r in mlflow_runs if r.data.tags["at.run_id"] == teacher_id]
    assert len(teacher) == 1, "the retry continues the same MLflow run"
    steps = sorted(m.step for m in client.get_metric_history(teacher[0].info.run_id, "test_error"))
    assert steps == [1], steps
