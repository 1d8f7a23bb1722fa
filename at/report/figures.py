"""Figures (PNG and PDF, without timestamps): bare matplotlib Figures, no pyplot state."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import numpy as np

from at import atomic
from at.choices import Metric
from at.report import labels
from at.report.cells import CellSummary
from at.report.inputs import ReportInputError
from at.report.layout import SweepAxis, TableLayout
from at.report.tables import mean_text

# Figure output stems (each written as .png and .pdf).
FIG_CURVES = "fig_curves_{table}"   # one per table with a finished run's history
FIG_BARS = "fig_bars_table1"
FIG_ATTENTION = "fig_attention_maps"
FIG_PAIRED = "fig_paired_{table}"   # one per table
FIG_SWEEP = "fig_sweep_{table}_{row}"   # one per row that sweeps a key (at.sweep)

_PNG_DPI = 100
# Without these, matplotlib stamps the creation date and its version into the files.
_PDF_METADATA = {"CreationDate": None, "Software": None, "Producer": None}
_PNG_METADATA = {"Software": None}
_FOOTER_SIZE = 7   # points: one small grey line, not a block


def new_figure(width: float, height: float):
    # A bare Figure (no pyplot): no global backend switch, no state shared between calls.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_PNG_DPI, layout="constrained")


def _chars_per_line(fig, fontsize: float) -> int:
    # DejaVu Sans averages about 0.6 em per character (tests check the drawn text fits)
    return max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))


def set_title(fig, text: str, fontsize: float = 11) -> None:
    """A figure title wrapped to the figure's width: a long title is never cut off.

    Constrained layout makes room above the axes but does not shorten a line wider than the
    figure, so each line is wrapped at the characters that fit.
    """
    per_line = _chars_per_line(fig, fontsize)
    lines = [wrapped for line in text.split("\n") for wrapped in textwrap.wrap(line, per_line)]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


def set_footer(fig, footer: str) -> None:
    """The provenance of a figure in one short grey line at its bottom (the whole record is in
    the README). It is the figure's supxlabel because constrained layout keeps room for that
    and for nothing placed with fig.text; shortened rather than wrapped, so it stays one line."""
    one_line = textwrap.shorten(footer, _chars_per_line(fig, _FOOTER_SIZE), placeholder=" …")
    fig.supxlabel(one_line, fontsize=_FOOTER_SIZE, color="0.4")


def legend_outside(ax, **kwargs) -> None:
    """A legend beside the axes, right of their frame, where it covers no data (constrained
    layout narrows the axes to make room for it; tests check the drawn legend)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def _colors(keys: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {key: cmap(i % cmap.N) for i, key in enumerate(keys)}


_LINE_STYLES = ("-", "--", ":")   # past the colours of tab20, the same colours again, dashed


def _line_style(index: int) -> str:
    return _LINE_STYLES[(index // 20) % len(_LINE_STYLES)]


# About the height of one legend entry at fontsize 8, in inches (its text and the gap below it).
_LEGEND_ENTRY_HEIGHT = 0.21


# ----------------------------------------------------------------------------------------------
# Curves: test error per epoch, mean over seeds


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


def curve_series(cells: list[CellSummary]) -> tuple[dict, list[str]]:
    """One table's {(row, column): (epochs, mean test error, n)} over its finished runs.

    Seeds are averaged at the epochs all of them have, so a curve never mixes seed counts.
    history.csv holds the top-1 error per epoch: a cell of another metric (top-5) has no curve.
    """
    series: dict[tuple[str, str], tuple] = {}
    notes = []
    for c in cells:
        if c.definition is None or c.definition.metric != Metric.TOP1:
            continue
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
        if common:
            mean = [float(np.mean([h[e] for h in histories])) for e in common]
            series[(c.row, c.column)] = (common, mean, len(histories))
    return series, sorted(set(notes))


def _panels(layout: TableLayout, cells: list[CellSummary]) -> list[tuple[str, list[tuple[tuple, str]]]]:
    """[(panel title, [((row, column), line label)])]: each panel holds a baseline and the cells
    measured against it. Table 1's baselines sit in their cells' row (a panel per pair, a line
    per method); Table 2's, 3's and 4's in their column (a panel per column, a line per row)."""
    by_row = len(layout.columns) > 1 and (
        any(c.baseline is not None and c.baseline.row == c.row for c in cells)
        or not any(c.baseline is not None for c in cells))
    if by_row:
        return [(layout.rows[r]["label"], [((r, c), layout.columns[c]) for c in layout.columns])
                for r in layout.rows]
    title = (lambda c: layout.columns[c]) if len(layout.columns) > 1 else (lambda c: "")
    return [(title(c), [((r, c), layout.rows[r]["label"]) for r in layout.rows]) for c in layout.columns]


def curves_figure(series: dict, layout: TableLayout, cells: list[CellSummary], footer: str):
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in _panels(layout, cells) if any(key in series for key, _ in p[1])]
    if not panels:
        raise ValueError(f"{layout.name}: no cell has a finished run with a history.csv")
    columns = min(2, len(panels))   # one panel (one pair, Table 2) gets the whole width
    grid_rows = -(-len(panels) // columns)
    # a panel is as tall as its legend beside it (a sweep's table draws twenty lines and more)
    entries = max(sum(key in series for key, _ in lines) for _, lines in panels)
    panel_height = max(3.5, _LEGEND_ENTRY_HEIGHT * entries + 1.0)
    fig = new_figure(6.5 * columns, panel_height * grid_rows + 0.6)
    axes = fig.subplots(grid_rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes, panels):
        colors = _colors([label for _, label in lines])
        if title:
            ax.set_title(labels.mathtext(title), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        for index, (key, label) in enumerate(lines):
            if key in series:
                epochs, mean, n = series[key]
                ax.plot(epochs, mean, marker="o", markersize=3, color=colors[label],
                        linestyle=_line_style(index), label=labels.mathtext(f"{label} (n={n})"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        legend_outside(ax)
    set_title(fig, f"{layout.title}: test error during training, mean over seeds")
    set_footer(fig, footer)
    return fig


# ----------------------------------------------------------------------------------------------
# Bars: ours beside the reference


def bars_figure(cells: list[CellSummary], layout: TableLayout, footer: str, full_scale: bool):
    """Per row of the table, one bar pair per column. On the reference's scale (full_scale):
    our mean error (± std) beside the reference's error. Otherwise absolute errors would only
    show the difference of scale: our paired Δ to the baseline (95% CI) beside the
    reference's Δ, for the cells that have a baseline."""
    by_key = {(c.row, c.column): c for c in cells}
    # the same columns in every panel: in Δ mode those measured against a baseline in some row
    columns = [col for col in layout.columns
               if full_scale or any(by_key[(row, col)].baseline is not None for row in layout.rows)]
    fig = new_figure(max(7.0, (0.55 * len(columns) + 0.8) * len(layout.rows) + 2.0), 4.2)
    axes = fig.subplots(1, len(layout.rows), squeeze=False, sharey=True).ravel()
    width = 0.38
    for ax, row in zip(axes, layout.rows):
        summaries = [by_key[(row, col)] for col in columns]
        x = np.arange(len(summaries), dtype=float)
        if full_scale:
            ours = [c.mean for c in summaries]
            low = high = [c.std for c in summaries]
            refs = [c.reference for c in summaries]
            why = [mean_text(c) for c in summaries]
        else:
            paired = [c.paired if c.paired is not None and c.paired.mean is not None else None
                      for c in summaries]
            ours = [p.mean if p else None for p in paired]
            low = [p.mean - p.ci_low if p and p.ci_low is not None else None for p in paired]
            high = [p.ci_high - p.mean if p and p.ci_high is not None else None for p in paired]
            refs = [c.paired.reference if c.paired else None for c in summaries]
            why = [mean_text(c) if c.mean is None else "no pair" for c in summaries]
            ax.axhline(0.0, color="gray", linewidth=1)
        has = [i for i, o in enumerate(ours) if o is not None]
        ax.bar(x[has] - width / 2, [ours[i] for i in has], width, color="tab:blue",
               label="ours: mean ± std" if full_scale else "ours: paired Δ, 95% CI")
        whiskers = [i for i in has if low[i] is not None]
        if whiskers:
            ax.errorbar(x[whiskers] - width / 2, [ours[i] for i in whiskers],
                        yerr=[[low[i] for i in whiskers], [high[i] for i in whiskers]],
                        fmt="none", ecolor="black", capsize=2)
        # cells without a reference number get no reference bar
        with_ref = [i for i, r in enumerate(refs) if r is not None]
        ax.bar(x[with_ref] + width / 2, [refs[i] for i in with_ref], width, color="tab:gray",
               alpha=0.6, label="reference" if full_scale else "reference Δ")
        # n, or why there is no bar (a bar of height 0 would read as "0 % error" or "no change"),
        # under each bar pair, where it covers nothing
        counts = [why[i] if ours[i] is None else f"n={c.n if full_scale else c.paired.n}"
                  for i, c in enumerate(summaries)]
        ax.set_xticks(x, [labels.mathtext(f"{layout.columns[c.column]}\n({n})")
                          for c, n in zip(summaries, counts)], fontsize=8)
        ax.set_title(labels.mathtext(layout.rows[row]["label"]), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test error (%)" if full_scale
                       else "error minus the baseline's, same seed (points)")
    legend_outside(axes[-1])
    set_title(fig, f"{layout.title}: " + ("ours against the reference" if full_scale else
                                         "our paired Δ to the baseline against the reference's Δ"))
    set_footer(fig, footer)
    return fig


# ----------------------------------------------------------------------------------------------
# Paired differences: dot and whisker


def paired_rows(cells: list[CellSummary]) -> list[CellSummary]:
    """The cells a paired figure shows: those with at least one seed paired with their baseline."""
    return [c for c in cells if c.paired is not None and c.paired.mean is not None]


def paired_figure(layout: TableLayout, cells: list[CellSummary], footer: str):
    """Dot and whisker: each method's paired difference to its baseline with its 95% CI,
    beside the reference's difference; methods on the y axis, top to bottom in table order."""
    shown = paired_rows(cells)
    if not shown:
        raise ValueError(f"{layout.name}: no cell has a finished run paired with its baseline")
    fig = new_figure(9, 1.8 + 0.45 * len(shown))
    ax = fig.subplots()
    y = np.arange(len(shown), dtype=float)[::-1]
    means = [c.paired.mean for c in shown]
    with_ci = [i for i, c in enumerate(shown) if c.paired.ci_low is not None]
    ax.axvline(0.0, color="gray", linewidth=1)
    if with_ci:
        low = [means[i] - shown[i].paired.ci_low for i in with_ci]
        high = [shown[i].paired.ci_high - means[i] for i in with_ci]
        ax.errorbar([means[i] for i in with_ci], y[with_ci], xerr=[low, high], fmt="none",
                    ecolor="black", capsize=3, label="95% CI (t, n − 1 df)")
    ax.plot(means, y, "o", color="tab:blue", label="ours: mean paired Δ")
    with_ref = [i for i, c in enumerate(shown) if c.paired.reference is not None]
    if with_ref:  # a cell or baseline without a reference number gets no marker
        ax.plot([shown[i].paired.reference for i in with_ref], y[with_ref], "D", color="tab:red",
                markerfacecolor="none", label="reference Δ")
    ax.set_yticks(y, [labels.mathtext(f"{c.label} (n={c.paired.n})") for c in shown], fontsize=8)
    ax.set_ylim(-0.6, len(shown) - 0.4)
    ax.set_xlabel("test error minus the baseline's, same seed (percentage points)")
    ax.grid(axis="x", alpha=0.3)
    legend_outside(ax)
    set_title(fig, f"{layout.title}: paired difference to the baseline")
    set_footer(fig, footer)
    return fig


# ----------------------------------------------------------------------------------------------
# Sweeps: the paired difference against the swept value


def sweep_points(axis: SweepAxis, column: str, cells: list[CellSummary]) -> list[tuple[object, CellSummary]]:
    """(value, cell) of one sweep in one column, for the values with at least one seed paired."""
    by_key = {(c.row, c.column): c for c in cells}
    return [(value, by_key[(row, column)]) for value, row in axis.values
            if (row, column) in by_key and by_key[(row, column)].paired is not None
            and by_key[(row, column)].paired.mean is not None]


def sweep_log_axis(values) -> bool:
    """A log x axis where the swept values are positive numbers spanning a decade or more."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(numbers) == len(values) and min(numbers) > 0 and max(numbers) / min(numbers) >= 10


def sweep_figure(layout: TableLayout, axis: SweepAxis, cells: list[CellSummary], footer: str):
    """One sweep: our paired Δ to the baseline (95% CI) against the swept value, a line per
    column, with the reference's Δ at the method's own value (the paper's cell, the swept row)."""
    from at.sweep import value_text

    values = [v for v, _ in axis.values]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    # names (a mapping, a schedule) sit at even steps in params.yaml's order
    where = (lambda v: v) if numeric else (lambda v: values.index(v) if v in values else None)
    by_key = {(c.row, c.column): c for c in cells}
    fig = new_figure(8, 4.2)
    ax = fig.subplots()
    ax.axhline(0.0, color="gray", linewidth=1)
    colors = _colors(list(layout.columns))
    drawn = 0
    for column, label in layout.columns.items():
        points = sweep_points(axis, column, cells)
        suffix = f", {label}" if len(layout.columns) > 1 else ""
        if points:
            drawn += 1
            x = [where(v) for v, _ in points]
            means = [c.paired.mean for _, c in points]
            ax.plot(x, means, "o-", color=colors[column], label=labels.mathtext(f"ours: mean paired Δ{suffix}"))
            ci = [(xi, c) for xi, (_, c) in zip(x, points) if c.paired.ci_low is not None]
            if ci:
                ax.errorbar([xi for xi, _ in ci], [c.paired.mean for _, c in ci],
                            yerr=[[c.paired.mean - c.paired.ci_low for _, c in ci],
                                  [c.paired.ci_high - c.paired.mean for _, c in ci]],
                            fmt="none", ecolor=colors[column], capsize=3)
        swept = by_key.get((axis.row, column))
        if swept is not None and swept.paired is not None and swept.paired.reference is not None \
                and where(axis.own) is not None:
            ax.plot([where(axis.own)], [swept.paired.reference], "D", color="tab:red", markerfacecolor="none",
                    markersize=8, label=labels.mathtext(f"reference Δ at its {axis.key} = {value_text(axis.own)}{suffix}"))
    if not drawn:
        raise ValueError(f"{layout.name}: no value of the sweep of row {axis.row} has a finished run "
                         "paired with its baseline")
    if numeric and sweep_log_axis(values):
        ax.set_xscale("log")
    ax.set_xticks([where(v) for v in values], [value_text(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(f"{axis.key} (swept)" + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("error minus the baseline's,\nsame seed (points)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    set_title(fig, labels.mathtext(f"{layout.title}: {layout.rows[axis.row]['label']}, paired difference "
                                   f"to the baseline against {axis.key}"))
    set_footer(fig, footer)
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
        paths.append(atomic.write_bytes(Path(out_dir) / f"{stem}.{ext}", data))
    return paths

