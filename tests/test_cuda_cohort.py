"""A cohort on a CUDA GPU: a real process killed with SIGKILL, restarted, every member resumed.

Marked ``cuda``: skipped without a GPU, run by ``make gpu-check`` (``pytest -m cuda``). On the
GPU, bf16 and cuDNN's algorithm choice make runs not bit-identical to a solo run (the CPU tests
in test_cohort.py check that); what is checked here is that the resume state saved on the GPU
(CUDA random states, the data stream's CUDA generator, optimizer state) brings every member back
where it stood and that the finished runs are complete.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from at import checkpoint

# the CPU cohort tests' helpers and their private MLflow store per test (the trained teacher is
# the session's, tests/conftest.py)
from test_cohort import _cli, _env, _spec_file, make_spec, private_mlflow  # noqa: F401

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EPOCHS = 3


def test_a_cohort_killed_on_the_gpu_resumes_every_member(tmp_path, cifar_mini_dir, teacher):
    # the whole mini set (5085 images, 159 batches of 32) so that an epoch lasts long enough for
    # the kill to land inside one
    specs = [make_spec(tmp_path / "cohort" / name, cifar_mini_dir, "wrn-10-1", method,
                       teacher if method != "baseline" else None, epochs=EPOCHS, train_subset=None,
                       test_subset=None, precision="auto")
             for name, method in (("baseline", "baseline"), ("at", "at-sum-p2"), ("kd", "kd"))]
    spec_file = _spec_file(tmp_path / "cohort.yaml", specs)
    proc = subprocess.Popen(_cli(spec_file, "--device", "cuda"), env=_env(tmp_path), cwd=tmp_path)
    last = [Path(s["out_dir"]) / "last.pt" for s in specs]
    deadline = time.time() + 600
    while not all(p.exists() for p in last):
        assert proc.poll() is None, "the cohort ended before saving its first epoch"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "the cohort finished before it could be killed: give it more work"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = [checkpoint.load(p) for p in last]
    # a kill between two members' saves leaves them an epoch apart: the trainer replays the
    # stream for the one behind, so either is a valid state to resume from
    assert {s["epoch"] for s in saved} <= {1, 2} and all(s["step"] == 0 for s in saved)
    assert not any((Path(s["out_dir"]) / "metrics.json").exists() for s in specs)

    done = subprocess.run(_cli(spec_file, "--device", "cuda"), env=_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("resuming from") == 3

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    for spec, before in zip(specs, saved):
        out = Path(spec["out_dir"])
        final = checkpoint.load(out / "checkpoint.pt")
        # the epochs trained before the kill are kept as they were, not trained again
        assert final["history"][:before["epoch"]] == before["history"]
        assert [row["epoch"] for row in final["history"]] == list(range(1, EPOCHS + 1))
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["precision"] == "bf16", "precision auto is bf16 on CUDA"
        assert metrics["final_epoch"] == EPOCHS and math.isfinite(metrics["final_test_error"])
        assert all(math.isfinite(row["train_loss"]) for row in final["history"])
        run_id = (out / "mlflow_run_id").read_text().strip()
        assert client.get_run(run_id).info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run_id, "test_error")) == list(range(1, EPOCHS + 1))
