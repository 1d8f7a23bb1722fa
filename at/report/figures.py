"""Figures (PNG and PDF, without timestamps): bare matplotlib Figures, no pyplot state."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import numpy as np

from at import atomic
from at.report.cells import CellSummary
from at.report.inputs import ReportInputError
from at.report.layout import TableLayout
from at.report.tables import mean_text

# Figure output stems (each written as .png and .pdf).
FIG_CURVES = "fig_curves_table1"
FIG_BARS = "fig_bars_table1"
FIG_ATTENTION = "fig_attention_maps"
FIG_PAIRED = "fig_paired_{table}"   # one per table

_PNG_DPI = 100
# Without these, matplotlib stamps the creation date and its version into the files.
_PDF_METADATA = {"CreationDate": None, "Software": None, "Producer": None}
_PNG_METADATA = {"Software": None}


def new_figure(width: float, height: float):
    # A bare Figure (no pyplot): no global backend switch, no state shared between calls.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_PNG_DPI, layout="constrained")


def set_title(fig, text: str, fontsize: float = 11) -> None:
    """A figure title wrapped to the figure's width: a long description is never cut off.

    Constrained layout makes room above the axes but does not shorten a line wider than the
    figure, so each line is wrapped at the characters that fit (DejaVu Sans averages about
    0.6 em per character; tests check the drawn title lies inside the figure).
    """
    width_pt = fig.get_figwidth() * 72
    per_line = max(20, int(width_pt / (0.6 * fontsize)))
    lines = [wrapped for line in text.split("\n") for wrapped in textwrap.wrap(line, per_line)]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


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


def curves_figure(series: dict, layout: TableLayout, description: str):
    from matplotlib.ticker import MaxNLocator

    colors = _method_colors(list(layout.columns))
    n_rows = len(layout.rows)
    columns = min(2, n_rows)   # one pair (a profile that runs one row) gets the whole width
    grid_rows = -(-n_rows // columns)
    fig = new_figure(5 * columns + 1, 3.5 * grid_rows + 0.5)
    axes = fig.subplots(grid_rows, columns, squeeze=False).ravel()
    for ax in axes[n_rows:]:
        ax.set_visible(False)
    for ax, row in zip(axes, layout.rows):
        ax.set_title(layout.rows[row]["label"], fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        lines = series.get(row, {})
        for column, label in layout.columns.items():
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
    set_title(fig, f"Table 1 pairs: test error during training, mean over seeds\n{description}")
    return fig


def bars_figure(cells: list[CellSummary], layout: TableLayout, description: str):
    columns = list(layout.columns)
    fig = new_figure(max(7.0, 3.25 * len(layout.rows)), 4.2)
    axes = fig.subplots(1, len(layout.rows), squeeze=False, sharey=True).ravel()
    by_key = {(c.row, c.column): c for c in cells}
    x = np.arange(len(columns), dtype=float)
    width = 0.38
    for ax, row in zip(axes, layout.rows):
        summaries = [by_key[(row, col)] for col in columns]
        ours = [c.mean if c.mean is not None else 0.0 for c in summaries]
        errs = [c.std if c.std is not None else 0.0 for c in summaries]
        has = [c.mean is not None for c in summaries]
        ax.bar(x - width / 2, [o if h else 0.0 for o, h in zip(ours, has)], width,
               color="tab:blue", label="ours (mean ± std)")
        with_std = [i for i, c in enumerate(summaries) if c.std is not None]
        if with_std:
            ax.errorbar(x[with_std] - width / 2, [ours[i] for i in with_std],
                        yerr=[errs[i] for i in with_std], fmt="none", ecolor="black", capsize=2)
        # cells without a reference number get no reference bar
        with_ref = [i for i, c in enumerate(summaries) if c.reference is not None]
        ax.bar(x[with_ref] + width / 2, [summaries[i].reference for i in with_ref], width,
               color="tab:gray", alpha=0.6, label="reference")
        for xi, c in zip(x, summaries):
            if c.mean is None:
                # No bar of height 0 that could read as "0 % error": say why there is none.
                ax.text(xi - width / 2, 0.2, mean_text(c), rotation=90, ha="center",
                        va="bottom", fontsize=7)
            else:
                ax.text(xi - width / 2, 0.2, f"n={c.n}", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="white")
        ax.set_xticks(x, [layout.columns[c] for c in columns], rotation=45, fontsize=8)
        ax.set_title(layout.rows[row]["label"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    # the legend goes in a band above the tallest bar, where it can cover none
    top = axes[0].get_ylim()[1]
    axes[0].set_ylim(top=top * 1.18)
    axes[0].legend(fontsize=8, loc="upper right", ncols=2)
    set_title(fig, f"Table 1: ours against the reference\n{description}")
    return fig


def paired_rows(cells: list[CellSummary]) -> list[CellSummary]:
    """The cells a paired figure shows: those with at least one seed paired with their baseline."""
    return [c for c in cells if c.paired is not None and c.paired.mean is not None]


def paired_figure(layout: TableLayout, cells: list[CellSummary], description: str):
    """Dot and whisker: each method's paired difference to its baseline with its 95% CI,
    beside the reference's difference; methods on the y axis, top to bottom in table order."""
    shown = paired_rows(cells)
    if not shown:
        raise ValueError(f"{layout.name}: no cell has a finished run paired with its baseline")
    fig = new_figure(8, 1.6 + 0.45 * len(shown))
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
    ax.set_yticks(y, [f"{c.label} (n={c.paired.n})" for c in shown], fontsize=8)
    ax.set_xlabel("test error minus the baseline's, same seed (percentage points)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    set_title(fig, f"{layout.title}: paired difference to the baseline\n{description}")
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

