"""Published numbers to set ours beside: references.yaml (beside params.yaml), read and checked.

The numbers are data, not a gate: a table or a cell of params.yaml that has no reference here
is valid, and the report shows "—" for it. What is here must be well formed: every table cites
its source, and every number is a finite error in [0, 100] of one of the table's rows and
columns. Layout of the file: see its header comment.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from at import yaml_file
from at.errors import shown

FILENAME = "references.yaml"
TABLE_KEYS = ("source", "title", "caption", "dataset", "row_header", "column_header", "rows",
              "columns", "values")
SOURCE_KEYS = {"paper", "table", "arxiv", "url"}


class ReferencesError(ValueError):
    """A references file that cannot be used as it is."""


@dataclass(frozen=True)
class ReferenceTable:
    """One published table: how to show it and which numbers it printed."""

    name: str
    source: dict[str, str]
    title: str
    caption: str
    dataset: str
    row_header: tuple[str, ...]
    column_header: str
    rows: dict[str, dict[str, str]]      # row key -> {"label": ..., and one text per row_header}
    columns: dict[str, str]              # column key -> display label, in display order
    values: dict[str, dict[str, float]]  # row key -> column key -> error (%); cells may be absent

    def value(self, row: str, column: str) -> float | None:
        """The published number of one cell; None when the source prints none for it."""
        return self.values.get(row, {}).get(column)

    def citation(self) -> str:
        where = [self.source["paper"], self.source["table"]]
        if "arxiv" in self.source:
            where.append(f"arXiv:{self.source['arxiv']}")
        if "url" in self.source:
            where.append(self.source["url"])
        return ", ".join(where)


def path_beside(params_path: str | Path) -> Path:
    """The references file that belongs to a params.yaml: the one in the same folder."""
    return Path(params_path).resolve().parent / FILENAME


def _fail(where: str, problem: str) -> ReferencesError:
    return ReferencesError(f"{where}: {problem}")


def _text(where: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"must be a non-empty string, got {shown(value)}")
    return value


def _table(where: str, name: str, spec) -> ReferenceTable:
    if not isinstance(spec, dict):
        raise _fail(where, f"must be a mapping, got {type(spec).__name__}")
    absent = [k for k in TABLE_KEYS if k not in spec]
    unknown = sorted(set(spec) - set(TABLE_KEYS))
    if absent or unknown:
        raise _fail(where, f"needs exactly the keys {list(TABLE_KEYS)}; missing {absent}, unknown {unknown}")
    source = spec["source"]
    if not isinstance(source, dict) or set(source) - SOURCE_KEYS or not {"paper", "table"} <= set(source) \
            or not set(source) & {"arxiv", "url"}:
        raise _fail(f"{where}.source", "must give paper, table, and arxiv and/or url (the citation of "
                    f"every number of the table); got {shown(source)}")
    for key, value in source.items():
        _text(f"{where}.source.{key}", value)
    headers = spec["row_header"]
    if not isinstance(headers, list) or not headers:
        raise _fail(f"{where}.row_header", f"must be a non-empty list, got {shown(headers)}")
    rows = spec["rows"]
    if not isinstance(rows, dict) or not rows:
        raise _fail(f"{where}.rows", "must be a non-empty mapping")
    for row, labels in rows.items():
        if not isinstance(labels, dict):
            raise _fail(f"{where}.rows.{row}", "must be a mapping of labels")
        for key in ["label", *headers]:
            _text(f"{where}.rows.{row}.{key}", labels.get(key))
    columns = spec["columns"]
    if not isinstance(columns, dict) or not columns:
        raise _fail(f"{where}.columns", "must be a non-empty mapping")
    for column, label in columns.items():
        _text(f"{where}.columns.{column}", label)
    values = spec["values"] or {}
    if not isinstance(values, dict):
        raise _fail(f"{where}.values", "must be a mapping")
    for row, by_column in values.items():
        if row not in rows:
            raise _fail(f"{where}.values.{row}", f"unknown row; known: {list(rows)}")
        if not isinstance(by_column, dict):
            raise _fail(f"{where}.values.{row}", "must be a mapping {column: error}")
        for column, number in by_column.items():
            key = f"{where}.values.{row}.{column}"
            if column not in columns:
                raise _fail(key, f"unknown column; known: {list(columns)}")
            if isinstance(number, bool) or not isinstance(number, (int, float)) \
                    or not math.isfinite(number) or not 0 <= number <= 100:
                raise _fail(key, f"must be a test error in [0, 100] (%), got {shown(number)}")
    return ReferenceTable(
        name=name, source=dict(source), title=_text(f"{where}.title", spec["title"]),
        caption=_text(f"{where}.caption", spec["caption"]),
        dataset=_text(f"{where}.dataset", spec["dataset"]),
        row_header=tuple(_text(f"{where}.row_header", h) for h in headers),
        column_header=_text(f"{where}.column_header", spec["column_header"]),
        rows=copy.deepcopy(rows), columns=dict(columns),
        values={r: {c: float(v) for c, v in cs.items()} for r, cs in values.items()},
    )


def parse(data, where: str = FILENAME) -> dict[str, ReferenceTable]:
    """Check the parsed YAML of a references file; {table name: ReferenceTable}, in file order."""
    if not isinstance(data, dict) or "tables" not in data:
        raise _fail(where, "must be a mapping with the key `tables`")
    # keys starting with "_" hold YAML anchors shared by the tables (e.g. a paper's citation)
    unknown = sorted(k for k in data if k != "tables" and not str(k).startswith("_"))
    if unknown:
        raise _fail(where, f"unknown top-level key(s) {unknown}; allowed: tables (and _anchors)")
    tables = data["tables"] or {}
    if not isinstance(tables, dict):
        raise _fail(f"{where}: tables", "must be a mapping {table name: table}")
    return {name: _table(f"{where}: tables.{name}", name, spec) for name, spec in tables.items()}


def load(path: str | Path) -> dict[str, ReferenceTable]:
    """Read and check a references file; a missing or malformed one is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ReferencesError(f"no references file {path}: the report sets every result beside "
                              f"these numbers; create it (`tables: {{}}` for none)")
    try:
        data = yaml_file.load(path)
    except yaml_file.Refused as e:
        raise ReferencesError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ReferencesError(f"{path} is not valid YAML: {e}") from None
    return parse(data, str(path))
