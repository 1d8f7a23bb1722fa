"""Tables in Markdown, LaTeX and CSV, with fixed number formats (same inputs, same bytes)."""

from __future__ import annotations

import csv
import io
import math
from typing import Callable

from at.report import labels
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
    """The paired columns of one cell as text: Δ vs baseline, its CI, per-seed Δ, sign check,
    and the reference's own Δ."""
    p = c.paired
    if p is None:
        return {"delta": _DASH, "ci": _DASH, "per_seed": _DASH, "sign": _DASH, "reference": _DASH}
    if p.mean is None:   # no seed paired (yet): the reference's Δ is still worth reading
        return {"delta": _DASH, "ci": _DASH, "per_seed": _DASH, "sign": _DASH,
                "reference": _fmt(p.reference, sign=True)}
    return {
        "delta": _fmt(p.mean, sign=True),
        "ci": _DASH if p.ci_low is None else f"[{_fmt(p.ci_low, sign=True)}, {_fmt(p.ci_high, sign=True)}]",
        "per_seed": ", ".join(f"{s}: {_fmt(d, sign=True)}" for s, d in zip(p.seeds, p.differences)),
        "sign": {True: "yes", False: "no", None: _DASH}[p.sign_agrees],
        "reference": _fmt(p.reference, sign=True),
    }


# ----------------------------------------------------------------------------------------------
# Tables


def _baseline_sentences(layout: TableLayout, cells: list[CellSummary]) -> list[str]:
    """Which cell each Δ base is measured against, as sentences: "Baseline of AT, KD and
    AT+KD: Student, in the same row." A cell is named by what tells it from its baseline (its
    column in the baseline's row, its row in the baseline's column), never by its whole label."""
    groups: dict[str, list[str]] = {}
    for c in cells:
        b = c.baseline
        if b is None:
            continue
        if b.row == c.row and len(layout.columns) > 1:
            target, name = f"{layout.columns[b.column]}, in the same row", layout.columns[c.column]
        elif b.column == c.column:
            target = layout.rows[b.row]["label"] + (", in the same column" if len(layout.columns) > 1 else "")
            name = layout.rows[c.row]["label"]
        else:
            target, name = b.label, c.label
        if name not in groups.setdefault(target, []):
            groups[target].append(name)
    return [f"Baseline of {_and(names)}: {target}." for target, names in groups.items()]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _table_notes(layout: TableLayout, cells: list[CellSummary], context: Context) -> list[str]:
    if layout.citation:
        reference = f"Reference: {layout.citation} (the published number, full protocol)."
    else:
        reference = "Reference: none published for this table: reference and reference Δ are —."
    if context.full_scale:
        diff = "diff = mean − reference (— where the cell has no reference)."
    else:
        # a profile of fewer epochs or a subset of the data is not on the reference's scale: its
        # absolute error minus the published one measures the scale, not the method
        diff = ("no diff to the reference's error: this profile's protocol is not the reference's "
                "(fewer epochs or a subset of the data), so compare Δ base with reference Δ.")
    notes = [
        reference,
        "mean and std: over the n seeds that finished, of the test error (%) at the last epoch; "
        "std is the sample std (ddof=1), shown as — when n = 1; " + diff,
        "Δ base: paired difference to the cell's baseline (same table, same model, data and "
        "protocol, method `baseline`): our error minus the baseline's of the same seed, "
        "averaged over the seeds both finished (per-seed Δ lists them, seed: Δ); 95% CI: "
        "Student t with n − 1 degrees of freedom, — for fewer than 2 pairs; reference Δ: the "
        "reference's error minus its baseline's (— where either is missing); sign: whether Δ base "
        "has the sign of reference Δ.",
    ]
    notes += _baseline_sentences(layout, cells)
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


def _number_columns(full_scale: bool) -> list[tuple[str, Callable[[CellSummary], str]]]:
    """(header, text of a cell) of the numbers, in order; diff only where the scales agree."""
    def paired(key):
        return lambda c: paired_texts(c)[key]

    columns = [("n", lambda c: str(c.n)), ("mean", mean_text), ("std", lambda c: _fmt(c.std)),
               ("reference", lambda c: _fmt_reference(c.reference))]
    if full_scale:
        columns.append(("diff", lambda c: _fmt(c.diff, sign=True)))
    columns += [("Δ base", paired("delta")), ("95% CI", paired("ci")),
                ("reference Δ", paired("reference")), ("sign", paired("sign")),
                ("per-seed Δ", paired("per_seed")), ("epoch", _epoch_text)]
    return columns


def _label_header(layout: TableLayout) -> list[str]:
    header = list(layout.row_header)
    if len(layout.columns) > 1:
        header.append(layout.column_header)
    return header


def _table_rows(layout: TableLayout, cells: list[CellSummary], full_scale: bool) -> list[tuple[list[str], list[str]]]:
    """Per cell: (its label texts, its number and status texts)."""
    rows = []
    for c in cells:
        labels = [layout.rows[c.row][h] for h in layout.row_header]
        if len(layout.columns) > 1:
            labels.append(layout.columns[c.column])
        rows.append((labels, [text(c) for _, text in _number_columns(full_scale)] + [c.status_text]))
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(layout: TableLayout, cells: list[CellSummary], context: Context,
                   level: int = 1, pointer: bool = True) -> str:
    """The table with its notes. pointer: a line that says where its provenance is (the
    README's own copy of the table leaves it out: the README says it once at its top)."""
    # the profile's purpose (e.g. "smoke numbers carry no information") comes first of all
    out = [f"**{context.purpose}**", ""] if context.purpose else []
    dataset = f" Data set: {layout.dataset}." if layout.dataset else ""
    out += [f"{'#' * level} {layout.title}", ""]
    if pointer:
        out += [f"Ours: profile `{context.profile}`; its data, md5, epochs, seeds, precision and code: "
                "[README.md](README.md).", ""]
    out += [labels.markdown(f"{layout.caption}{dataset}"), ""]
    label_header = _label_header(layout)
    header = label_header + [h for h, _ in _number_columns(context.full_scale)] + ["status"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(
        "--:" if len(label_header) <= i < len(header) - 1 else "---" for i in range(len(header))
    ) + "|")
    for texts, numbers in _table_rows(layout, cells, context.full_scale):
        out.append("| " + " | ".join(_md_escape(labels.markdown(x)) for x in texts + numbers) + " |")
    out.append("")
    out += [f"- {_md_escape(labels.markdown(n))}" for n in _table_notes(layout, cells, context)]
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


def tex_text(text: str) -> str:
    """Escaped for LaTeX, with the mapping functions as mathematics (at.report.labels)."""
    return labels.latex(text, tex_escape)


def table_latex(layout: TableLayout, cells: list[CellSummary], context: Context) -> str:
    label_header = _label_header(layout)
    numbers = _number_columns(context.full_scale)
    header = label_header + [h for h, _ in numbers] + ["status"]
    align = "l" * len(label_header) + "r" * len(numbers) + "l"
    dataset = f" Data set: {layout.dataset}." if layout.dataset else ""
    caption = " ".join(
        ([tex_text(context.purpose)] if context.purpose else [])
        + [tex_text(layout.title) + ".", tex_text(layout.caption + dataset),
           tex_text(f"Ours: profile {context.profile} (its provenance: the README of its results).")]
        + [tex_text(n) for n in _table_notes(layout, cells, context)]
    )
    out = [
        "% Generated by at.report from the runs' metrics.json; needs \\usepackage{booktabs}.",
        r"\begin{table}[ht]",
        r"\centering",
        r"\caption{" + caption + "}",
        r"\label{tab:" + layout.name + "}",
        r"\begin{tabular}{" + align + "}",
        r"\toprule",
        " & ".join(tex_text(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for texts, values in _table_rows(layout, cells, context.full_scale):
        out.append(" & ".join(tex_text(x) for x in texts + values) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ("table", "row", "column", "label", "n", "mean", "std", "reference", "diff",
               "baseline_row", "baseline_column", "paired_n", "paired_seeds", "paired_diffs",
               "paired_mean", "ci_low", "ci_high", "reference_diff", "sign_agrees", "epoch",
               "status")


def table_csv(cells: list[CellSummary], full_scale: bool) -> str:
    """Machine-readable: empty fields where there is no number; lists joined by ';'; diff
    empty where the profile's scale is not the reference's (see _table_notes)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(x):
        return "" if x is None else _fmt(x, digits=4)

    for c in cells:
        p = c.paired
        writer.writerow([
            c.table, c.row, c.column, c.label, c.n, num(c.mean), num(c.std),
            "" if c.reference is None else _fmt_reference(c.reference),
            num(c.diff) if full_scale else "",
            c.baseline.row if c.baseline else "", c.baseline.column if c.baseline else "",
            p.n if p else "", ";".join(str(s) for s in p.seeds) if p else "",
            ";".join(num(d) for d in p.differences) if p else "",
            num(p.mean) if p else "", num(p.ci_low) if p else "", num(p.ci_high) if p else "",
            num(p.reference) if p else "",
            {True: "yes", False: "no", None: ""}[p.sign_agrees] if p else "",
            ";".join(str(e) for e in sorted(set(c.epochs))), c.status,
        ])
    return buf.getvalue()
