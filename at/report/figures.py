"""Figures (PNG and PDF, without timestamps): bare matplotlib Figures, no pyplot state."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from at import atomic, paper
from at.report.cells import CellSummary
from at.report.inputs import ReportInputError
from at.report.tables import mean_text

# Figure output stems (each written as .png and .pdf).
FIG_CURVES = "fig_curves_table1"
FIG_BARS = "fig_bars_table1"
FIG_ATTENTION = "fig_attention_maps"

_PNG_DPI = 100
# Without these, matplotlib stamps the creation date and its version into the files.
_PDF_METADATA = {"CreationDate": None, "Software": None, "Producer": None}
_PNG_METADATA = {"Software": None}


def new_figure(width: float, height: float):
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
    fig = new_figure(10, 7.5)
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
    fig = new_figure(13, 4.2)
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
                ax.text(xi - width / 2, 0.2, mean_text(c), rotation=90, ha="center",
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

