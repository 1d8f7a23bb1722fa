"""MLflow tracking: fails fast on an unreachable server, retries only what is transient (and
says so), survives a server that goes away mid-run, and never touches a FINISHED run."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from at.spec import RunSpec
from at import tracking

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    """A loopback port that nothing listens on (the OS just handed it out and we closed it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(out: Path, data_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "train", "--student", "wrn-10-1",
            "--out", str(out), "--id", "tracked", "--data-dir", str(data_dir), "--epochs", str(epochs),
            "--train-subset", "64", "--test-subset", "64", "--batch-size", "32", "--lr-drops", "",
            "--threads", "1", "--no-progress", *extra]


def _env(uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}


def _main(out: Path, data_dir: Path, epochs: int, capsys) -> tuple[int, str, str]:
    """`python -m at train` in this process (the same code as the command): status, stdout, stderr."""
    from at.__main__ import main

    capsys.readouterr()
    status = main(_train_cmd(out, data_dir, epochs)[3:])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def test_unreachable_server_fails_in_seconds_with_one_line_naming_it(tmp_path, cifar_mini_dir, capsys, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    status, _, err = _main(tmp_path / "run", cifar_mini_dir, 1, capsys)
    elapsed = time.monotonic() - start
    assert status == 2, err
    assert elapsed < 15, f"took {elapsed:.1f} s to report an unreachable server"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], err
    assert "refused" in lines[0].lower()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_refused_connection_is_not_retried(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    for key, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    client = tracking._client()
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="not reachable"):
        tracking._retry(client.get_experiment_by_name, "x")
    assert time.monotonic() - start < 15
    assert "retry" not in capsys.readouterr().err


class _Busy(http.server.BaseHTTPRequestHandler):
    """Answers every request with 503, as an overloaded server or its proxy does."""

    def do_GET(self):
        self.server.hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_http_5xx_is_retried_with_a_printed_line_per_retry_then_fails_naming_the_uri(capsys, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    server.hits = 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for key, value in tracking.HTTP_DEFAULTS.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")   # keep the test short
        tracking.check_reachable(uri)   # a server that answers (even 503) is reachable
        client = tracking._client()
        with pytest.raises(tracking.TrackingError) as info:
            tracking._retry(client.get_experiment_by_name, "x", budget_s=2.0)
    finally:
        server.shutdown()
        server.server_close()
    assert uri in str(info.value) and "5xx" in str(info.value)
    retries = [line for line in capsys.readouterr().err.splitlines() if "retry" in line]
    assert retries and all("HTTP 429/5xx" in line for line in retries)
    assert server.hits >= 2 * len(retries)


class _HealthyButHung(http.server.BaseHTTPRequestHandler):
    """Answers its health check, and never the API: a server whose database hangs."""

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")
            return
        self.server.released.wait(120)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_whose_api_hangs_is_one_line_within_seconds(tmp_path, cifar_mini_dir, capsys, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButHung)
    server.daemon_threads = True
    server.released = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        start = time.monotonic()
        status, _, err = _main(tmp_path / "run", cifar_mini_dir, 1, capsys)
        elapsed = time.monotonic() - start
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()
    assert status == 2 and elapsed < 10, f"{elapsed:.0f} s, exit {status}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow tracking server {uri} answers its health check "
                                                   f"but not its API"), err
    assert not (tmp_path / "run").exists()


def test_locked_sqlite_store_is_retried_and_succeeds(tmp_path, monkeypatch, capsys):
    db = tmp_path / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    tracking.init_store("p")
    client = tracking._client()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")   # another writer holds the file

    def release():
        # longer than the 20 s SQLite busy timeout that MLflow sets: MLflow reports "locked"
        time.sleep(22)
        holder.execute("COMMIT")

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        experiment_id = tracking._retry(client.create_experiment, "other")
    finally:
        releaser.join()
        holder.close()
    assert client.get_experiment(experiment_id).name == "other"
    assert "SQLite store locked" in capsys.readouterr().err


def test_a_finished_run_is_never_deleted_but_an_unfinished_orphan_is(tmp_path, mlflow_store):
    spec = RunSpec.resolve({"id": "orphans", "dataset": "cifar10", "student": "wrn-10-1", "seed": 0,
                            "method_name": "baseline", "method": {"terms": [{"type": "ce"}]},
                            "out_dir": str(tmp_path), "data_dir": "",
                            "protocol": {"epochs": 1, "batch_size": 8, "lr": 0.1, "lr_gamma": 0.2}})
    id_file = tmp_path / "mlflow_run_id"
    first = tracking.RunTracker(spec, id_file)
    first.start(None, {})
    first.finish({}, [])
    second = tracking.RunTracker(spec, id_file)
    second.start(None, {})           # a fresh start beside a finished run: a new run
    third = tracking.RunTracker(spec, id_file)
    third.start(None, {})            # a fresh start beside an unfinished one: it was an orphan
    client = first.client
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(first.run_id).info.lifecycle_stage == "active"
    assert client.get_run(second.run_id).info.lifecycle_stage == "deleted"
    assert len({first.run_id, second.run_id, third.run_id}) == 3
    # resuming a run that MLflow has as FINISHED (killed after finishing, before last.pt went)
    # changes nothing in it
    resumed = tracking.RunTracker(spec, id_file)
    resumed.start(first.run_id, {})
    resumed.log_epochs([{"epoch": 1, "test_error": 50.0}])
    resumed.finish({"final_test_error": 1.0}, [])
    resumed.failed()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and not run.data.metrics


# --- a real MLflow server that goes away in the middle of a run ---------------------------

def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(), "--no-serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # without MLflow's job runner (GenAI jobs): a second full MLflow process that the tracking
        # API never uses, which made each start take about twice as long here
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited at start"
            assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
            time.sleep(0.5)


def _stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)   # the server and its worker: gone without a goodbye
    proc.wait()


@pytest.mark.parametrize("message", [
    # the server killed while it answered: the body cut short (requests' ChunkedEncodingError)
    "API request to http://127.0.0.1:1/api/2.0/mlflow/metrics/get-history failed with exception "
    "('Connection broken: IncompleteRead(0 bytes read, 2 more expected)', IncompleteRead(0 bytes read, 2 more expected))",
    "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed with exception ('Connection aborted.', "
    "ConnectionResetError(104, 'Connection reset by peer'))",
])
def test_a_server_gone_mid_answer_is_a_tracking_error_not_a_traceback(message):
    from at.tracking import TrackingError, _retry

    def get_metric_history():
        raise RuntimeError(message)

    with pytest.raises(TrackingError, match="get_metric_history failed \\(not reachable, 1 attempt"):
        _retry(get_metric_history, budget_s=0)


@pytest.mark.slow
def test_server_killed_mid_run_training_goes_on_then_the_retry_finishes_the_same_mlflow_run(
        tmp_path, cifar_mini_dir, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    epochs = 2   # epoch 1 reaches the server; epoch 2 trains without it
    port = _closed_port()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    server = _start_server(tmp_path, port)
    try:
        proc = subprocess.Popen(_train_cmd(out, cifar_mini_dir, epochs), env=_env(uri), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists():   # epoch 1 is trained and logged
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)          # hold training while the server goes away
    finally:
        _stop_server(server)
    proc.send_signal(signal.SIGCONT)
    start = time.monotonic()
    stdout, stderr = proc.communicate(timeout=300)
    assert time.monotonic() - start < 120, "a dead server must not stall training"
    assert proc.returncode == 2, stderr
    assert f"epoch {epochs}/{epochs}" in stdout, "training went on without the server"
    assert "warning:" in stderr and "training goes on" in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and "Traceback" not in stderr, stderr
    assert (out / "last.pt").exists() and not (out / "checkpoint.pt").exists()

    server = _start_server(tmp_path, _closed_port())   # the server is back (on another port)
    try:
        uri = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)   # the retry: in this process, the same code
        status, printed, err = _main(out, cifar_mini_dir, epochs, capsys)
        assert status == 0, err
        assert "epoch 1/" not in printed, "the retry resumes: it does not train again"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name("custom"))
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, "the retry continues the same MLflow run"
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.info.run_id == (out / "mlflow_run_id").read_text().strip()
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_error"))
        assert steps == list(range(1, epochs + 1)), steps
        assert "checkpoint.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        _stop_server(server)


def test_mlflow_http_bounds_are_ours_unless_the_user_set_them(monkeypatch):
    for key in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    tracking._client()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_experiments_are_tagged_as_model_training(mlflow_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    experiment_id = tracking.init_store("kind")
    kind = client.get_experiment(experiment_id).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"
    # an experiment made by earlier code (no tag) gets it at the next start
    older = client.create_experiment("attention-transfer/older")
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    assert tracking.init_store("older") == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_names_put_what_tells_rows_apart_first():
    # MLflow's runs table cuts names at about 17 characters (less for a nested row): the seed
    # tells apart the runs nested under one cell, column and row the cells of one table
    spec = RunSpec.resolve({"id": "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed3", "dataset": "cifar10",
                            "student": "wrn-10-1", "seed": 3, "method_name": "baseline",
                            "method": {"terms": [{"type": "ce"}]}, "out_dir": "x", "data_dir": "",
                            "protocol": {"epochs": 1, "batch_size": 8, "lr": 0.1, "lr_gamma": 0.2}})
    assert tracking.run_name(spec) == "seed3 at-sum-p2 | cifar10/wrn-16-1_from_wrn-16-2"
    table1 = [{"table": "table1", "row": row, "column": column, "metric": "top1"}
              for row in ("wrn-16-1_from_wrn-16-2", "wrn-16-1_from_wrn-40-1", "wrn-16-2_from_wrn-40-2",
                          "nin-thin_from_nin-wide")
              for column in ("student", "teacher", "at", "kd", "at+kd", "factt")]
    names = [tracking.cell_name(cell) for cell in table1]
    assert names[:3] == ["wrn-16-1←16-2 student | table1", "wrn-16-1←16-2 teacher | table1", "wrn-16-1←16-2 at | table1"]
    assert "nin-thin←wide at+kd | table1" in names
    assert len({name[:17] for name in names}) == len(names), "the first 17 characters tell every cell apart"
    assert tracking.cell_name({"table": "table2", "row": "sum-p2", "column": "error", "metric": "top1"}) == "sum-p2 | table2"
    # an id not of the grid's form (a run trained from arguments) is its own name
    assert tracking.run_name(spec.replace(id="my-run")) == "my-run"
