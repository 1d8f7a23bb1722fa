"""Nothing half-recorded, one writer per run, one line for a full disk or a bad tracking store,
no name that leaves the repository, no silent clamping, no edited metrics rendered as measured.

Real files and processes throughout: a real second process holding a run's lock (and killed
with SIGKILL), a real tmpfs filled up (root only), real SQLite files damaged on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from at import checkpoint, names, references, run_lock
from at.errors import ParamsError
from at.params import load as load_params
from at.tracking import TrackingError, check_store
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0


def _train_args(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--params", str(REPO / "params.yaml"), "train", "--student", "wrn-10-1", "--out", str(out),
            "--id", "integrity", "--data-dir", str(data_dir), "--train-subset", "64", "--test-subset", "64",
            "--batch-size", "32", "--lr-drops", "", "--epochs", "2", "--threads", "1", "--no-progress", *extra]


def _status(uri: str, out: Path) -> str:
    """The status of the MLflow run of the run in ``out``."""
    client, runs = _mlflow_run(uri)
    mine = (out / "mlflow_run_id").read_text().strip()
    return client.get_run(mine).info.status


def _mlflow_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("attention-transfer/custom")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return client, runs


# ------------------------------------------------------------------------------------------------
# 1. A run's MLflow state is part of "finished"; stale temporary files go


@pytest.mark.slow
def test_a_finished_run_whose_mlflow_run_did_not_finish_is_completed_without_training(
        tmp_path, cifar_mini_dir, mlflow_store, monkeypatch):
    from at.tracking import RunTracker

    out = tmp_path / "run"
    # a kill between writing the outputs and telling MLflow: the outputs are complete, the MLflow
    # run is RUNNING with neither its final metrics nor its artifacts
    with monkeypatch.context() as patched:
        patched.setattr(RunTracker, "finish", lambda self, summary, files: None)
        assert run_cli(_train_args(out, cifar_mini_dir)).returncode == 0
    client, runs = _mlflow_run(mlflow_store)
    assert [r.info.status for r in runs] == ["RUNNING"] and "final_test_error" not in runs[0].data.metrics
    stale = out / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)   # and a state write cut short before its rename

    again = run_cli(_train_args(out, cifar_mini_dir))
    assert again.returncode == 0, again.stderr
    assert "epoch 1/" not in again.stdout, "nothing is trained again"
    assert "finishing it from the files" in again.stdout
    assert not stale.exists(), "the stale temporary file is removed at the next start"
    _, runs = _mlflow_run(mlflow_store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = json.loads((out / "metrics.json").read_text())
    assert runs[0].data.metrics["final_test_error"] == metrics["final_test_error"]
    assert {"checkpoint.pt", "metrics.json", "history.csv"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    third = run_cli(_train_args(out, cifar_mini_dir))
    assert "already finished with this spec: left as it is" in third.stdout


# ------------------------------------------------------------------------------------------------
# 2. One writer per run folder


def _hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(f"""
        import sys, time
        from at import run_lock
        with run_lock.hold({{"integrity": {str(folder)!r}}}):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_writer_exits_at_once_naming_the_holder_and_a_killed_holder_leaves_no_lock(
        tmp_path, cifar_mini_dir, mlflow_store):
    out = tmp_path / "run"
    holder = _hold_lock_in_another_process(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        start = time.monotonic()
        second = run_cli(_train_args(out, cifar_mini_dir))
        assert time.monotonic() - start < 30
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: run integrity is being trained by "
                                                       f"pid {holder.pid} on host {socket.gethostname()}"), lines
        assert sorted(p.name for p in out.iterdir()) == before, "the second process touched nothing"
        assert _mlflow_run(mlflow_store)[1] == [], "and recorded nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with the process: no stale lock to clear by hand
    third = run_cli(_train_args(out, cifar_mini_dir))
    assert third.returncode == 0, third.stderr
    assert (out / "metrics.json").is_file()


def test_the_lock_is_all_or_nothing_for_a_cohort(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    holder = _hold_lock_in_another_process(b)
    try:
        with pytest.raises(run_lock.RunLocked, match="run b is being trained"):
            with run_lock.hold({"a": a, "b": b}):
                pass
        with run_lock.hold({"a": a}):   # a was released when b failed
            pass
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------
# 3. A full disk (a real tmpfs): one line, MLflow FAILED, the previous state kept


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a size the test sets (mount -o remount,size=...), unmounted afterwards."""
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")

    def resize(size_bytes: int) -> None:
        kib = -(-size_bytes // 4096) * 4
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_at_a_state_save_and_at_the_outputs_is_one_line_and_resumes_exactly(
        tmp_path, cifar_mini_dir, mlflow_store, small_disk):
    mount, resize = small_disk
    reference = tmp_path / "reference"
    assert run_cli(_train_args(reference, cifar_mini_dir)).returncode == 0
    state = (reference / "last.pt").stat().st_size
    final = (reference / "checkpoint.pt").stat().st_size

    # room for one resume state and a half: epoch 1 is saved, epoch 2's state is not
    out = mount / "run"
    resize(state + state // 2)
    full = run_cli(_train_args(out, cifar_mini_dir))
    assert full.returncode == 2
    errors = [line for line in full.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr
    assert errors[0].startswith(f"error: could not write {out / 'last.pt'}: No space left on device"), errors
    assert "epoch 1/2" in full.stdout and (out / "last.prev.pt").is_file() and not (out / "last.pt").exists()
    assert not list(out.glob(".*.tmp")), "no temporary file is left on the full disk"
    assert _status(mlflow_store, out) == "FAILED"

    # room for the states, not for the final checkpoint beside them
    resize(2 * state + final // 2)
    outputs = run_cli(_train_args(out, cifar_mini_dir))
    assert outputs.returncode == 2, outputs.stdout + outputs.stderr
    assert f"resuming from {out / 'last.prev.pt'} at epoch 2" in outputs.stdout, "the retry names its file"
    assert f"error: could not write {out / 'checkpoint.pt'}: No space left on device" in outputs.stderr
    assert (out / "last.pt").is_file() and not (out / "metrics.json").exists()
    assert _status(mlflow_store, out) == "FAILED"

    resize(4 * (state + final))
    done = run_cli(_train_args(out, cifar_mini_dir))
    assert done.returncode == 0, done.stderr
    assert f"writing its outputs again from {out / 'last.pt'}" in done.stdout
    assert _status(mlflow_store, out) == "FINISHED"
    assert len(_mlflow_run(mlflow_store)[1]) == 2, "one MLflow run per run: the reference's and this one's"
    ours, theirs = (json.loads((p / "metrics.json").read_text()) for p in (out, reference))
    assert ours["final_test_error"] == theirs["final_test_error"], "the interrupted run ends as the uninterrupted"


@pytest.mark.slow
def test_a_full_disk_under_the_mlflow_artifacts_fails_the_mlflow_run_then_a_retry_finishes_it(
        tmp_path, cifar_mini_dir, mlflow_template, small_disk, monkeypatch):
    mount, resize = small_disk
    # the store's artifacts live beside its database, in mlartifacts/: that folder is the tmpfs
    store = mount.parent / "store"
    store.mkdir()
    shutil.copy(mlflow_template, store / "mlruns.db")
    (store / "mlartifacts").symlink_to(mount)
    uri = f"sqlite:///{store / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    full = run_cli(_train_args(out, cifar_mini_dir))
    assert full.returncode == 2
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "as an artifact of MLflow run" in errors[0] and "No space left" in errors[0], full.stderr
    assert "Traceback" not in full.stderr
    _, runs = _mlflow_run(uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    resize(8 * 2**20)
    done = run_cli(_train_args(out, cifar_mini_dir))
    assert done.returncode == 0 and "finishing it from the files" in done.stdout, done.stdout + done.stderr
    client, runs = _mlflow_run(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "checkpoint.pt" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


@pytest.mark.slow
def test_a_read_only_artifact_folder_fails_the_mlflow_run_then_a_retry_stores_the_artifacts(
        tmp_path, cifar_mini_dir, mlflow_template, monkeypatch):
    # the store's artifacts live beside its database, in mlartifacts/: a real read-only file
    # system for root (who writes into any folder a chmod protects), a read-only folder otherwise
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(mlflow_template, store / "mlruns.db")
    artifacts = store / "mlartifacts"
    artifacts.mkdir()
    if ROOT:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=8m", "tmpfs", str(artifacts)]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        writable = ["mount", "-o", "remount,rw", str(artifacts)]
    else:
        artifacts.chmod(0o555)
        writable = ["chmod", "755", str(artifacts)]
    uri = f"sqlite:///{store / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    try:
        failed = run_cli(_train_args(out, cifar_mini_dir))
        assert failed.returncode == 2, failed.stdout + failed.stderr
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert lines[0].startswith(f"error: could not store {out / 'metrics.json'} as an artifact of MLflow run "), lines
        assert lines[0].endswith("make it writable and run again (the run is finished from its files)"), lines
        _, runs = _mlflow_run(uri)
        assert [r.info.status for r in runs] == ["FAILED"], "a run without its artifacts is not FINISHED"
        subprocess.run(writable, check=True)
        done = run_cli(_train_args(out, cifar_mini_dir))
        assert done.returncode == 0 and "finishing it from the files" in done.stdout, done.stdout + done.stderr
        assert "epoch 1/" not in done.stdout, "nothing is trained again"
        client, runs = _mlflow_run(uri)
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert {"checkpoint.pt", "metrics.json", "history.csv"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    finally:
        if ROOT:
            subprocess.run(["umount", "-l", str(artifacts)], check=False)


# ------------------------------------------------------------------------------------------------
# 4. The tracking store is checked before anything is written


def _damaged(tmp_path: Path, mlflow_template: Path, how: str) -> Path:
    db = tmp_path / "mlruns.db"
    data = mlflow_template.read_bytes()
    db.write_bytes(data[: len(data) // 3] if how == "truncated" else b"this is not a database\n" * 500)
    return db


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_sqlite_store_is_one_line_before_any_run_folder_or_result(
        tmp_path, cifar_mini_dir, mlflow_template, monkeypatch, how):
    db = _damaged(tmp_path, mlflow_template, how)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    out = tmp_path / "run"
    start = time.monotonic()
    ran = run_cli(_train_args(out, cifar_mini_dir))
    assert time.monotonic() - start < 30
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    line = ran.stderr.strip()
    assert line.startswith(f"error: MLflow store sqlite:///{db}: {db} is") and "move it aside" in line, line
    assert not out.exists(), "nothing was written"


def _store_of(tmp_path: Path, mlflow_template: Path, how: str) -> Path:
    """An SQLite file that MLflow cannot or must not record in, made with sqlite3 by hand."""
    import sqlite3

    db = tmp_path / "store" / "mlruns.db"
    db.parent.mkdir()
    if how != "foreign":
        shutil.copy(mlflow_template, db)
    edit = {"newer": "UPDATE alembic_version SET version_num = 'f00dfeedbeef'",   # a revision to come
            "older": "UPDATE alembic_version SET version_num = '1a0cddfcaa16'",   # one of MLflow's past ones
            "missing": "DROP TABLE latest_metrics",
            "foreign": "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)"}[how]
    with sqlite3.connect(db) as connection:
        connection.execute(edit)
    connection.close()
    return db


STORE_LINES = {
    "newer": "was written by a newer MLflow (schema revision f00dfeedbeef, unknown to MLflow ",
    "older": "was written by an older MLflow (schema revision 1a0cddfcaa16; MLflow ",
    "missing": "lacks MLflow's table(s) latest_metrics: it is damaged",
    "foreign": "is not an MLflow store (another program's SQLite database, its tables: invoices): MLflow would add "
               "its tables to it",
}


@pytest.mark.parametrize("how", sorted(STORE_LINES))
def test_a_store_of_another_schema_or_program_is_one_line_and_left_untouched(
        tmp_path, cifar_mini_dir, mlflow_template, monkeypatch, how):
    db = _store_of(tmp_path, mlflow_template, how)
    before = db.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    out = tmp_path / "run"
    start = time.monotonic()
    ran = run_cli(_train_args(out, cifar_mini_dir))
    assert time.monotonic() - start < 30
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    line = ran.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: MLflow store sqlite:///{db}: {db} {STORE_LINES[how]}"), line
    assert not out.exists(), "no run folder (nor its lock file) is left"
    assert db.read_bytes() == before and sorted(p.name for p in db.parent.iterdir()) == ["mlruns.db"], \
        "the store is not written to"


def test_ui_on_a_store_of_a_newer_mlflow_is_one_line(tmp_path, mlflow_template):
    # a process: `ui` ends by replacing itself with MLflow's server
    db = _store_of(tmp_path, mlflow_template, "newer")
    ran = subprocess.run([sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "ui", "--profile", "ci",
                          "--port", str(_free_port())], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PYTHONPATH": str(REPO)})
    assert ran.returncode == 2 and not ran.stdout, ran.stdout + ran.stderr
    assert ran.stderr.count("\n") == 1 and STORE_LINES["newer"] in ran.stderr, ran.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_refuses_a_port_that_another_program_serves(tmp_path, mlflow_store):
    with socket.socket() as other:   # another program listening on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        start = time.monotonic()
        ran = subprocess.run([sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "ui", "--profile",
                              "ci", "--port", str(port)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert time.monotonic() - start < 30
    assert ran.returncode == 2 and not ran.stdout, "no address is printed: it would show the other program"
    assert ran.stderr.count("\n") == 1 and ran.stderr.startswith(f"error: port {port} on 127.0.0.1 is taken"), ran.stderr


def test_the_report_checks_the_store_before_it_rewrites_results(tmp_path, mlflow_template, monkeypatch):
    db = _damaged(tmp_path, mlflow_template, "garbage")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    work = tmp_path / "repo"
    work.mkdir()
    ran = run_cli(["--params", str(REPO / "params.yaml"), "report", "--profile", "smoke"], cwd=work)
    assert ran.returncode == 2 and "MLflow store" in ran.stderr and "Traceback" not in ran.stderr
    assert not (work / "results").exists()


def test_unsupported_and_read_only_stores_are_one_line(tmp_path, monkeypatch):
    for uri in (f"file://{tmp_path / 'mlruns'}", str(tmp_path / "mlruns"), "ftp://example.org/store"):
        with pytest.raises(TrackingError, match="not one MLflow 3 can record runs in"):
            check_store(uri)
    with pytest.raises(TrackingError, match="cannot create"):
        check_store(f"sqlite:///{tmp_path / 'missing-folder' / 'mlruns.db'}")
    check_store(f"sqlite:///{tmp_path / 'new.db'}")   # a new file in a writable folder is fine


def test_a_read_only_store_is_one_line_within_seconds(tmp_path, mlflow_template, small_disk):
    mount, resize = small_disk
    resize(8 * 2**20)
    shutil.copy(mlflow_template, mount / "mlruns.db")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="read-only"):
        check_store(f"sqlite:///{mount / 'mlruns.db'}")
    assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------------------
# 5. Duplicate keys


def test_duplicate_keys_in_params_and_references_name_the_key_and_both_lines(tmp_path):
    text = (REPO / "params.yaml").read_text()
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("seeds:"))
    params = tmp_path / "params.yaml"
    params.write_text(text + "\nseeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n")
    last = len(params.read_text().splitlines())
    ran = run_cli(["--params", str(params), "runs", "--profile", "smoke"])
    assert ran.returncode == 2
    assert ran.stderr.strip() == (f"error: {params}: key 'seeds' is given twice, at line {first} and at line "
                                  f"{last}: keep one")
    nested = tmp_path / "nested.yaml"
    nested.write_text("tables:\n  table2:\n    rows: {a: 1}\n  table2:\n    rows: {b: 2}\n")
    with pytest.raises(references.ReferencesError, match=r"key 'table2' is given twice, at line 2 and at line 4"):
        references.load(nested)


# ------------------------------------------------------------------------------------------------
# 6. Names that become paths


@pytest.mark.parametrize("where", ["profile", "table", "row", "method"])
def test_a_name_that_would_leave_the_repository_is_refused(tmp_path, where):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = "../../somewhere"
    if where == "profile":
        params["profiles"][bad] = params["profiles"]["smoke"]
    elif where == "table":
        params["tables"][bad] = params["tables"].pop("table2")
    elif where == "row":
        params["tables"]["table2"]["rows"][bad] = None
    else:
        params["methods"][bad] = params["methods"]["baseline"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ParamsError, match=r"must be a name of at most 64 letters.*got '\.\./\.\./somewhere'"):
        load_params(path)


def test_paths_built_from_names_are_checked_to_stay_inside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert names.inside("runs", "runs/smoke/cifar10/x/seed0") == "runs/smoke/cifar10/x/seed0"
    with pytest.raises(ValueError, match="would lie outside runs/"):
        names.inside("runs", "runs/../../somewhere")
    (tmp_path / "runs" / "escape").symlink_to(tmp_path.parent)   # a link out of runs/ is followed
    with pytest.raises(ValueError, match="would lie outside runs/"):
        names.inside("runs", "runs/escape/x")
    from at.models import Architecture, register_model
    with pytest.raises(ValueError, match="model name '../x' is not a valid name"):
        register_model(Architecture(name="../x", build=lambda **kw: None))


# ------------------------------------------------------------------------------------------------
# 7. A subset larger than the data


def test_a_subset_larger_than_the_data_is_an_error_naming_both_sizes(tmp_path, cifar_mini_dir, mlflow_store):
    out = tmp_path / "run"
    args = _train_args(out, cifar_mini_dir)
    args[args.index("--train-subset") + 1] = "100000"
    ran = run_cli(args)
    assert ran.returncode == 2
    assert "protocol.train_subset is 100000" in ran.stderr and "has only 5085 train images" in ran.stderr
    assert not out.exists(), "nothing left behind"


# ------------------------------------------------------------------------------------------------
# 8. A wrong source is refused before it is copied, naming the user's file


def test_a_huge_wrong_source_is_refused_without_copying_it(tmp_path, monkeypatch):
    source = tmp_path / "huge source.tar.gz"
    with open(source, "wb") as f:
        f.truncate(512 * 2**20)   # sparse: 512 MiB that cost no disk
    monkeypatch.setenv("AT_CIFAR10_URL", str(source))
    root = tmp_path / "data" / "cifar10"
    start = time.monotonic()
    ran = run_cli(["--params", str(REPO / "params.yaml"), "download", "cifar10", "--root", str(root)])
    assert ran.returncode == 2
    assert f"checksum mismatch for {source}" in ran.stderr and "nothing was copied" in ran.stderr
    assert ".staging" not in ran.stderr
    assert not root.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["huge source.tar.gz"]
    assert time.monotonic() - start < 60


def test_an_archive_that_is_not_one_is_named_by_the_users_path(tmp_path, monkeypatch):
    from at.data.download import file_md5

    source = tmp_path / "not-an-archive.tar.gz"
    source.write_bytes(b"<html>not found</html>\n" * 100)
    monkeypatch.setenv("AT_CIFAR10_URL", str(source))
    monkeypatch.setenv("AT_CIFAR10_MD5", file_md5(source))
    ran = run_cli(["--params", str(REPO / "params.yaml"), "download", "cifar10", "--root", str(tmp_path / "d")])
    assert ran.returncode == 2 and str(source) in ran.stderr and ".staging" not in ran.stderr, ran.stderr


# ------------------------------------------------------------------------------------------------
# 9. A run's metrics are bound to its checkpoint and history


@pytest.mark.slow
def test_an_edited_metrics_json_is_refused_by_the_report(tmp_path, cifar_mini_dir, mlflow_store):
    from at.report.inputs import ReportInputError, unbound

    out = tmp_path / "run"
    assert run_cli(_train_args(out, cifar_mini_dir)).returncode == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert unbound(out, metrics) is None
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved[checkpoint.OUTPUT_DIGESTS]["metrics.json"] == checkpoint.digest((out / "metrics.json").read_bytes())

    edited = {**metrics, "final_test_error": 1.23}
    (out / "metrics.json").write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
    assert "metrics.json is not the file the run wrote" in unbound(out, edited)
    # without the checkpoint (records committed without it), the history still speaks
    (out / "checkpoint.pt").unlink()
    problem = unbound(out, edited)
    assert problem.startswith("disagrees with the run's history.csv: final_test_error 1.23"), problem
    assert issubclass(ReportInputError, ValueError)
