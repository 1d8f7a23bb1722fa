"""Data-parallel runs in real processes: torchrun, two ranks, gloo on the CPU.

One cohort (KD from a teacher with `sync_bn: true`, a baseline with `sync_bn: false`) of two
epochs of 6 steps of 16 images (8 per rank) is trained four times, in four launches:

- uninterrupted, started as `python -m at train` in one process, which starts its two ranks
  with torchrun (through at.launch; the module-scoped fixture: the reference of every test here);
- stopped by SIGTERM sent to rank 1 alone mid-epoch 1, restarted with `torchrun`, killed with
  SIGKILL (the whole process group, as a job is killed) mid-epoch 2, restarted to the end:
  bit-identical to the uninterrupted run.

Two runs of their own, started as `python -m at train`, end early: rank 1 killed with SIGKILL
mid-epoch, and the launcher alone sent SIGTERM; one line from each process, no traceback.

Against the same cohort trained in one process (in this process): with `sync_bn` the two
processes compute the one-process run up to float rounding (tolerances below); without it,
each rank's BatchNorm normalises over its own 8 images, and the run is another run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from at import checkpoint
from at.train import EXIT_INTERRUPTED, Options, train_cohort
from test_cohort import REPO, _history, _spec_file, assert_same_run, make_spec, relocate   # noqa: the cohort tests' helpers

pytestmark = pytest.mark.slow

PROTOCOL = {"epochs": 2, "batch_size": 16, "train_subset": 96, "test_subset": 32, "processes": 2}
STEPS = 6   # per epoch: 96 images in batches of 16

# How close a 2-process run with sync_bn stays to the one-process run of the same seed after
# 12 steps (CPU, float32): every weight within ATOL + RTOL * |w|, every epoch's mean train loss
# within LOSS_RTOL. Only the order of the float sums differs (the batch statistics summed over
# two ranks, the gradients averaged over two); measured: weights within 1e-5 absolute,
# losses within 3e-7 relative. Without sync_bn the losses differ by more than NO_SYNC_LOSS_DIFF.
ATOL, RTOL, LOSS_RTOL = 1e-4, 1e-3, 1e-5
NO_SYNC_LOSS_DIFF = 1e-3


def _cohort(root: Path, data_dir: Path, teacher: Path) -> list[dict]:
    return [make_spec(root / "kd_sync", data_dir, "wrn-10-1", "kd", teacher, sync_bn=True, **PROTOCOL),
            make_spec(root / "plain", data_dir, "wrn-10-1", "baseline", sync_bn=False, **PROTOCOL)]


def _command(spec_file: Path) -> list[str]:
    return ["--params", str(REPO / "params.yaml"), "train", "--spec", str(spec_file), "--threads", "1",
            "--no-progress", "--device", "cpu"]


def _torchrun(spec_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "at",
            *_command(spec_file)]


@pytest.fixture(scope="module")
def root(tmp_path_factory, mlflow_template) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("ddp")
    shutil.copy(mlflow_template, root / "mlruns.db")
    return root


def _env(root: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def uninterrupted(root, cifar_mini_dir, teacher) -> tuple[list[dict], str]:
    """The cohort trained on two processes without interruption; (specs, the command's output)."""
    specs = _cohort(root / "whole", cifar_mini_dir, teacher)
    spec_file = _spec_file(root / "whole.yaml", specs)
    done = subprocess.run([sys.executable, "-m", "at", *_command(spec_file)], env=_env(root), cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return specs, done.stdout + done.stderr


def _max_excess(got: dict, ref: dict) -> tuple[float, float]:
    """(max |got - ref| over the floating tensors, max of |got - ref| - RTOL * |ref|)."""
    worst_abs, worst_excess = 0.0, -float("inf")
    for key, r in ref.items():
        if not r.is_floating_point():
            continue
        diff = (got[key].double() - r.double()).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_excess = max(worst_excess, float((diff - RTOL * r.double().abs()).max()))
    return worst_abs, worst_excess


def test_two_processes_with_sync_bn_compute_the_one_process_run(uninterrupted, root):
    specs, output = uninterrupted
    assert "-m at.launch" in output and "--nproc-per-node=2" in output, \
        "python -m at train must have started its two ranks itself"
    one = relocate(specs, root / "one")
    for spec in one:
        spec["protocol"] = {**spec["protocol"], "processes": 1}
    torch.set_num_threads(1)
    train_cohort(one, Options(device="cpu", progress=False, threads=1, tracking=False))
    for two_spec, one_spec in zip(specs, one):
        two = checkpoint.load(Path(two_spec["out_dir"]) / "checkpoint.pt")
        ref = checkpoint.load(Path(one_spec["out_dir"]) / "checkpoint.pt")
        worst_abs, worst_excess = _max_excess(two["model"], ref["model"])
        losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(two["history"], ref["history"], strict=True)]
        print(f"{two_spec['id']} sync_bn={two_spec['protocol']['sync_bn']}: max |dw| {worst_abs:.3g}, "
              f"epoch losses 2 processes / 1 process {losses}")
        if two_spec["protocol"]["sync_bn"]:
            assert worst_excess <= ATOL, f"weights differ by up to {worst_abs}"
            assert all(abs(a - b) <= LOSS_RTOL * abs(b) for a, b in losses), losses
        else:
            # each rank's BatchNorm saw 8 images, not 16: another run, not a rounding away
            assert any(abs(a - b) > NO_SYNC_LOSS_DIFF for a, b in losses), losses
            assert worst_excess > ATOL


def test_one_run_one_record_written_by_rank_0(uninterrupted, root):
    from mlflow.tracking import MlflowClient

    specs, _ = uninterrupted
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("attention-transfer/custom")
    for spec in specs:
        out = Path(spec["out_dir"])
        # .outputs: the kept copies of the outputs (at.member); spec.json: what they are for (at.outdated)
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".outputs", "checkpoint.pt", "history.csv",
                                                         "last.prev.pt", "last.pt", "metrics.json", "mlflow_run_id",
                                                         "spec.json"]
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["train_size"], metrics["final_epoch"]) == (96, 2)
        state = checkpoint.load(out / "last.pt")
        assert len(state["ranks"]) == 2 and all(r["partial"] is None for r in state["ranks"])
        runs = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("at.run_id") == spec["id"] and r.data.params.get("out_dir") == spec["out_dir"]]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["protocol.processes"] == "2"
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "test_error")] == [1, 2]


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child process with RANK=<rank>)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} appeared")


def _wait_for(condition, launcher: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert launcher.poll() is None, f"the run ended ({launcher.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _epoch_of(path: Path) -> int | None:
    try:
        return checkpoint.load(path)["epoch"]
    except (FileNotFoundError, checkpoint.CheckpointError):
        return None


def test_sigterm_on_one_rank_and_sigkill_of_the_job_resume_bit_identical(uninterrupted, root):
    specs, _ = uninterrupted
    stopped = relocate(specs, root / "stopped")
    spec_file = _spec_file(root / "stopped.yaml", stopped)
    outs = [Path(s["out_dir"]) for s in stopped]

    # 1. SIGTERM to rank 1 only, once training has started: both ranks save once and exit 143
    with open(root / "sigterm.log", "w") as log:
        launcher = subprocess.Popen(_torchrun(spec_file), env=_env(root), cwd=root, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        rank1 = _worker(launcher, 1)
        _wait_for(lambda: all((o / "mlflow_run_id").exists() for o in outs), launcher, "training started")
        time.sleep(0.5)
        os.kill(rank1, signal.SIGTERM)
        launcher.wait(timeout=300)
    printed = (root / "sigterm.log").read_text()
    assert launcher.returncode != 0
    # each rank stops by itself (torchrun then reports the first to exit and may SIGTERM the
    # other while it is shutting down, which changes nothing: rank 0 has saved)
    for rank in (0, 1):
        assert f"rank {rank} of 2: stopped by SIGTERM, position saved by rank 0; exiting {EXIT_INTERRUPTED}" \
            in printed, printed[-3000:]
    saved = [checkpoint.load(o / "last.pt") for o in outs]
    positions = {(s["epoch"], s["step"]) for s in saved}
    assert len(positions) == 1 and 0 < saved[0]["step"] < STEPS, f"expected one mid-epoch position, got {positions}"
    assert all(len(s["ranks"]) == 2 and s["ranks"][1]["partial"]["seen"] == 8 * s["step"] for s in saved)
    assert printed.count("SIGTERM: saved") == len(outs), "rank 0 alone writes, once per run"

    # 2. restarted, then the whole job killed with SIGKILL during epoch 2
    with open(root / "sigkill.log", "w") as log:
        launcher = subprocess.Popen(_torchrun(spec_file), env=_env(root), cwd=root, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: all(_epoch_of(o / "last.pt") == 1 for o in outs), launcher, "epoch 1 ended")
        time.sleep(0.3)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    assert "resuming from" in (root / "sigkill.log").read_text()
    assert [_epoch_of(o / "last.pt") for o in outs] == [1, 1], "the kill must land inside epoch 2"

    # 3. restarted to the end: the same run, bit for bit, as the uninterrupted one
    done = subprocess.run(_torchrun(spec_file), env=_env(root), cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for spec, out in zip(specs, outs):
        assert_same_run(Path(spec["out_dir"]), out)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    for out in outs:
        run_id = (out / "mlflow_run_id").read_text().strip()
        assert client.get_run(run_id).info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run_id, "test_error")) == [1, 2], \
            "one MLflow run, each epoch logged once"


def test_a_grid_run_on_two_processes_starts_with_run_and_log(root, cifar_mini_dir):
    """The way docs/cluster.md and the Snakefile start a run of the grid, `python -m at train --run ID
    --profile P --log FILE`, for a protocol of two processes: the command launches its ranks
    (torchrun here), whose parser never sees --run or --log (at.distributed.RANK_ARGV)."""
    import yaml

    work = root / "grid"
    (work / "data").mkdir(parents=True)
    (work / "data" / "cifar10").symlink_to(cifar_mini_dir)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["ddp"] = {
        "tables": ["table2"], "rows": {"table2": ["none"]}, "seeds": [0],
        "protocol": {"epochs": 1, "lr_drops": [], "batch_size": 16, "train_subset": 32, "test_subset": 32,
                     "processes": 2, "precision": "float32"},
        "not_run": {name: "not in this test" for name in params["tables"] if name != "table2"}}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_id = "cifar10/wrn-16-1/baseline/seed0"
    done = subprocess.run([sys.executable, "-m", "at", "train", "--run", run_id, "--profile", "ddp",
                           "--log", "logs/ddp.log", "--threads", "1", "--device", "cpu", "--no-progress"],
                          env=_env(root), cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ambiguous option" not in done.stderr
    log = (work / "logs" / "ddp.log").read_text()
    assert f"{run_id}: 2 processes: " in log and "-m at.rank" in log, log[-3000:]
    metrics = json.loads((work / "runs" / "ddp" / run_id / "metrics.json").read_text())
    assert metrics["final_epoch"] == 1 and metrics["train_size"] == 32


def test_a_rank_killed_mid_epoch_ends_the_run_in_one_line_per_process(root, cifar_mini_dir):
    """SIGKILL to rank 1 while it trains (`python -m at train` started the ranks, as a user's
    command or a Snakemake job does): the surviving rank says in one line that it stops, the
    launcher names the rank that died and exits with its status, and nobody prints a traceback."""
    specs = [make_spec(root / "killed" / "plain", cifar_mini_dir, "wrn-10-1", "baseline", sync_bn=False,
                       **{**PROTOCOL, "epochs": 3, "train_subset": 256})]
    spec_file = _spec_file(root / "killed.yaml", specs)
    out = Path(specs[0]["out_dir"])
    with open(root / "killed.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "at", *_command(spec_file)], env=_env(root), cwd=root,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rank1 = _worker(launcher, 1)
            _wait_for(lambda: (out / "mlflow_run_id").exists(), launcher, "training started")
            time.sleep(0.5)
            os.kill(rank1, signal.SIGKILL)
            launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    printed = (root / "killed.log").read_text()
    assert launcher.returncode == 128 + signal.SIGKILL, printed[-3000:]
    assert "Traceback" not in printed, printed[-5000:]
    errors = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: rank 0 of 2: another rank of the run is gone (killed, crashed or out of memory), so this one "
        "stops too, without saving",
        f"error: rank 1 of 2 was killed by SIGKILL (pid {rank1}), the first of the run's processes to end; the "
        "others were stopped: started again, the run resumes from its last saved state"], printed[-3000:]
    assert not (out / "metrics.json").exists()


def test_sigterm_to_the_launcher_stops_the_ranks_with_their_position_in_one_line_each(root, cifar_mini_dir):
    """SIGTERM to the launcher alone (`python -m at train`, now torchrun through at.launch): it
    passes the signal to the ranks, which save and say so; it says so in one line and exits 143,
    as the run in one process would, without torchrun's traceback."""
    specs = [make_spec(root / "terminated" / "plain", cifar_mini_dir, "wrn-10-1", "baseline", sync_bn=False,
                       **{**PROTOCOL, "epochs": 3, "train_subset": 256})]
    spec_file = _spec_file(root / "terminated.yaml", specs)
    out = Path(specs[0]["out_dir"])
    with open(root / "terminated.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "at", *_command(spec_file)], env=_env(root), cwd=root,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _worker(launcher, 1)
            _wait_for(lambda: (out / "mlflow_run_id").exists(), launcher, "training started")
            time.sleep(0.5)
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    printed = (root / "terminated.log").read_text()
    assert launcher.returncode == EXIT_INTERRUPTED, printed[-3000:]
    assert "Traceback" not in printed, printed[-5000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2: stopped by SIGTERM, position saved by rank 0; exiting {EXIT_INTERRUPTED}" \
            in printed, printed[-3000:]
    assert [line for line in printed.splitlines() if line.startswith("error: ")] == [
        "error: torchrun received SIGTERM and passed it to the 2 ranks (each says whether its position was saved)"]
