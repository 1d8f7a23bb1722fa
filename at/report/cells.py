"""One summary per cell of a table: the runs that fill it, the statistics of their numbers, and
the paired difference to the cell's baseline.

The baseline of a cell (the rule, from params.yaml's structure alone): the cell of the SAME
table whose method is `baseline` and which trains the same model on the same data set with the
same protocol, starting weights and metric. Where several cells qualify, the one in the same row
is taken, then the one in the same column, then the first in display order. A cell whose own
method is `baseline` has no baseline (it is one); neither has a cell without runs. So Table 1's
student column is the baseline of its row, Table 2's `none` row and Table 3's `baseline` row of
theirs, Table 4's `student` row of each data set's column, and a user table gets the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from at.method import BASELINE_METHOD
from at.report import statistics
from at.report.inputs import CellDefinition, Context, ReportInputError, RunResult, metric_key
from at.report.layout import TableLayout


@dataclass
class CellSummary:
    """Our numbers for one cell of a table, beside the reference's."""

    table: str
    row: str
    column: str
    label: str
    reference: float | None            # None: no published number for this cell
    runs: list[RunResult] = field(default_factory=list)
    by_seed: dict[int, float] = field(default_factory=dict)   # finished runs' errors
    epochs: list[int] = field(default_factory=list)
    not_run_reason: str | None = None
    definition: CellDefinition | None = None
    baseline: "CellSummary | None" = None
    paired: statistics.PairedDifference | None = None

    @property
    def values(self) -> list[float]:
        return [self.by_seed[s] for s in sorted(self.by_seed)]

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.sample_std(self.values)

    @property
    def diff(self) -> float | None:
        """Our mean minus the reference; None when either is missing."""
        if self.mean is None or self.reference is None:
            return None
        return self.mean - self.reference

    @property
    def missing_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.missing]

    @property
    def status(self) -> str:
        if self.not_run_reason is not None:
            return "not run"
        if not self.by_seed:
            return "missing"
        if self.missing_runs:
            return "partial"
        return "ok"

    @property
    def status_text(self) -> str:
        if self.status == "partial":
            return f"partial: {len(self.missing_runs)} of {len(self.runs)} runs missing"
        return self.status


def _summarize_table(layout: TableLayout, by_cell: dict, not_run: str | None) -> list[CellSummary]:
    cells = []
    for row, column in layout.cells():
        summary = CellSummary(table=layout.name, row=row, column=column,
                              label=layout.cell_label(row, column),
                              reference=layout.reference.get((row, column)),
                              not_run_reason=not_run)
        cell_runs = sorted(by_cell.get((layout.name, row, column), []), key=lambda r: (r.seed, r.id))
        seeds = [r.seed for r in cell_runs]
        if len(set(seeds)) != len(seeds):
            raise ReportInputError(
                f"cell {layout.name}/{row}/{column} has several runs with the same seed: "
                f"{[(r.id, r.seed) for r in cell_runs]}")
        if not cell_runs and summary.not_run_reason is None:
            summary.not_run_reason = "no run of this profile's grid fills this cell"
        definitions = {r.definitions[(layout.name, row, column)] for r in cell_runs}
        if len(definitions) > 1:
            raise ReportInputError(f"cell {layout.name}/{row}/{column} is filled by runs that "
                                   f"train different things: {sorted(map(str, definitions))}")
        summary.definition = next(iter(definitions), None)
        summary.runs = cell_runs
        for r in cell_runs:
            if not r.missing:
                summary.by_seed[r.seed] = float(r.metrics[metric_key(summary.definition.metric)])
                summary.epochs.append(int(r.metrics["final_epoch"]))
        cells.append(summary)
    return cells


def _baseline_key(d: CellDefinition) -> tuple:
    return (d.dataset, d.protocol, d.model, d.weights, d.metric)


def find_baseline(cell: CellSummary, table: list[CellSummary]) -> CellSummary | None:
    """The cell's baseline by the rule of this module's docstring; None if it has none."""
    if cell.definition is None or cell.definition.method == BASELINE_METHOD:
        return None
    candidates = [b for b in table
                  if b is not cell and b.definition is not None
                  and b.definition.method == BASELINE_METHOD
                  and _baseline_key(b.definition) == _baseline_key(cell.definition)]
    for prefer in (lambda b: b.row == cell.row, lambda b: b.column == cell.column, lambda b: True):
        chosen = [b for b in candidates if prefer(b)]
        if chosen:
            return chosen[0]
    return None


def summarize(results: list[RunResult], context: Context) -> dict[str, list[CellSummary]]:
    """Per table of the grid, one CellSummary per cell in display order, paired with baselines."""
    by_cell: dict[tuple[str, str, str], list[RunResult]] = {}
    for result in results:
        for cell in result.cells:
            by_cell.setdefault(cell, []).append(result)
    summaries = {}
    for name, layout in context.tables.items():
        cells = _summarize_table(layout, by_cell, context.not_run.get(name))
        for cell in cells:
            cell.baseline = find_baseline(cell, cells)
            if cell.baseline is not None:
                cell.paired = statistics.paired_difference(
                    cell.by_seed, cell.baseline.by_seed, cell.reference, cell.baseline.reference)
        summaries[name] = cells
    return summaries
