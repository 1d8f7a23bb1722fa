"""A cohort in a real process killed with SIGKILL, or stopped with SIGTERM as SLURM preempts a
job, with Ctrl-C (SIGINT) or by closing its terminal (SIGHUP, a real pseudo-terminal hung up):
only a real process proves what a signal does to it. Every other resume path is proven
in-process, at an exact step, in tests/test_cohort.py (a run alone is a cohort of one)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest

from at import checkpoint
from at.train import EXIT_INTERRUPTED, Options, train, train_cohort
from in_process import default_signals
from test_cohort import _cli, _env, _main, _spec_file, assert_same_run, make_spec, private_mlflow, relocate  # noqa: F401


@pytest.mark.slow
def test_a_cohort_process_killed_mid_epoch_resumes_every_member_exactly(tmp_path, cifar_mini_dir, teacher, capsys):
    # a kill anywhere in epoch 2 resumes from the state saved at the end of epoch 1 (nothing is
    # saved mid-epoch without SIGTERM): 16 steps of 16 images leave the kill room to land there
    specs = [make_spec(tmp_path / "cohort" / name, cifar_mini_dir, "wrn-10-1", method, teacher if method != "baseline"
                       else None, epochs=2, train_subset=256, batch_size=16)
             for name, method in (("baseline", "baseline"), ("at", "at-sum-p2"), ("kd", "kd"))]
    spec_file = _spec_file(tmp_path / "cohort.yaml", specs)
    proc = subprocess.Popen(_cli(spec_file), env=_env(tmp_path), cwd=tmp_path)
    last = [Path(s["out_dir"]) / "last.pt" for s in specs]
    deadline = time.time() + 600
    while not all(p.exists() for p in last):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [checkpoint.load(p)["epoch"] for p in last] == [1, 1, 1], "the kill must land inside epoch 2"
    # the restart needs no process of its own: what it reads is what the killed one left
    status, printed = _main(spec_file, capsys)
    assert status == 0
    assert printed.count("resuming from") == 3

    for spec in relocate(specs, tmp_path / "alone"):
        train(spec, Options(progress=False, threads=1))
    for spec in specs:
        assert_same_run(Path(spec["out_dir"]), tmp_path / "alone" / Path(spec["out_dir"]).name)
    assert [checkpoint.load(p)["epoch"] for p in last] == [2, 2, 2], "last.pt stays as the run's final state"
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("attention-transfer/custom")
    for spec in specs:
        run_id = (Path(spec["out_dir"]) / "mlflow_run_id").read_text().strip()
        # (the runs trained alone above share the ids, in other folders)
        mine = [r.info.run_id for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("at.run_id") == spec["id"] and r.data.params.get("out_dir") == spec["out_dir"]]
        assert mine == [run_id], "the restart must continue the same MLflow run"
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run_id, "test_error")) == [1, 2], \
            "each epoch logged exactly once"
        logged = ("train_loss", "lr", "train_error", "test_error_top5") + (("loss_ce", "loss_at") if "at" in
                                                                              spec["method_name"] else ())
        for key in logged:
            assert len(client.get_metric_history(run_id, key)) == 2, key
        tags = run.data.tags
        for key in ("student", "teacher", "method", "seed", "data_md5", "git_commit", "checkpoint_path"):
            assert tags.get(key), f"tag {key} missing"
        assert (tags["student"], tags["method"]) == ("wrn-10-1", spec["method_name"])
        assert tags["teacher"] == ("wrn-10-2" if spec["teacher"] else "none")


@pytest.mark.slow
def test_sigterm_saves_every_member_mid_epoch_and_exits_for_a_retry(tmp_path, cifar_mini_dir, teacher):
    specs = [make_spec(tmp_path / name, cifar_mini_dir, "wrn-10-1", method, teacher if method != "baseline" else None,
                       epochs=1, train_subset=512)
             for name, method in (("baseline", "baseline"), ("at", "at-sum-p2"))]
    spec_file = _spec_file(tmp_path / "cohort.yaml", specs)
    proc = subprocess.Popen(_cli(spec_file), env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    # the MLflow run ids appear once training is about to start (the SIGTERM handler is in place
    # by then); epoch 1 has 16 steps, the flag is read after each
    ids = [Path(s["out_dir"]) / "mlflow_run_id" for s in specs]
    while not all(p.exists() for p in ids):
        assert proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED
    saved = [checkpoint.load(Path(s["out_dir"]) / "last.pt") for s in specs]
    positions = {(s["epoch"], s["step"]) for s in saved}
    assert len(positions) == 1 and 0 < saved[0]["step"] < 16, f"expected one mid-epoch position, got {positions}"
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert {client.get_run(p.read_text().strip()).info.status for p in ids} == {"KILLED"}
    # the retry (in this process: exactness from a mid-epoch state is proven in-process above)
    # continues each member's MLflow run from where SIGTERM left it, and finishes it
    train_cohort(specs, Options(progress=False, threads=1))
    for spec, id_file in zip(specs, ids):
        run_id = id_file.read_text().strip()
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "test_error")] == [1]
        assert json.loads((Path(spec["out_dir"]) / "metrics.json").read_text())["final_epoch"] == 1


def _take_terminal() -> None:
    # in the child, after setsid (start_new_session): its stdin, a pseudo-terminal, becomes its
    # controlling terminal, as a login shell's is
    default_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _drain(master: int, until, timeout: float) -> bytes:
    """What the terminal shows until ``until()`` holds (read, so that the process never blocks on
    a full terminal); fails after ``timeout`` s."""
    shown = bytearray()
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, shown.decode(errors="replace")
        if select.select([master], [], [], 0.05)[0]:
            shown += os.read(master, 65536)
    return bytes(shown)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGHUP"])
def test_ctrl_c_and_a_closed_terminal_save_like_sigterm_and_the_same_command_resumes_the_same_mlflow_run(
        how, tmp_path, cifar_mini_dir, teacher, capsys):
    specs = [make_spec(tmp_path / name, cifar_mini_dir, "wrn-10-1", method, teacher if method != "baseline" else None,
                       epochs=1, train_subset=512)
             for name, method in (("baseline", "baseline"), ("at", "at-sum-p2"))]
    spec_file = _spec_file(tmp_path / "cohort.yaml", specs)
    ids = [Path(s["out_dir"]) / "mlflow_run_id" for s in specs]
    started = lambda: all(p.exists() for p in ids)   # noqa: E731 - training is about to start
    if how == "SIGINT":
        # Ctrl-C: the terminal sends SIGINT to the process in its foreground
        proc = subprocess.Popen(_cli(spec_file), env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=default_signals)
        while not started():
            assert proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        printed, _ = proc.communicate(timeout=120)
    else:
        # the terminal closes: a real pseudo-terminal, the process its session's leader (as a login
        # shell is), hung up by closing its other side; the kernel sends SIGHUP, and what the
        # process writes to the terminal afterwards fails (EIO). What it said is in its --log.
        master, child = pty.openpty()
        log = tmp_path / "train.log"
        proc = subprocess.Popen(_cli(spec_file, "--log", str(log)), env=_env(tmp_path), cwd=tmp_path, stdin=child,
                                stdout=child, stderr=child, start_new_session=True, preexec_fn=_take_terminal)
        os.close(child)
        _drain(master, lambda: started() or proc.poll() is not None, 300)
        end = time.monotonic() + 0.3
        _drain(master, lambda: time.monotonic() > end, 5)
        os.close(master)
        proc.wait(timeout=120)
        printed = log.read_text()
    signum = getattr(signal, how)
    assert proc.returncode == 128 + signum, printed
    saved = [checkpoint.load(Path(s["out_dir"]) / "last.pt") for s in specs]
    positions = {(s["epoch"], s["step"]) for s in saved}
    assert len(positions) == 1 and 0 < saved[0]["step"] < 16, f"expected one mid-epoch position, got {positions}"
    step = saved[0]["step"]
    # (before training, each network's execution says what auto chose: at.execution)
    assert "Traceback" not in printed and [line for line in printed.splitlines()
                                           if line.strip() and not line.startswith("execution: ")] == [
        f"[{s['id']}] {how}: saved {Path(s['out_dir']) / 'last.pt'} at epoch 1, step {step}; the same command "
        f"resumes it" for s in specs], printed
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    run_ids = [p.read_text().strip() for p in ids]
    assert [client.get_run(r).info.status for r in run_ids] == ["KILLED"] * len(specs), "stopped, not failed"

    # the same command (in this process: the same code) resumes each member where it stood, in
    # the same MLflow run, and ends as an uninterrupted run does
    status, resumed = _main(spec_file, capsys)
    assert status == 0 and resumed.count(f"at epoch 1, step {step}") == len(specs), resumed
    assert [p.read_text().strip() for p in ids] == run_ids
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "test_error")] == [1]
    for spec in relocate(specs, tmp_path / "alone"):
        train(spec, Options(progress=False, threads=1))
    for spec in specs:
        assert_same_run(Path(spec["out_dir"]), tmp_path / "alone" / Path(spec["out_dir"]).name)
