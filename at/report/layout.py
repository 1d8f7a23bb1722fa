"""What each table of the report looks like: params.yaml's rows and columns, dressed with the
titles, labels and numbers of its reference (references.yaml) where it has one.

params.yaml decides which tables, rows and columns exist; a reference only adds words and
numbers. A row or column of params.yaml that the reference lacks is shown under its key, with
no reference number; a reference row or column the grid lacks is shown too (its cells are "not
run"), so that no published number silently disappears from the report.

A profile that chooses some rows of a table (its `rows` key, e.g. the mini profile's one pair of
Table 1) shows just those: the other rows are a choice, not a gap, so they are named once
(`omitted_rows`) instead of filling the table and its figures with "not run".
"""

from __future__ import annotations

from dataclasses import dataclass

from at.references import ReferenceTable


@dataclass(frozen=True)
class SweepAxis:
    """A row's sweep (at.sweep) as the report draws it: the row swept (the paper's cell, at the
    method's own value), the key, that own value, and each value with the row it fills."""

    row: str
    key: str
    own: object
    values: tuple[tuple[object, str], ...]   # (value, row), in params.yaml's order


@dataclass(frozen=True)
class TableLayout:
    name: str
    title: str
    caption: str
    dataset: str | None
    citation: str | None              # None: the table has no reference
    row_header: tuple[str, ...]
    column_header: str
    rows: dict[str, dict[str, str]]   # row key -> {"label": ..., one text per row_header}
    columns: dict[str, str]           # column key -> label
    reference: dict[tuple[str, str], float]
    omitted_rows: tuple[str, ...] = ()  # labels of the rows the profile chose not to run
    sweeps: tuple[SweepAxis, ...] = ()   # the rows that sweep a key, each with the rows it adds

    def cells(self) -> list[tuple[str, str]]:
        """(row, column) in display order: row by row."""
        return [(row, column) for row in self.rows for column in self.columns]

    def cell_label(self, row: str, column: str) -> str:
        if len(self.columns) == 1:
            return self.rows[row]["label"]
        return f"{self.rows[row]['label']}: {self.columns[column]}"


def _union(first: list[str], then: list[str]) -> list[str]:
    return first + [k for k in then if k not in first]


def _with_sweep_labels(rows: dict[str, dict[str, str]], sweeps: tuple[SweepAxis, ...]) -> dict:
    """A sweep's rows labelled as the swept row with the value: "F_sum^4, beta = 300"."""
    from at.sweep import value_text

    out = dict(rows)
    for axis in sweeps:
        for value, row in axis.values:
            if row in out and axis.row in out:
                out[row] = {k: f"{text}, {axis.key} = {value_text(value)}" for k, text in out[axis.row].items()}
    return out


def table_layout(name: str, rows: list[str], columns: list[str],
                 reference: ReferenceTable | None, omitted: list[str] = (),
                 sweeps: tuple[SweepAxis, ...] = ()) -> TableLayout:
    """The layout of one grid table (its rows and columns in params.yaml's order).

    omitted: params.yaml's rows that the profile leaves out; when there are any, the rows shown
    are exactly ``rows`` (the reference's other rows are omitted too). sweeps: the rows that
    sweep a key (``rows`` lists the rows they add, each after its swept row).
    """
    if reference is None:
        return TableLayout(
            name=name, title=name,
            caption="A table of params.yaml with no published reference numbers.",
            dataset=None, citation=None, row_header=("row",), column_header="column",
            rows=_with_sweep_labels({r: {"label": r, "row": r} for r in rows}, sweeps),
            columns={c: c for c in columns}, reference={}, omitted_rows=tuple(omitted), sweeps=sweeps,
        )
    if omitted:   # the profile chose its rows: show just those, name every other row once
        row_keys = list(rows)
        left_out = [r for r in _union(list(omitted), list(reference.rows)) if r not in row_keys]
    else:
        row_keys, left_out = _union(list(rows), list(reference.rows)), []
    column_keys = _union(list(columns), list(reference.columns))
    shown_rows = {}
    for r in row_keys:
        # a row the reference lacks: its key stands in for every label
        shown_rows[r] = dict(reference.rows.get(r) or {k: r for k in ("label", *reference.row_header)})
    return TableLayout(
        name=name, title=reference.title, caption=reference.caption, dataset=reference.dataset,
        citation=reference.citation(), row_header=reference.row_header,
        column_header=reference.column_header, rows=_with_sweep_labels(shown_rows, sweeps), sweeps=sweeps,
        columns={c: reference.columns.get(c, c) for c in column_keys},
        reference={(r, c): v for r, cs in reference.values.items() for c, v in cs.items() if r in shown_rows},
        omitted_rows=tuple(reference.rows[r]["label"] if r in reference.rows else r for r in left_out),
    )


def layouts(grid_tables: dict[str, dict], references: dict[str, ReferenceTable]
            ) -> dict[str, TableLayout]:
    """{table: layout} for every table of the grid, in params.yaml's order.

    grid_tables: {table: {"rows": [row keys], "columns": [column keys], "omitted": [row keys],
    "sweeps": [{row, key, own, values: [[value, row], ...]}]}}, as params.yaml and the profile
    have them ("omitted" and "sweeps" optional: no row left out, none sweeps).
    """
    return {name: table_layout(name, list(spec["rows"]), list(spec["columns"]), references.get(name),
                               list(spec.get("omitted") or []),
                               tuple(SweepAxis(s["row"], s["key"], s["own"], tuple(map(tuple, s["values"])))
                                     for s in spec.get("sweeps") or []))
            for name, spec in grid_tables.items()}


def grid_tables(params: dict, profile: str | None = None) -> dict[str, dict]:
    """The rows and columns of every table of params.yaml (the rows the profile runs, where it
    selects some with its `rows` key, each followed by the rows its sweep adds; the rows it
    leaves out; the sweeps): what `layouts` takes."""
    from at import grid

    selected = ((params.get("profiles") or {}).get(profile) or {}).get("rows") or {} if profile else {}
    found = {}
    for name, spec in (params.get("tables") or {}).items():
        rows = list(spec.get("rows") or {})
        chosen = [r for r in rows if name not in selected or r in selected[name]]
        columns = list(spec.get("columns") or {})
        sweeps = [s for s in (grid.row_sweep(params, name, r, columns[0]) for r in chosen) if s is not None]
        found[name] = {"rows": grid.table_rows(params, name, chosen), "columns": columns,
                       "omitted": [r for r in rows if r not in chosen],
                       "sweeps": [{"row": s.row, "key": s.label, "own": s.own,
                                   "values": [[v, s.row_of(v)] for v in s.values]} for s in sweeps]}
    return found
