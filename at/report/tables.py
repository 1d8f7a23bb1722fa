"""Tables in Markdown, LaTeX and CSV, with fixed number formats (same inputs, same bytes)."""

from __future__ import annotations

import csv
import io
import math

from at.report.cells import CellSummary
from at.report.inputs import Context
from at.report.layout import TableLayout

_DASH = "—"


def _fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return _DASH
    if math.isnan(x):
        return "nan"
    x = round(x, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_reference(x: float | None) -> str:
    # As printed in the source (27, 13.5, 8.77): no invented precision.
    return _DASH if x is None else format(x, "g")


def _epoch_text(summary: CellSummary) -> str:
    return ", ".join(str(e) for e in sorted(set(summary.epochs))) if summary.epochs else _DASH


def mean_text(summary: CellSummary) -> str:
    if summary.status == "not run":
        return "not run"
    if summary.status == "missing":
        return "missing"
    return _fmt(summary.mean)


def paired_texts(c: CellSummary) -> dict[str, str]:
    """The paired columns of one cell as text: Δ vs baseline, its CI, per-seed Δ, sign check."""
    p = c.paired
    if p is None or p.mean is None:
        return {"delta": _DASH, "ci": _DASH, "per_seed": _DASH, "sign": _DASH}
    return {
        "delta": _fmt(p.mean, sign=True),
        "ci": _DASH if p.ci_low is None else f"[{_fmt(p.ci_low, sign=True)}, {_fmt(p.ci_high, sign=True)}]",
        "per_seed": ", ".join(f"{s}: {_fmt(d, sign=True)}" for s, d in zip(p.seeds, p.differences)),
        "sign": {True: "yes", False: "no", None: _DASH}[p.sign_agrees],
    }


# ----------------------------------------------------------------------------------------------
# Tables


def _table_notes(layout: TableLayout, cells: list[CellSummary], context: Context) -> list[str]:
    if layout.citation:
        reference = f"Reference: {layout.citation} (the published number, full protocol)."
    else:
        reference = "Reference: none published for this table: reference and diff are —."
    notes = [
        f"Ours: {context.description} (profile `{context.profile}`).",
        reference,
        "mean and std: over the n seeds that finished, of the test error (%) at the last epoch; "
        "std is the sample std (ddof=1), shown as — when n = 1; diff = mean − reference (— "
        "where the cell has no reference).",
        "Δ base: paired difference to the cell's baseline (same table, same model, data and "
        "protocol, method `baseline`): our error minus the baseline's of the same seed, "
        "averaged over the seeds both finished (per-seed Δ lists them, seed: Δ); 95% CI: "
        "Student t with n − 1 degrees of freedom, — for fewer than 2 pairs; sign: whether Δ base "
        "has the sign of the reference's own difference (— where either reference is missing).",
    ]
    baselines = {}
    for c in cells:
        if c.baseline is not None:
            baselines.setdefault(c.baseline.label, []).append(c.label)
    for label, of in baselines.items():
        notes.append(f"Baseline {label}: of {'; '.join(of)}.")
    if layout.omitted_rows:
        notes.append("Rows this profile does not run (not shown): " + "; ".join(layout.omitted_rows) + ".")
    reasons = sorted({c.not_run_reason for c in cells if c.not_run_reason})
    if cells and all(c.status == "not run" for c in cells):
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


_NUMBER_COLUMNS = ["n", "mean", "std", "reference", "diff", "Δ base", "95% CI", "per-seed Δ",
                   "sign", "epoch"]


def _label_header(layout: TableLayout) -> list[str]:
    header = list(layout.row_header)
    if len(layout.columns) > 1:
        header.append(layout.column_header)
    return header


def _table_rows(layout: TableLayout, cells: list[CellSummary]) -> list[list[str]]:
    rows = []
    for c in cells:
        line = [layout.rows[c.row][h] for h in layout.row_header]
        if len(layout.columns) > 1:
            line.append(layout.columns[c.column])
        paired = paired_texts(c)
        line += [
            str(c.n),
            mean_text(c),
            _fmt(c.std),
            _fmt_reference(c.reference),
            _fmt(c.diff, sign=True),
            paired["delta"],
            paired["ci"],
            paired["per_seed"],
            paired["sign"],
            _epoch_text(c),
            c.status_text,
        ]
        rows.append(line)
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(layout: TableLayout, cells: list[CellSummary], context: Context,
                   level: int = 1) -> str:
    # the profile's purpose (e.g. "smoke numbers carry no information") comes first of all
    out = [f"**{context.purpose}**", ""] if context.purpose else []
    dataset = f" Data set: {layout.dataset}." if layout.dataset else ""
    out += [
        f"{'#' * level} {layout.title}",
        "",
        f"**{context.description}** (profile `{context.profile}`)",
        "",
        f"{layout.caption}{dataset}",
        "",
    ]
    labels = _label_header(layout)
    header = labels + _NUMBER_COLUMNS + ["status"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(
        "--:" if len(labels) <= i < len(header) - 1 else "---" for i in range(len(header))
    ) + "|")
    for line in _table_rows(layout, cells):
        out.append("| " + " | ".join(_md_escape(x) for x in line) + " |")
    out.append("")
    out += [f"- {_md_escape(n)}" for n in _table_notes(layout, cells, context)]
    return "\n".join(out) + "\n"


def tex_escape(text: str) -> str:
    special = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "<": r"\textless{}", ">": r"\textgreater{}",
        "±": r"$\pm$", "—": "---", "−": "$-$", "`": "", "Δ": r"$\Delta$",
    }
    text = text.replace("->", "\x00")  # arrows first, before '>' is escaped
    escaped = "".join(special.get(ch, ch) for ch in text)
    return escaped.replace("\x00", r"$\to$")


def table_latex(layout: TableLayout, cells: list[CellSummary], context: Context) -> str:
    labels = _label_header(layout)
    header = labels + _NUMBER_COLUMNS + ["status"]
    align = "l" * len(labels) + "r" * len(_NUMBER_COLUMNS) + "l"
    dataset = f" Data set: {layout.dataset}." if layout.dataset else ""
    caption = " ".join(
        ([tex_escape(context.purpose)] if context.purpose else [])
        + [
            tex_escape(layout.title) + ".",
            tex_escape(layout.caption + dataset),
            r"\textbf{" + tex_escape(f"Ours: {context.description} (profile {context.profile}).") + "}",
        ]
        + [tex_escape(n) for n in _table_notes(layout, cells, context)[1:]]  # [0]: in bold above
    )
    out = [
        "% Generated by at.report from the runs' metrics.json; needs \\usepackage{booktabs}.",
        r"\begin{table}[ht]",
        r"\centering",
        r"\caption{" + caption + "}",
        r"\label{tab:" + layout.name + "}",
        r"\begin{tabular}{" + align + "}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for line in _table_rows(layout, cells):
        out.append(" & ".join(tex_escape(x) for x in line) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ("table", "row", "column", "label", "n", "mean", "std", "reference", "diff",
               "baseline_row", "baseline_column", "paired_n", "paired_seeds", "paired_diffs",
               "paired_mean", "ci_low", "ci_high", "reference_diff", "sign_agrees", "epoch",
               "status")


def table_csv(cells: list[CellSummary]) -> str:
    """Machine-readable: empty fields where there is no number; lists joined by ';'."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(x):
        return "" if x is None else _fmt(x, digits=4)

    for c in cells:
        p = c.paired
        writer.writerow([
            c.table, c.row, c.column, c.label, c.n, num(c.mean), num(c.std),
            "" if c.reference is None else _fmt_reference(c.reference), num(c.diff),
            c.baseline.row if c.baseline else "", c.baseline.column if c.baseline else "",
            p.n if p else "", ";".join(str(s) for s in p.seeds) if p else "",
            ";".join(num(d) for d in p.differences) if p else "",
            num(p.mean) if p else "", num(p.ci_low) if p else "", num(p.ci_high) if p else "",
            num(p.reference) if p else "",
            {True: "yes", False: "no", None: ""}[p.sign_agrees] if p else "",
            ";".join(str(e) for e in sorted(set(c.epochs))), c.status,
        ])
    return buf.getvalue()
