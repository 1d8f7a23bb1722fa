"""The report's inputs, checked: the run list, the context, and what each run folder holds.

The report trusts no metrics.json: each must say it belongs to the run it stands for (run_id),
to the profile being reported (profile) and to the data the report was asked about
(data_md5), and hold possible numbers (finite errors in [0, 100], the run's planned epochs).
Anything else is refused with one error naming the file and the problem, before anything is
written.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from at import checkpoint
from at.choices import METRIC_KEYS
from at.references import ReferenceTable
from at.report.layout import TableLayout, layouts
from at.schema import CELL_DEFAULTS

# the metric of a cell that names none (params.yaml's default, at.schema)
DEFAULT_METRIC = CELL_DEFAULTS["metric"]

REQUIRED_RUN_KEYS = ("id", "out_dir", "cells", "seed", "student", "method_name", "dataset",
                     "protocol_name", "epochs")
CELL_KEYS = ("table", "row", "column")   # and optionally metric


class ReportInputError(ValueError):
    """A run list, context or run folder the report cannot be built from."""


@dataclass(frozen=True)
class Context:
    """What the report is asked to render, beyond the runs (see `render`)."""

    profile: str
    description: str                  # one line: data, md5, epochs, seeds, code (said once, in the README)
    purpose: str | None               # one line said first everywhere (e.g. what smoke runs are)
    footer: str                       # one short line under every figure (profile, data, epochs, code)
    full_scale: bool                  # the runs follow the references' protocols on the full data
    not_run: dict[str, str]           # {table: reason}
    tables: dict[str, TableLayout]    # every table of the grid, in order
    data_md5: dict[str, str | None]   # {data set: md5 its runs must have used}; None: unknown


@dataclass(frozen=True)
class CellDefinition:
    """What a cell trains, as far as pairing needs it (from the run that fills it)."""

    dataset: str
    protocol: str
    model: str
    weights: str | None
    method: str
    metric: str


@dataclass(frozen=True)
class PlannedRun:
    """One run the report is asked about (a grid run with its protocol's planned epochs, or a
    hand-made one), checked: what the report reads of it. ``cells``: (table, row, column,
    metric) of each cell it fills."""

    id: str
    out_dir: str
    seed: int
    epochs: int
    dataset: str
    protocol_name: str
    student: str
    weights: str | None
    method_name: str
    cells: tuple[tuple[str, str, str, str], ...]


@dataclass(frozen=True)
class RunResult:
    """One training run of the grid and what its folder holds."""

    id: str
    seed: int
    out_dir: Path
    cells: tuple[tuple[str, str, str], ...]
    definitions: dict[tuple[str, str, str], CellDefinition]
    metrics: dict | None  # None: metrics.json is missing (the run did not finish)

    @property
    def missing(self) -> bool:
        return self.metrics is None


def _one_line(key: str, value, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ReportInputError(f"context[{key!r}] must be a non-empty string, got {value!r}")
    if "\n" in value:
        raise ReportInputError(f"context[{key!r}] must be one line (it goes into titles)")
    return value


def validate_context(context: dict) -> Context:
    if not isinstance(context, dict):
        raise ReportInputError(f"context must be a dict, got {type(context).__name__}")
    profile = _one_line("profile", context.get("profile"), required=True)
    # description: which data, subset and epochs the runs used (at.provenance.describe)
    description = _one_line("description", context.get("description"), required=True)
    purpose = _one_line("purpose", context.get("purpose"), required=False)
    # footer: at.provenance.footer; without one, the figures point at the README
    footer = (_one_line("footer", context.get("footer"), required=False)
              or f"{profile} profile · provenance: README.md")
    # full_scale and not_run are optional: a context made by hand may leave them out (false, none)
    full_scale = context.get("full_scale", False)
    if not isinstance(full_scale, bool):
        raise ReportInputError(f"context['full_scale'] must be True or False, got {full_scale!r}")
    grid_tables = context.get("tables")
    if not isinstance(grid_tables, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("rows"), list) and isinstance(t.get("columns"), list)
            for t in grid_tables.values()):
        raise ReportInputError("context['tables'] must map every table of params.yaml to "
                               "{'rows': [...], 'columns': [...]} (at.report.layout.grid_tables)")
    refs = context.get("references")
    if not isinstance(refs, dict) or not all(isinstance(r, ReferenceTable) for r in refs.values()):
        raise ReportInputError("context['references'] must be the tables of a references file "
                               "(at.references.load)")
    tables = layouts(grid_tables, refs)
    not_run = context.get("not_run") or {}
    if not isinstance(not_run, dict):
        raise ReportInputError(f"context['not_run'] must be a dict, got {type(not_run).__name__}")
    for table, reason in not_run.items():
        if table not in tables:
            raise ReportInputError(
                f"context['not_run'] names unknown table {table!r}; known: {list(tables)}")
        if not isinstance(reason, str) or not reason.strip():
            raise ReportInputError(f"context['not_run'][{table!r}] must give a reason")
    data_md5 = context.get("data_md5")
    if not isinstance(data_md5, dict):
        raise ReportInputError("context['data_md5'] must map each data set to the md5 its runs "
                               "must have used (from its data folder's source.json)")
    return Context(profile=profile, description=description, purpose=purpose, footer=footer,
                   full_scale=full_scale,
                   not_run=dict(not_run), tables=tables, data_md5=dict(data_md5))


def validate_runs(runs: Sequence[dict], context: Context) -> list[PlannedRun]:
    """The runs (dicts: a grid run's JSON with its planned ``epochs``, or hand-made) checked
    and typed once, sorted by id; ReportInputError naming the run and the key otherwise."""
    if isinstance(runs, (str, bytes, dict)) or not isinstance(runs, Sequence):
        raise ReportInputError(f"runs must be a list of dicts, got {type(runs).__name__}")
    seen: set[str] = set()
    planned = []
    for i, raw in enumerate(runs):
        if not isinstance(raw, dict):
            raise ReportInputError(f"runs[{i}] must be a dict, got {type(raw).__name__}")
        absent = [k for k in REQUIRED_RUN_KEYS if k not in raw]
        if absent:
            raise ReportInputError(f"runs[{i}] lacks {absent}; required keys: {REQUIRED_RUN_KEYS}")
        values = {k: raw[k] for k in REQUIRED_RUN_KEYS}
        run_id = values["id"]
        if run_id in seen:
            raise ReportInputError(f"run id {run_id!r} appears twice in runs")
        seen.add(run_id)
        for key in ("seed", "epochs"):
            if not _is_int(values[key]) or values[key] < 0:
                raise ReportInputError(f"run {run_id!r}: {key} must be a non-negative int, got {values[key]!r}")
        if not isinstance(values["cells"], (list, tuple)):
            raise ReportInputError(f"run {run_id!r}: cells must be a list")
        values["cells"] = tuple(_checked_cell(run_id, cell, context) for cell in values["cells"])
        values["out_dir"] = str(values["out_dir"])
        planned.append(PlannedRun(**values, weights=raw.get("weights")))
    return sorted(planned, key=lambda r: r.id)


def _checked_cell(run_id: str, cell: object, context: Context) -> tuple[str, str, str, str]:
    """(table, row, column, metric) of one of a run's cells, checked against the tables."""
    if not isinstance(cell, dict) or not set(CELL_KEYS) <= set(cell) or not set(cell) <= {*CELL_KEYS, "metric"}:
        raise ReportInputError(
            f"run {run_id!r}: each cell must be a dict with keys table, row, column "
            f"(and optionally metric); got {cell!r}")
    table, row, column = (cell[k] for k in CELL_KEYS)
    metric = cell.get("metric", DEFAULT_METRIC)
    layout = context.tables.get(table)
    if layout is None:
        raise ReportInputError(f"run {run_id!r}: unknown table {table!r}; known: {list(context.tables)}")
    for part, value, known in (("row", row, layout.rows), ("column", column, layout.columns)):
        if value not in known:
            raise ReportInputError(f"run {run_id!r}: unknown {part} {value!r} of {table}; known: {list(known)}")
    if metric not in METRIC_KEYS:
        raise ReportInputError(f"run {run_id!r}: unknown metric {metric!r}; known: {sorted(METRIC_KEYS)}")
    if table in context.not_run:
        raise ReportInputError(
            f"run {run_id!r} fills a cell of {table}, which context['not_run'] "
            "says is not run in this profile: drop the run or the not_run entry")
    return table, row, column, metric


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_metrics(run: PlannedRun, needed: set[str], context: Context) -> dict | None:
    """The run's metrics.json, checked to belong to this run and to hold possible numbers;
    None when there is none (the run did not finish)."""
    path = Path(run.out_dir) / "metrics.json"
    if not path.is_file():
        return None

    def refuse(problem: str) -> ReportInputError:
        return ReportInputError(f"run {run.id!r}: {path}: {problem}")

    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"run {run.id!r}: cannot read {path}: {exc}") from None
    if not isinstance(metrics, dict):
        raise refuse("must hold a JSON object")
    for key in sorted(needed | {"final_epoch", "epochs", "run_id", "profile", "data_md5"}):
        if key not in metrics:
            raise ReportInputError(f"run {run.id!r}: {path} lacks key {key!r}")
    # whose file is it: a metrics.json copied from another run, profile or data set is refused
    if metrics["run_id"] != run.id:
        raise refuse(f"run_id is {metrics['run_id']!r}, not {run.id!r}: the file belongs to "
                     "another run")
    if metrics["profile"] != context.profile:
        raise refuse(f"profile is {metrics['profile']!r}, not {context.profile!r}: the run was "
                     "trained for another profile")
    if run.dataset not in context.data_md5:
        raise refuse(f"no data md5 given for data set {run.dataset!r} (context['data_md5']) to "
                     "check the run against")
    expected = context.data_md5[run.dataset]
    if expected is None:
        raise refuse(f"cannot check data_md5 {metrics['data_md5']!r}: the {run.dataset} data "
                     "folder has no source.json (prepare the data first)")
    if metrics["data_md5"] != expected:
        raise refuse(f"data_md5 is {metrics['data_md5']!r}, but the {run.dataset} data folder "
                     f"holds {expected!r}: the run was trained on other data")
    # possible numbers only
    for key in sorted(needed):
        value = metrics[key]
        if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 100:
            raise refuse(f"{key} must be a test error in [0, 100] (%), got {value!r}")
    for key in ("final_epoch", "epochs"):
        if not _is_int(metrics[key]):
            raise refuse(f"{key} must be an int, got {metrics[key]!r}")
    if metrics["epochs"] != run.epochs:
        raise refuse(f"epochs is {metrics['epochs']}, but the run's protocol plans {run.epochs}")
    if not 1 <= metrics["final_epoch"] <= metrics["epochs"]:
        raise refuse(f"final_epoch {metrics['final_epoch']} is not between 1 and epochs "
                     f"({metrics['epochs']})")
    problem = unbound(path.parent, metrics)
    if problem:
        raise refuse(problem)
    return metrics


def unbound(folder: Path, metrics: dict) -> str | None:
    """Why a run's metrics.json is not the one its run wrote (None when it is, as far as the
    folder can tell): its bytes against the digests in the run's checkpoint.pt, and its numbers
    against the run's history.csv. A record without them (hand-made inputs, records committed
    without checkpoints) is checked against what is there."""
    final = folder / "checkpoint.pt"
    if final.is_file():
        try:
            saved = checkpoint.load(final, required=("spec",), mmap=True)
        except checkpoint.CheckpointError as e:
            return f"cannot check it against the run's checkpoint: {e}"
        for name, expected in sorted((saved.get(checkpoint.OUTPUT_DIGESTS) or {}).items()):
            written = folder / name
            if written.is_file() and checkpoint.digest(written.read_bytes()) != expected:
                return (f"{name} is not the file the run wrote (its sha256 differs from the one in {final}): "
                        f"restore it (`dvc checkout`, `git checkout`) or retrain the run with --force")
    history = folder / "history.csv"
    if not history.is_file():
        return None
    with open(history, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        errors = [float(r["test_error"]) for r in rows]
        last_epoch = int(rows[-1]["epoch"])
    except (KeyError, ValueError, IndexError):
        return f"its history.csv ({history}) has no test_error per epoch to check it against"
    expected = {"final_test_error": errors[-1], "best_test_error": min(errors), "final_epoch": last_epoch}
    differing = [f"{k} {metrics[k]!r} (history: {v!r})" for k, v in expected.items() if k in metrics and metrics[k] != v]
    if differing:
        return f"disagrees with the run's history.csv: {', '.join(differing)}"
    return None


def metric_key(metric: str) -> str:
    return METRIC_KEYS[metric]


def load_runs(runs: list[PlannedRun], context: Context) -> list[RunResult]:
    results = []
    for run in runs:
        definitions = {}
        for table, row, column, metric in run.cells:
            definitions[(table, row, column)] = CellDefinition(
                dataset=run.dataset, protocol=run.protocol_name, model=run.student,
                weights=run.weights, method=run.method_name, metric=metric)
        needed = {metric_key(d.metric) for d in definitions.values()} or {metric_key(DEFAULT_METRIC)}
        results.append(
            RunResult(
                id=run.id, seed=run.seed, out_dir=Path(run.out_dir),
                cells=tuple(sorted(definitions)), definitions=definitions,
                metrics=read_metrics(run, needed, context),
            )
        )
    return results


def expected_data_md5(dataset: str, folder: str | Path) -> str | None:
    """The data_md5 a run of `dataset` trained from `folder` records in its metrics.json.

    The same rule as the trainer's (at.data.sources): the md5 in the folder's source.json,
    "unknown" when that record has none, "user-folder" for a data set the user supplies as a
    folder (ImageNet); None when the folder has no source.json (nothing to check against).
    """
    from at.data.datasets import DATASETS
    from at.data.download import read_source_record
    from at.data.sources import USER_FOLDER

    if dataset in DATASETS and DATASETS[dataset].user_folder:
        return USER_FOLDER
    record = read_source_record(folder)
    if not record:
        return None
    return record.get("md5") or "unknown"
