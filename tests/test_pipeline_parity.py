"""Snakemake and DVC plan the same DAG as the grid (no training): Snakemake's dry run of the paper
profile, the train stages of the root dvc.yaml (the default profile, paper) as DVC itself loads them, and `python -m at
runs --json` are the same runs with the same commands, inputs and outputs; bad params, the lint,
the SLURM profile without sbatch, a user's own table, ImageNet from a folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from at import dvc_pipeline, grid
from at import outdated
from in_process import run_cli
from pipeline_repo import (REPO, _argv, _env, _option, _sh, _train_jobs, _without, copy_repository, dvc_stages,
                           parse_dry_run)


# ------------------------------------------------------------------------------------------------
# Parity: the same runs, commands and outputs (no training)


@pytest.fixture(scope="module")
def paper_copy(tmp_path_factory) -> Path:
    return copy_repository(tmp_path_factory.mktemp("paper") / "repo")


@pytest.fixture(scope="module")
def snakemake_paper_jobs(paper_copy) -> list[dict]:
    # --forceall: every job of the DAG, whatever already exists; --nolock: a dry run writes nothing
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--config", "profile=paper",
                "--dry-run", "--printshellcmds", "--forceall", "--nolock"], paper_copy, timeout=300)
    # the whole paper DAG (120 runs, a report input list of thousands of characters, every rule
    # in the reasons) prints no line over 300 characters (at.snakemake_log folds them)
    longest = max(done.stdout.splitlines(), key=len)
    assert len(longest) <= 300, longest[:200]
    return parse_dry_run(done.stdout)


@pytest.fixture(scope="module")
def grid_paper_runs(paper_copy) -> list[dict]:
    return json.loads(run_cli(["runs", "--profile", "paper", "--json"], paper_copy).stdout)


@pytest.fixture(scope="module")
def grid_paper_cohorts(paper_copy) -> list[dict]:
    return json.loads(run_cli(["runs", "--profile", "paper", "--cohorts", "--json"], paper_copy).stdout)


def test_snakemake_dry_run_trains_every_run_of_the_grid_in_cohorts(snakemake_paper_jobs, grid_paper_runs,
                                                                    grid_paper_cohorts):
    train = _train_jobs(snakemake_paper_jobs)
    assert sorted(train) == [c["id"] for c in grid_paper_cohorts]
    runs = {r["id"]: r for r in grid_paper_runs}
    # every run of the grid is trained by exactly one job
    members = sorted(run_id for c in grid_paper_cohorts for run_id in c["runs"])
    assert members == sorted(runs) and len(members) == 120
    for cohort in grid_paper_cohorts:
        job = train[cohort["id"]]
        expected = [f"{runs[r]['out_dir']}/{f}" for r in cohort["runs"] for f in ("checkpoint.pt", "metrics.json", "history.csv")]
        assert sorted(job["output"]) == sorted(expected)
        argv = _argv(job["shell"])
        assert _option(argv, "--profile") == "paper"
        teachers = {f"runs/paper/{runs[r]['teacher_run']}/checkpoint.pt" for r in cohort["runs"] if runs[r]["teacher_run"]}
        # and the cohort's stamp (at.outdated: Snakemake's way to see a folder holding another spec)
        assert sorted(job["input"]) == sorted({f"data/{runs[r]['dataset']}" for r in cohort["runs"]} | teachers
                                              | {outdated.stamp(grid.Cohort(**cohort))})
        # members share a data stream: one data set, protocol and seed; none is another's teacher
        assert len({(runs[r]["dataset"], runs[r]["protocol_name"], runs[r]["seed"]) for r in cohort["runs"]}) == 1
        assert not set(cohort["runs"]) & {runs[r]["teacher_run"] for r in cohort["runs"]}
        assert 1 <= len(cohort["runs"]) <= 8
    # the 8 WRN-16-1 runs of Tables 1 and 2 of a seed learn from WRN-16-2 in one cohort
    first = next(c for c in grid_paper_cohorts if c["id"] == "cifar10/wrn-16-1/seed0/cohort0")
    assert len(first["runs"]) == 8 and first["teacher_runs"] == ["cifar10/wrn-16-2/baseline/seed0"]
    tables = {c["table"] for r in grid_paper_runs for c in r["cells"]}
    assert tables == {"table1", "table2", "table3", "table4"}  # ImageNet: no folder given


def test_snakemake_runs_the_grid_seed_by_seed(snakemake_paper_jobs, grid_paper_cohorts):
    # a lower seed's job outranks a higher seed's whenever both are ready: a grid cut short (a
    # laptop running out of time) has whole seeds, each teacher with all of its students
    train = _train_jobs(snakemake_paper_jobs)
    seeds = {c["id"]: c["seed"] for c in grid_paper_cohorts}
    assert sorted(set(seeds.values())) == [0, 1, 2]
    for cohort_id, job in train.items():
        assert f"/seed{seeds[cohort_id]}/" in cohort_id
        assert job["priority"] == 2 - seeds[cohort_id], (cohort_id, job["priority"])


def test_dvc_stages_are_the_snakemake_jobs(paper_copy, snakemake_paper_jobs, grid_paper_cohorts):
    stages = dvc_stages(paper_copy, "paper")
    train_stages = [s for s in stages if s["name"].startswith("train-")]
    train_jobs = _train_jobs(snakemake_paper_jobs)
    by_cohort = {}
    for stage in train_stages:
        argv = shlex.split(stage["cmd"])
        by_cohort[_option(argv, "--cohort")] = (stage, argv)
    assert sorted(by_cohort) == sorted(train_jobs) == [c["id"] for c in grid_paper_cohorts]
    for cohort_id, (stage, argv) in by_cohort.items():
        job = train_jobs[cohort_id]
        # the same command, but for how many threads Snakemake gives the job and where its log goes
        assert _without(_without(_argv(job["shell"]), "--threads"), "--log") == argv
        # the same outputs: checkpoints cached outs, metrics.json metrics, history.csv plots
        assert sorted(stage["outs"] + stage["metrics"] + stage["plots"]) == sorted(job["output"])
        assert {Path(p).name for p in stage["outs"]} == {"checkpoint.pt"}
        assert {Path(p).name for p in stage["metrics"]} == {"metrics.json"}
        assert {Path(p).name for p in stage["plots"]} == {"history.csv"}
        # pushed with the checkpoint, so a fresh clone has the whole result
        assert sorted(stage["cached"]) == sorted(job["output"])
        assert stage["deps"] == sorted(i for i in job["input"] if "/.stamps/" not in i)

    downloads = {tuple(j["output"]): j for j in snakemake_paper_jobs if j["rule"] == "download"}
    download_stages = {tuple(s["outs"]): s for s in stages if s["name"].startswith("download-")}
    assert sorted(downloads) == sorted(download_stages)
    for outs, stage in download_stages.items():
        assert _argv(downloads[outs]["shell"]) == shlex.split(stage["cmd"])
        # DVC keeps the data while its download runs: a failed one leaves it as it was
        assert stage["persist"] == list(outs)

    [report_job] = [j for j in snakemake_paper_jobs if j["rule"] == "report"]
    [report_stage] = [s for s in stages if s["name"].startswith("report-")]
    assert _argv(report_job["shell"]) == shlex.split(report_stage["cmd"])
    assert report_job["output"] == report_stage["outs"] == ["results/paper"]
    assert sorted(report_job["input"]) == report_stage["deps"]
    assert len(stages) == len(train_stages) + len(download_stages) + 1


def test_one_seed_of_a_profile_is_the_same_part_for_snakemake_and_dvc(paper_copy, grid_paper_cohorts):
    """A long profile run in parts, seed by seed (docs/running.md, "A long profile in parts"): Snakemake's
    `--config seeds=1` and DVC's stage glob plan exactly that seed's cohorts, and no report."""
    seed1 = sorted(c["id"] for c in grid_paper_cohorts if c["seed"] == 1)
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--config", "profile=paper", "seeds=1",
                "--dry-run", "--printshellcmds", "--forceall", "--nolock"], paper_copy, timeout=300)
    jobs = parse_dry_run(done.stdout)
    assert sorted(_train_jobs(jobs)) == seed1
    assert not [j for j in jobs if j["rule"] == "report"]
    # the paper profile is params.yaml's default: its stages are the root dvc.yaml's
    done = _sh(["dvc", "repro", "--dry", "--force", "--glob", "dvc.yaml:train-*--seed1--*"], paper_copy)
    # (the downloads upstream, never run in this copy, come along: the part is its trainings)
    stages = {s for s in re.findall(r"Running stage '(?:dvc\.yaml:)?([^']+)'", done.stdout) if s.startswith("train-")}
    assert sorted(stages) == sorted(dvc_pipeline.stage_name(c) for c in seed1)


def test_dvc_params_deps_exist_in_params_yaml():
    # DVC reports a stage as changed forever when one of its params keys is missing
    from at import dvc_pipeline
    from at import params as params_io

    params = params_io.load(REPO / "params.yaml")
    for profile in params["profiles"]:
        for name, stage in dvc_pipeline.stages(params, profile).items():
            for key in stage.get("params", []):
                if isinstance(key, dict):   # another file's keys: the data set's source.json
                    assert list(key) == [dvc_pipeline.source_record("cifar10")] or name.startswith("train-")
                    continue
                node = params
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{profile}: {name}: params key {key} is missing"
                    node = node[part]
        # a training stage does not depend on what does not change its result
        some_train = next(s for n, s in dvc_pipeline.stages(params, profile).items() if n.startswith("train-"))
        assert f"profiles.{profile}" not in some_train["params"]


def test_snakemake_refuses_bad_params_before_any_job(paper_copy, tmp_path):
    bad = yaml.safe_load((paper_copy / "params.yaml").read_text())
    bad["methods"]["at-sum-p1"]["terms"][1]["mapping"] = "mean"
    bad_file = tmp_path / "params.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--config", f"params={bad_file}",
                "profile=ci", "--dry-run", "--nolock"], paper_copy, check=False, timeout=300)
    assert done.returncode != 0
    assert "methods.at-sum-p1" in done.stdout + done.stderr and "'mean'" in done.stdout + done.stderr
    assert "rule train" not in done.stdout


def test_snakemake_lint_finds_only_the_justified_one(paper_copy):
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--config", "profile=ci", "--lint"],
               paper_copy, check=False, timeout=300)
    lints = {line.strip()[2:].rstrip(":.") for line in (done.stdout + done.stderr).splitlines()
             if line.strip().startswith("* ")}
    assert lints == {"Specify a conda environment or container for each rule"}, lints
    snakefile = (paper_copy / "workflow" / "Snakefile").read_text()
    assert "`snakemake --lint` asks for a conda environment or container per rule" in snakefile, \
        "the remaining lint is justified in the Snakefile"


def test_the_slurm_profile_refuses_in_one_line_before_planning_where_sbatch_is_missing(paper_copy, tmp_path):
    # a PATH with the shell tools Snakemake needs and this venv, but no SLURM command
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("bash", "sh", "which", "git", "env"):
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    env = {**_env(paper_copy), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{tools}"}
    done = subprocess.run(["snakemake", "--snakefile", "workflow/Snakefile", "--profile", "slurm", "--config",
                           "profile=ci", "--dry-run", "--nolock"], cwd=paper_copy, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    output = (done.stdout + done.stderr).strip().splitlines()
    assert output[-1].startswith("error: --profile slurm submits each job with SLURM's sbatch, which is not on PATH")
    assert "rule train" not in done.stdout and "Traceback" not in done.stderr


def _dry_run_with(params: dict, paper_copy: Path, tmp_path: Path, profile: str = "paper") -> list[dict]:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--config", f"params={path}",
                f"profile={profile}", "--dry-run", "--printshellcmds", "--forceall", "--nolock"],
               paper_copy, timeout=300)
    return parse_dry_run(done.stdout)


def test_a_users_own_table_runs_through_snakemake_and_dvc(paper_copy, tmp_path):
    """A table no paper has (WRN-16-1 from WRN-40-2, AT and a new max-p2 mapping) is trained by
    Snakemake's jobs and DVC's stages like the paper's (issue: reference numbers are data)."""
    from at import dvc_pipeline, grid
    from test_grid import USER_TABLE_RUNS, with_user_table

    params = with_user_table(yaml.safe_load((paper_copy / "params.yaml").read_text()))
    jobs = _dry_run_with(params, paper_copy, tmp_path)
    outputs = {o for job in _train_jobs(jobs).values() for o in job["output"]}
    stage_outs = {o for name, stage in dvc_pipeline.stages(params, "paper").items() if name.startswith("train-")
                  for o in stage["outs"]}
    for run_id in USER_TABLE_RUNS.values():
        assert f"runs/paper/{run_id}/metrics.json" in outputs
        assert f"runs/paper/{run_id}/checkpoint.pt" in stage_outs
    assert len(_train_jobs(jobs)) == len(grid.cohorts(params, "paper"))


def test_imagenet_from_the_users_folder_is_read_where_it_is(paper_copy, tmp_path):
    """With data.imagenet.folder set, ImageNet's training jobs and stages read that folder and
    nothing tries to download ImageNet."""
    from at import dvc_pipeline

    folder = tmp_path / "my-imagenet"
    for split in ("train", "val"):
        (folder / split / "n01440764").mkdir(parents=True)
    params = yaml.safe_load((paper_copy / "params.yaml").read_text())
    params["data"]["imagenet"]["folder"] = str(folder)
    jobs = _dry_run_with(params, paper_copy, tmp_path)
    imagenet = [j for j in _train_jobs(jobs).values() if "--cohort imagenet/" in j["shell"]]
    assert imagenet and all(str(folder) in job["input"] for job in imagenet)
    assert not [j for j in jobs if j["rule"] == "download" and "data/imagenet" in j["output"]]
    stages = dvc_pipeline.stages(params, "paper")
    imagenet_stages = [s for name, s in stages.items() if name.startswith("train-imagenet")]
    assert imagenet_stages and all(str(folder) in s["deps"] for s in imagenet_stages)
    assert "download-imagenet" not in stages
