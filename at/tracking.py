"""MLflow adapter: one MLflow run per training run, continued across restarts, organised the
way a user browses it.

Layout of the store (docs/interfaces.md, "MLflow"):

- one experiment per profile, ``attention-transfer/<profile>`` (``AT_MLFLOW_EXPERIMENT``
  replaces the name, for every profile);
- one run per training run (tag ``at.run_id``), with per-epoch metrics (step = epoch), the
  data set as an input (its md5 as digest) and the final checkpoint as an artifact;
- one parent run per table cell (tag ``at.cell``), made by ``python -m at report`` once the
  seeds finished, holding the cell's mean, std and n over seeds; each seed's run is nested
  under it (``mlflow.parentRunId``). A run shared by several cells nests under the first and
  lists all of them in its tag ``at.cells``; each cell's tag ``seeds`` (a column of the runs
  table) says which row to expand for its seeds. A cell has no duration (its start is its end);
- one report run (tag ``at.kind = report``) holding the rendered tables and figures.

The store defaults to a SQLite file in the working directory (``mlruns.db``);
``MLFLOW_TRACKING_URI`` points every job at another store, e.g. an ``mlflow server``.

Failure policy. An unreachable server (or one whose API does not answer) is found at the start
of a run, in seconds, by two requests with a short timeout, its health check and one API read;
a SQLite store that MLflow could not use (damaged, read-only, of a newer or older MLflow, lacking
a table) or must not (another program's database) is found by reading it: either way the run
stops with one line naming the store before anything is written. A refused connection is never
retried (no server listens: waiting will not start one). What is retried, with a printed line
per retry and for a bounded time, are the failures that go away by themselves: SQLite's "database is locked" (concurrent writers on one file), HTTP 429/5xx
(a busy or restarting server) and timeouts (a slow answer). MLflow's own HTTP retries and
timeouts are bounded too (:data:`HTTP_DEFAULTS`), since ours wrap them.

If the store goes away *during* training, the run keeps training: the metrics are in the
run's checkpoint and history, which are the record; MLflow is a mirror of them. Each epoch
tries once more to send every epoch the store lacks (a refused connection fails at once;
transient errors are retried for :data:`MIDRUN_BUDGET_S` s, plus the last request's own
timeout).
At the end the store must have every epoch before the run writes its final outputs: if it
is still unreachable, the run fails with one line and keeps ``last.pt``, so a retry (by hand
or by Snakemake) resumes at the end, sends what is missing and finishes. Artifacts that cannot
be stored (a full disk, a read-only folder) fail the MLflow run the same way, and the retry
stores them. Training hours are never lost to a tracking outage, and a finished run is never
missing from MLflow, nor its artifacts.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from at import atomic
from at.errors import WriteError

EXPERIMENT_PREFIX = "attention-transfer"
RUN_ID_TAG = "at.run_id"       # a training run: its id in the grid
KIND_TAG = "at.kind"           # "cell" or "report" for the runs that `report` makes
CELL_TAG = "at.cell"           # a cell's parent run: "table/row/column"
CELLS_TAG = "at.cells"         # a training run: JSON list of every cell it counts in
PARENT_TAG = "mlflow.parentRunId"
# What MLflow 3 records as an experiment's kind (its run pages read it). Which view the UI opens
# first is decided in the browser (`?workflowType=machine_learning`, or the "Model training"
# toggle, remembered per browser), not by this tag: checked in headless Chromium.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SEEDS_TAG = "seeds"            # a cell's parent run: where its seeds' runs are nested
# The runs table as a researcher reads it: the metric columns (a cell's mean over seeds, and
# each seed's final error, share `test_error`) and where each cell's seeds are (SEEDS_TAG)
# instead of MLflow's default Source/Models/Dataset columns, and a Run Name column wide enough
# for the names (MLflow's default cuts them at about 17 characters). MLflow's UI has no
# server-side default view; it reads a "shared view" from an experiment tag named by the address
# (`/runs?viewStateShareKey=<key>`), which :func:`runs_url` gives; a width applies to the columns
# named in `columnOrder` (read in MLflow 3.17's UI code). The order stays MLflow's (by creation),
# which keeps each cell's seeds nested under it.
RUNS_VIEW_KEY = "at-runs"
RUN_NAME_COLUMN = "attributes.`Run Name`"
VIEW_COLUMNS = ["metrics.`test_error`", "metrics.`std`", "metrics.`n`", f"tags.`{SEEDS_TAG}`"]
RUNS_VIEW = {"selectedColumns": VIEW_COLUMNS, "columnOrder": [RUN_NAME_COLUMN, *VIEW_COLUMNS],
             "columnWidths": {RUN_NAME_COLUMN: 380, f"tags.`{SEEDS_TAG}`": 300}, "runsHiddenMode": "SHOW_ALL"}

# MLflow's HTTP client retries a failed request up to 7 times with exponential backoff and
# waits up to 120 s per request: wrapped in our retries that is close to an hour before an
# error. These bounds (used unless the user set the variables) make one call give up in under
# a minute; our retry loop decides what is worth retrying.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
REACHABLE_TIMEOUT_S = 5.0   # the start-up check of a server
RETRY_BUDGET_S = 120.0      # how long a call keeps retrying transient failures
MIDRUN_BUDGET_S = 30.0      # how long an epoch waits for the store before training on


class TrackingError(RuntimeError):
    """The tracking store is unreachable or keeps failing; the message names its URI."""


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / 'mlruns.db').resolve()}"


def experiment_name(profile: str) -> str:
    return os.environ.get("AT_MLFLOW_EXPERIMENT") or f"{EXPERIMENT_PREFIX}/{profile}"


# What the start-up check asks of a server's API: the cheapest read of the tracking API (MLflow
# 2 and 3), answered from its database.
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def check_reachable(uri: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail in seconds, naming ``uri``, when an HTTP tracking server does not answer: its health
    check, then its API (a server whose database hangs answers the first and not the second,
    and each call would then wait out MLflow's timeouts and our retries, minutes).

    Any HTTP answer (even an error status) shows a server is there; only a failed connection
    or a timeout is an error. Other stores (SQLite, a folder) are local files: nothing to check.
    """
    if not uri.startswith(("http://", "https://")):
        return
    for path in ("/health", API_PROBE):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + path, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            continue
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if path == "/health":
                raise TrackingError(f"MLflow tracking server {uri} is not reachable ({reason}): start it, or point "
                                    f"MLFLOW_TRACKING_URI at a running one (unset, runs use ./mlruns.db)") from None
            raise TrackingError(f"MLflow tracking server {uri} answers its health check but not its API ({path}: "
                                f"{reason}, waited {timeout:.0f} s): check the server and its database, or point "
                                f"MLFLOW_TRACKING_URI at a running one (unset, runs use ./mlruns.db)") from None


# The stores MLflow 3 runs on: SQLite and the other SQL databases, and a tracking server. A
# folder store (file:// or a plain path) is in maintenance mode in MLflow 3 and refuses to write.
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
STORE_ADVICE = ("unset MLFLOW_TRACKING_URI to use ./mlruns.db, or point it at sqlite:///<path>/mlruns.db "
                "or a running `mlflow server`")


def check_store(uri: str | None = None) -> None:
    """Fail in seconds, with one line naming the store and what to do, when runs could not be
    recorded in it: a scheme MLflow 3 cannot write, a SQLite file that is damaged or cannot be
    written, a server that does not answer. Called before anything is written (a run's folder,
    results/), so a store that fails leaves nothing half-recorded."""
    uri = uri or tracking_uri()
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        check_reachable(uri)
        return
    if scheme.split("+")[0] in SQL_SCHEMES[1:]:
        return   # a database server: MLflow's own connection errors name it
    if scheme != "sqlite":
        kind = "a folder store" if scheme in ("", "file") else f"scheme {scheme!r}"
        raise TrackingError(f"MLflow store {uri}: {kind} is not one MLflow 3 can record runs in "
                            f"(its file store is read-only, in maintenance mode): {STORE_ADVICE}")
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if path is None or not str(path):
        raise TrackingError(f"MLflow store {uri}: give the SQLite file as sqlite:///<path>: {STORE_ADVICE}")
    folder = path.parent
    if not path.exists():
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingError(f"MLflow store {uri}: cannot create {path} (folder {folder} is missing or "
                                f"not writable): {STORE_ADVICE}")
        return
    problem = _sqlite_problem(path)
    if problem:
        raise TrackingError(f"MLflow store {uri}: {path} {problem}: move it aside (MLflow makes a new one) "
                            f"or restore it from a backup, or {STORE_ADVICE}")
    problem = _schema_problem(path, uri)
    if problem:
        raise TrackingError(f"MLflow store {uri}: {path} {problem}")
    # SQLite writes a journal beside the file: the file and its folder must both be writable
    if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow store {uri}: {path} or its folder is read-only: make them writable, "
                            f"or {STORE_ADVICE}")


def _sqlite_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable SQLite database (None if it is), read without writing."""
    import sqlite3

    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as e:
        return f"cannot be opened ({e})"
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            return f"is damaged (SQLite's check: {rows[0][0]})"
    except sqlite3.DatabaseError as e:
        if "locked" in str(e).lower():
            return None   # another writer holds it right now: the calls retry that
        return f"is not a readable SQLite database ({e})"
    finally:
        db.close()
    return None


def _schema_problem(path: Path, uri: str) -> str | None:
    """Why the SQLite database ``path`` is not an MLflow store that this MLflow can record in,
    with what to do (None if it is one, or holds no table yet: MLflow makes its tables), read
    without writing. MLflow itself would add its tables to any other program's database, and
    stops with a traceback on a schema newer or older than its own, or on a missing table."""
    import sqlite3

    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables -= {"sqlite_sequence", "sqlite_stat1"}
        if not tables - {"alembic_version"}:
            return None
        if "alembic_version" not in tables or not {"experiments", "runs"} <= tables:
            listed = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
            return (f"is not an MLflow store (another program's SQLite database, its tables: {listed}): MLflow "
                    f"would add its tables to it; move it aside, or {STORE_ADVICE}")
        revision = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e).lower():
            return None   # another writer holds it right now: the calls retry that
        return f"cannot be read ({e})"
    finally:
        db.close()
    import mlflow
    from mlflow.store.db import utils as mlflow_db   # MLflow's schema: its migrations and tables

    from alembic.script import ScriptDirectory

    migrations = ScriptDirectory.from_config(mlflow_db._get_alembic_config(""))
    head = migrations.get_current_head()
    known = {r.revision for r in migrations.walk_revisions()}
    revision = revision[0] if revision else None
    if revision is None:
        return ("has MLflow's tables but no schema revision (alembic_version is empty): it is damaged; restore it "
                f"from a backup, or move it aside (MLflow makes a new one), or {STORE_ADVICE}")
    if revision not in known:
        return (f"was written by a newer MLflow (schema revision {revision}, unknown to MLflow {mlflow.__version__} "
                f"here): install that MLflow here (pip install -U mlflow), or {STORE_ADVICE}")
    if revision != head:
        return (f"was written by an older MLflow (schema revision {revision}; MLflow {mlflow.__version__} here "
                f"expects {head}): back it up, then upgrade it with `mlflow db upgrade {uri}`")
    missing = sorted(set(mlflow_db.Base.metadata.tables) - tables)
    if missing:
        return (f"lacks MLflow's table(s) {', '.join(missing)}: it is damaged; restore it from a backup, or "
                f"move it aside (MLflow makes a new one), or {STORE_ADVICE}")
    return None


def _transient(error: Exception) -> str | None:
    """Why ``error`` may go away when retried, or None if it will not."""
    text = str(error).lower()
    if "connection refused" in text or "failed to establish a new connection" in text:
        return None   # no server listens: retrying only delays the error
    if "database is locked" in text or "database is busy" in text:
        return "SQLite store locked by another writer"
    if re.search(r"\b(429|500|502|503|504)\b", text):
        return "server busy or restarting (HTTP 429/5xx)"
    if "timed out" in text or "timeout" in text:
        return "request timed out"
    return None


def _disk_full(error: BaseException) -> bool:
    import errno

    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(error).lower()


def _unreachable(error: Exception) -> bool:
    text = str(error).lower()
    # "connection broken" / "aborted" / "reset": the server went away while it answered (a
    # response cut mid-body, seen when a server is killed during get_metric_history)
    return any(s in text for s in ("connection refused", "failed to establish a new connection",
                                   "max retries exceeded", "timed out", "remotedisconnected",
                                   "connection broken", "connection aborted", "connection reset"))


def _retry(call, *args, budget_s: float = RETRY_BUDGET_S, **kwargs):
    """Run an MLflow call, retrying transient failures (:func:`_transient`) for ``budget_s`` s.

    Every retry is printed. A failure to reach the store becomes a :class:`TrackingError`
    naming it; any other error is raised as it is.
    """
    deadline = time.monotonic() + budget_s
    delay, attempt = 0.1, 0
    name = getattr(call, "__name__", "call")
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as e:  # mlflow wraps the driver's errors in several exception types
            reason = _transient(e)
            attempt += 1
            if reason is None or time.monotonic() + delay > deadline:
                if reason is not None or _unreachable(e):
                    raise TrackingError(f"MLflow store {tracking_uri()}: {name} failed "
                                        f"({reason or 'not reachable'}, {attempt} attempt(s)): "
                                        f"{str(e).splitlines()[0][:300]}") from None
                raise
            print(f"mlflow: {name} failed ({reason}); retry {attempt} in {delay:.1f} s", file=sys.stderr,
                  flush=True)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)


def _client():
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def init_store(profile: str) -> str:
    """Create the store (schema migrations included) and the profile's experiment; return its id.

    Idempotent. Run it once before starting many jobs, so that they do not race to create the
    schema or the experiment.
    """
    uri = tracking_uri()
    # only the cheap part here (every run's start calls this): the whole check_store ran once
    # before anything was written (train_cohort, report, tracking-init)
    check_reachable(uri)
    client = _client()
    name = experiment_name(profile)
    found = _retry(client.get_experiment_by_name, name)
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps(RUNS_VIEW)}
    if found is not None:
        for key, value in tags.items():
            if found.tags.get(key) != value:   # made by earlier code
                _retry(client.set_experiment_tag, found.experiment_id, key, value)
        return found.experiment_id
    kwargs = {"tags": tags}
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the database instead of in the working directory of each job
        kwargs["artifact_location"] = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    try:
        return _retry(client.create_experiment, name, **kwargs)
    except TrackingError:
        raise
    except Exception:
        found = _retry(client.get_experiment_by_name, name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def runs_url(base: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in MLflow's UI at ``base``: the Model training
    view (MLflow 3 opens the GenAI one unless the address says otherwise) with our columns."""
    return f"{base.rstrip('/')}/{_runs_route(experiment_id)}"


def _runs_route(experiment_id: str) -> str:
    # MLflow's UI routes are hash-based: a link inside it may be relative, and works on any host
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning"


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


def _dataset_input(name: str, folder: str, md5: str):
    """The data set as an MLflow input: its folder as source, its archive's md5 as digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():
        # mlflow registers the file scheme twice and warns that it picked one of the two
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(folder).resolve().as_uri())
    dataset = MetaDataset(source, name=name, digest=md5)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])


def run_name(spec) -> str:
    """A training run's MLflow name: what tells runs apart first, the seed (what differs between
    the runs nested under one cell) and the method, then the rest of the id, so that names cut
    short in the runs table stay distinguishable ("seed0 at-sum-p2 | cifar10/wrn-16-1_from_wrn-16-2";
    a sweep's method keeps its value: "seed0 at-sum-p2/beta=300 | ..."). The id itself is the
    tag at.run_id."""
    suffix = f"/{spec.method_name}/seed{spec.seed}"
    if spec.id.endswith(suffix) and len(spec.id) > len(suffix):
        return f"seed{spec.seed} {spec.method_name} | {spec.id[:-len(suffix)]}"
    parts = spec.id.split("/")
    if len(parts) >= 3 and parts[-1] == f"seed{spec.seed}":
        return f"{parts[-1]} {parts[-2]} | {'/'.join(parts[:-2])}"
    return spec.id


class RunTracker:
    """The MLflow run of one training run.

    ``id_file`` (in the run's folder) remembers the MLflow run id as soon as the run exists, so a
    run killed before its first checkpoint leaves no orphan: the next fresh start deletes it,
    unless it is FINISHED (a finished run is a result: it is never deleted nor changed).
    """

    def __init__(self, spec, id_file: Path):
        self.spec = spec   # the run's at.spec.RunSpec
        self.id_file = Path(id_file)
        self.client = _client()
        self.run_id: str | None = None
        self.was_finished = False   # resumed a run that MLflow already has as FINISHED

    def status(self, run_id: str) -> str | None:
        try:
            return _retry(self.client.get_run, run_id).info.status
        except TrackingError:
            raise
        except Exception:  # deleted, or in another store
            return None

    def start(self, resume_run_id: str | None, tags: dict) -> str:
        from mlflow.entities import Param, RunTag

        experiment_id = init_store(self.spec.profile)   # checks the server first
        status = self.status(resume_run_id) if resume_run_id is not None else None
        if status is not None:
            self.run_id = resume_run_id
            # killed between finishing and removing last.pt: the MLflow run is complete already
            self.was_finished = status == "FINISHED"
            if not self.was_finished:
                _retry(self.client.update_run, resume_run_id, status="RUNNING")
            return resume_run_id
        if self.id_file.exists():
            orphan = self.id_file.read_text().strip()
            if self.status(orphan) not in (None, "FINISHED"):
                _retry(self.client.delete_run, orphan)
        name = run_name(self.spec)
        all_tags = {RUN_ID_TAG: self.spec.id, "mlflow.runName": name, **tags}
        run = _retry(self.client.create_run, experiment_id, run_name=name,
                     tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        atomic.write_text(self.id_file, self.run_id)
        params = _flatten("", {k: v for k, v in self.spec.to_dict().items() if k != "id"}, {})
        # MLflow caps a param value at 6000 characters and a batch at 100 params
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, self.run_id, params=items[i:i + 100])
        _retry(self.client.log_batch, self.run_id, tags=[RunTag("checkpoint_path", tags.get("checkpoint_path", ""))])
        if tags.get("data_md5") and self.spec.data_dir:
            self._log_data_set(self.spec.dataset, self.spec.data_dir, str(tags["data_md5"]))
        return self.run_id

    def _log_data_set(self, name: str, folder: str, md5: str, attempts: int = 5) -> None:
        """Log the data set as the run's input. Runs starting at the same moment race on MLflow's
        one row per (experiment, data set, digest): the loser's insert fails on the unique
        constraint (seen with 16 concurrent jobs on SQLite), and its retry finds the row and
        links it."""
        for attempt in range(attempts):
            try:
                _retry(self.client.log_inputs, self.run_id, [_dataset_input(name, folder, md5)])
                return
            except Exception as e:  # noqa: BLE001 - only the race is retried, the rest re-raised
                text = str(e).lower()
                if ("unique constraint" not in text and "integrityerror" not in text) or attempt == attempts - 1:
                    raise
                print(f"[{self.spec.id}] MLflow: data set {name} was being recorded by another run "
                      f"at the same moment; retrying", file=sys.stderr, flush=True)
                time.sleep(0.2 * (attempt + 1))

    def logged_epochs(self, budget_s: float = RETRY_BUDGET_S) -> set[int]:
        return {m.step for m in _retry(self.client.get_metric_history, self.run_id, "test_error", budget_s=budget_s)}

    def _send_epochs(self, rows: list[dict], budget_s: float) -> None:
        from mlflow.entities import Metric

        have = self.logged_epochs(budget_s)
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
                _retry(self.client.log_batch, self.run_id, metrics=batch, budget_s=budget_s)
                batch = []
            batch += epoch_metrics
        if batch:
            _retry(self.client.log_batch, self.run_id, metrics=batch, budget_s=budget_s)

    def log_epochs(self, rows: list[dict]) -> None:
        """Send the per-epoch rows (``epoch`` is the step) that MLflow does not have yet.

        Called after each checkpoint with the whole history, so an epoch whose metrics were not
        sent before a kill (or while the store was away) is sent later, and none is sent twice.
        A store that does not answer within :data:`MIDRUN_BUDGET_S` is reported and training
        goes on (module docstring).
        """
        if self.was_finished:
            return
        try:
            self._send_epochs(rows, MIDRUN_BUDGET_S)
        except TrackingError as e:
            print(f"[{self.spec.id}] warning: {e}; training goes on, the epochs are sent when the "
                  f"store answers again (the run cannot finish before)", file=sys.stderr, flush=True)

    def sync(self, rows: list[dict]) -> None:
        """Send every epoch the store lacks, or raise :class:`TrackingError`: call before the
        final outputs are written, so that a run never finishes with an incomplete MLflow run."""
        if not self.was_finished:
            self._send_epochs(rows, RETRY_BUDGET_S)

    def finish(self, summary: dict, files: list[Path]) -> None:
        """Final metrics and files, then FINISHED. ``files`` become artifacts of the run: the
        checkpoint among them is stored as the file it is, not as an MLflow model, because an
        MLflow PyTorch model is a pickled module whose loading runs code, exactly what our
        checkpoint format (loaded with weights_only=True) avoids; it also keeps spec and history."""
        from mlflow.entities import Metric

        if self.was_finished:
            return
        now = int(time.time() * 1000)
        numbers = [Metric(k, float(v), now, 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        _retry(self.client.log_batch, self.run_id, metrics=numbers)
        for f in files:
            try:
                _retry(self.client.log_artifact, self.run_id, str(f))
            except TrackingError:
                raise
            except Exception as e:  # noqa: BLE001 - a full disk, a read-only or forbidden folder, ...
                # not a finished record (a FINISHED run is never touched again, so its artifacts
                # would never come): the caller marks the run FAILED, and a retry, once the store
                # takes files again, stores them and finishes it without training
                text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                fix = "make room there" if _disk_full(e) else "make it writable"
                raise WriteError(f"could not store {f} as an artifact of MLflow run {self.run_id} "
                                 f"({self.client.get_run(self.run_id).info.artifact_uri}): {text}; "
                                 f"{fix} and run again (the run is finished from its files)") from None
        _retry(self.client.set_terminated, self.run_id, "FINISHED")

    def _end(self, status: str) -> None:
        # called while another error (SIGTERM, a crash) is being raised: a store that is away
        # must not replace that error, so this is best effort
        if self.run_id is None or self.was_finished:
            return
        try:
            _retry(self.client.set_terminated, self.run_id, status, budget_s=MIDRUN_BUDGET_S)
        except Exception as e:  # noqa: BLE001 - reported, and the original error goes on
            print(f"[{self.spec.id}] warning: could not mark MLflow run {self.run_id} {status}: "
                  f"{str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)

    def interrupted(self) -> None:
        self._end("KILLED")

    def failed(self) -> None:
        self._end("FAILED")


# What a training run's MLflow run gets at its end, beside its epochs: these metrics of its
# metrics.json, and its final outputs (at.member.FINAL_OUTPUTS) as artifacts.
SUMMARY_METRICS = ("final_test_error", "best_test_error", "student_params", "wall_time_s")


class Recorder:
    """What a cohort's training tells MLflow, through the one object the loop calls: at a run's
    start, after each epoch, around its final outputs, and at its failure or stop. One
    :class:`RunTracker` per member. Off (``enabled`` false: tracking turned off, or a rank other
    than 0, which never writes) every call does nothing, so the loop reads the same either way.

    Reads of a member (at.member.Member) its spec, folder, history, arithmetic and execution,
    and sets its ``mlflow_run_id``: the resume state keeps it, so that a restart continues the
    same MLflow run (``force``: a retrained run gets a new one)."""

    def __init__(self, enabled: bool, force: bool, data_md5: str):
        self.enabled = enabled
        self.force = force
        self.data_md5 = data_md5
        self.trackers: dict[str, RunTracker] = {}

    def start(self, member) -> None:
        """The member's MLflow run (continued, or new), with the epochs it has trained so far."""
        if not self.enabled:
            return
        from at.data.download import read_source_record

        spec = member.spec
        tracker = self.trackers[member.id] = RunTracker(spec, member.out / "mlflow_run_id")
        tracker.start(None if self.force else member.mlflow_run_id, tags={
            "student": spec.student, "teacher": spec.teacher or "none",
            "method": spec.method_name, "seed": spec.seed, "data_md5": self.data_md5,
            # where the data came from (params.yaml's URL or an override's path), as the download recorded it
            "data_source": read_source_record(spec.data_dir).get("url", "a folder of your own") if spec.data_dir else "none",
            "git_commit": git_commit(), "profile": spec.profile,
            "checkpoint_path": str((member.out / "checkpoint.pt").resolve()),
            "device": str(member.arithmetic.device), "precision": member.arithmetic.precision,
            # how its networks executed (at.execution): chosen per machine, so recorded per run
            "layout": member.layout, "compile": member.execution["student"]["compile"],
            "teacher_layout": member.teacher_layout or "none",
        })
        member.mlflow_run_id = tracker.run_id
        tracker.log_epochs(member.history)

    def epoch(self, member) -> None:
        """After an epoch: the epochs MLflow lacks (training goes on if the store is away)."""
        if self.enabled:
            self.trackers[member.id].log_epochs(member.history)

    def finishing(self, member) -> None:
        """Before the final outputs are written: MLflow gets every epoch, or this raises (the
        failure policy above). A run whose outputs are written again from its final state, or
        whose MLflow run is finished from its files, starts its MLflow run here."""
        if not self.enabled:
            return
        if member.id not in self.trackers:
            self.start(member)
        self.trackers[member.id].sync(member.history)

    def finished(self, member, metrics: dict) -> None:
        """Once the final outputs are written: the summary metrics, the files, then FINISHED."""
        if self.enabled:
            self.trackers[member.id].finish({k: v for k, v in metrics.items() if k in SUMMARY_METRICS},
                                            [member.out / name for name in member.OUTPUTS])

    def failed(self, member) -> None:
        if member.id in self.trackers:
            self.trackers[member.id].failed()

    def interrupted(self, member) -> None:
        if member.id in self.trackers:
            self.trackers[member.id].interrupted()

    def unfinished(self, member, final: dict) -> bool:
        """Whether a finished run's MLflow run did not finish (killed between writing its
        outputs and telling MLflow; a full disk at the artifacts): then the member takes its
        history and MLflow run from its final checkpoint ``final``, for the caller to finish
        that MLflow run from the files, without training. A run recorded in another store is
        left alone."""
        if not self.enabled:
            return False
        from at import console

        id_file = member.out / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else (final or {}).get("mlflow_run_id")
        if not run_id:
            return False
        status = RunTracker(member.spec, id_file).status(run_id)
        if status in (None, "FINISHED"):
            return False
        console.say(f"[{member.id}] outputs complete but its MLflow run {run_id} is {status}: finishing it from "
                    f"the files (no training)")
        member.history, member.mlflow_run_id = final["history"], run_id
        return True


def _search(client, experiment_id: str, filter_string: str) -> list:
    """Every run of the experiment that matches, page by page (a page holds at most 1000)."""
    found, token = [], None
    while True:
        page = _retry(client.search_runs, [experiment_id], filter_string, max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _latest_runs_by_id(client, experiment_id: str) -> dict[str, object]:
    """Each training run's newest FINISHED MLflow run, by its grid id."""
    found: dict[str, object] = {}
    for run in _search(client, experiment_id, "attributes.status = 'FINISHED'"):
        rid = run.data.tags.get(RUN_ID_TAG)
        if rid and (rid not in found or run.info.start_time > found[rid].info.start_time):
            found[rid] = run
    return found


def _runs_of_kind(client, experiment_id: str, kind: str) -> list:
    return _search(client, experiment_id, f"tags.`{KIND_TAG}` = '{kind}'")


def cell_key(cell: dict) -> str:
    return f"{cell['table']}/{cell['row']}/{cell['column']}"


def cell_name(cell: dict) -> str:
    """A cell's run name: what tells cells apart first, its row and column, then the table that
    rows next to it share ("wrn-16-1←16-2 at | table1", "sum-p2 | table2"), so that names cut
    short in the runs table (about 17 characters) stay distinguishable. A table whose only
    column is its metric (Table 2's "error") is named by its rows alone; a student←teacher pair
    of one family names the family once."""
    if cell["column"] in ("error", cell.get("metric")):
        return f"{cell['row']} | {cell['table']}"
    return f"{_pair(cell['row'])} {cell['column']} | {cell['table']}"


def _pair(row: str) -> str:
    student, found, teacher = row.partition("_from_")
    if not found:
        return row
    family = student.split("-")[0] + "-"
    return f"{student}←{teacher[len(family):] if teacher.startswith(family) else teacher}"


def _run_link(experiment_id: str, run) -> str:
    # a link inside the MLflow UI (its routes are hash-based: relative links work on any host),
    # to the Model training view of the run; a '|' in the name would end the table's cell
    name = run.info.run_name.replace("|", "\\|")
    return f"[{name}](#/experiments/{experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning)"


def _cell_description(experiment_id: str, cell: dict, seeds: dict, nested_under: list[str] = ()) -> str:
    """The cell run's description (shown on its page): every run it aggregates, with a link, its
    seed and final test error, whichever cell that run is nested under (named when another)."""
    lines = [f"**{cell_key(cell)}**: mean of the final `test_error` over the seeds below "
             f"(n = {cell.get('n', 0)}).", ""]
    if nested_under:
        lines += [f"In the runs table these runs are nested under {' and '.join(f'**{n}**' for n in nested_under)}, "
                  f"the first cell they count in (MLflow gives a run one parent).", ""]
    lines += ["| seed | run | final test error (%) | also in |", "|--:|---|--:|---|"]
    for rid in sorted(cell["run_ids"]):
        run = seeds.get(rid)
        if run is None:
            lines.append(f"| | `{rid}` (not finished in this store) | | |")
            continue
        others = [c for c in json.loads(run.data.tags.get(CELLS_TAG, "[]")) if c != cell_key(cell)]
        error = run.data.metrics.get("test_error")
        lines.append(f"| {run.data.params.get('seed', '')} | {_run_link(experiment_id, run)} | "
                     f"{'' if error is None else f'{error:.2f}'} | {', '.join(others)} |")
    # MLflow's own links from this page (Child runs, the breadcrumb) drop the runs table's view
    lines += ["", f"[Back to the runs table]({_runs_route(experiment_id)})"]
    return "\n".join(lines) + "\n"


def record_cells(profile: str, cells: list[dict], report_dir: Path | None = None,
                 outside_cells: list[str] = ()) -> dict[str, str]:
    """Make or update one parent run per table cell, nest each seed's run under it, and store
    the report folder as the artifacts of the profile's report run.

    ``cells``: ``{table, row, column, metric, mean, std, n, run_ids}`` per cell, ``run_ids`` the
    grid ids of its seeds' runs (``mean``/``std`` may be None: too few finished seeds). Parent
    runs are found by their tag ``at.cell``, so calling this again updates them and never makes
    a second one. MLflow gives a run one parent: a run shared by several cells nests under the
    first and every cell's description lists and links all of its runs. ``outside_cells``: the
    grid ids of runs that fill no cell (a teacher trained only to teach), nested under one
    "teachers" run so that they do not sit among the cells. Returns ``{"table/row/column":
    parent MLflow run id}``.
    """
    from mlflow.entities import Metric, RunTag

    client = _client()
    experiment_id = init_store(profile)
    found = {r.data.tags[CELL_TAG]: r.info for r in _runs_of_kind(client, experiment_id, "cell")}
    parents = {key: info.run_id for key, info in found.items()}
    started = {key: info.start_time for key, info in found.items()}
    seeds = _latest_runs_by_id(client, experiment_id)
    now = int(time.time() * 1000)
    cells_of_run: dict[str, list[str]] = {}
    for cell in sorted(cells, key=cell_key):
        for rid in cell["run_ids"]:
            cells_of_run.setdefault(rid, []).append(cell_key(cell))
    for rid, keys in cells_of_run.items():
        if rid in seeds:   # else not finished (or not tracked in this store): nothing to nest
            seeds[rid].data.tags[CELLS_TAG] = json.dumps(keys)   # read by the cells' descriptions
    names = {cell_key(cell): cell_name(cell) for cell in cells}
    for cell in sorted(cells, key=cell_key):
        key = cell_key(cell)
        name = names[key]
        # where its seeds are in the runs table: nested under this cell, or (runs shared with
        # another cell) under the first cell they count in, which a column of the view names
        homes = sorted({cells_of_run[rid][0] for rid in cell["run_ids"] if rid in seeds})
        where = "; ".join("expand this row" if home == key else f"expand {names[home]}" for home in homes)
        tags = {KIND_TAG: "cell", CELL_TAG: key, "table": cell["table"], "row": cell["row"],
                "column": cell["column"], "metric": cell["metric"], "mlflow.runName": name,
                "run_ids": json.dumps(sorted(cell["run_ids"])), SEEDS_TAG: where or "none finished",
                "mlflow.note.content": _cell_description(experiment_id, cell, seeds,
                                                         [names[h] for h in homes if h != key])}
        if key not in parents:
            # a summary, not a computation: no duration (its start is its end)
            run = _retry(client.create_run, experiment_id, run_name=name, tags=tags, start_time=now)
            parents[key], started[key] = run.info.run_id, now
        else:
            _retry(client.log_batch, parents[key], tags=[RunTag(k, v) for k, v in tags.items()])
        stats = {k: cell[k] for k in ("mean", "std", "n") if cell.get(k) is not None}
        if cell.get("mean") is not None:
            # the seeds' metric name too: one column of the runs table shows cells and seeds alike
            stats["test_error"] = cell["mean"]
        _retry(client.log_batch, parents[key], metrics=[Metric(k, float(v), now, 0) for k, v in stats.items()])
        _retry(client.set_terminated, parents[key], "FINISHED", end_time=started[key])
    # each seed's run once: the cells it counts in, and the first of them as its parent
    for rid, keys in sorted(cells_of_run.items()):
        if rid in seeds:
            _retry(client.log_batch, seeds[rid].info.run_id,
                   tags=[RunTag(CELLS_TAG, json.dumps(keys)), RunTag(PARENT_TAG, parents[keys[0]])])
    lone = sorted(rid for rid in outside_cells if rid in seeds and rid not in cells_of_run)
    if lone:
        group = _group_run(client, experiment_id, "teachers", "teachers (in no table cell)")
        for rid in lone:
            _retry(client.log_batch, seeds[rid].info.run_id, tags=[RunTag(PARENT_TAG, group)])
    if report_dir is not None:
        _record_report(client, experiment_id, profile, Path(report_dir))
    return {key: parents[key] for key in (cell_key(c) for c in cells)}


def _group_run(client, experiment_id: str, group: str, name: str) -> str:
    """The run, found by its tag or made once, under which runs of one kind are nested."""
    found = _search(client, experiment_id, f"tags.`{KIND_TAG}` = 'group' and tags.`at.group` = '{group}'")
    if found:
        return found[0].info.run_id
    now = int(time.time() * 1000)
    run = _retry(client.create_run, experiment_id, run_name=name, start_time=now,
                 tags={KIND_TAG: "group", "at.group": group, "mlflow.runName": name})
    _retry(client.set_terminated, run.info.run_id, "FINISHED", end_time=now)   # no duration: nothing ran
    return run.info.run_id


def _record_report(client, experiment_id: str, profile: str, report_dir: Path) -> str:
    found = _runs_of_kind(client, experiment_id, "report")
    if found:
        run_id, start = found[0].info.run_id, found[0].info.start_time
    else:
        start = int(time.time() * 1000)
        run_id = _retry(client.create_run, experiment_id, run_name=f"report/{profile}", start_time=start,
                        tags={KIND_TAG: "report", "mlflow.runName": f"report/{profile}"}).info.run_id
    _retry(client.log_artifacts, run_id, str(report_dir))
    # no duration: what took time (rendering the report) happened before, outside MLflow
    _retry(client.set_terminated, run_id, "FINISHED", end_time=start)
    return run_id
