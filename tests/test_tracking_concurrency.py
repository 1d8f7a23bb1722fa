"""MLflow under many concurrent jobs: no lost runs or metrics, no "database is locked" failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from at.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
JOBS = 16
EPOCHS = 2


@pytest.mark.slow
def test_16_concurrent_training_processes_all_complete_in_one_sqlite_store(tmp_path, cifar_mini_dir, mlflow_store):
    """16 processes, each making one training run's MLflow calls (tests/tracking_writer.py: the
    RunTracker calls of at.train, without the arithmetic between them, so they all hit the store
    within the same seconds). A real training process's calls reach the store through the same
    RunTracker: tests/test_pipeline.py's MLflow checks, after Snakemake ran the jobs in parallel."""
    from mlflow.tracking import MlflowClient

    uri = mlflow_store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    # what the Snakefile's onstart does before the fan-out
    subprocess.run([sys.executable, "-m", "at", "tracking-init", "--profile", "custom"], env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    procs = []
    for i in range(JOBS):
        spec = RunSpec.resolve({
            "id": f"concurrent/run{i}", "dataset": "cifar10", "data_dir": str(cifar_mini_dir), "student": "wrn-10-1",
            "method_name": "baseline", "method": {"terms": [{"type": "ce"}]}, "seed": i,
            "out_dir": str(tmp_path / f"run{i}"), "profile": "custom",
            "protocol": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2}})
        spec_file = tmp_path / f"spec{i}.json"
        spec_file.write_text(json.dumps(spec.to_dict()))
        cmd = [sys.executable, str(REPO / "tests" / "tracking_writer.py"), str(spec_file), str(EPOCHS)]
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
        assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}, run_id
