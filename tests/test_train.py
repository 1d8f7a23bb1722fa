"""The training loop from the command line: the learning-rate schedule, momentum at the drops,
and every failure a user can provoke with arguments, each one line on stderr with nothing left
behind. In-process through `python -m at`'s own `main` (the same code path as the command,
without a process per case); exact resume after a real SIGKILL and SIGTERM is proven on a
cohort with real processes in tests/test_cohort.py (a run alone is a cohort of one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from at import checkpoint
from at.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_mlflow(mlflow_store):
    """Each test's own MLflow store (conftest)."""


def _train(out: Path, data_dir: Path, *extra: str) -> int:
    """`python -m at train` with the tests' small protocol, in this process; its exit status."""
    return main(["--params", str(REPO / "params.yaml"), "train", "--out", str(out), "--id", "test-run",
                 "--data-dir", str(data_dir), "--train-subset", "256", "--test-subset", "128",
                 "--batch-size", "32", "--lr-drops", "2", "--threads", "1", "--no-progress", *extra])


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("attention-transfer/custom")  # runs trained from arguments
    return client, (client.search_runs([exp.experiment_id]) if exp is not None else [])


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
    from at.spec import Protocol
    protocol = Protocol.resolve(params_mod.protocol(params_mod.load(REPO / "params.yaml"), protocol_name))
    rates = [protocol.learning_rate(epoch) for epoch in range(protocol.epochs)]
    runs = [len(list(group)) for _, group in __import__("itertools").groupby(rates)]
    assert runs == split
    assert rates[0] == protocol.lr
    assert rates[-1] == pytest.approx(protocol.lr * protocol.lr_gamma ** 3)


def test_momentum_restarts_at_the_drops_where_the_protocol_says_so(cifar_mini_dir):
    from at.data.datasets import training_data
    from at.member import Member
    from at.precision import Arithmetic
    from at.spec import RunSpec
    from at.train import begin_epoch, train_step
    from test_cohort import make_spec   # noqa: the spec builder of the cohort tests

    arithmetic = Arithmetic(torch.device("cpu"), "float32")
    for reset in (True, False):
        spec = RunSpec.resolve(make_spec(Path("unused"), cifar_mini_dir, "wrn-10-1", "baseline", epochs=3,
                                         lr_drops=[1], reset_momentum_at_drops=reset))
        data = training_data(spec, torch.device("cpu"))
        member = Member(spec, data, None, arithmetic, None)
        x, y = next(data.train_batches(torch.arange(32), 0, 32, torch.Generator().manual_seed(0)))
        begin_epoch(member)
        train_step(member, x, y, None)                 # epoch 0: momentum buffers now exist
        before = member.optimizer
        member.epoch, member.step = 1, 0               # the drop epoch starts
        begin_epoch(member)
        train_step(member, x, y, None)
        assert (member.optimizer is not before) == reset
        assert member.optimizer.param_groups[0]["lr"] == pytest.approx(spec.protocol.lr * 0.2)


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path, cifar_mini_dir, capsys):
    out = tmp_path / "diverging"
    assert _train(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1", "--lr", "1e30") == 3
    err = capsys.readouterr().err.lower()
    assert "loss became nan" in err or "loss became inf" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("content, message", [
    (b"definitely not a checkpoint", "corrupt"),
    (None, "not an attention-transfer checkpoint"),
])
def test_bad_teacher_checkpoint_is_a_clear_error(tmp_path, cifar_mini_dir, content, message, capsys):
    bad = tmp_path / "teacher.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(1)}}, bad)   # a foreign, well-formed file
    else:
        bad.write_bytes(content)
    assert _train(tmp_path / "s", cifar_mini_dir, "--student", "wrn-10-1", "--teacher-checkpoint", str(bad),
                  "--method", "kd", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and err.count("\n") == 1


def test_untrusted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "at-checkpoint", "version": 1, "x": Evil()}, bad)
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.load(bad)


def test_checkpoint_save_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "folder" / "c.pt"
    checkpoint.save({"spec": {"id": "x"}, "model": {"w": torch.arange(3.0)}}, path)
    assert checkpoint.load(path)["model"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"], "no temporary file may stay behind"


def test_resume_state_of_a_changed_spec_is_discarded_not_mixed(tmp_path, cifar_mini_dir, capsys):
    out = tmp_path / "run"
    first = ("--student", "wrn-10-1", "--epochs", "2")
    assert _train(out, cifar_mini_dir, *first) == 0
    # leave a resume state behind as a killed run would, then change the spec (the lr); the
    # outputs go, as Snakemake deletes them before re-running a job
    final = checkpoint.load(out / "checkpoint.pt")
    for name in ("checkpoint.pt", "metrics.json", "history.csv"):
        (out / name).unlink()
    stale = dict(final, spec={**final["spec"], "protocol": {**final["spec"]["protocol"], "lr": 0.5}})
    checkpoint.save(stale, out / "last.pt")
    capsys.readouterr()
    assert _train(out, cifar_mini_dir, *first) == 0
    printed = capsys.readouterr().out
    assert "discarding" in printed and "protocol" in printed
    assert "epoch 1/2" in printed, "the run must start from epoch 1, not resume the stale state"


def test_a_teacher_given_to_a_method_without_one_is_refused(tmp_path, cifar_mini_dir, teacher, capsys):
    out = tmp_path / "s"
    assert _train(out, cifar_mini_dir, "--student", "wrn-10-1", "--teacher-checkpoint", str(teacher),
                  "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "uses no teacher" in err and err.count("\n") == 1
    assert not out.exists(), "nothing may be left behind"


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_a_device_this_machine_lacks_is_one_clear_line(tmp_path, cifar_mini_dir, device, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "s"
    assert _train(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1", "--device", device) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("make_bad", ["file", "readonly"])
def test_an_output_folder_that_cannot_be_written_is_one_clear_line(tmp_path, cifar_mini_dir, make_bad, capsys):
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
    assert _train(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert expected in err and str(out) in err and err.count("\n") == 1
    assert not (tmp_path / "mlruns.db").exists() or not _mlflow_runs(uri)[1], "no MLflow run may be left RUNNING"


def test_outputs_written_again_from_the_final_state_are_the_same_bytes(cifar_mini_dir, tmp_path, monkeypatch):
    """Snakemake and DVC delete a job's outputs before it runs: the members of a cohort that had
    finished are written again from their final state. Those outputs must be the bytes they were
    (so `dvc status` lists only what retrained), the commit they trained with included, even when
    the checkout is dirty now (an edit of params.yaml for another member)."""
    from at import member as member_mod

    out = tmp_path / "run"
    monkeypatch.setattr(member_mod, "git_commit", lambda: "1111111")
    assert _train(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1") == 0
    first = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.json", "history.csv")}
    for name in first:
        (out / name).unlink()
    monkeypatch.setattr(member_mod, "git_commit", lambda: "2222222-dirty")
    assert _train(out, cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1") == 0
    again = {name: (out / name).read_bytes() for name in first}
    assert [name for name in first if first[name] != again[name]] == []


def test_stop_signals_become_a_flag_an_ignored_one_stays_ignored_and_a_second_ctrl_c_stops_at_once():
    import signal
    import time

    from at.start import _StopFlag

    def deliver(signum):
        os.kill(os.getpid(), signum)
        time.sleep(0.01)   # Python runs a signal's handler between two bytecodes of the main thread

    # the stop signals as a terminal's foreground process has them (a suite run in the background
    # has SIGINT ignored), then SIGHUP ignored, as under nohup
    was = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _StopFlag() as flag:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            deliver(signal.SIGINT)
            assert (flag.raised, flag.signum) == (True, signal.SIGINT)
            deliver(signal.SIGTERM)   # a later signal of another kind: still the first one's stop
            assert flag.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                deliver(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "restored on exit"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)
        for signum, handler in was.items():
            signal.signal(signum, handler)


def test_a_second_ctrl_c_leaves_the_mlflow_run_killed_and_the_command_says_one_line(
        tmp_path, cifar_mini_dir, mlflow_store, capsys, monkeypatch):
    from at import train as train_mod
    from at.spec import RunSpec

    class SecondCtrlC:
        """The stop flag of a person who pressed Ctrl-C twice: the second raises where the loop is."""

        @property
        def raised(self):
            raise KeyboardInterrupt

    spec = RunSpec.resolve({"id": "twice", "dataset": "cifar10", "data_dir": str(cifar_mini_dir), "student": "wrn-10-1",
                            "method_name": "baseline", "method": {"terms": [{"type": "ce"}]}, "seed": 0,
                            "out_dir": str(tmp_path / "run"),
                            "protocol": {"epochs": 1, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2,
                                         "train_subset": 64, "test_subset": 64, "precision": "float32"}})
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_cohort([spec], train_mod.Options(device="cpu", progress=False, threads=1), stop=SecondCtrlC())
    client, runs = _mlflow_runs(mlflow_store)
    assert [r.info.status for r in runs] == ["KILLED"], "stopped by a person: not FAILED"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_cohort", interrupted)
    capsys.readouterr()
    assert _train(tmp_path / "other", cifar_mini_dir, "--student", "wrn-10-1", "--epochs", "1") == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted (Ctrl-C)") and err.count("\n") == 1 and "Traceback" not in err
