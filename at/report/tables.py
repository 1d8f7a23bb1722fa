"""Tables in Markdown, LaTeX and CSV, with fixed number formats (same inputs, same bytes)."""

from __future__ import annotations

import csv
import io
import math

from at import paper
from at.report.cells import CellSummary

_DASH = "—"


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


def mean_text(summary: CellSummary) -> str:
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
            mean_text(c),
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


def tex_escape(text: str) -> str:
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
            tex_escape(spec["title"]) + ".",
            tex_escape(spec["caption"]),
            r"\textbf{" + tex_escape(f"Ours: {description} (profile {profile}).") + "}",
        ]
        + [tex_escape(n) for n in _table_notes(name, cells, profile, description)[1:]]
    )
    out = [
        "% Generated by at.report from the runs' metrics.json; needs \\usepackage{booktabs}.",
        r"\begin{table}[ht]",
        r"\centering",
        r"\caption{" + caption + "}",
        r"\label{tab:" + name + "}",
        r"\begin{tabular}{" + align + "}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for line in _table_rows(spec, cells):
        out.append(" & ".join(tex_escape(x) for x in line) + r" \\")
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

