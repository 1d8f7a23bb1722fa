"""at.report: honest, deterministic tables and figures from real run folders (tmp dirs)."""

import csv
import json
import math
import os
import statistics
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from at import grid as grid_mod
from at import params as params_io
from at import references, report
from at.report import attention_maps, cells, driver, figures, inputs, tables
from at.report.layout import grid_tables
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
DESC = "smoke profile, CIFAR-10 mini subset (5085 train / 1017 test images), 2 epochs"
FOOTER = "smoke · CIFAR-10 mini subset · 2 ep · code 9106bbf"
T1ROW = "wrn-16-1_from_wrn-16-2"
CIFAR_MD5 = "1c190744c9595cc62078be24b4b038fb"
TABLES = ["table1", "table2", "table3", "table4", "imagenet", "beyond"]  # params.yaml's, in order


def cell(table, row, column, metric=None):
    return {"table": table, "row": row, "column": column, **({"metric": metric} if metric else {})}


def write_run(root, run_id, seed, cells, error=None, final_epoch=2, epochs=2, top5=None,
              history=True, student="wrn-16-1", method="baseline", dataset="cifar10",
              protocol="cifar", metrics_changes=None):
    """A run folder as the trainer leaves it; error None: the run did not finish."""
    out = Path(root) / run_id
    out.mkdir(parents=True)
    if error is not None:
        metrics = {"run_id": run_id, "profile": "smoke", "final_test_error": error,
                   "final_epoch": final_epoch, "epochs": epochs,
                   "data_md5": "user-folder" if dataset == "imagenet" else CIFAR_MD5}
        if top5 is not None:
            metrics["final_test_error_top5"] = top5
        metrics.update(metrics_changes or {})
        (out / "metrics.json").write_text(json.dumps(metrics))
        if history:
            lines = ["epoch,lr,train_loss,loss_ce,train_error,test_error,images_per_s,epoch_time_s"]
            for e in range(1, final_epoch + 1):
                # the last epoch's test error is the final one
                te = error + (final_epoch - e) * 5.0
                lines.append(f"{e},0.1,1.0,1.0,50.0,{te},1000.0,1.0")
            (out / "history.csv").write_text("\n".join(lines) + "\n")
    return {"id": run_id, "out_dir": str(out), "cells": cells, "seed": seed, "student": student,
            "method_name": method, "dataset": dataset, "protocol_name": protocol, "weights": None,
            "epochs": epochs}


# Numbers of the fake grid, kept here to recompute the expected statistics independently.
AT_ERRORS = [61.25, 58.5, 60.0]          # 3 seeds, AT sum-p2: table1 AT and table2 sum-p2
STUDENT_ERRORS = [70.0, 66.5]            # 2 seeds: table1 student and table2 "none"
TEACHER_ERRORS = [55.125]                # 1 seed
KD_ERRORS = [None, 64.0, 63.0]           # seed 0 missing: partial
SUMP1_ERRORS = [59.0, 57.5]


def real_params():
    return params_io.load(REPO / "params.yaml")


def make_context(params=None, refs=None, **changes):
    params = params or real_params()
    context = {"profile": "smoke", "description": DESC, "footer": FOOTER, "tables": grid_tables(params),
               "references": refs if refs is not None else references.load(REPO / "references.yaml"),
               "not_run": {"table4": "CUB and Scenes are not downloaded in the smoke profile",
                           # its sweep's report: tests/test_sweep.py
                           "beta-sweep": "run by the sweep-smoke profile only",
                           "sensitivity": "run by the sensitivity profile only"},
               "data_md5": {"cifar10": CIFAR_MD5, "imagenet": "user-folder"}}
    context.update(changes)
    return context


def build_grid(root):
    runs = []
    for s, e in enumerate(AT_ERRORS):
        runs.append(write_run(root, f"at-sum-p2/seed{s}", s,
                              [cell("table1", T1ROW, "at"), cell("table2", "sum-p2", "error")], e,
                              method="at-sum-p2"))
    for s, e in enumerate(STUDENT_ERRORS):
        runs.append(write_run(root, f"student/seed{s}", s,
                              [cell("table1", T1ROW, "student"), cell("table2", "none", "error")], e))
    for s, e in enumerate(TEACHER_ERRORS):
        runs.append(write_run(root, f"teacher/seed{s}", s, [cell("table1", T1ROW, "teacher")], e,
                              student="wrn-16-2"))
    for s, e in enumerate(KD_ERRORS):
        runs.append(write_run(root, f"kd/seed{s}", s, [cell("table1", T1ROW, "kd")], e, method="kd"))
    for s, e in enumerate(SUMP1_ERRORS):
        runs.append(write_run(root, f"at-sum-p1/seed{s}", s, [cell("table2", "sum-p1", "error")], e,
                              method="at-sum-p1"))
    # F-ActT: its only run never finished.
    runs.append(write_run(root, "factt/seed0", 0, [cell("table1", T1ROW, "factt")], None, method="factt"))
    # A run that stopped before its planned epochs (table3 AT); table3 has no baseline run.
    runs.append(write_run(root, "nin-at/seed0", 0, [cell("table3", "at", "error")], 40.0,
                          final_epoch=1, epochs=2, student="nin-thin-nobn", method="at-sum-p2",
                          protocol="cifar_flip"))
    runs.append(write_run(root, "imagenet/seed0", 0,
                          [cell("imagenet", "resnet18", "top1", "top1"),
                           cell("imagenet", "resnet18", "top5", "top5")],
                          45.5, top5=20.25, student="resnet18", dataset="imagenet",
                          protocol="imagenet"))
    return runs, make_context()


@pytest.fixture
def grid(tmp_path):
    return build_grid(tmp_path / "runs")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One render of the fake grid, shared by the tests that only read its output."""
    root = tmp_path_factory.mktemp("rendered")
    runs, context = build_grid(root / "runs")
    report.render(runs, root / "out", context)
    return root / "out", runs, context


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["row"], r["column"]): r for r in csv.DictReader(f)}


def summaries_of(runs, context):
    checked = inputs.validate_context(context)
    return cells.summarize(inputs.load_runs(inputs.validate_runs(runs, checked), checked), checked), checked


def test_render_is_byte_identical(grid, tmp_path):
    runs, context = grid
    a = report.render(runs, tmp_path / "a", context)
    b = report.render(list(reversed(runs)), tmp_path / "b", context)
    # the report's mark (driver.MARKER) names the files; it is not one of them
    names_a = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != driver.MARKER)
    names_b = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != driver.MARKER)
    assert names_a == names_b == sorted(p.name for p in a) == sorted(p.name for p in b)
    for name in names_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # table4 is not run: no file of it
    expected = {f"{t}.{ext}" for t in TABLES if t != "table4" for ext in ("md", "tex", "csv")}
    expected |= {f"{stem}.{ext}" for ext in ("png", "pdf")
                 for stem in (figures.FIG_BARS,
                              *(figures.FIG_CURVES.format(table=t) for t in ("table1", "table2", "table3", "imagenet")),
                              figures.FIG_PAIRED.format(table="table1"),
                              figures.FIG_PAIRED.format(table="table2"))}
    # no attention figure (no checkpoint), no paired figure for table3 (no baseline run),
    # imagenet (no AT run) or table4 (not run), no curves for beyond (no run); no temp files left
    assert set(names_a) == expected | {"README.md"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "runs"]   # no staging folder left
    assert b"CreationDate" not in (tmp_path / "a" / f"{figures.FIG_BARS}.pdf").read_bytes()


def test_statistics_against_independent_computation(rendered):
    tmp_path, runs, context = rendered
    t1 = read_csv(tmp_path / "table1.csv")

    def check(row, values, reference, status):
        mean = statistics.mean(values)
        assert row["n"] == str(len(values))
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4)
        if len(values) > 1:
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        else:
            assert row["std"] == ""
        assert float(row["reference"]) == reference
        assert row["diff"] == ""   # smoke is not on the reference's scale: no diff to it
        assert row["status"] == status

    check(t1[(T1ROW, "at")], AT_ERRORS, 7.93, "ok")
    check(t1[(T1ROW, "student")], STUDENT_ERRORS, 8.77, "ok")
    check(t1[(T1ROW, "teacher")], TEACHER_ERRORS, 6.31, "ok")
    check(t1[(T1ROW, "kd")], [64.0, 63.0], 7.41, "partial")
    t2 = read_csv(tmp_path / "table2.csv")
    check(t2[("sum-p1", "error")], SUMP1_ERRORS, 7.99, "ok")
    imagenet = read_csv(tmp_path / "imagenet.csv")
    check(imagenet[("resnet18", "top1")], [45.5], 30.4, "ok")
    check(imagenet[("resnet18", "top5")], [20.25], 10.8, "ok")

    # Markdown: 2 decimals, std as a dash for n = 1.
    md = (tmp_path / "table1.md").read_text()
    at_mean, at_std = statistics.mean(AT_ERRORS), statistics.stdev(AT_ERRORS)
    assert f"| 3 | {at_mean:.2f} | {at_std:.2f} | 7.93 | " in md
    assert f"| 1 | {TEACHER_ERRORS[0]:.2f} | — | 6.31 | — |" in md


def test_paired_differences_in_the_tables(rendered):
    tmp_path, runs, context = rendered
    t1 = read_csv(tmp_path / "table1.csv")
    # AT (seeds 0, 1, 2) against the student (seeds 0, 1): only seeds 0 and 1 pair
    at = t1[(T1ROW, "at")]
    diffs = [AT_ERRORS[0] - STUDENT_ERRORS[0], AT_ERRORS[1] - STUDENT_ERRORS[1]]  # -8.75, -8.0
    assert (at["baseline_row"], at["baseline_column"]) == (T1ROW, "student")
    assert at["paired_n"] == "2" and at["paired_seeds"] == "0;1"
    assert [float(d) for d in at["paired_diffs"].split(";")] == pytest.approx(diffs)
    mean = (diffs[0] + diffs[1]) / 2
    half = math.tan(math.pi * 0.475) * statistics.stdev(diffs) / math.sqrt(2)  # t_{0.975,1} = tan(0.475 pi)
    assert float(at["paired_mean"]) == pytest.approx(mean, abs=1e-4)
    assert float(at["ci_low"]) == pytest.approx(mean - half, abs=1e-4)
    assert float(at["ci_high"]) == pytest.approx(mean + half, abs=1e-4)
    assert float(at["reference_diff"]) == pytest.approx(7.93 - 8.77)
    assert at["sign_agrees"] == "yes"
    # KD: seed 0 missing, seed 2 has no student: one pair, no interval
    kd = t1[(T1ROW, "kd")]
    assert (kd["paired_n"], kd["paired_seeds"], kd["ci_low"], kd["ci_high"]) == ("1", "1", "", "")
    assert float(kd["paired_mean"]) == pytest.approx(64.0 - 66.5)
    # the baselines themselves, and a teacher (a baseline of another model), have none
    for key in ((T1ROW, "student"), (T1ROW, "teacher")):
        assert t1[key]["paired_n"] == t1[key]["baseline_row"] == ""
    # Table 2's baseline is its `none` row; Table 3's AT has no baseline run: no pairing
    sum_p1 = read_csv(tmp_path / "table2.csv")[("sum-p1", "error")]
    assert sum_p1["baseline_row"] == "none"
    assert [float(d) for d in sum_p1["paired_diffs"].split(";")] == pytest.approx(
        [SUMP1_ERRORS[0] - STUDENT_ERRORS[0], SUMP1_ERRORS[1] - STUDENT_ERRORS[1]])
    assert read_csv(tmp_path / "table3.csv")[("at", "error")]["paired_n"] == ""
    # ImageNet's top-5 cell pairs with the top-5 baseline, never the top-1 one: no AT run here
    assert read_csv(tmp_path / "imagenet.csv")[("resnet18", "top5")]["paired_n"] == ""
    md = (tmp_path / "table1.md").read_text()
    lo, hi = mean - half, mean + half
    assert (f"| {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {7.93 - 8.77:+.2f} | yes | 0: {diffs[0]:+.2f}, "
            f"1: {diffs[1]:+.2f} |" in md)
    assert f"| {64.0 - 66.5:+.2f} | — | {7.41 - 8.77:+.2f} | yes | 1: {64.0 - 66.5:+.2f} |" in md


def test_baseline_rule_on_the_real_grid(tmp_path):
    """Every non-baseline cell of params.yaml's paper grid gets the baseline the docs name."""
    params = real_params()
    params["data"]["imagenet"]["folder"] = str(tmp_path / "imagenet")  # so that its table runs
    runs = [{**r.to_dict(), "out_dir": str(tmp_path / r.out_dir), "epochs": 1}  # no metrics.json: missing
            for r in grid_mod.runs(params, "paper")]
    context = make_context(params, profile="paper", not_run=grid_mod.not_run(params, "paper"))
    summaries, _ = summaries_of(runs, context)
    found = {(c.table, c.row, c.column): (c.baseline.row, c.baseline.column)
             for table in summaries.values() for c in table if c.baseline is not None}
    expected = {}
    for row in params["tables"]["table1"]["rows"]:
        for column in ("at", "factt", "kd", "at+kd"):
            expected[("table1", row, column)] = (row, "student")
    for row in ("sum-p1", "sum-p2", "sum-p4", "max-p1"):
        expected[("table2", row, "error")] = ("none", "error")
    for row in ("min-l2", "grad-at", "kd", "symmetry", "at"):
        expected[("table3", row, "error")] = ("baseline", "error")
    for row in ("kd", "at"):
        for column in ("cub", "scenes"):
            expected[("table4", row, column)] = ("student", column)
    for column in ("top1", "top5"):  # each metric against the same metric
        expected[("imagenet", "resnet18_at", column)] = ("resnet18", column)
    assert found == expected


def test_csv_columns_and_every_cell(rendered):
    tmp_path, runs, context = rendered
    refs = references.load(REPO / "references.yaml")
    for name in TABLES:
        if name in context["not_run"]:
            continue
        with open(tmp_path / f"{name}.csv", newline="") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == tables.CSV_COLUMNS
            rows = list(reader)
        assert [(r["row"], r["column"]) for r in rows] == [
            (row, column) for row in refs[name].rows for column in refs[name].columns]


def test_shared_run_is_compared_with_each_cells_own_reference(grid, tmp_path):
    # Table 1's AT cell and Table 2's F_sum^2 cell are one run, and both references print 7.93:
    # give Table 2's another number, so that a report using the wrong cell's reference fails
    runs, context = grid
    data = yaml.safe_load((REPO / "references.yaml").read_text())
    data["tables"]["table2"]["values"]["sum-p2"]["error"] = 8.0
    report.render(runs, tmp_path / "out", dict(context, references=references.parse(data), full_scale=True))
    t1 = read_csv(tmp_path / "out" / "table1.csv")[(T1ROW, "at")]
    t2 = read_csv(tmp_path / "out" / "table2.csv")[("sum-p2", "error")]
    for key in ("n", "mean", "std"):
        assert t1[key] == t2[key]
    mean = statistics.mean(AT_ERRORS)
    assert (float(t1["reference"]), float(t2["reference"])) == (7.93, 8.0)
    assert float(t1["diff"]) == pytest.approx(mean - 7.93, abs=1e-4)
    assert float(t2["diff"]) == pytest.approx(mean - 8.0, abs=1e-4)
    assert float(t2["reference_diff"]) == pytest.approx(8.0 - 8.77)
    none = read_csv(tmp_path / "out" / "table2.csv")[("none", "error")]
    assert float(none["mean"]) == pytest.approx(statistics.mean(STUDENT_ERRORS), abs=1e-4)


def test_missing_is_never_a_number(rendered):
    tmp_path, runs, context = rendered
    factt = read_csv(tmp_path / "table1.csv")[(T1ROW, "factt")]
    assert factt["status"] == "missing"
    assert factt["n"] == "0"
    assert factt["mean"] == factt["std"] == factt["diff"] == factt["epoch"] == factt["paired_mean"] == ""
    md = (tmp_path / "table1.md").read_text()
    assert ("| WRN-16-1, 0.2M | WRN-16-2, 0.7M | F-ActT | 0 | missing | — | 8.51 | — | — | "
            f"{8.51 - 8.77:+.2f} | — | — | — | missing |") in md
    assert "`factt/seed0`" in md and "`kd/seed0`" in md
    readme = (tmp_path / "README.md").read_text()
    assert "run `factt/seed0`: missing" in readme
    assert "run `kd/seed0`: missing" in readme
    # the partial KD cell averages only the finished seeds: not (0 + 64 + 63) / 3
    kd = read_csv(tmp_path / "table1.csv")[(T1ROW, "kd")]
    assert float(kd["mean"]) == pytest.approx(63.5)


def test_not_run_table_and_unfilled_cells(rendered):
    tmp_path, runs, context = rendered
    # a table the profile does not run has no file and is named once, with its reason
    assert not list(tmp_path.glob("table4.*"))
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("Table 4: transfer from ImageNet-pretrained networks") == 1
    assert "- Table 4: transfer from ImageNet-pretrained networks: not run: CUB and Scenes are " \
           "not downloaded in the smoke profile\n" in readme
    # table3 cells no run fills are "not run", with the reason
    t3 = read_csv(tmp_path / "table3.csv")
    assert t3[("min-l2", "error")]["status"] == "not run"
    assert "no run of this profile's grid fills this cell" in (tmp_path / "table3.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "not run: CUB and Scenes are not downloaded" in readme
    assert "table3: no run of this profile's grid fills 5 of 6 cells: baseline" in readme
    assert "min-l2 (Drucker & LeCun 1992)" in readme
    assert "no cell of this table has a finished run paired with its baseline" in readme


def test_a_profile_that_chooses_rows_shows_just_those(grid, tmp_path):
    # the mini profile runs one pair of Table 1: the other three are its choice, named once,
    # never 18 "not run" rows in the table nor empty panels in its figures
    runs, _ = grid
    params = real_params()
    chosen = grid_tables(params, "mini")
    assert chosen["table1"]["rows"] == [T1ROW]
    assert chosen["table1"]["omitted"] == [r for r in params["tables"]["table1"]["rows"] if r != T1ROW]
    assert chosen["table2"]["omitted"] == [] and grid_tables(params, "smoke")["table1"]["omitted"] == []
    context = make_context(tables=chosen)
    tmp_path = tmp_path / "out"
    report.render(runs, tmp_path, context)
    t1 = read_csv(tmp_path / "table1.csv")
    assert {row for row, _ in t1} == {T1ROW} and len(t1) == 6
    others = "NIN-thin, 0.2M / NIN-wide, 1M; WRN-16-1, 0.2M / WRN-40-1, 0.6M; WRN-16-2, 0.7M / WRN-40-2, 2.2M"
    md = (tmp_path / "table1.md").read_text()
    data_lines = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(data_lines) == 6 and all(line.startswith("| WRN-16-1, 0.2M | WRN-16-2, 0.7M |") for line in data_lines)
    assert f"Rows this profile does not run (not shown): {others}." in md
    readme = (tmp_path / "README.md").read_text()
    assert f"this profile runs 1 of its rows; not shown: {others}" in readme
    # the fake grid has no AT+KD run: of the 6 cells shown, not of 24
    assert "table1: no run of this profile's grid fills 1 of 6 cells: WRN-16-1, 0.2M / WRN-16-2, 0.7M: AT+KD\n" in readme
    # one panel per chosen row, and no reference bar of a row not shown
    summaries, checked = summaries_of(runs, context)
    layout = checked.tables["table1"]
    assert layout.omitted_rows and list(layout.rows) == [T1ROW]
    assert {r for r, _ in layout.reference} == {T1ROW}
    series, _ = figures.curve_series(summaries["table1"])
    curves = figures.curves_figure(series, layout, summaries["table1"], FOOTER)
    assert [ax.get_title() for ax in curves.get_axes() if ax.get_visible()] == ["WRN-16-1, 0.2M / WRN-16-2, 0.7M"]
    for full_scale in (True, False):
        assert len(figures.bars_figure(summaries["table1"], layout, FOOTER, full_scale).get_axes()) == 1


def test_epoch_is_stated(rendered):
    tmp_path, runs, context = rendered
    assert "Reported epoch: the last one, epoch 2" in (tmp_path / "table1.md").read_text()
    t3 = (tmp_path / "table3.md").read_text()
    assert "Reported epoch: the last one, epoch 1 (planned: 2)" in t3
    assert "`nin-at/seed0` (1 of 2)" in t3
    assert read_csv(tmp_path / "table3.csv")[("at", "error")]["epoch"] == "1"


def test_differing_final_epochs_are_said(tmp_path):
    runs = [
        write_run(tmp_path / "r", "a/seed0", 0, [cell("table2", "none", "error")], 10.0,
                  final_epoch=2, epochs=2),
        write_run(tmp_path / "r", "a/seed1", 1, [cell("table2", "none", "error")], 12.0,
                  final_epoch=1, epochs=2),
    ]
    report.render(runs, tmp_path / "out", make_context())
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "Runs of this table differ in final epoch (1, 2)" in md
    assert read_csv(tmp_path / "out" / "table2.csv")[("none", "error")]["epoch"] == "1;2"


def test_table1_not_run_skips_its_figures(tmp_path):
    runs = [write_run(tmp_path / "r", "a/seed0", 0, [cell("table2", "none", "error")], 10.0)]
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{figures.FIG_BARS}.png").write_bytes(b"from an earlier render")
    (out / f"{figures.FIG_PAIRED.format(table='table2')}.pdf").write_bytes(b"from an earlier render")
    # an earlier render's files, named by its mark: the report may replace them
    (out / driver.MARKER).write_text(driver._marker_text([out / f"{figures.FIG_BARS}.png",
                                                         out / f"{figures.FIG_PAIRED.format(table='table2')}.pdf"]))
    written = report.render(runs, out, make_context(
        not_run={"table1": "no teachers in this profile", "table4": "no"}))
    # the one figure left: Table 2's curves (its one run has no baseline to pair with)
    curves2 = figures.FIG_CURVES.format(table="table2")
    assert sorted(p.name for p in written if p.suffix in (".png", ".pdf")) == [f"{curves2}.pdf", f"{curves2}.png"]
    assert sorted(p.name for p in out.glob("fig_*")) == [f"{curves2}.pdf", f"{curves2}.png"]
    readme = (out / "README.md").read_text()
    # said once, in "Missing and not run"; not again per figure
    assert readme.count("no teachers in this profile") == 1
    assert "- Table 1: activation-based attention transfer against other transfer methods: not run: " \
           "no teachers in this profile\n" in readme


def _drawn(fig):
    """The figure drawn as savefig draws it (constrained layout done); its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def all_figures(summaries, checked, footer=FOOTER):
    """Every chart the report draws from the fake grid (the attention maps have their own tests)."""
    out = {}
    for name in ("table1", "table2"):
        series, _ = figures.curve_series(summaries[name])
        out[f"curves {name}"] = figures.curves_figure(series, checked.tables[name], summaries[name], footer)
        out[f"paired {name}"] = figures.paired_figure(checked.tables[name], summaries[name], footer)
    for full_scale in (True, False):
        out[f"bars full_scale={full_scale}"] = figures.bars_figure(
            summaries["table1"], checked.tables["table1"], footer, full_scale)
    return out


def test_provenance_once_in_the_readme_and_a_one_line_footer_per_figure(rendered):
    tmp_path, runs, context = rendered
    readme = (tmp_path / "README.md").read_text()
    assert readme.count(DESC) == 1 and DESC in readme.splitlines()[2]
    for path in sorted(tmp_path.glob("*.*")):
        if path.suffix in (".md", ".tex", ".csv") and path.name != "README.md":
            text = path.read_text()
            assert DESC not in text and tables.tex_escape(DESC) not in text, path.name
    # a table file points at the README, in one line, instead
    md = (tmp_path / "table1.md").read_text()
    assert md.count("[README.md](README.md)") == 1
    assert "[README.md]" not in readme
    tex = (tmp_path / "table1.tex").read_text()
    assert r"\caption{" in tex and r"\end{table}" in tex
    summaries, checked = summaries_of(runs, context)
    for what, fig in all_figures(summaries, checked).items():
        renderer = _drawn(fig)
        footer = fig._supxlabel
        assert footer.get_text() == FOOTER, what
        assert DESC not in fig._suptitle.get_text(), what
        box = footer.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0, what
        assert box.height / fig.bbox.height < 0.08, (what, box.height / fig.bbox.height)
        # below every axes: a footer, not a caption over the data
        assert all(box.y1 <= ax.get_tightbbox(renderer).y0 + 1 for ax in fig.get_axes() if ax.get_visible()), what
    # a footer too long for the figure is shortened to one line, never wrapped into a block
    fig = figures.new_figure(6, 3)
    figures.set_footer(fig, FOOTER * 10)
    assert "\n" not in fig._supxlabel.get_text() and fig._supxlabel.get_text().endswith("…")


def _title_inside(fig) -> bool:
    renderer = _drawn(fig)   # runs the constrained layout, as savefig does
    title = fig._suptitle.get_window_extent(renderer)
    frame = fig.bbox
    return (frame.x0 <= title.x0 and title.x1 <= frame.x1
            and frame.y0 <= title.y0 and title.y1 <= frame.y1)


def test_titles_are_not_cut_off(grid):
    runs, context = grid
    long = DESC + ", and a description long enough to run past any figure's right edge" * 2
    # a table title as long as that (a user's table) is wrapped inside every figure
    data = yaml.safe_load((REPO / "references.yaml").read_text())
    for name in ("table1", "table2"):
        data["tables"][name]["title"] = long
    for refs in (None, references.parse(data)):
        summaries, checked = summaries_of(runs, make_context(refs=refs))
        for what, fig in all_figures(summaries, checked).items():
            assert _title_inside(fig), what
    # the check can fail: an unwrapped long title is cut
    fig = figures.new_figure(6, 3)
    fig.suptitle(long, fontsize=11)
    assert not _title_inside(fig)


def test_paired_figure_draws_what_the_table_says(grid):
    runs, context = grid
    summaries, checked = summaries_of(runs, context)
    fig = figures.paired_figure(checked.tables["table1"], summaries["table1"], FOOTER)
    ax = fig.get_axes()[0]
    shown = figures.paired_rows(summaries["table1"])
    assert [c.column for c in shown] == ["at", "kd"]   # F-ActT: missing; AT+KD: no run
    ours = next(line for line in ax.get_lines() if line.get_marker() == "o")
    ref = next(line for line in ax.get_lines() if line.get_marker() == "D")
    mean_at = ((AT_ERRORS[0] - STUDENT_ERRORS[0]) + (AT_ERRORS[1] - STUDENT_ERRORS[1])) / 2
    assert list(ours.get_xdata()) == pytest.approx([mean_at, 64.0 - 66.5])
    assert list(ref.get_xdata()) == pytest.approx([7.93 - 8.77, 7.41 - 8.77])
    assert list(ours.get_ydata()) == [1.0, 0.0]          # first cell on top
    labels = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    assert labels == {1.0: "WRN-16-1, 0.2M / WRN-16-2, 0.7M: AT (n=2)",
                      0.0: "WRN-16-1, 0.2M / WRN-16-2, 0.7M: KD (n=1)"}


def test_curves_average_seeds(grid):
    runs, context = grid
    summaries, _ = summaries_of(runs, context)
    series, notes = figures.curve_series(summaries["table1"])
    epochs, mean, n = series[(T1ROW, "at")]
    assert epochs == [1, 2] and n == 3
    assert mean == pytest.approx([statistics.mean(AT_ERRORS) + 5.0, statistics.mean(AT_ERRORS)])
    assert (T1ROW, "factt") not in series  # missing runs draw no curve
    assert notes == []
    # history.csv holds the top-1 error: the top-5 cell of ImageNet has no curve, its top-1 has
    imagenet, _ = figures.curve_series(summaries["imagenet"])
    assert list(imagenet) == [("resnet18", "top1")]


def test_table2_has_curves_one_line_per_mapping(grid):
    runs, context = grid
    summaries, checked = summaries_of(runs, context)
    series, _ = figures.curve_series(summaries["table2"])
    fig = figures.curves_figure(series, checked.tables["table2"], summaries["table2"], FOOTER)
    [ax] = [ax for ax in fig.get_axes() if ax.get_visible()]   # its cells share one baseline: one panel
    lines = {line.get_label(): line for line in ax.get_lines()}
    # the fake grid fills "none" (2 seeds), sum-p1 (2 seeds) and sum-p2 (3 seeds)
    assert list(lines) == ["no attention transfer (n=2)", r"$F_{\mathrm{sum}}$ (n=2)",
                           r"$F_{\mathrm{sum}}^{2}$ (n=3)"]
    assert list(lines[r"$F_{\mathrm{sum}}$ (n=2)"].get_ydata()) == pytest.approx(
        [statistics.mean(SUMP1_ERRORS) + 5.0, statistics.mean(SUMP1_ERRORS)])
    assert "Table 2" in fig._suptitle.get_text()


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _legends_cover(fig) -> list[str]:
    """What the figure's legends cover, drawn: another axes' data area (its frame), or the
    figure's edge. Empty when every legend lies beside the data, inside the figure."""
    renderer = _drawn(fig)
    found = []
    axes = [ax for ax in fig.get_axes() if ax.get_visible()]
    for owner in axes:
        legend = owner.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for ax in axes:
            if _overlap(box, ax.bbox):   # ax.bbox: the axes' data area, where lines and bars are
                found.append(f"legend of {owner.get_title()!r} covers the data area of {ax.get_title()!r}")
        frame = fig.bbox
        if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
            found.append(f"legend of {owner.get_title()!r} runs past the figure's edge")
    return found


def test_legends_cover_no_data(grid):
    runs, context = grid
    summaries, checked = summaries_of(runs, context)
    for what, fig in all_figures(summaries, checked).items():
        assert any(ax.get_legend() for ax in fig.get_axes()), what
        assert _legends_cover(fig) == [], what
    # the check can fail: matplotlib's own placement inside the axes covers its data area
    series, _ = figures.curve_series(summaries["table2"])
    fig = figures.curves_figure(series, checked.tables["table2"], summaries["table2"], FOOTER)
    fig.get_axes()[0].legend(loc="best")
    assert _legends_cover(fig)


def test_scale_decides_between_diff_and_paired_delta(grid, tmp_path):
    """Off the reference's scale (smoke: 2 epochs, a subset) no diff to its absolute error is
    printed and the bars compare our paired Δ with the reference's Δ; on it (full_scale) both."""
    runs, context = grid
    mean_at = ((AT_ERRORS[0] - STUDENT_ERRORS[0]) + (AT_ERRORS[1] - STUDENT_ERRORS[1])) / 2
    for full_scale in (False, True):
        out = tmp_path / f"full_scale={full_scale}"
        report.render(runs, out, dict(context, full_scale=full_scale))
        md = (out / "table1.md").read_text()
        header = next(line for line in md.splitlines() if line.startswith("| student |"))
        columns = [h.strip() for h in header.strip("|").split("|")]
        at = read_csv(out / "table1.csv")[(T1ROW, "at")]
        assert ("diff" in columns) is full_scale
        assert {"reference", "Δ base", "95% CI", "reference Δ", "sign"} <= set(columns)
        assert float(at["paired_mean"]) == pytest.approx(mean_at, abs=1e-4)
        assert float(at["reference_diff"]) == pytest.approx(7.93 - 8.77)
        if full_scale:
            assert float(at["diff"]) == pytest.approx(statistics.mean(AT_ERRORS) - 7.93, abs=1e-4)
        else:
            assert at["diff"] == ""
            assert "no diff to the reference's error" in md
        readme = (out / "README.md").read_text()
        assert ("our absolute errors are not compared with theirs" in readme) is not full_scale
    summaries, checked = summaries_of(runs, context)
    layout = checked.tables["table1"]

    def bars(fig):
        [ax] = [ax for ax in fig.get_axes() if ax.get_title() == layout.rows[T1ROW]["label"]]
        blue, grey = (sorted((p.get_x() + p.get_width() / 2, p.get_height()) for p in container)
                      for container in ax.containers if hasattr(container, "patches"))
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        return [h for _, h in blue], [h for _, h in grey], ticks

    ours, theirs, ticks = bars(figures.bars_figure(summaries["table1"], layout, FOOTER, False))
    # Δ mode: the columns measured against a baseline (AT+KD: no run, so no baseline and no
    # column); bars = our paired Δs and the reference's Δs
    assert ticks == ["AT\n(n=2)", "F-ActT\n(missing)", "KD\n(n=1)"]
    assert ours == pytest.approx([mean_at, 64.0 - 66.5])
    assert theirs == pytest.approx([7.93 - 8.77, 8.51 - 8.77, 7.41 - 8.77])
    fig = figures.bars_figure(summaries["table1"], layout, FOOTER, False)
    assert "baseline" in fig.get_axes()[0].get_ylabel()
    # a pair with no run has its panel, the same columns, each saying why it has no bar
    assert [t.get_text() for t in fig.get_axes()[0].get_xticklabels()] == [
        "AT\n(not run)", "F-ActT\n(not run)", "KD\n(not run)"]
    # full scale: every column, our mean beside the reference's error
    ours, theirs, ticks = bars(figures.bars_figure(summaries["table1"], layout, FOOTER, True))
    assert ticks[0] == "Student\n(n=2)" and len(ticks) == 6
    assert ours == pytest.approx([statistics.mean(STUDENT_ERRORS), statistics.mean(AT_ERRORS), 63.5,
                                  TEACHER_ERRORS[0]])
    assert theirs == pytest.approx([8.77, 7.93, 8.51, 7.41, 7.51, 6.31])


def test_only_run_tables_get_files_and_a_rerender_leaves_no_stale_file(grid, tmp_path):
    runs, context = grid
    out = tmp_path / "out"
    report.render(runs, out, context)
    assert (out / "table3.md").is_file() and (out / f"{figures.FIG_CURVES.format(table='table3')}.png").is_file()
    (out / "notes.txt").write_text("a file of no render")
    # a file the report did not write: the folder is not the report's to replace, so the render is
    # refused and the folder left as it was (tests/test_report_out.py has the CLI's cases)
    with pytest.raises(report.ReportInputError, match=r"holds what the report did not write \(notes.txt\)"):
        report.render(runs, out, context)
    assert (out / "notes.txt").read_text() == "a file of no render" and (out / "table3.md").is_file()
    (out / "notes.txt").unlink()
    # a tool's hidden marker (Snakemake's, in a directory output) is not the report's: it stays
    (out / ".snakemake_timestamp").write_bytes(b"")
    os.utime(out / ".snakemake_timestamp", (1_000_000_000, 1_000_000_000))
    for left in (".out.render", ".out.old"):   # what a render killed between its steps leaves
        (tmp_path / left).mkdir()
        (tmp_path / left / "table9.md").write_text("half a render")
    # the profile stops running table3 (and imagenet): their files go, named once in the README
    kept = [r for r in runs if not any(c["table"] in ("table3", "imagenet") for c in r["cells"])]
    not_run = dict(context["not_run"], table3="dropped from this profile", imagenet="no ImageNet folder")
    written = report.render(kept, out, dict(context, not_run=not_run))
    names = sorted(p.name for p in out.iterdir() if p.name not in (".snakemake_timestamp", driver.MARKER))
    assert names == sorted(p.name for p in written)
    assert json.loads((out / driver.MARKER).read_text())["files"] == names
    assert (out / ".snakemake_timestamp").stat().st_mtime == 1_000_000_000
    assert not [n for n in names if n.startswith(("table3.", "imagenet.", "table4.", "fig_curves_table3",
                                                  "fig_curves_imagenet"))]
    readme = (out / "README.md").read_text()
    assert readme.count("Table 3: gradient-based attention transfer") == 1
    assert "- Table 3: gradient-based attention transfer: not run: dropped from this profile\n" in readme
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]   # nothing left beside it
    # a folder that holds folders is not the report's: refused, never emptied
    with pytest.raises(report.ReportInputError, match=r"holds what the report did not write \(out, runs\)"):
        report.render(kept, tmp_path, context)
    assert (out / "README.md").is_file()


def test_the_baseline_note_reads_as_a_sentence(rendered):
    tmp_path, runs, context = rendered
    t1 = (tmp_path / "table1.md").read_text()
    # F-ActT's run is missing but the cell still has its baseline; AT+KD has no run at all
    assert "- Baseline of AT, F-ActT and KD: Student, in the same row.\n" in t1
    assert "- Baseline of F_sum and F_sum²: no attention transfer.\n" in (tmp_path / "table2.md").read_text()
    assert "Baseline WRN" not in t1 and ": of " not in t1


def test_the_baseline_note_on_the_real_grid(tmp_path):
    params = real_params()
    params["data"]["imagenet"]["folder"] = str(tmp_path / "imagenet")
    runs = [{**r.to_dict(), "out_dir": str(tmp_path / r.out_dir), "epochs": 1} for r in grid_mod.runs(params, "paper")]
    context = make_context(params, profile="paper", not_run=grid_mod.not_run(params, "paper"))
    summaries, checked = summaries_of(runs, context)
    notes = {name: tables._baseline_sentences(checked.tables[name], summaries[name]) for name in summaries}
    # one sentence per baseline role, not one per row of Table 1
    assert notes["table1"] == ["Baseline of AT, F-ActT, KD and AT+KD: Student, in the same row."]
    assert notes["table2"] == ["Baseline of F_sum, F_sum^2, F_sum^4 and F_max^1: no attention transfer."]
    assert notes["table4"] == ["Baseline of KD (ResNet-18) and AT (ResNet-18): student (ResNet-18), in the same column."]
    assert notes["imagenet"] == ["Baseline of ResNet-18 + AT from ResNet-34: ResNet-18, in the same column."]


def test_tex_escaping():
    assert tables.tex_escape("F_sum^2 & 5% #1 ImageNet->CUB ± — Δ") == (
        r"F\_sum\^{}2 \& 5\% \#1 ImageNet$\to$CUB $\pm$ --- $\Delta$")


def test_bad_inputs_are_refused(grid, tmp_path):
    runs, context = grid
    out = tmp_path / "out"
    bad = dict(runs[0], cells=[cell("table1", T1ROW, "fitnet")])
    with pytest.raises(ValueError, match="fitnet"):
        report.render([bad], out, context)
    with pytest.raises(ValueError, match="same seed"):
        report.render([runs[0], dict(runs[1], seed=0)], out, context)
    with pytest.raises(ValueError, match="description"):
        report.render(runs, out, {k: v for k, v in context.items() if k != "description"})
    with pytest.raises(ValueError, match="not_run"):
        report.render(runs, out, dict(context, not_run={"table1": "no"}))
    with pytest.raises(ValueError, match="table9"):
        report.render(runs, out, dict(context, not_run={"table9": "no"}))
    with pytest.raises(ValueError, match="twice"):
        report.render([runs[0], runs[0]], out, context)
    with pytest.raises(ValueError, match="references"):
        report.render(runs, out, dict(context, references={"table1": {}}))
    broken = write_run(tmp_path / "r", "x/seed0", 0, [cell("table2", "sum-p4", "error")], 1.0)
    (Path(broken["out_dir"]) / "metrics.json").write_text('{"final_test_error": 1.0}')
    with pytest.raises(ValueError, match="metrics.json lacks key 'data_md5'"):
        report.render([broken], out, context)
    assert not out.exists()  # refused before anything was written


def test_a_table_without_references_renders_with_dashes(tmp_path):
    """A user table of params.yaml (tests/test_grid.py) renders: "—" as reference and diff,
    no sign check, no reference marker; its paired statistics are computed as for any table."""
    from test_grid import USER_TABLE_RUNS, with_user_table

    params = with_user_table(real_params())
    errors = {USER_TABLE_RUNS[("alone", "error")]: 9.5, USER_TABLE_RUNS[("at", "error")]: 8.75,
              USER_TABLE_RUNS[("max-p2", "error")]: 9.0}
    runs = []
    for run in grid_mod.runs(params, "paper"):
        if run.id in errors:
            epochs = grid_mod.protocol_of(params, run).epochs
            written = write_run(tmp_path / "runs", run.id, run.seed, [c.to_dict() for c in run.cells], errors[run.id],
                                final_epoch=epochs, epochs=epochs, history=False,
                                metrics_changes={"profile": "paper"})
            runs.append({**run.to_dict(), "out_dir": written["out_dir"], "epochs": epochs})
    assert len(runs) == 3
    context = make_context(params, profile="paper", not_run=grid_mod.not_run(params, "paper"),
                           full_scale=True)
    written = report.render(runs, tmp_path / "out", context)
    mine = read_csv(tmp_path / "out" / "mine.csv")
    assert list(mine) == [("alone", "error"), ("at", "error"), ("max-p2", "error")]
    for key, row in mine.items():
        assert row["reference"] == row["diff"] == row["reference_diff"] == row["sign_agrees"] == ""
        assert float(row["mean"]) == errors[USER_TABLE_RUNS[key]]
    assert float(mine[("at", "error")]["paired_mean"]) == pytest.approx(8.75 - 9.5)
    assert float(mine[("max-p2", "error")]["paired_mean"]) == pytest.approx(9.0 - 9.5)
    md = (tmp_path / "out" / "mine.md").read_text()
    assert "| at | 1 | 8.75 | — | — | — | -0.75 | — | — | — | 0: -0.75 | 200 | ok |" in md
    assert "Reference: none published for this table" in md
    assert "[mine.md](mine.md)" in (tmp_path / "out" / "README.md").read_text()
    # the WRN-16-1 baseline also fills Table 1 and 2 cells: there, its reference is shown
    assert read_csv(tmp_path / "out" / "table2.csv")[("none", "error")]["reference"] == "8.77"
    assert tmp_path / "out" / "fig_paired_mine.png" in written
    summaries, checked = summaries_of(runs, context)
    ax = figures.paired_figure(checked.tables["mine"], summaries["mine"], FOOTER).get_axes()[0]
    assert [line.get_marker() for line in ax.get_lines() if line.get_marker() in ("o", "D")] == ["o"]


def test_the_smoke_profile_says_first_what_its_numbers_are(grid, tmp_path):
    runs, context = grid
    purpose = real_params()["profiles"]["smoke"]["purpose"]
    # what params.yaml says of smoke runs: no information, and where the informative numbers are
    assert "exercise the pipeline" in purpose and "no information" in purpose
    assert "results/mini/" in purpose
    report.render(runs, tmp_path / "out", dict(context, purpose=purpose))
    out = tmp_path / "out"
    assert (out / "README.md").read_text().splitlines()[0] == f"**{purpose}**"
    for name in (t for t in TABLES if t not in context["not_run"]):
        assert (out / f"{name}.md").read_text().splitlines()[0] == f"**{purpose}**"
        tex = (out / f"{name}.tex").read_text()
        assert r"\caption{" + tables.tex_escape(purpose) + " " in tex
    # the README's copy of each table does not repeat it
    assert (out / "README.md").read_text().count(purpose) == 1
    # without a purpose (the paper profile) the files start with their titles
    report.render(runs, tmp_path / "plain", context)
    assert (tmp_path / "plain" / "README.md").read_text().splitlines()[0] == "# Results"
    assert (tmp_path / "plain" / "table1.md").read_text().startswith("# Table 1:")
    with pytest.raises(report.ReportInputError, match="purpose"):
        report.render(runs, tmp_path / "bad", dict(context, purpose="two\nlines"))


# ----------------------------------------------------------------------------------------------
# The report trusts no metrics.json


@pytest.mark.parametrize("changes, problem", [
    ({"run_id": "cifar10/wrn-16-2/baseline/seed0"},
     "run_id is 'cifar10/wrn-16-2/baseline/seed0', not 'x/seed0': the file belongs to another run"),
    ({"profile": "paper"}, "profile is 'paper', not 'smoke': the run was trained for another profile"),
    ({"data_md5": "c58f30108f718f92721af3b95e74349a"},
     "data_md5 is 'c58f30108f718f92721af3b95e74349a', but the cifar10 data folder holds "
     f"'{CIFAR_MD5}': the run was trained on other data"),
    ({"final_test_error": float("nan")}, "final_test_error must be a test error in [0, 100] (%), got nan"),
    ({"final_test_error": float("inf")}, "final_test_error must be a test error in [0, 100] (%), got inf"),
    ({"final_test_error": -0.5}, "final_test_error must be a test error in [0, 100] (%), got -0.5"),
    ({"final_test_error": 100.5}, "final_test_error must be a test error in [0, 100] (%), got 100.5"),
    ({"final_test_error": "7.5"}, "final_test_error must be a test error in [0, 100] (%), got '7.5'"),
    ({"epochs": 3, "final_epoch": 3}, "epochs is 3, but the run's protocol plans 2"),
    ({"final_epoch": 3}, "final_epoch 3 is not between 1 and epochs (2)"),
    ({"final_epoch": 0}, "final_epoch 0 is not between 1 and epochs (2)"),
    ({"final_epoch": 2.0}, "final_epoch must be an int, got 2.0"),
])
def test_impossible_or_foreign_metrics_are_refused(grid, tmp_path, changes, problem):
    runs, context = grid
    bad = write_run(tmp_path / "r", "x/seed0", 0, [cell("table2", "sum-p4", "error")], 7.5,
                    method="at-sum-p4", metrics_changes=changes)
    path = Path(bad["out_dir"]) / "metrics.json"
    out = tmp_path / "out"
    with pytest.raises(report.ReportInputError) as info:
        report.render(runs + [bad], out, context)
    assert str(info.value) == f"run 'x/seed0': {path}: {problem}"
    assert not out.exists()  # refused before anything was written


def test_a_metrics_json_copied_from_another_run_is_refused(grid, tmp_path):
    runs, context = grid
    source = Path(runs[0]["out_dir"]) / "metrics.json"   # at-sum-p2/seed0, a real finished run
    target = Path(next(r for r in runs if r["id"] == "factt/seed0")["out_dir"]) / "metrics.json"
    target.write_bytes(source.read_bytes())
    with pytest.raises(report.ReportInputError, match=r"run 'factt/seed0': .*factt/seed0/metrics.json: "
                       r"run_id is 'at-sum-p2/seed0', not 'factt/seed0'"):
        report.render(runs, tmp_path / "out", context)


def test_data_that_cannot_be_checked_is_refused(grid, tmp_path):
    runs, context = grid
    with pytest.raises(report.ReportInputError, match="the cifar10 data folder has no source.json"):
        report.render(runs, tmp_path / "out", dict(context, data_md5={"cifar10": None, "imagenet": "user-folder"}))
    with pytest.raises(report.ReportInputError, match="no data md5 given for data set 'imagenet'"):
        report.render(runs, tmp_path / "out", dict(context, data_md5={"cifar10": CIFAR_MD5}))


def test_expected_data_md5_follows_the_trainers_rule(tmp_path):
    from at.data.download import write_source_record

    assert inputs.expected_data_md5("cifar10", tmp_path / "absent") is None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_source_record(tmp_path / "a", {"md5": CIFAR_MD5, "url": "file:///x"})
    assert inputs.expected_data_md5("cifar10", tmp_path / "a") == CIFAR_MD5
    write_source_record(tmp_path / "b", {"url": "file:///x"})
    assert inputs.expected_data_md5("scenes", tmp_path / "b") == "unknown"
    assert inputs.expected_data_md5("imagenet", tmp_path / "absent") == "user-folder"


def test_cli_report_checks_every_file_against_the_grid(tmp_path, monkeypatch):
    """`python -m at report` in a folder with params.yaml, references.yaml, a data record and
    the ci profile's run folders (each with the checkpoint that names its metrics.json's sha256,
    as a finished run's): renders; then one copied metrics.json makes it refuse."""
    import shutil

    from at import checkpoint
    from at.data.download import write_source_record

    shutil.copy2(REPO / "references.yaml", tmp_path / "references.yaml")
    # the purpose line comes from params.yaml, whatever the profile is called
    purpose = "CI runs only prove that the pipeline runs: their numbers mean nothing."
    params = real_params()
    params["profiles"]["ci"]["purpose"] = purpose
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    write_source_record(tmp_path / "data" / "cifar10", {"md5": CIFAR_MD5, "url": "file:///mini"})
    runs = grid_mod.runs(params, "ci")
    for i, run in enumerate(runs):
        epochs = grid_mod.protocol_of(params, run).epochs
        (tmp_path / run.out_dir).mkdir(parents=True)
        metrics = {"run_id": run.id, "profile": "ci", "data_md5": CIFAR_MD5, "epochs": epochs,
                   "final_epoch": epochs, "final_test_error": 80.0 - i, "final_test_error_top5": 40.0}
        text = json.dumps(metrics).encode()
        (tmp_path / run.out_dir / "metrics.json").write_bytes(text)
        checkpoint.save({"spec": grid_mod.run_spec(params, run).to_dict(),
                         checkpoint.OUTPUT_DIGESTS: {"metrics.json": checkpoint.digest(text)}},
                        tmp_path / run.out_dir / "checkpoint.pt")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the store beside params.yaml, as for a user
    cli = ["report", "--profile", "ci"]
    done = run_cli(cli, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    t2 = read_csv(tmp_path / "results" / "ci" / "table2.csv")
    assert [r["status"] for r in t2.values()] == ["ok"] * 5
    assert t2[("sum-p1", "error")]["baseline_row"] == "none"
    assert (tmp_path / "results" / "ci" / "README.md").read_text().splitlines()[0] == f"**{purpose}**"
    assert (tmp_path / "results" / "ci" / "table2.md").read_text().splitlines()[0] == f"**{purpose}**"
    first, second = (tmp_path / runs[1].out_dir, tmp_path / runs[2].out_dir)
    (second / "metrics.json").write_bytes((first / "metrics.json").read_bytes())
    done = run_cli(cli, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"run_id is '{runs[1].id}', not '{runs[2].id}'" in done.stderr


# ----------------------------------------------------------------------------------------------
# Attention-map figure, with tiny models


class TinyNet(torch.nn.Module):
    """Two conv stages; taps at 8x8 and 4x4, like the group outputs of a WRN."""

    def __init__(self, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(2 * width, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        a1 = torch.relu(self.c1(x))
        a2 = torch.relu(self.c2(a1))
        return self.fc(a2.mean((2, 3))), [a1, a2]


def l2_attention(act):
    q = act.pow(2).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)


def tiny_images(n=3, size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, images.float() / 255.0 - 0.5


def test_attention_figure_with_tiny_models(tmp_path):
    teacher, student = TinyNet(6, 1).eval(), TinyNet(3, 2).eval()
    images, inputs = tiny_images()
    maps = attention_maps.compute_maps(teacher, student, inputs, attention_fn=l2_attention)
    fig = attention_maps.attention_figure(images.numpy(), maps, f"maps\n{DESC}")
    assert DESC in fig._suptitle.get_text()
    axes = fig.get_axes()
    assert len(axes) == 3 * (1 + 2 * 2)
    # the teacher's group-2 map of image 1 is what l2_attention gives, reshaped to 4x4
    shown = np.asarray(axes[1 * 5 + 3].get_images()[0].get_array())
    with torch.no_grad():
        expected = l2_attention(teacher(inputs)[1][1])[1].reshape(4, 4).numpy()
    np.testing.assert_allclose(shown, expected, rtol=1e-6)
    (tmp_path / "a").mkdir()
    paths = figures.save_figure(fig, tmp_path / "a", "att")
    assert sorted(p.name for p in paths) == ["att.pdf", "att.png"]
    assert (tmp_path / "a" / "att.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a" / "att.pdf").read_bytes()[:5] == b"%PDF-"
    fig2 = attention_maps.attention_figure(images.numpy(), maps, f"maps\n{DESC}")
    (tmp_path / "b").mkdir()
    figures.save_figure(fig2, tmp_path / "b", "att")
    for name in ("att.png", "att.pdf"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_attention_figure_refuses_unpaired_taps():
    class OneTap(TinyNet):
        def forward(self, x):
            logits, taps = super().forward(x)
            return logits, taps[:1]

    images, inputs = tiny_images()
    with pytest.raises(ValueError, match="taps"):
        attention_maps.compute_maps(TinyNet(4, 0), OneTap(4, 1), inputs, attention_fn=l2_attention)


def test_render_draws_attention_from_the_runs_record(grid, tmp_path):
    """The figure comes from the AT run's attention.json (at.records), never from checkpoints."""
    runs, context = grid
    at_seed0 = Path(runs[0]["out_dir"])
    images, inputs = tiny_images(n=4)
    maps = attention_maps.compute_maps(TinyNet(6, 1).eval(), TinyNet(3, 2).eval(), inputs,
                                       attention_fn=l2_attention)
    (at_seed0 / attention_maps.ATTENTION_FILE).write_text(json.dumps({
        "run": runs[0]["id"], "seed": 0, "student": "wrn-16-1", "teacher": "wrn-16-2",
        "mapping": "F_sum^2", "images": images.tolist(),
        "maps": [{"teacher": t.tolist(), "student": s.tolist()} for t, s in maps]}))
    written = report.render(runs, tmp_path / "out", context)
    names = {p.name for p in written}
    assert {f"{figures.FIG_ATTENTION}.png", f"{figures.FIG_ATTENTION}.pdf"} <= names
    assert f"({figures.FIG_ATTENTION}.png)" in (tmp_path / "out" / "README.md").read_text()
    # the maps are one run's: the title names its seed and run, never the profile's seed count
    summaries, checked = summaries_of(runs, context)
    fig, note = attention_maps.attention_from_runs(summaries, checked)
    title = fig._suptitle.get_text()
    assert "seed 0: run at-sum-p2/seed0 and its teacher" in title and "seeds" not in title
    assert r"$F_{\mathrm{sum}}^{2}$" in title
    assert fig._supxlabel.get_text() == FOOTER and DESC not in title
    assert note.startswith("Seed 0 only: from `at-sum-p2/seed0` and its teacher")
    assert _title_inside(fig)
    # the student's group-2 map of image 1 is the record's
    shown = np.asarray(fig.get_axes()[1 * 5 + 4].get_images()[0].get_array())
    np.testing.assert_allclose(shown, maps[1][1][1])
    # without the record's maps the figure is skipped, said in the README, and the old one removed
    (at_seed0 / attention_maps.ATTENTION_FILE).unlink()
    report.render(runs, tmp_path / "out", context)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Not drawn: no finished AT run of WRN-16-1 from WRN-16-2 has an attention.json" in readme
    assert not (tmp_path / "out" / f"{figures.FIG_ATTENTION}.png").exists()
def test_a_curves_panel_with_many_lines_keeps_its_legend_inside_and_its_lines_apart(tmp_path):
    """The sensitivity table draws 23 lines in one panel: the figure grows to hold its legend,
    and no two lines share both colour and line style."""
    context = make_context()
    layout = inputs.validate_context(context).tables["sensitivity"]
    runs = [write_run(tmp_path, f"{row}/seed0", 0, [cell("sensitivity", row, "error")], 30.0 + i,
                      method="baseline" if row == "none" else "kd")
            for i, row in enumerate(layout.rows)]
    assert len(runs) > 20
    summaries, checked = summaries_of(runs, dict(context, not_run={}))
    series, _ = figures.curve_series(summaries["sensitivity"])
    fig = figures.curves_figure(series, checked.tables["sensitivity"], summaries["sensitivity"], FOOTER)
    assert _legends_cover(fig) == []
    lines = fig.get_axes()[0].get_lines()
    assert len(lines) == len(runs)
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == len(lines)
