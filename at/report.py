"""Render our results beside the paper's: tables (Markdown, LaTeX, CSV), figures, a README.

Entry point: `render(runs, out_dir, context)`.

Honest reporting (DESIGN.md, contract 6):
- every cell shows n (the runs that finished), the mean and the sample std (ddof=1) of their
  final-epoch test error, the paper's number and the difference (ours - paper);
- a run without metrics.json is *missing*: it is shown as "missing", never as a number, and
  a cell whose runs are all missing has no mean;
- a table the profile does not run (context["not_run"]) shows every cell as "not run", with the
  reason; a cell no run of the grid fills is "not run" as well;
- the reported epoch is the last one (metrics.json's final_epoch), stated per cell and per table;
- the profile's description (data, subset, epochs) is written into every table and figure, so
  that smoke numbers can never pass for the paper's.

Outputs are a pure function of the inputs: everything is sorted, numbers have a fixed format,
there are no timestamps, figures are saved without creation dates; every file is written to a
temporary file beside its destination and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from at import atomic, paper

# The metrics.json key that holds each cell's number; every other cell reads final_test_error.
_METRIC_BY_CELL = {("imagenet", "top5"): "final_test_error_top5"}
_DEFAULT_METRIC = "final_test_error"

# The Table 1 pair and method whose checkpoints feed the attention-map figure (as in the paper).
ATTENTION_PAIR = "wrn-16-1_from_wrn-16-2"
ATTENTION_METHOD = "at"
ATTENTION_IMAGES = 4

# Figure output stems (each written as .png and .pdf).
FIG_CURVES = "fig_curves_table1"
FIG_BARS = "fig_bars_table1"
FIG_ATTENTION = "fig_attention_maps"

_PNG_DPI = 100
# Without these, matplotlib stamps the creation date and its version into the files.
_PDF_METADATA = {"CreationDate": None, "Software": None, "Producer": None}
_PNG_METADATA = {"Software": None}

_DASH = "—"
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
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        # Sample std: the spread we would expect between two independent seeds.
        return float(np.std(self.values, ddof=1)) if len(self.values) >= 2 else None

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


def _validate_context(context: dict) -> tuple[str, str, dict[str, str]]:
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


def _validate_runs(runs: Sequence[dict], not_run: dict[str, str]) -> list[dict]:
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


def _metric_key(table: str, column: str) -> str:
    return _METRIC_BY_CELL.get((table, column), _DEFAULT_METRIC)


def _load_runs(runs: list[dict]) -> list[RunResult]:
    results = []
    for run in runs:
        cells = tuple(
            sorted({(c["table"], c["row"], c["column"]) for c in run["cells"]})
        )
        needed = {_metric_key(t, c) for t, _, c in cells} or {_DEFAULT_METRIC}
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
                key = _metric_key(name, column)
                for r in cell_runs:
                    if not r.missing:
                        summary.values.append(float(r.metrics[key]))
                        summary.epochs.append(int(r.metrics["final_epoch"]))
                cells.append(summary)
        summaries[name] = cells
    return summaries


# ----------------------------------------------------------------------------------------------
# Number formatting: fixed, so that the same inputs give the same bytes.


def _fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return _DASH
    if math.isnan(x):
        return "nan"
    x = round(x, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_paper(x: float) -> str:
    # As printed in the paper (27, 13.5, 8.77): no invented precision.
    return format(x, "g")


def _epoch_text(summary: CellSummary) -> str:
    return ", ".join(str(e) for e in sorted(set(summary.epochs))) if summary.epochs else _DASH


def _mean_text(summary: CellSummary) -> str:
    if summary.status == "not run":
        return "not run"
    if summary.status == "missing":
        return "missing"
    return _fmt(summary.mean)


# ----------------------------------------------------------------------------------------------
# Tables


def _table_notes(name: str, cells: list[CellSummary], profile: str, description: str) -> list[str]:
    notes = [
        f"Ours: {description} (profile `{profile}`). Paper: the published number, full protocol.",
        "mean and std: over the n seeds that finished, of the test error (%) at the last epoch; "
        "std is the sample std (ddof=1), shown as — when n = 1; diff = mean − paper.",
    ]
    reasons = sorted({c.not_run_reason for c in cells if c.not_run_reason})
    if all(c.status == "not run" for c in cells):
        notes.append(f"Not run in this profile: {reasons[0] if len(reasons) == 1 else '; '.join(reasons)}.")
    else:
        for reason in reasons:
            count = sum(c.not_run_reason == reason for c in cells)
            notes.append(f"not run: {reason} ({count} of {len(cells)} cells, see status).")
    missing = sorted({r.id for c in cells for r in c.missing_runs})
    if missing:
        notes.append(
            "missing (no metrics.json, shown as missing, never as a number): "
            + ", ".join(f"`{m}`" for m in missing)
            + "."
        )
    runs = {r.id: r for c in cells for r in c.runs if not r.missing}
    finals = sorted({r.metrics["final_epoch"] for r in runs.values()})
    planned = sorted({r.metrics["epochs"] for r in runs.values()})
    if len(finals) == 1:
        notes.append(
            f"Reported epoch: the last one, epoch {finals[0]} "
            f"(planned: {', '.join(str(p) for p in planned)})."
        )
    elif len(finals) > 1:
        notes.append(
            "Runs of this table differ in final epoch ("
            + ", ".join(str(f) for f in finals)
            + "): each is reported at its last epoch, see the epoch column."
        )
    stopped = sorted(
        (r.id, r.metrics["final_epoch"], r.metrics["epochs"])
        for r in runs.values()
        if r.metrics["final_epoch"] != r.metrics["epochs"]
    )
    if stopped:
        notes.append(
            "Runs whose last epoch is not their planned number of epochs: "
            + ", ".join(f"`{i}` ({f} of {e})" for i, f, e in stopped)
            + "."
        )
    return notes


def _table_header(spec: dict) -> list[str]:
    header = [h for h in spec["row_header"]]
    if len(spec["columns"]) > 1:
        header.append(spec["column_header"])
    return header + ["n", "mean", "std", "paper", "diff", "epoch", "status"]


def _table_rows(spec: dict, cells: list[CellSummary]) -> list[list[str]]:
    rows = []
    for c in cells:
        line = [spec["rows"][c.row][h] for h in spec["row_header"]]
        if len(spec["columns"]) > 1:
            line.append(spec["columns"][c.column])
        line += [
            str(c.n),
            _mean_text(c),
            _fmt(c.std),
            _fmt_paper(c.paper),
            _fmt(c.diff, sign=True),
            _epoch_text(c),
            c.status_text,
        ]
        rows.append(line)
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(name: str, cells: list[CellSummary], profile: str, description: str,
                   level: int = 1) -> str:
    spec = paper.get_table(name)
    out = [
        f"{'#' * level} {spec['title']}",
        "",
        f"**{description}** (profile `{profile}`)",
        "",
        f"{spec['caption']} Data set: {spec['dataset']}.",
        "",
    ]
    header = _table_header(spec)
    out.append("| " + " | ".join(header) + " |")
    n_text = len(header) - 7  # row labels (text), then n..epoch (numbers), then status (text)
    out.append("|" + "|".join(
        "--:" if n_text <= i < len(header) - 1 else "---" for i in range(len(header))
    ) + "|")
    for line in _table_rows(spec, cells):
        out.append("| " + " | ".join(_md_escape(x) for x in line) + " |")
    out.append("")
    out += [f"- {_md_escape(n)}" for n in _table_notes(name, cells, profile, description)]
    return "\n".join(out) + "\n"


def _tex_escape(text: str) -> str:
    special = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "<": r"\textless{}", ">": r"\textgreater{}",
        "±": r"$\pm$", "—": "---", "−": "$-$", "`": "",
    }
    text = text.replace("->", "\x00")  # arrows first, before '>' is escaped
    escaped = "".join(special.get(ch, ch) for ch in text)
    return escaped.replace("\x00", r"$\to$")


def table_latex(name: str, cells: list[CellSummary], profile: str, description: str) -> str:
    spec = paper.get_table(name)
    header = _table_header(spec)
    n_text = len(header) - 7
    align = "l" * n_text + "rrrrrrl"
    caption = " ".join(
        [
            _tex_escape(spec["title"]) + ".",
            _tex_escape(spec["caption"]),
            r"\textbf{" + _tex_escape(f"Ours: {description} (profile {profile}).") + "}",
        ]
        + [_tex_escape(n) for n in _table_notes(name, cells, profile, description)[1:]]
    )
    out = [
        "% Generated by at.report from the runs' metrics.json; needs \\usepackage{booktabs}.",
        r"\begin{table}[ht]",
        r"\centering",
        r"\caption{" + caption + "}",
        r"\label{tab:" + name + "}",
        r"\begin{tabular}{" + align + "}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for line in _table_rows(spec, cells):
        out.append(" & ".join(_tex_escape(x) for x in line) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ("table", "row", "column", "label", "n", "mean", "std", "paper", "diff", "epoch",
               "status")


def table_csv(name: str, cells: list[CellSummary]) -> str:
    """Machine-readable: empty mean/std/diff where there is no number; epochs joined by ';'."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(x):
        return "" if x is None else _fmt(x, digits=4)

    for c in cells:
        writer.writerow(
            [
                c.table, c.row, c.column, c.label, c.n, num(c.mean), num(c.std),
                _fmt_paper(c.paper), num(c.diff), ";".join(str(e) for e in sorted(set(c.epochs))),
                c.status,
            ]
        )
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float, height: float):
    # A bare Figure (no pyplot): no global backend switch, no state shared between calls.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_PNG_DPI, layout="constrained")


def _method_colors(columns: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {col: cmap(i % 10) for i, col in enumerate(columns)}


def _read_history(path: Path) -> dict[int, float]:
    """epoch -> test_error of one history.csv."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"epoch", "test_error"} <= set(reader.fieldnames):
            raise ReportInputError(f"{path} must have columns epoch and test_error")
        try:
            return {int(row["epoch"]): float(row["test_error"]) for row in reader}
        except (TypeError, ValueError) as exc:
            raise ReportInputError(f"{path}: bad epoch or test_error value: {exc}") from None


def curve_series(summaries: dict[str, list[CellSummary]]) -> tuple[dict, list[str]]:
    """Table 1: {row: {column: (epochs, mean test error, n)}} over finished runs.

    Seeds are averaged at the epochs all of them have, so a curve never mixes seed counts.
    """
    series: dict[str, dict[str, tuple]] = {}
    notes = []
    for c in summaries["table1"]:
        histories = []
        for r in c.runs:
            if r.missing:
                continue
            path = r.out_dir / "history.csv"
            if not path.is_file():
                notes.append(f"`{r.id}` has metrics.json but no history.csv: left out of the curves")
                continue
            histories.append(_read_history(path))
        if not histories:
            continue
        common = sorted(set.intersection(*(set(h) for h in histories)))
        if not common:
            continue
        mean = [float(np.mean([h[e] for h in histories])) for e in common]
        series.setdefault(c.row, {})[c.column] = (common, mean, len(histories))
    return series, sorted(notes)


def curves_figure(series: dict, description: str):
    from matplotlib.ticker import MaxNLocator

    spec = paper.get_table("table1")
    colors = _method_colors(list(spec["columns"]))
    fig = _new_figure(10, 7.5)
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    for ax, row in zip(axes, spec["rows"]):
        ax.set_title(spec["rows"][row]["label"], fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        lines = series.get(row, {})
        for column, label in spec["columns"].items():
            if column in lines:
                epochs, mean, n = lines[column]
                ax.plot(epochs, mean, marker="o", markersize=3, color=colors[column],
                        label=f"{label} (n={n})")
        if lines:
            ax.legend(fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.grid(alpha=0.3)
    fig.suptitle(f"Table 1 pairs: test error during training, mean over seeds\n{description}",
                 fontsize=11)
    return fig


def bars_figure(cells: list[CellSummary], description: str):
    spec = paper.get_table("table1")
    columns = list(spec["columns"])
    fig = _new_figure(13, 4.2)
    axes = fig.subplots(1, len(spec["rows"]), squeeze=False, sharey=True).ravel()
    by_key = {(c.row, c.column): c for c in cells}
    x = np.arange(len(columns), dtype=float)
    width = 0.38
    for ax, row in zip(axes, spec["rows"]):
        summaries = [by_key[(row, col)] for col in columns]
        paper_values = [c.paper for c in summaries]
        ours = [c.mean if c.mean is not None else 0.0 for c in summaries]
        errs = [c.std if c.std is not None else 0.0 for c in summaries]
        has = [c.mean is not None for c in summaries]
        ax.bar(x - width / 2, [o if h else 0.0 for o, h in zip(ours, has)], width,
               color="tab:blue", label="ours (mean ± std)")
        with_std = [i for i, c in enumerate(summaries) if c.std is not None]
        if with_std:
            ax.errorbar(x[with_std] - width / 2, [ours[i] for i in with_std],
                        yerr=[errs[i] for i in with_std], fmt="none", ecolor="black", capsize=2)
        ax.bar(x + width / 2, paper_values, width, color="tab:gray", alpha=0.6, label="paper")
        for xi, c in zip(x, summaries):
            if c.mean is None:
                # No bar of height 0 that could read as "0 % error": say why there is none.
                ax.text(xi - width / 2, 0.2, _mean_text(c), rotation=90, ha="center",
                        va="bottom", fontsize=7)
            else:
                ax.text(xi - width / 2, 0.2, f"n={c.n}", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="white")
        ax.set_xticks(x, [spec["columns"][c] for c in columns], rotation=45, fontsize=8)
        ax.set_title(spec["rows"][row]["label"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Table 1: ours against the paper\n{description}", fontsize=11)
    return fig


def attention_figure(teacher, student, images, inputs, title: str,
                     attention_fn: Callable | None = None,
                     names: tuple[str, str] = ("teacher", "student")):
    """Attention maps of teacher and student at each tapped layer, one row per image.

    teacher, student: models returning (logits, taps), in eval mode on the device of `inputs`.
    images: uint8 (N, 3, H, W) array or tensor, shown as is; inputs: what the models take
    (normalised float tensor, N first). attention_fn(activation) -> (N, h*w) per tap; default
    at.attention.attention_map(act, "sum", 2) (imported here, so that tests can pass their own).
    """
    import torch

    if attention_fn is None:
        from at.attention import attention_map

        def attention_fn(act):
            return attention_map(act, "sum", 2)

    with torch.no_grad():
        _, t_taps = teacher(inputs)
        _, s_taps = student(inputs)
    if len(t_taps) != len(s_taps):
        raise ValueError(
            f"{names[0]} has {len(t_taps)} taps and {names[1]} {len(s_taps)}: cannot pair them"
        )
    maps = []  # per tap: (teacher maps, student maps), each (N, h, w)
    for j, (t_act, s_act) in enumerate(zip(t_taps, s_taps)):
        if t_act.shape[-2:] != s_act.shape[-2:]:
            raise ValueError(
                f"tap {j}: spatial sizes differ ({tuple(t_act.shape[-2:])} vs "
                f"{tuple(s_act.shape[-2:])})"
            )
        h, w = s_act.shape[-2:]
        pair = []
        for act in (t_act, s_act):
            q = attention_fn(act.float())
            pair.append(q.reshape(q.shape[0], h, w).detach().cpu().double().numpy())
        maps.append(pair)
    pictures = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    if pictures.dtype != np.uint8 or pictures.ndim != 4 or pictures.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {pictures.dtype} {pictures.shape}")
    n = pictures.shape[0]
    cols = 1 + 2 * len(maps)
    fig = _new_figure(1.5 * cols, 1.6 * n + 0.9)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(pictures[i].transpose(1, 2, 0), interpolation="nearest")
        for j, pair in enumerate(maps):
            for k, (who, m) in enumerate(zip(names, pair)):
                ax = axes[i, 1 + 2 * j + k]
                ax.imshow(m[i], cmap="jet", interpolation="bilinear")
                if i == 0:
                    ax.set_title(f"{who}\ngroup {j + 1}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def _figure_bytes(fig) -> dict[str, bytes]:
    out = {}
    for ext, metadata in (("png", _PNG_METADATA), ("pdf", _PDF_METADATA)):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=_PNG_DPI, metadata=metadata)
        out[ext] = buf.getvalue()
    return out


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """stem.png and stem.pdf, both without timestamps, each written atomically."""
    paths = []
    for ext, data in _figure_bytes(fig).items():
        paths.append(_write_atomic(Path(out_dir) / f"{stem}.{ext}", data))
    return paths


def _find_cifar_folder(candidate: Path) -> Path | None:
    # data_dir may be the prepare() root or the cifar-10-batches-py folder itself.
    for folder in (candidate, candidate / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file():
            return folder
    return None


def _attention_from_runs(summaries, context, description) -> tuple[object | None, str]:
    """(figure, note) or (None, why it was skipped), from the AT student's checkpoint."""
    cell = next(
        (c for c in summaries["table1"] if c.row == ATTENTION_PAIR and c.column == ATTENTION_METHOD),
        None,
    )
    if cell is None or cell.status == "not run":
        return None, "the AT run of WRN-16-1 from WRN-16-2 is not run in this profile"
    candidates = [r for r in cell.runs if not r.missing and (r.out_dir / "checkpoint.pt").is_file()]
    if not candidates:
        return None, "no finished AT run of WRN-16-1 from WRN-16-2 has a checkpoint.pt"
    run = candidates[0]  # lowest seed: runs are sorted by seed
    from at.checkpoint import load_model

    student, spec = load_model(run.out_dir / "checkpoint.pt")
    teacher_path = spec.get("teacher_checkpoint")
    if not teacher_path or not Path(teacher_path).is_file():
        return None, f"the teacher checkpoint of `{run.id}` ({teacher_path}) is not there"
    teacher, _ = load_model(Path(teacher_path))
    data_dir = context.get("cifar_dir") or spec.get("data_dir")
    folder = _find_cifar_folder(Path(data_dir)) if data_dir else None
    if folder is None:
        return None, f"no CIFAR-10 test batch under {data_dir!r}"

    import torch

    from at.data import augment, cifar

    data = cifar.load(folder)
    images = torch.as_tensor(data.test_x[:ATTENTION_IMAGES])
    inputs = augment.normalize(images, augment.CIFAR_MEAN, augment.CIFAR_STD)
    student = student.to("cpu").float().eval()
    teacher = teacher.to("cpu").float().eval()
    title = (
        f"Attention maps (F_sum^2) of {spec.get('teacher')} (teacher) and {spec.get('student')} "
        f"(AT student, seed {run.seed}), first {ATTENTION_IMAGES} test images\n{description}"
    )
    fig = attention_figure(teacher, student, images.numpy(), inputs, title,
                           names=("teacher", "student"))
    return fig, f"from `{run.id}` and its teacher"


# ----------------------------------------------------------------------------------------------
# Writing


def _write_atomic(path: Path, data: bytes | str) -> Path:
    """Never a half-written file: see at.atomic."""
    return atomic.write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)


def _readme(summaries, results, profile, description, not_run, figures, skipped) -> str:
    out = [
        "# Results",
        "",
        f"**{description}** (profile `{profile}`).",
        "",
        "Every table sets our numbers beside the paper's: n = the seeds that finished; mean and "
        "sample std (ddof=1) of the test error (%) at the last epoch; diff = mean − paper. The "
        "paper's numbers come from its full protocol; ours from the profile above. Generated by "
        "`at.report` from the runs' metrics.json and history.csv.",
        "",
        "## Missing and not run",
        "",
    ]
    gaps = []
    for name in paper.table_names():
        if name in not_run:
            gaps.append(f"- {paper.TABLES[name]['title']}: not run: {not_run[name]}")
    for r in results:
        if r.missing:
            cells = ", ".join("/".join(c) for c in r.cells)
            gaps.append(f"- run `{r.id}`: missing (no metrics.json in `{r.out_dir.as_posix()}`); cells: {cells}")
    for name in paper.table_names():
        if name in not_run:
            continue
        unfilled = [c.label for c in summaries[name] if c.status == "not run"]
        if unfilled:
            gaps.append(
                f"- {name}: no run of this profile's grid fills {len(unfilled)} of "
                f"{len(summaries[name])} cells: " + "; ".join(unfilled)
            )
    out += gaps or ["- none"]
    out.append("")
    for name in paper.table_names():
        out.append(table_markdown(name, summaries[name], profile, description, level=2))
        out.append(f"Files: [{name}.md]({name}.md), [{name}.tex]({name}.tex), [{name}.csv]({name}.csv)")
        out.append("")
    out += ["## Figures", ""]
    for stem, caption, note in figures:
        out.append(f"### {caption}")
        out.append("")
        if note:
            out += [note, ""]
        out.append(f"![{caption}]({stem}.png)")
        out.append("")
        out.append(f"PDF: [{stem}.pdf]({stem}.pdf)")
        out.append("")
    for caption, why in skipped:
        out += [f"### {caption}", "", f"Not drawn: {why}.", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def render(runs: Sequence[dict], out_dir, context: dict) -> list[Path]:
    """Render every table and figure of the paper from the runs' folders into out_dir.

    runs: one dict per training run: id, out_dir, cells ([{table, row, column}]), seed (and
    optionally student, teacher, method_name, dataset). context: profile, description,
    not_run ({table: reason}), optionally cifar_dir (CIFAR-10 folder for the attention figure;
    default: the data_dir of the AT student's checkpoint spec).
    Returns the written files, sorted.
    """
    profile, description, not_run = _validate_context(context)
    ordered = _validate_runs(runs, not_run)
    results = _load_runs(ordered)
    summaries = summarize(results, not_run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    for name in paper.table_names():
        cells = summaries[name]
        written.append(_write_atomic(out / f"{name}.md", table_markdown(name, cells, profile, description)))
        written.append(_write_atomic(out / f"{name}.tex", table_latex(name, cells, profile, description)))
        written.append(_write_atomic(out / f"{name}.csv", table_csv(name, cells)))

    figures: list[tuple[str, str, str]] = []  # (stem, caption, note)
    skipped: list[tuple[str, str]] = []
    stale: list[str] = []
    if "table1" in not_run:
        for stem, caption in ((FIG_CURVES, "Test-error curves, Table 1 pairs"),
                              (FIG_BARS, "Table 1: ours against the paper"),
                              (FIG_ATTENTION, "Attention maps, teacher and AT student")):
            skipped.append((caption, f"Table 1 is not run: {not_run['table1']}"))
            stale.append(stem)
    else:
        series, notes = curve_series(summaries)
        written += save_figure(curves_figure(series, description), out, FIG_CURVES)
        figures.append((FIG_CURVES, "Test-error curves, Table 1 pairs", "; ".join(notes)))
        written += save_figure(bars_figure(summaries["table1"], description), out, FIG_BARS)
        figures.append((FIG_BARS, "Table 1: ours against the paper",
                        "Error bars: sample std over seeds (none when n = 1)."))
        fig, note = _attention_from_runs(summaries, context, description)
        if fig is None:
            skipped.append(("Attention maps, teacher and AT student", note))
            stale.append(FIG_ATTENTION)
        else:
            written += save_figure(fig, out, FIG_ATTENTION)
            figures.append((FIG_ATTENTION, "Attention maps, teacher and AT student", note))
    # A figure this render did not draw must not survive from an earlier render.
    for stem in stale:
        for ext in ("png", "pdf"):
            (out / f"{stem}.{ext}").unlink(missing_ok=True)

    written.append(_write_atomic(
        out / "README.md",
        _readme(summaries, results, profile, description, not_run, figures, skipped),
    ))
    return sorted(written)
