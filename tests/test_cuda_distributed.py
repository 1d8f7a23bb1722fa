"""A data-parallel run on CUDA GPUs: two ranks under torchrun with nccl, torch's SyncBatchNorm.

Marked ``cuda``: run by ``make gpu-check`` (``pytest -m cuda``); skipped with fewer than two
CUDA devices (nccl refuses two ranks on one GPU). In float32 the two-GPU run with ``sync_bn``
must stay close to the one-GPU run of the same seed (cuDNN's algorithms and the nccl sum order
are not the CPU's, and convolutions may run in TF32: hence far looser tolerances than
tests/test_distributed_processes.py's). Not yet run on a machine with two GPUs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from at import checkpoint
from at.train import Options, train
from test_cohort import REPO, _env, _spec_file, make_spec, private_mlflow  # noqa: F401

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (nccl: one rank per GPU)")]


def test_two_gpus_with_nccl_and_sync_bn_follow_the_one_gpu_run(tmp_path, cifar_mini_dir, teacher):
    protocol = {"epochs": 2, "batch_size": 32, "train_subset": 256, "test_subset": 128, "precision": "float32"}
    two = make_spec(tmp_path / "two", cifar_mini_dir, "wrn-10-1", "at-sum-p2", teacher, processes=2, sync_bn=True,
                    **protocol)
    spec_file = _spec_file(tmp_path / "two.yaml", [two])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "at", "--params", str(REPO / "params.yaml"), "train", "--spec", str(spec_file),
                           "--no-progress", "--device", "cuda"],
                          env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = make_spec(tmp_path / "one", cifar_mini_dir, "wrn-10-1", "at-sum-p2", teacher, **protocol)
    train(one, Options(device="cuda", progress=False))
    a, b = (checkpoint.load(Path(s["out_dir"]) / "checkpoint.pt") for s in (two, one))
    assert a["precision"] == "float32" and a["spec"]["protocol"]["processes"] == 2
    for key, ref in b["model"].items():
        if ref.is_floating_point():
            assert torch.allclose(a["model"][key], ref, atol=1e-2, rtol=5e-2), key
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-2 * abs(rb["train_loss"])
