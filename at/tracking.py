"""MLflow adapter: one MLflow run per training run, continued across restarts.

The store defaults to a SQLite file at the project root (``mlruns.db`` in the working
directory); ``MLFLOW_TRACKING_URI`` points every job at another store, e.g. an ``mlflow server``
on a cluster's head node. Many jobs may start at once, so :func:`init_store` creates the store
and the experiment before the fan-out, and every call retries on SQLite's "database is locked".
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from at import atomic

EXPERIMENT = "attention-transfer"
RUN_ID_TAG = "at.run_id"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / 'mlruns.db').resolve()}"


def experiment_name() -> str:
    return os.environ.get("AT_MLFLOW_EXPERIMENT", EXPERIMENT)


def _retry(call, *args, attempts: int = 12, **kwargs):
    """Run an MLflow call, retrying transient failures of a shared store.

    SQLite refuses concurrent writers with "database is locked" and a busy HTTP server may drop
    a request; both go away when retried after a short, jittered wait.
    """
    delay = 0.1
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as e:  # mlflow wraps the driver's errors in several exception types
            text = str(e).lower()
            transient = any(s in text for s in ("locked", "busy", "connection", "timed out", "503", "502"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def init_store() -> str:
    """Create the store (schema migrations included) and the experiment; return its id.

    Idempotent. Run it once before starting many jobs, so that they do not race to create the
    schema or the experiment.
    """
    client = _client()
    name = experiment_name()
    found = _retry(client.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    kwargs = {}
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the database instead of in the working directory of each job
        kwargs["artifact_location"] = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return _retry(client.create_experiment, name, **kwargs)
    except Exception:
        found = _retry(client.get_experiment_by_name, name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out[prefix] = json.dumps(value, sort_keys=True)
    else:
        out[prefix] = value
    return out


class RunTracker:
    """The MLflow run of one training run.

    ``id_file`` (in the run's folder) remembers the MLflow run id as soon as the run exists, so a
    run killed before its first checkpoint leaves no orphan: the next fresh start deletes it.
    """

    def __init__(self, spec: dict, id_file: Path):
        self.spec = spec
        self.id_file = Path(id_file)
        self.client = _client()
        self.run_id: str | None = None

    def start(self, resume_run_id: str | None, tags: dict) -> str:
        from mlflow.entities import Param, RunTag

        if resume_run_id is not None:
            self.run_id = resume_run_id
            _retry(self.client.update_run, resume_run_id, status="RUNNING")
            return resume_run_id
        if self.id_file.exists():
            orphan = self.id_file.read_text().strip()
            # a FINISHED run is a result (a forced retrain starts a new one beside it), never an orphan
            if not run_is_finished(orphan):
                try:
                    _retry(self.client.delete_run, orphan)
                except Exception:
                    pass  # already deleted or in another store: nothing to clean
        experiment_id = init_store()
        all_tags = {RUN_ID_TAG: self.spec["id"], "mlflow.runName": self.spec["id"], **tags}
        run = _retry(self.client.create_run, experiment_id, run_name=self.spec["id"],
                     tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        atomic.write_text(self.id_file, self.run_id)
        params = _flatten("", {k: v for k, v in self.spec.items() if k != "id"}, {})
        # MLflow caps a param value at 6000 characters and a batch at 100 params
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, self.run_id, params=items[i:i + 100])
        _retry(self.client.log_batch, self.run_id, tags=[RunTag("checkpoint_path", tags.get("checkpoint_path", ""))])
        return self.run_id

    def logged_epochs(self) -> set[int]:
        return {m.step for m in _retry(self.client.get_metric_history, self.run_id, "test_error")}

    def log_epochs(self, rows: list[dict]) -> None:
        """Log per-epoch rows (``epoch`` is the step) that MLflow does not have yet.

        Called after each checkpoint with the whole history, so an epoch whose metrics were not
        sent before a kill is sent on resume, and none is sent twice.
        """
        from mlflow.entities import Metric

        have = self.logged_epochs()
        now = int(time.time() * 1000)
        batch: list = []
        for row in rows:
            step = int(row["epoch"])
            if step in have:
                continue
            # one batch is one transaction: an epoch is logged whole or not at all
            epoch_metrics = [Metric(k, float(v), now, step) for k, v in sorted(row.items())
                             if k != "epoch" and v is not None]
            if len(batch) + len(epoch_metrics) > 1000:  # MLflow's per-batch limit
                _retry(self.client.log_batch, self.run_id, metrics=batch)
                batch = []
            batch += epoch_metrics
        if batch:
            _retry(self.client.log_batch, self.run_id, metrics=batch)

    def finish(self, summary: dict, files: list[Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = [Metric(k, float(v), now, 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        _retry(self.client.log_batch, self.run_id, metrics=numbers)
        for f in files:
            try:
                _retry(self.client.log_artifact, self.run_id, str(f))
            except Exception as e:  # artifacts are a convenience; the run's folder has the files
                print(f"warning: could not store {f} as an MLflow artifact: {e}")
        _retry(self.client.set_terminated, self.run_id, "FINISHED")

    def interrupted(self) -> None:
        if self.run_id is not None:
            _retry(self.client.set_terminated, self.run_id, "KILLED")

    def failed(self) -> None:
        if self.run_id is not None:
            _retry(self.client.set_terminated, self.run_id, "FAILED")


def run_is_finished(run_id: str) -> bool:
    """Whether the MLflow run exists and is FINISHED (False where it cannot be read)."""
    try:
        return _retry(_client().get_run, run_id).info.status == "FINISHED"
    except Exception:
        return False
