"""The training loop: exact resume after SIGKILL and SIGTERM, MLflow continuity, clear failures."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from at import checkpoint
from at.train import EXIT_INTERRUPTED, learning_rate

REPO = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"images_per_s", "epoch_time_s"}


def _train_cmd(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "train",
            "--out", str(out), "--id", "test-run", "--data-dir", str(data_dir),
            "--train-subset", "256", "--test-subset", "128", "--batch-size", "32",
            "--lr-drops", "2", "--threads", "1", "--no-progress", *extra]


def _env(mlflow_uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar_mini_dir):
    tmp = tmp_path_factory.mktemp("teacher")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    out = tmp / "teacher"
    subprocess.run(_train_cmd(out, cifar_mini_dir, "--student", "wrn-10-2", "--epochs", "1"),
                   env=_env(uri), check=True, cwd=tmp)
    return out / "checkpoint.pt"


def _student_cmd(out, cifar_mini_dir, teacher, epochs="3", batch="32"):
    return _train_cmd(out, cifar_mini_dir, "--student", "wrn-10-1", "--teacher-checkpoint", str(teacher),
                      "--method", "at-sum-p2", "--epochs", epochs, "--batch-size", batch)


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def _assert_same_result(a: Path, b: Path) -> None:
    wa, wb = checkpoint.load(a / "checkpoint.pt")["model"], checkpoint.load(b / "checkpoint.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ at {k}"
    assert _history(a) == _history(b)


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("attention-transfer/custom")  # runs trained from arguments
    return client, client.search_runs([exp.experiment_id])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended (status {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("protocol_name, split", [
    # the authors' torchnet hook fires on the 1-based epoch before its increment: their
    # [60, 120, 160] gives lr 0.1 for 59 epochs, then 60, 40 and 41 epochs at the lower rates
    ("cifar", [59, 60, 40, 41]),
    ("cifar_flip", [59, 60, 40, 41]),
    # imagenet.py: [30, 60, 90] through the same hook, 100 epochs
    ("imagenet", [29, 30, 30, 11]),
])
def test_learning_rate_schedule_matches_the_authors_epoch_split(protocol_name, split):
    from at import params as params_mod
    protocol = params_mod.protocol(params_mod.load(REPO / "params.yaml"), protocol_name)
    rates = [learning_rate(protocol, epoch) for epoch in range(protocol["epochs"])]
    runs = [len(list(group)) for _, group in __import__("itertools").groupby(rates)]
    assert runs == split
    assert rates[0] == protocol["lr"]
    assert rates[-1] == pytest.approx(protocol["lr"] * protocol["lr_gamma"] ** 3)


def test_momentum_restarts_at_the_drops_where_the_protocol_says_so(cifar_mini_dir):
    from at.member import Member
    from at.precision import Arithmetic
    from at.data import sources
    from test_cohort import make_spec   # noqa: the spec builder of the cohort tests

    arithmetic = Arithmetic(torch.device("cpu"), "float32")
    for reset in (True, False):
        spec = make_spec(Path("unused"), cifar_mini_dir, "wrn-10-1", "baseline", epochs=3, lr_drops=[1],
                         reset_momentum_at_drops=reset)
        data = sources.load(spec, torch.device("cpu"))
        member = Member(spec, data, None, arithmetic, None)
        x, y = next(data.train_batches(torch.arange(32), 0, 32, torch.Generator().manual_seed(0)))
        member.train_step(x, y, None)                  # epoch 0: momentum buffers now exist
        before = member.optimizer
        member.epoch, member.step = 1, 0               # the drop epoch starts
        member.train_step(x, y, None)
        assert (member.optimizer is not before) == reset
        assert member.optimizer.param_groups[0]["lr"] == pytest.approx(spec["protocol"]["lr"] * 0.2)


@pytest.mark.slow
def test_sigkill_then_restart_is_bit_identical_and_continues_the_mlflow_run(tmp_path, cifar_mini_dir, teacher):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = _env(uri)
    reference = tmp_path / "reference"
    subprocess.run(_student_cmd(reference, cifar_mini_dir, teacher, batch="8"), env=env, check=True, cwd=tmp_path)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_student_cmd(killed, cifar_mini_dir, teacher, batch="8"), env=env, cwd=tmp_path)
    _wait_for(killed / "last.pt", proc)   # the first epoch's checkpoint exists: we are in epoch 2
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint.pt").exists()
    assert checkpoint.load(killed / "last.pt")["epoch"] == 1, "the kill must land inside epoch 2"
    subprocess.run(_student_cmd(killed, cifar_mini_dir, teacher, batch="8"), env=env, check=True, cwd=tmp_path)

    _assert_same_result(reference, killed)
    assert checkpoint.load(killed / "last.pt")["epoch"] == 3, "last.pt stays as the run's final state"
    client, runs = _mlflow_runs(uri)
    mine = [r for r in runs if r.info.artifact_uri and r.data.tags.get("at.run_id") == "test-run"
            and r.data.params.get("out_dir") == str(killed)]
    assert len(mine) == 1, "the restart must continue the same MLflow run"
    run = mine[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_error")]
    assert sorted(steps) == [1, 2, 3], f"each epoch logged exactly once, got {steps}"
    for key in ("train_loss", "loss_ce", "loss_at", "lr", "train_error"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    tags = run.data.tags
    for key in ("student", "teacher", "method", "seed", "data_md5", "git_commit", "checkpoint_path"):
        assert tags.get(key), f"tag {key} missing"
    assert tags["student"] == "wrn-10-1" and tags["teacher"] == "wrn-10-2" and tags["method"] == "at-sum-p2"


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_the_retry_resumes_exactly(tmp_path, cifar_mini_dir, teacher):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = _env(uri)
    reference = tmp_path / "reference"
    # epoch 2 has 128 steps of 8 images (seconds): a signal 0.5 s after epoch 1's checkpoint
    # lands inside it, and the test fails (instead of passing on another path) if it did not
    more = ["--train-subset", "1024"]
    subprocess.run(_student_cmd(reference, cifar_mini_dir, teacher, epochs="2", batch="8") + more, env=env,
                   check=True, cwd=tmp_path)

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_student_cmd(stopped, cifar_mini_dir, teacher, epochs="2", batch="8") + more, env=env,
                            cwd=tmp_path)
    _wait_for(stopped / "last.pt", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED
    saved = checkpoint.load(stopped / "last.pt")
    assert saved["epoch"] == 1 and 0 < saved["step"] < 128, "SIGTERM must save mid-epoch, where it stopped"
    subprocess.run(_student_cmd(stopped, cifar_mini_dir, teacher, epochs="2", batch="8") + more, env=env, check=True,
                   cwd=tmp_path)
    _assert_same_result(reference, stopped)
    client, runs = _mlflow_runs(uri)
    mine = [r for r in runs if r.data.params.get("out_dir") == str(stopped)]
    assert len(mine) == 1 and mine[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(mine[0].info.run_id, "test_error")) == [1, 2]


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path, cifar_mini_dir):
    out = tmp_path / "diverging"
    result = subprocess.run(_train_cmd(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1", "--lr", "1e30"),
                            env=_env(f"sqlite:///{tmp_path / 'mlruns.db'}"), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "loss became nan" in result.stderr.lower() or "loss became inf" in result.stderr.lower()
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("content, message", [
    (b"definitely not a checkpoint", "corrupt"),
    (None, "not an attention-transfer checkpoint"),
])
def test_bad_teacher_checkpoint_is_a_clear_error(tmp_path, cifar_mini_dir, content, message):
    bad = tmp_path / "teacher.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(1)}}, bad)   # a foreign, well-formed file
    else:
        bad.write_bytes(content)
    result = subprocess.run(_train_cmd(tmp_path / "s", cifar_mini_dir, "--student", "wrn-10-1",
                                       "--teacher-checkpoint", str(bad), "--method", "kd", "--epochs", "1"),
                            env=_env(f"sqlite:///{tmp_path / 'mlruns.db'}"), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and str(bad) in result.stderr


def test_untrusted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "at-checkpoint", "version": 1, "x": Evil()}, bad)
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.load(bad)


def test_checkpoint_save_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"spec": {"id": "x"}, "model": {"w": torch.arange(3.0)}}, path)
    assert checkpoint.load(path)["model"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "no temporary file may stay behind"


def test_resume_state_of_a_changed_spec_is_discarded_not_mixed(tmp_path, cifar_mini_dir):
    env = _env(f"sqlite:///{tmp_path / 'mlruns.db'}")
    out = tmp_path / "run"
    first = _train_cmd(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "2")
    subprocess.run(first, env=env, cwd=tmp_path, check=True, capture_output=True)
    # leave a resume state behind as a killed run would, then change the spec (the lr); the
    # outputs go, as Snakemake deletes them before re-running a job
    final = checkpoint.load(out / "checkpoint.pt")
    for name in ("checkpoint.pt", "metrics.json", "history.csv"):
        (out / name).unlink()
    stale = dict(final, spec={**final["spec"], "protocol": {**final["spec"]["protocol"], "lr": 0.5}})
    checkpoint.save(stale, out / "last.pt")
    result = subprocess.run(first, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "discarding" in result.stdout and "protocol" in result.stdout
    assert "epoch 1/2" in result.stdout, "the run must start from epoch 1, not resume the stale state"


def test_a_teacher_given_to_a_method_without_one_is_refused(tmp_path, cifar_mini_dir, teacher):
    out = tmp_path / "s"
    result = subprocess.run(_train_cmd(out, cifar_mini_dir, "--student", "wrn-10-1", "--teacher-checkpoint",
                                       str(teacher), "--epochs", "1"),
                            env=_env(f"sqlite:///{tmp_path / 'mlruns.db'}"), cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "uses no teacher" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists(), "nothing may be left behind"


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_a_device_this_machine_lacks_is_one_clear_line(tmp_path, cifar_mini_dir, device):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "s"
    result = subprocess.run(_train_cmd(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1",
                                       "--device", device),
                            env=_env(f"sqlite:///{tmp_path / 'mlruns.db'}"), cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--device {device}" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("make_bad", ["file", "readonly"])
def test_an_output_folder_that_cannot_be_written_is_one_clear_line(tmp_path, cifar_mini_dir, make_bad):
    if make_bad == "file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
        expected = "is not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o500)
        out = parent / "run"
        expected = "cannot create output folder"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    result = subprocess.run(_train_cmd(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1"),
                            env=_env(uri), cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert expected in result.stderr and str(out) in result.stderr
    assert not (tmp_path / "mlruns.db").exists() or not _mlflow_runs(uri)[1], "no MLflow run may be left RUNNING"
