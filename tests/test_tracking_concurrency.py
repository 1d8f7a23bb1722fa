"""MLflow under many concurrent jobs: no lost runs or metrics, no "database is locked" failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = 16
EPOCHS = 2


@pytest.mark.slow
def test_16_concurrent_training_processes_all_complete_in_one_sqlite_store(tmp_path, cifar_mini_dir, mlflow_store):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    # what the Snakefile's onstart does before the fan-out
    subprocess.run([sys.executable, "-m", "at", "tracking-init", "--profile", "custom"], env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    procs = []
    for i in range(JOBS):
        cmd = [sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "train",
               "--student", "wrn-10-1", "--out", str(tmp_path / f"run{i}"), "--id", f"concurrent/run{i}",
               "--data-dir", str(cifar_mini_dir), "--seed", str(i), "--epochs", str(EPOCHS),
               "--train-subset", "64", "--test-subset", "64", "--batch-size", "32", "--lr-drops", "",
               "--threads", "1", "--no-progress"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    failed = [(i, p.returncode, out[-2000:]) for i, (p, out) in enumerate(zip(procs, outputs)) if p.returncode]
    assert not failed, failed

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("attention-transfer/custom")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_id = {r.data.tags["at.run_id"]: r for r in runs}
    assert sorted(by_id) == sorted(f"concurrent/run{i}" for i in range(JOBS)), "one run per job, none lost"
    assert len(runs) == JOBS
    for run_id, run in by_id.items():
        assert run.info.status == "FINISHED", run_id
        for key in ("test_error", "train_error", "train_loss", "loss_ce", "lr", "images_per_s"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (run_id, key, steps)
        assert "final_test_error" in run.data.metrics, run_id
