"""One summary per cell of a table: the runs that fill it and the statistics of their numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from at import paper
from at.report import statistics
from at.report.inputs import ReportInputError, RunResult, metric_key


@dataclass
class CellSummary:
    """Our numbers for one cell of a paper table, beside the paper's."""

    table: str
    row: str
    column: str
    label: str
    paper: float
    runs: list[RunResult] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    not_run_reason: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.sample_std(self.values)

    @property
    def diff(self) -> float | None:
        mean = self.mean
        return None if mean is None else mean - self.paper

    @property
    def missing_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.missing]

    @property
    def status(self) -> str:
        if self.not_run_reason is not None:
            return "not run"
        if not self.values:
            return "missing"
        if self.missing_runs:
            return "partial"
        return "ok"

    @property
    def status_text(self) -> str:
        if self.status == "partial":
            return f"partial: {len(self.missing_runs)} of {len(self.runs)} runs missing"
        return self.status



def _cell_label(spec: dict, row: str, column: str) -> str:
    row_label = spec["rows"][row]["label"]
    if len(spec["columns"]) == 1:
        return row_label
    return f"{row_label}: {spec['columns'][column]}"


def summarize(results: list[RunResult], not_run: dict[str, str]) -> dict[str, list[CellSummary]]:
    """Per paper table, one CellSummary per cell in display order."""
    by_cell: dict[tuple[str, str, str], list[RunResult]] = {}
    for result in results:
        for cell in result.cells:
            by_cell.setdefault(cell, []).append(result)
    summaries: dict[str, list[CellSummary]] = {}
    for name in paper.table_names():
        spec = paper.get_table(name)
        cells = []
        for row in spec["rows"]:
            for column in spec["columns"]:
                summary = CellSummary(
                    table=name,
                    row=row,
                    column=column,
                    label=_cell_label(spec, row, column),
                    paper=spec["values"][row][column],
                )
                if name in not_run:
                    summary.not_run_reason = not_run[name]
                cell_runs = sorted(by_cell.get((name, row, column), []), key=lambda r: (r.seed, r.id))
                seeds = [r.seed for r in cell_runs]
                if len(set(seeds)) != len(seeds):
                    raise ReportInputError(
                        f"cell {name}/{row}/{column} has several runs with the same seed: "
                        f"{[(r.id, r.seed) for r in cell_runs]}"
                    )
                if not cell_runs and summary.not_run_reason is None:
                    summary.not_run_reason = "no run of this profile's grid fills this cell"
                summary.runs = cell_runs
                key = metric_key(name, column)
                for r in cell_runs:
                    if not r.missing:
                        summary.values.append(float(r.metrics[key]))
                        summary.epochs.append(int(r.metrics["final_epoch"]))
                cells.append(summary)
        summaries[name] = cells
    return summaries


