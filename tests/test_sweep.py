"""Sweeps (at.sweep): a row of a table sweeps one key of a term of its method over values.

params.yaml's `beta-sweep` table (run by the `sweep-smoke` profile) sweeps the weight of F_sum^2
attention transfer over [100, 1000]; 1000 is the method's own weight, so that value's row is the
plain at-sum-p2 row's run. Every bad-input test mutates a copy of params.yaml in one place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from at import dvc_pipeline, grid, references, report, tracking
from at.method import Progress, resolve_method
from at.objective import Objective
from at.report import cells, figures, inputs
from at.report.layout import grid_tables
from test_grid import _assert_names, _error

REPO = Path(__file__).resolve().parents[1]
PROFILE = "sweep-smoke"
PAIR = "cifar10/wrn-16-1_from_wrn-16-2"
AT_RUN = f"{PAIR}/at-sum-p2/seed0"
SWEPT_RUN = f"{PAIR}/at-sum-p2/beta=100/seed0"
STUDENT_RUN = "cifar10/wrn-16-1/baseline/seed0"
TEACHER_RUN = "cifar10/wrn-16-2/baseline/seed0"




def _row(params: dict) -> dict:
    return params["tables"]["beta-sweep"]["rows"]["sum-p2"]


# ------------------------------------------------------------------------------------------------
# Declaration: the schema's and the grid's errors


def test_the_real_sweep_is_valid(params):
    grid.validate(params)


@pytest.mark.parametrize("sweep, fragments", [
    ({"beta": [100], "at.p": [1, 2]}, ["tables.beta-sweep.rows.sum-p2.sweep", "one term key"]),
    ({"beta": []}, ["tables.beta-sweep.rows.sum-p2.sweep.beta", "non-empty list"]),
    ({"beta": [100, True]}, ["sweep.beta.1", "a number or a name", "True"]),
    ({"at.beta.x": [1]}, ["sweep", "term key"]),
])
def test_the_schema_refuses_a_malformed_sweep(params, sweep, fragments):
    _row(params)["sweep"] = sweep
    _assert_names(_error(params), *fragments)


def test_a_sweep_on_a_column_is_refused(params):
    params["tables"]["beta-sweep"]["columns"]["error"]["sweep"] = {"beta": [100]}
    _assert_names(_error(params), "tables.beta-sweep.columns.error", "unknown key(s) ['sweep']")


def test_a_key_no_term_declares_names_the_method_and_its_keys(params):
    _row(params)["sweep"] = {"gamma": [1, 2]}
    _assert_names(_error(params), "tables.beta-sweep.rows.sum-p2.sweep", "method 'at-sum-p2'", "'gamma'",
                  "ce.beta", "at.beta", "at.p", "at.mapping", "at.form", "at.layers")


def test_an_unknown_term_or_a_key_its_term_lacks_is_refused(params):
    _row(params)["sweep"] = {"kd.T": [2, 4]}
    _assert_names(_error(params), "method 'at-sum-p2' has no term named 'kd'", "its terms: ce, at")
    _row(params)["sweep"] = {"ce.p": [2, 4]}
    _assert_names(_error(params), "term 'ce' of method 'at-sum-p2' has no key 'p'", "at.p")


def test_a_key_several_terms_set_needs_the_term(params):
    # at+kd with kd's weight written out: `beta` could be kd's or at's
    params["methods"]["at+kd"]["terms"][0]["beta"] = 1.0
    _row(params)["method"] = "at+kd"
    _assert_names(_error(params), "tables.beta-sweep.rows.sum-p2.sweep", "key 'beta'", "kd, at",
                  "method 'at+kd'", "write term.key", "at.beta")
    _row(params)["sweep"] = {"at.beta": [100, 1000]}
    grid.validate(params)


def test_a_value_the_term_refuses_is_named(params):
    _row(params)["sweep"] = {"beta": [100, -1]}
    _assert_names(_error(params), "tables.beta-sweep.rows.sum-p2.sweep", "value -1 of beta",
                  "beta must be a finite number >= 0")
    _row(params)["sweep"] = {"mapping": ["sum", "mean"]}
    _assert_names(_error(params), "value 'mean' of mapping", "unknown mapping 'mean'")


def test_one_value_written_twice_is_refused(params):
    _row(params)["sweep"] = {"beta": [100, 100.0]}
    _assert_names(_error(params), "values 100 and 100.0 are the same value")


# ------------------------------------------------------------------------------------------------
# Expansion: rows, run ids, the method's own value shared, cohorts


def test_each_value_is_a_row_and_a_run_named_by_its_value(params):
    runs = {r.id: r for r in grid.runs(params, PROFILE)}
    assert sorted(runs) == sorted([AT_RUN, SWEPT_RUN, STUDENT_RUN, TEACHER_RUN])
    swept = runs[SWEPT_RUN]
    assert swept.method_name == "at-sum-p2/beta=100"
    assert swept.out_dir == f"runs/{PROFILE}/{SWEPT_RUN}"
    assert [c.to_dict() for c in swept.cells] == [{"table": "beta-sweep", "row": "sum-p2/beta=100", "column": "error", "metric": "top1"}]
    assert swept.teacher_run == TEACHER_RUN
    # beta = 1000 is at-sum-p2's own weight: its row is filled by the plain row's very run
    assert [c.row for c in runs[AT_RUN].cells] == ["sum-p2", "sum-p2/beta=1000"]
    assert grid.table_rows(params, "beta-sweep", ["none", "sum-p2"]) == [
        "none", "sum-p2", "sum-p2/beta=100", "sum-p2/beta=1000"]


def test_the_methods_own_value_shares_the_run_however_it_is_written(params):
    # the term key spelled with its term and the own value as a float: the same rows and runs
    _row(params)["sweep"] = {"at.beta": [300, 1000.0]}
    runs = {r.id: r for r in grid.runs(params, PROFILE)}
    assert f"{PAIR}/at-sum-p2/beta=300/seed0" in runs
    assert [c.row for c in runs[AT_RUN].cells] == ["sum-p2", "sum-p2/beta=1000"]
    assert len(runs) == 4
    # a default the method leaves out is its own value too: p of F_sum^2 is 2
    _row(params)["sweep"] = {"p": [2, 4]}
    ids = {r.id for r in grid.runs(params, PROFILE)}
    assert ids == {AT_RUN, f"{PAIR}/at-sum-p2/p=4/seed0", STUDENT_RUN, TEACHER_RUN}


def test_a_sweep_run_joins_its_stream_s_cohort(params):
    [cohort] = [c for c in grid.cohorts(params, PROFILE) if SWEPT_RUN in c.runs]
    assert cohort.id == "cifar10/wrn-16-1/seed0/cohort0"
    assert sorted(cohort.runs) == sorted([AT_RUN, SWEPT_RUN, STUDENT_RUN])


# ------------------------------------------------------------------------------------------------
# The swept value reaches every layer through the run spec


class _Net(nn.Module):
    """A tiny network of the (logits, [taps]) form that the objective reads."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        tap = torch.relu(self.conv(x))
        return self.fc(tap.mean((2, 3))), [tap]


def test_the_spec_carries_the_swept_value_into_the_loss(params):
    swept = grid.run_spec(params, SWEPT_RUN, PROFILE)
    plain = grid.run_spec(params, AT_RUN, PROFILE)
    assert swept.method_name == "at-sum-p2/beta=100"
    assert [t.beta for t in resolve_method(swept.method)] == [1.0, 100.0]
    # every other key as params.yaml has the method
    assert {**swept.method.to_dict()["terms"][1], "beta": 1000.0} == plain.method.to_dict()["terms"][1]
    student, teacher = _Net(0), _Net(1).eval().requires_grad_(False)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    progress = Progress(epoch=0, epochs=2)
    at_swept = Objective(swept.method, student, teacher, (3, 8, 8))(x, y, progress).terms["at"]
    at_plain = Objective(plain.method, student, teacher, (3, 8, 8))(x, y, progress).terms["at"]
    assert at_plain.item() > 0
    assert math.isclose(at_swept.item(), at_plain.item() / 10, rel_tol=1e-5)


def test_mlflow_params_hold_the_swept_value(params):
    spec = grid.run_spec(params, SWEPT_RUN, PROFILE)
    # what RunTracker.start logs: the flattened spec
    flat = tracking._flatten("", {k: v for k, v in spec.to_dict().items() if k != "id"}, {})
    assert flat["method_name"] == "at-sum-p2/beta=100"
    assert json.loads(flat["method.terms"])[1]["beta"] == 100.0
    assert tracking.run_name(spec) == f"seed0 at-sum-p2/beta=100 | {PAIR}"


def test_dvc_stage_of_a_sweep_run_depends_on_its_method_and_names_its_value(params):
    runs = {r.id: r for r in grid.runs(params, PROFILE)}
    assert "methods.at-sum-p2" in dvc_pipeline.train_params(params, runs[SWEPT_RUN])
    stages = dvc_pipeline.stages(params, PROFILE)
    [stage] = [s for s in stages.values() if grid.outputs(runs[SWEPT_RUN])["checkpoint"] in s.get("outs", [])]
    assert "methods.at-sum-p2" in stage["params"]
    # another value is another run: other outputs, so DVC trains it (and keeps the old one's)
    _row(params)["sweep"] = {"beta": [300, 1000]}
    outs = {o for s in dvc_pipeline.stages(params, PROFILE).values() for o in s.get("outs", []) if isinstance(o, str)}
    assert f"runs/{PROFILE}/{PAIR}/at-sum-p2/beta=300/seed0/checkpoint.pt" in outs
    assert grid.outputs(runs[SWEPT_RUN])["checkpoint"] not in outs


def test_snakemake_plans_the_sweep_s_cohorts(tmp_path):
    from pipeline_repo import _sh, _train_jobs, copy_repository, parse_dry_run

    repo = copy_repository(tmp_path / "repo")
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--config", f"profile={PROFILE}",
                "--dry-run", "--printshellcmds", "--forceall", "--nolock"], repo, timeout=300)
    train = _train_jobs(parse_dry_run(done.stdout))
    assert sorted(train) == ["cifar10/wrn-16-1/seed0/cohort0", "cifar10/wrn-16-2/seed0/cohort0"]
    outputs = train["cifar10/wrn-16-1/seed0/cohort0"]["output"]
    assert f"runs/{PROFILE}/{SWEPT_RUN}/metrics.json" in outputs
    assert f"runs/{PROFILE}/{AT_RUN}/metrics.json" in outputs


# ------------------------------------------------------------------------------------------------
# Report: the sweep's rows in the table, its figure with the reference's Δ at the method's value

CIFAR_MD5 = "1c190744c9595cc62078be24b4b038fb"
# test error (%) per seed of each run (hand-made)
ERRORS = {STUDENT_RUN: [70.0, 66.0], AT_RUN: [60.0, 58.0], SWEPT_RUN: [64.0, 63.0]}
# the reference of the beta-sweep table: Table 2's numbers for its two rows
REFERENCE = """
tables:
  beta-sweep:
    source: {paper: Zagoruyko & Komodakis, table: Table 2, arxiv: "1612.03928"}
    title: "beta sweep"
    caption: "CIFAR-10 test error of WRN-16-1 taught by WRN-16-2."
    dataset: CIFAR-10
    row_header: [mapping]
    column_header: error
    rows:
      none: {label: no attention transfer, mapping: no attention transfer}
      sum-p2: {label: F_sum^2, mapping: F_sum^2}
    columns: {error: Error}
    values:
      none: {error: 8.77}
      sum-p2: {error: 7.93}
"""


def _sweep_report_inputs(params, tmp_path):
    params["profiles"][PROFILE]["seeds"] = [0, 1]
    runs = []
    for run in grid.runs(params, PROFILE):
        if not run.cells:
            continue   # the teacher fills no cell of the table
        out = tmp_path / "runs" / run.id
        out.mkdir(parents=True)
        error = ERRORS[run.id.replace(f"seed{run.seed}", "seed0")][run.seed]
        (out / "metrics.json").write_text(json.dumps({
            "run_id": run.id, "profile": PROFILE, "final_test_error": error, "final_epoch": 2,
            "epochs": 2, "data_md5": CIFAR_MD5}))
        runs.append({**run.to_dict(), "out_dir": str(out), "epochs": 2})
    (tmp_path / "references.yaml").write_text(REFERENCE)
    context = {"profile": PROFILE, "description": "sweep test", "tables": grid_tables(params, PROFILE),
               "references": references.load(tmp_path / "references.yaml"),
               "not_run": grid.not_run(params, PROFILE), "data_md5": {"cifar10": CIFAR_MD5}}
    return runs, context


def test_the_sweep_figure_draws_paired_deltas_against_the_value_with_the_reference(params, tmp_path):
    runs, context = _sweep_report_inputs(params, tmp_path)
    checked = inputs.validate_context(context)
    summaries = cells.summarize(inputs.load_runs(inputs.validate_runs(runs, checked), checked), checked)
    layout = checked.tables["beta-sweep"]
    [axis] = layout.sweeps
    assert (axis.row, axis.key, axis.own) == ("sum-p2", "beta", 1000.0)
    fig = figures.sweep_figure(layout, axis, summaries["beta-sweep"], "footer")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"   # 100 to 1000: a decade
    by_marker = {line.get_marker(): line for line in ax.get_lines()}
    ours = by_marker["o"]
    assert list(ours.get_xdata()) == [100, 1000]
    # paired by seed against `none`: (64 - 70, 63 - 66) and (60 - 70, 58 - 66)
    assert list(ours.get_ydata()) == pytest.approx([-4.5, -9.0])
    reference = by_marker["D"]
    assert list(reference.get_xdata()) == [1000.0]
    assert list(reference.get_ydata()) == pytest.approx([7.93 - 8.77])
    assert ax.collections, "the 95% intervals are drawn"
    assert r"$F_{\mathrm{sum}}^{2}$" in fig.get_suptitle()   # mathtext, as every figure's labels
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("reference Δ at its beta = 1000" in t for t in legend), legend


def test_a_sweep_of_values_within_a_decade_has_a_linear_axis():
    assert figures.sweep_log_axis([100, 1000]) and not figures.sweep_log_axis([300, 1000])
    assert not figures.sweep_log_axis(["sum", "max"])


def test_the_report_shows_the_sweep_rows_and_its_figure(params, tmp_path):
    runs, context = _sweep_report_inputs(params, tmp_path)
    written = {p.name for p in report.render(runs, tmp_path / "out", context)}
    assert {"fig_sweep_beta-sweep_sum-p2.png", "fig_sweep_beta-sweep_sum-p2.pdf"} <= written
    table = (tmp_path / "out" / "beta-sweep.md").read_text()
    assert "F_sum², beta = 100" in table and "F_sum², beta = 1000" in table
    csv_rows = (tmp_path / "out" / "beta-sweep.csv").read_text().splitlines()
    assert any(line.startswith("beta-sweep,sum-p2/beta=100,error,") for line in csv_rows)
    assert "fig_sweep_beta-sweep_sum-p2.png" in (tmp_path / "out" / "README.md").read_text()
