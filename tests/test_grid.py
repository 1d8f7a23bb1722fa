"""params.yaml -> runs: the schema's errors, stable ids, shared runs, teachers, the CLI listing.

Every bad-input test mutates a copy of the real params.yaml in one place, so it fails for the
reason it names (the unmutated file is checked to be valid, too).
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from at import grid
from at.params import ParamsError
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]



def _error(params: dict) -> str:
    with pytest.raises(ParamsError) as info:
        grid.validate(params)
    return str(info.value)


def _assert_names(message: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in message]
    assert not missing, f"error message lacks {missing}: {message}"


# ------------------------------------------------------------------------------------------------
# Schema: one clear error naming the key and the allowed values


def test_the_real_params_yaml_is_valid(params):
    grid.validate(params)  # the mutations below are the only reason their tests fail


def test_unknown_student_model_names_the_cell_and_the_allowed_models(params):
    params["tables"]["table1"]["rows"]["wrn-16-1_from_wrn-16-2"]["student"] = "wrn-15-1"  # 15 != 6n+4
    _assert_names(_error(params), "tables.table1 cell (wrn-16-1_from_wrn-16-2, student).student",
                  "'wrn-15-1'", "allowed:", "wrn-D-K", "nin-thin", "resnet18")


def test_unknown_teacher_model_is_refused(params):
    params["tables"]["table2"]["columns"]["error"]["teacher"] = "vgg-16"
    _assert_names(_error(params), "tables.table2 cell", ".teacher", "'vgg-16'", "allowed:", "wrn-D-K")


def test_unknown_method_in_a_cell_names_the_defined_methods(params):
    params["tables"]["table2"]["rows"]["sum-p1"]["method"] = "at-sum-p3"
    _assert_names(_error(params), "tables.table2 cell (sum-p1, error).method", "'at-sum-p3'",
                  "allowed:", "at-sum-p2", "baseline", "kd")


def test_unknown_mapping_names_the_method_and_the_mappings(params):
    params["methods"]["at-sum-p1"]["terms"][1]["mapping"] = "mean"
    _assert_names(_error(params), "methods.at-sum-p1", "'mean'", "sum", "max")


def test_unknown_default_profile_names_the_key_and_the_profiles(params):
    params["default_profile"] = "fast"
    _assert_names(_error(params), "default_profile", "'fast'",
                  "allowed: " + ", ".join(sorted(params["profiles"])))


def test_unknown_profile_asked_for_names_the_profiles(params):
    with pytest.raises(ParamsError) as info:
        grid.runs(params, "fast")
    _assert_names(str(info.value), "'fast'", "profiles", ", ".join(sorted(params["profiles"])))


@pytest.mark.parametrize("section", ["methods", "protocols", "profiles", "data"])
def test_a_name_that_dvc_would_split_is_refused(params, section):
    # a method `kd-alpha0.5` would be the DVC params path methods.kd-alpha0.5: DVC reads
    # methods -> kd-alpha0 -> 5, and every stage of its runs would fail to find its params
    params[section]["kd-alpha0.5" if section != "data" else "cifar10.mini"] = copy.deepcopy(
        next(iter(params[section].values())))
    _assert_names(_error(params), section, "no dot", "DVC")


@pytest.mark.parametrize("asked, chosen", [(None, None), ("", None), (1, [1]), ("0,2", [0, 2]), (" 2 , 0", [0, 2]),
                                            ([2, 0, 2], [0, 2])])
def test_a_seed_selection_is_read_as_snakemake_and_the_main_command_pass_it(params, asked, chosen):
    assert grid.seed_selection(params, "paper", asked) == chosen


@pytest.mark.parametrize("asked, fragments", [(7, ["no seed 7", "its seeds: 0, 1, 2"]),
                                              ("0,x", ["seed numbers", "'0,x'"])])
def test_a_bad_seed_selection_names_what_is_wrong(params, asked, fragments):
    with pytest.raises(ParamsError) as info:
        grid.seed_selection(params, "paper", asked)
    _assert_names(str(info.value), *fragments)


def test_a_seeds_outputs_are_every_file_of_its_runs_and_no_other(params):
    runs = grid.runs(params, "paper")
    wanted = grid.seed_outputs(params, "paper", [1])
    assert wanted == sorted(p for r in runs if r.seed == 1 for p in grid.outputs(r).values())
    assert wanted and all("/seed1/" in path for path in wanted)


def test_unknown_table_in_a_profile_is_refused(params):
    params["profiles"]["smoke"]["tables"].append("table9")
    _assert_names(_error(params), "profiles.smoke.tables", "'table9'", "allowed:", "table1", "table3")


def test_student_whose_teacher_is_not_trained_by_the_grid_is_refused(params):
    # drop the only cell that trains NIN-wide: row 1's AT/KD students lose their teacher
    del params["tables"]["table1"]["columns"]["teacher"]
    del params["tables"]["table1"]["rows"]["wrn-16-2_from_wrn-40-2"]  # WRN-16-2 is then untrained too
    message = _error(params)
    _assert_names(message, "tables.table1 cell (nin-thin_from_nin-wide, ", ".teacher", "'nin-wide'",
                  "train: teacher", "allowed: nin-thin, wrn-16-1")


@pytest.mark.parametrize("epochs", [0, -3])
def test_non_positive_epochs_in_a_protocol_are_refused(params, epochs):
    params["protocols"]["cifar"]["epochs"] = epochs
    _assert_names(_error(params), "protocols.cifar.epochs", "positive integer", repr(epochs))


def test_non_positive_epochs_in_a_profile_override_are_refused(params):
    params["profiles"]["smoke"]["protocol"]["epochs"] = 0
    _assert_names(_error(params), "profiles.smoke.protocol", "epochs", "positive integer")


def test_cli_refuses_bad_params_before_listing_anything(params, tmp_path):
    params["tables"]["table2"]["rows"]["sum-p1"]["method"] = "at-sum-p3"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    done = run_cli(["--params", str(bad), "runs", "--profile", "ci"], cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    _assert_names(done.stderr, "tables.table2 cell (sum-p1, error).method", "'at-sum-p3'", "allowed:")


# ------------------------------------------------------------------------------------------------
# Runs: stable ids, shared runs, teachers


def test_run_ids_and_folders_read_as_documented(params):
    by_id = {r.id: r for r in grid.runs(params, "paper")}
    run = by_id["cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"]
    assert run.out_dir == "runs/paper/cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"
    assert (run.student, run.teacher, run.method_name, run.seed) == ("wrn-16-1", "wrn-16-2", "at-sum-p2", 0)
    assert grid.outputs(run) == {
        "checkpoint": "runs/paper/cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0/checkpoint.pt",
        "metrics": "runs/paper/cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0/metrics.json",
        "history": "runs/paper/cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0/history.csv",
    }
    # Table 3's protocol differs from CIFAR's usual one: it is part of the id
    assert "cifar10-cifar_flip/nin-thin-nobn_from_nin-wide/grad-at/seed2" in by_id
    # Table 4 fine-tunes ImageNet-pretrained models
    assert "cub/resnet18-pretrained_from_resnet34-pretrained/at-sum-p2/seed1" in by_id


def _reversed_order(params: dict) -> dict:
    """The same experiment with every table, row and column listed in the opposite order."""
    out = copy.deepcopy(params)
    out["tables"] = {name: dict(spec) for name, spec in reversed(list(out["tables"].items()))}
    for spec in out["tables"].values():
        for part in ("rows", "columns"):
            spec[part] = dict(reversed(list(spec[part].items())))
    return out


@pytest.mark.parametrize("profile", ["paper", "smoke", "ci"])
def test_runs_are_a_pure_function_of_the_params_not_of_their_order(params, profile):
    first = grid.runs(params, profile)
    assert grid.runs(copy.deepcopy(params), profile) == first
    assert grid.runs(_reversed_order(params), profile) == first
    assert [r.id for r in first] == sorted({r.id for r in first})  # sorted, each once


def _run_of_cell(runs: list[dict], table: str, row: str, column: str, seed: int) -> str:
    found = [r.id for r in runs for c in r.cells
             if (c.table, c.row, c.column) == (table, row, column) and r.seed == seed]
    assert len(found) == 1, f"cell ({table}, {row}, {column}) seed {seed} is filled by {found}"
    return found[0]


def test_shared_cells_are_one_run(params):
    runs = grid.runs(params, "paper")
    for seed in params["seeds"]:
        # Table 1 row 2's AT cell is Table 2's F_sum^2 cell
        at_cell = _run_of_cell(runs, "table1", "wrn-16-1_from_wrn-16-2", "at", seed)
        assert at_cell == _run_of_cell(runs, "table2", "sum-p2", "error", seed)
        assert at_cell == f"cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed{seed}"
        # the WRN-16-2 baseline is the teacher of row 2 and the student of row 4
        wrn_16_2 = _run_of_cell(runs, "table1", "wrn-16-1_from_wrn-16-2", "teacher", seed)
        assert wrn_16_2 == _run_of_cell(runs, "table1", "wrn-16-2_from_wrn-40-2", "student", seed)
        assert wrn_16_2 == f"cifar10/wrn-16-2/baseline/seed{seed}"
        # the WRN-16-1 baseline: rows 2 and 3 of Table 1, row "none" of Table 2
        alone = _run_of_cell(runs, "table1", "wrn-16-1_from_wrn-16-2", "student", seed)
        assert alone == _run_of_cell(runs, "table1", "wrn-16-1_from_wrn-40-1", "student", seed)
        assert alone == _run_of_cell(runs, "table2", "none", "error", seed)


def test_paper_grid_has_the_hand_counted_number_of_runs(params):
    # Per seed: Table 1 has 24 cells but 22 runs (the WRN-16-1 baseline fills rows 2 and 3, the
    # WRN-16-2 baseline is row 2's teacher and row 4's student); Table 2 adds 3 (p1, p4, max:
    # its "none" and F_sum^2 cells are Table 1's); Table 3 adds its 7 rows (own protocol);
    # Table 4 adds 4 rows x 2 data sets. ImageNet is off (no folder given). 3 seeds.
    assert len(grid.runs(params, "paper")) == (22 + 3 + 7 + 8) * 3 == 120


@pytest.mark.parametrize("profile", ["paper", "smoke", "ci"])
def test_every_students_teacher_run_is_in_the_grid(params, profile):
    runs = grid.runs(params, profile)
    by_id = {r.id: r for r in runs}
    students = [r for r in runs if r.teacher and not r.teacher_weights]
    assert students
    for run in students:
        teacher = by_id.get(run.teacher_run)
        assert teacher is not None, f"{run.id}: teacher run {run.teacher_run} is not in the grid"
        assert (teacher.student, teacher.method_name, teacher.teacher) == (run.teacher, "baseline", None)
        for key in ("seed", "dataset", "protocol_name", "weights", "profile"):
            assert getattr(teacher, key) == getattr(run, key), (run.id, key)
        assert grid.teacher_checkpoint(params, run) == grid.outputs(teacher)["checkpoint"]
        assert grid.run_spec(params, run).teacher_checkpoint == grid.outputs(teacher)["checkpoint"]
    for run in runs:
        if not run.teacher or run.teacher_weights:
            assert run.teacher_run is None


def test_ci_profile_trains_its_teacher_although_table1_is_not_run(params):
    ids = [r.id for r in grid.runs(params, "ci")]
    assert ids == [
        "cifar10/wrn-16-1/baseline/seed0",
        "cifar10/wrn-16-1_from_wrn-16-2/at-max-p1/seed0",
        "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p1/seed0",
        "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0",
        "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p4/seed0",
        "cifar10/wrn-16-2/baseline/seed0",  # the teacher: no cell of ci, still a run
    ]


# ------------------------------------------------------------------------------------------------
# The CLI listing and the generated dvc.yaml


def test_cli_lists_exactly_the_grid(params):
    expected = grid.runs(params, "paper")
    text = run_cli(["runs", "--profile", "paper"], cwd=REPO).stdout
    lines = text.splitlines()
    assert len(lines) == len(expected) == 120
    assert [line.split("\t")[0] for line in lines] == [r.id for r in expected]
    assert [line.split("\t")[-1] for line in lines] == [r.out_dir for r in expected]
    # (`runs --json` is compared with Snakemake's and DVC's job sets in test_pipeline.py)


def test_committed_dvc_pipelines_are_what_params_yaml_defines():
    done = run_cli(["dvc", "--check"], cwd=REPO)
    assert done.returncode == 0, f"a pipelines/*/dvc.yaml is stale: {done.stderr}"
    from at import dvc_pipeline
    from at import params as params_io

    params = params_io.load(REPO / "params.yaml")
    expected = {str(p) for p in dvc_pipeline.files(params)}
    # the root dvc.yaml: the downloads and the default profile (what a bare `dvc repro` runs)
    assert expected == {"dvc.yaml"} | {f"pipelines/{name}/dvc.yaml" for name in params["profiles"]
                                       if name != params["default_profile"]}
    committed = [f for f in subprocess.run(["git", "ls-files", "pipelines", "dvc.yaml"], cwd=REPO, capture_output=True,
                                           text=True, check=True).stdout.split() if f.endswith("dvc.yaml")]
    assert set(committed) <= expected, f"a pipeline file that params.yaml no longer defines: {committed}"


def test_dvc_check_fails_on_a_stale_file_and_names_it(params, tmp_path):
    # the check must be able to fail: the committed pipelines against a changed experiment
    params["seeds"] = [0, 1, 2, 3]
    changed = tmp_path / "params.yaml"
    changed.write_text(yaml.safe_dump(params, sort_keys=False))
    done = run_cli(["--params", str(changed), "dvc", "--profile", "paper", "--check"], cwd=REPO)
    assert done.returncode == 1
    # paper is the default profile: its stages are the root dvc.yaml's; no other file is named
    assert done.stderr.startswith("error: dvc.yaml not what") and "pipelines/" not in done.stderr
    assert "regenerate with `python -m at dvc`" in done.stderr


def test_writing_one_profiles_pipeline_touches_no_other_file(params, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = run_cli(["--params", str(tmp_path / "params.yaml"), "dvc", "--profile", "smoke"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["dvc.yaml", "params.yaml", "pipelines/smoke/dvc.yaml"]
    assert (tmp_path / "pipelines/smoke/dvc.yaml").read_text() == (REPO / "pipelines/smoke/dvc.yaml").read_text()
    # again: nothing changes, not even a modification time (Snakemake and DVC compare them)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.yaml")}
    run_cli(["--params", str(tmp_path / "params.yaml"), "dvc", "--profile", "smoke"], cwd=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.yaml")} == before


def with_user_table(params: dict) -> dict:
    """params.yaml plus a table of the user's own, which no published table has: WRN-16-1 from
    WRN-40-2 (trained by Table 1) under AT and under a max-p2 mapping, one seed, in `paper`."""
    out = copy.deepcopy(params)
    out["methods"]["at-max-p2"] = {"terms": [{"type": "ce"},
                                             {"type": "at", "mapping": "max", "p": 2, "form": "code", "beta": 1000}]}
    out["tables"]["mine"] = {
        "dataset": "cifar10", "protocol": "cifar", "seeds": [0],
        "rows": {"alone": {"method": "baseline"}, "at": {"method": "at-sum-p2"},
                 "max-p2": {"method": "at-max-p2"}},
        "columns": {"error": {"student": "wrn-16-1", "teacher": "wrn-40-2"}},
    }
    out["profiles"]["paper"]["tables"].append("mine")
    return out


USER_TABLE_RUNS = {
    ("alone", "error"): "cifar10/wrn-16-1/baseline/seed0",
    ("at", "error"): "cifar10/wrn-16-1_from_wrn-40-2/at-sum-p2/seed0",
    ("max-p2", "error"): "cifar10/wrn-16-1_from_wrn-40-2/at-max-p2/seed0",
}


def test_a_table_no_paper_has_is_valid_and_its_runs_are_in_the_grid(params, tmp_path):
    mine = with_user_table(params)
    grid.validate(mine)  # reference numbers are data, not a gate
    runs = grid.runs(mine, "paper")
    for (row, column), run_id in USER_TABLE_RUNS.items():
        assert _run_of_cell(runs, "mine", row, column, 0) == run_id
    assert not any(c.table == "mine" and r.seed != 0 for r in runs for c in r.cells)
    # the teacher of the new pair is Table 1's WRN-40-2 baseline run of the same seed
    by_id = {r.id: r for r in runs}
    assert by_id[USER_TABLE_RUNS[("max-p2", "error")]].teacher_run == "cifar10/wrn-40-2/baseline/seed0"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(mine))
    listed = json.loads(run_cli(["--params", str(path), "runs", "--profile", "paper", "--json"], cwd=REPO).stdout)
    assert listed == [run.to_dict() for run in runs]
    # two new runs: the two students of WRN-40-2; the WRN-16-1 baseline is Table 1's seed-0 run
    assert len(listed) == 120 + 2


def test_the_mini_profile_is_the_laptop_evidence_the_results_are_made_of(real_params):
    """The committed results/mini/ are only worth what this grid is: Table 1's WRN-16-1 <- WRN-16-2
    row and Table 2 on the whole mini subset, 30 epochs with the lr cut after 9, 18 and 24
    epochs, 5 seeds, every method paired with its own seed's baseline in one cohort."""
    runs = grid.runs(real_params, "mini")
    cells = {(c.table, c.row, c.column) for r in runs for c in r.cells}
    assert {t for t, _, _ in cells} == {"table1", "table2"}
    assert {r for t, r, _ in cells if t == "table1"} == {"wrn-16-1_from_wrn-16-2"}
    assert {c for t, _, c in cells if t == "table1"} == {"student", "at", "factt", "kd", "at+kd", "teacher"}
    assert {r for t, r, _ in cells if t == "table2"} == set(real_params["tables"]["table2"]["rows"])
    assert sorted({r.seed for r in runs}) == [0, 1, 2, 3, 4]
    assert len(runs) == 45   # per seed: the teacher, the baseline, 7 methods
    for run in runs:
        protocol = grid.protocol_of(real_params, run)
        assert (protocol.epochs, protocol.lr_drops, protocol.lr_gamma, protocol.batch_size) == \
            (30, (9, 18, 24), 0.2, 128)
        assert (protocol.train_subset, protocol.test_subset, protocol.precision) == (None, None, "auto")
    students = [c for c in grid.cohorts(real_params, "mini") if c.level > 0]
    assert len(students) == 5
    for c in students:
        seeds = {r.seed for r in runs if r.id in c.runs}
        methods = {r.method_name for r in runs if r.id in c.runs}
        assert len(seeds) == 1 and "baseline" in methods and len(c.runs) == 8
