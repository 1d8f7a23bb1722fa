"""The report's inputs: the run list, the context, and what each run folder holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from at import paper

# The metrics.json key that holds each cell's number; every other cell reads final_test_error.
_METRIC_BY_CELL = {("imagenet", "top5"): "final_test_error_top5"}
_DEFAULT_METRIC = "final_test_error"

_REQUIRED_RUN_KEYS = ("id", "out_dir", "cells", "seed")


class ReportInputError(ValueError):
    """A run list, context or run folder the report cannot be built from."""


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class RunResult:
    """One training run of the grid and what its folder holds."""

    id: str
    seed: int
    out_dir: Path
    cells: tuple[tuple[str, str, str], ...]
    metrics: dict | None  # None: metrics.json is missing (the run did not finish)

    @property
    def missing(self) -> bool:
        return self.metrics is None


def validate_context(context: dict) -> tuple[str, str, dict[str, str]]:
    if not isinstance(context, dict):
        raise ReportInputError(f"context must be a dict, got {type(context).__name__}")
    profile = context.get("profile")
    description = context.get("description")
    if not isinstance(profile, str) or not profile.strip():
        raise ReportInputError(f"context['profile'] must be a non-empty string, got {profile!r}")
    if not isinstance(description, str) or not description.strip():
        raise ReportInputError(
            "context['description'] must be a non-empty string saying which data, subset and "
            f"epochs the runs used; got {description!r}"
        )
    if "\n" in description:
        raise ReportInputError("context['description'] must be one line (it goes into titles)")
    not_run = context.get("not_run", {}) or {}
    if not isinstance(not_run, dict):
        raise ReportInputError(f"context['not_run'] must be a dict, got {type(not_run).__name__}")
    for table, reason in not_run.items():
        if table not in paper.TABLES:
            raise ReportInputError(
                f"context['not_run'] names unknown table {table!r}; known: {paper.table_names()}"
            )
        if not isinstance(reason, str) or not reason.strip():
            raise ReportInputError(f"context['not_run'][{table!r}] must give a reason")
    return profile, description, dict(not_run)


def validate_runs(runs: Sequence[dict], not_run: dict[str, str]) -> list[dict]:
    if isinstance(runs, (str, bytes, dict)) or not isinstance(runs, Sequence):
        raise ReportInputError(f"runs must be a list of dicts, got {type(runs).__name__}")
    seen: set[str] = set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ReportInputError(f"runs[{i}] must be a dict, got {type(run).__name__}")
        absent = [k for k in _REQUIRED_RUN_KEYS if k not in run]
        if absent:
            raise ReportInputError(f"runs[{i}] lacks {absent}; required keys: {_REQUIRED_RUN_KEYS}")
        if run["id"] in seen:
            raise ReportInputError(f"run id {run['id']!r} appears twice in runs")
        seen.add(run["id"])
        if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
            raise ReportInputError(f"run {run['id']!r}: seed must be an int, got {run['seed']!r}")
        if not isinstance(run["cells"], (list, tuple)):
            raise ReportInputError(f"run {run['id']!r}: cells must be a list")
        for cell in run["cells"]:
            if not isinstance(cell, dict) or set(cell) != {"table", "row", "column"}:
                raise ReportInputError(
                    f"run {run['id']!r}: each cell must be a dict with keys table, row, column; "
                    f"got {cell!r}"
                )
            try:
                paper.check_cell(cell["table"], cell["row"], cell["column"])
            except ValueError as exc:
                raise ReportInputError(f"run {run['id']!r}: {exc}") from None
            if cell["table"] in not_run:
                raise ReportInputError(
                    f"run {run['id']!r} fills a cell of {cell['table']}, which context['not_run'] "
                    "says is not run in this profile: drop the run or the not_run entry"
                )
    return sorted(runs, key=lambda r: r["id"])


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read_metrics(run: dict, needed: set[str]) -> dict | None:
    path = Path(run["out_dir"]) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"run {run['id']!r}: cannot read {path}: {exc}") from None
    if not isinstance(metrics, dict):
        raise ReportInputError(f"run {run['id']!r}: {path} must hold a JSON object")
    for key in sorted(needed | {"final_epoch", "epochs"}):
        if key not in metrics:
            raise ReportInputError(f"run {run['id']!r}: {path} lacks key {key!r}")
    for key in sorted(needed):
        if not _is_number(metrics[key]):
            raise ReportInputError(
                f"run {run['id']!r}: {path}: {key} must be a number, got {metrics[key]!r}"
            )
    for key in ("final_epoch", "epochs"):
        if not isinstance(metrics[key], int) or isinstance(metrics[key], bool):
            raise ReportInputError(
                f"run {run['id']!r}: {path}: {key} must be an int, got {metrics[key]!r}"
            )
    return metrics


def metric_key(table: str, column: str) -> str:
    return _METRIC_BY_CELL.get((table, column), _DEFAULT_METRIC)


def load_runs(runs: list[dict]) -> list[RunResult]:
    results = []
    for run in runs:
        cells = tuple(
            sorted({(c["table"], c["row"], c["column"]) for c in run["cells"]})
        )
        needed = {metric_key(t, c) for t, _, c in cells} or {_DEFAULT_METRIC}
        results.append(
            RunResult(
                id=run["id"],
                seed=run["seed"],
                out_dir=Path(run["out_dir"]),
                cells=cells,
                metrics=_read_metrics(run, needed),
            )
        )
    return results

