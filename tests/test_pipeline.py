"""Snakemake and DVC run the same DAG, and the whole pipeline works end to end.

- Parity (no training): Snakemake's dry run of the paper profile, the train stages of dvc.yaml
  as DVC itself loads them, and `python -m at runs --json` are the same runs with the same
  commands, inputs and outputs.
- End to end (slow): the `ci` profile through real Snakemake in a copy of the repository, then
  `dvc commit -f` / `dvc status` / `dvc repro` doing nothing, one finished MLflow run per
  training job, a deterministic report, and `dvc push` / `dvc pull` into a fresh clone.

Everything runs in a copy of the working tree under tmp_path: the real repository never gets
runs/, data/, mlruns.db or .snakemake/ from these tests.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AT_SHARED_DIR", REPO.parent / "shared"))
CIFAR_MINI = SHARED / "data" / "cifar10-mini-python.tar.gz"
CIFAR_MINI_MD5 = "1c190744c9595cc62078be24b4b038fb"
GIT_IDENTITY = ["-c", "user.name=at-tests", "-c", "user.email=at-tests@localhost"]


# ------------------------------------------------------------------------------------------------
# A copy of the repository to run in


def _env(root: Path) -> dict[str, str]:
    """The environment of every command: this venv first on PATH, the mini CIFAR-10, a private MLflow store."""
    # nothing of the caller's Snakemake profile, MLflow store or data overrides leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAKEMAKE_", "MLFLOW_", "AT_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["AT_CIFAR10_URL"] = str(CIFAR_MINI)
    env["AT_CIFAR10_MD5"] = CIFAR_MINI_MD5
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns.db'}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _sh(args: list[str], cwd: Path, timeout: float = 600, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env={**_env(cwd), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"`{shlex.join(args)}` in {cwd} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}")
    return done


def _working_tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what the next commit of the repository holds."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(f for f in listed if f and (REPO / f).is_file())


def copy_repository(dest: Path) -> Path:
    """The working tree (uncommitted work included) as a fresh git + DVC repository at dest."""
    for name in _working_tree_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    # a dvc.lock or results of the real repository describe its runs, not the copy's
    for lock in (dest / "pipelines").glob("*/dvc.lock"):
        lock.unlink()
    shutil.rmtree(dest / "results", ignore_errors=True)
    assert (dest / ".dvc" / "config").is_file(), "the repository is a DVC repository: .dvc/config must be committed"
    _sh(["git", "init", "-q"], dest)
    _sh(["git", "add", "-A"], dest)
    _sh(["git", *GIT_IDENTITY, "commit", "-q", "-m", "copy of the working tree"], dest)
    return dest


def _git_commit_all(root: Path, message: str) -> None:
    _sh(["git", "add", "-A"], root)
    _sh(["git", *GIT_IDENTITY, "commit", "-q", "--allow-empty", "-m", message], root)


# ------------------------------------------------------------------------------------------------
# What each tool says it runs


def parse_dry_run(text: str) -> list[dict]:
    """The jobs of `snakemake --dry-run --printshellcmds` output: rule, input, output, wildcards, shell.

    Strict on purpose: a train job without outputs, wildcards or a shell command means the output
    format changed, and the parity test must say so instead of comparing empty sets.
    """
    jobs: list[dict] = []
    job: dict | None = None
    for line in text.splitlines():
        head = line.strip()
        if head.startswith(("rule ", "localrule ")) and head.endswith(":"):
            job = {"rule": head.split()[1].rstrip(":"), "input": [], "output": [], "wildcards": {}, "shell": None,
                   "priority": 0}  # Snakemake prints a priority only where it is not 0
            jobs.append(job)
        elif job is None:
            continue
        elif line.startswith("    ") and ": " in head:
            key, _, value = head.partition(": ")
            if key in ("input", "output"):
                job[key] = value.split(", ")
            elif key == "wildcards":
                job["wildcards"] = dict(item.split("=", 1) for item in value.split(", "))
            elif key == "priority":
                job["priority"] = int(value)
        elif line.startswith("Shell command: "):
            job["shell"] = line[len("Shell command: "):]
    stats = {}
    if "Job stats:" in text:
        table = text.split("Job stats:", 1)[1].splitlines()
        for row in table[3:]:
            parts = row.split()
            if len(parts) != 2 or parts[0] == "total":
                break
            stats[parts[0]] = int(parts[1])
    counted = {rule: sum(j["rule"] == rule for j in jobs) for rule in stats}
    assert stats and counted == stats, f"parsed {counted} jobs, Snakemake's job stats say {stats}"
    for j in jobs:
        if j["rule"].startswith("train_"):
            assert j["output"] and j["shell"], f"unparsed train job {j}"
    return jobs


def _argv(command: str) -> list[str]:
    """A shell command as argv, without a leading `exec` and its log redirection (`>> log 2>&1`)."""
    words = shlex.split(command)
    if words and words[0] == "exec":
        words = words[1:]
    for redirect in (">", ">>"):
        if redirect in words:
            words = words[:words.index(redirect)]
    return words


def _without(argv: list[str], option: str) -> list[str]:
    # an option with a value that says how to run, not what (Snakemake's --threads, --log)
    if option not in argv:
        return argv
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


def _option(argv: list[str], option: str) -> str:
    assert argv.count(option) == 1, f"{option} must appear once in {argv}"
    return argv[argv.index(option) + 1]


def dvc_stages(root: Path, profile: str) -> list[dict]:
    """A profile's DVC stages (its pipeline's and the downloads') as DVC itself loads them."""
    from dvc.repo import Repo

    stages = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if Path(stage.dvcfile.path).relative_to(root).as_posix() not in (
                    f"pipelines/{profile}/dvc.yaml", "pipelines/data/dvc.yaml"):
                continue
            outs = stage.outs
            stages.append({
                "name": stage.name, "cmd": stage.cmd,
                "deps": sorted(d.def_path for d in stage.deps if not hasattr(d, "params")),
                "params": sorted(k for d in stage.deps if hasattr(d, "params") for k in d.params),
                "outs": sorted(o.def_path for o in outs if not o.metric and not o.plot),
                "metrics": sorted(o.def_path for o in outs if o.metric),
                "plots": sorted(o.def_path for o in outs if o.plot),
                "cached": sorted(o.def_path for o in outs if o.use_cache),
            })
    return stages


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
    return parse_dry_run(done.stdout)


@pytest.fixture(scope="module")
def grid_paper_runs(paper_copy) -> list[dict]:
    return json.loads(run_cli(["runs", "--profile", "paper", "--json"], paper_copy).stdout)


@pytest.fixture(scope="module")
def grid_paper_cohorts(paper_copy) -> list[dict]:
    return json.loads(run_cli(["runs", "--profile", "paper", "--cohorts", "--json"], paper_copy).stdout)


def _train_jobs(jobs: list[dict]) -> dict[str, dict]:
    """Snakemake's training jobs by the cohort they train (one job per cohort)."""
    found = {}
    for job in jobs:
        if job["rule"].startswith("train_"):
            cohort = _option(_argv(job["shell"]), "--cohort")
            assert cohort not in found, f"cohort {cohort} has two jobs"
            found[cohort] = job
    return found


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
        assert sorted(job["input"]) == sorted({f"data/{runs[r]['dataset']}" for r in cohort["runs"]} | teachers)
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
        assert stage["deps"] == sorted(job["input"])

    downloads = {tuple(j["output"]): j for j in snakemake_paper_jobs if j["rule"] == "download"}
    download_stages = {tuple(s["outs"]): s for s in stages if s["name"].startswith("download-")}
    assert sorted(downloads) == sorted(download_stages)
    for outs, stage in download_stages.items():
        assert _argv(downloads[outs]["shell"]) == shlex.split(stage["cmd"])

    [report_job] = [j for j in snakemake_paper_jobs if j["rule"] == "report"]
    [report_stage] = [s for s in stages if s["name"].startswith("report-")]
    assert _argv(report_job["shell"]) == shlex.split(report_stage["cmd"])
    assert report_job["output"] == report_stage["outs"] == ["results/paper"]
    assert sorted(report_job["input"]) == report_stage["deps"]
    assert len(stages) == len(train_stages) + len(download_stages) + 1


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


# ------------------------------------------------------------------------------------------------
# End to end: the ci profile through real Snakemake, then DVC, MLflow, the report


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory) -> Path:
    if not CIFAR_MINI.is_file():
        pytest.fail(f"{CIFAR_MINI} is missing: the tests need ../shared beside the repository "
                    f"(or AT_SHARED_DIR pointing at it)")
    root = copy_repository(tmp_path_factory.mktemp("ci") / "repo")
    _sh([sys.executable, "-m", "at", "dvc", "--profile", "ci"], root)
    _git_commit_all(root, "dvc.yaml for the ci profile")
    # --show-failed-logs: a failed job's log ends up in the assertion message
    done = _sh(["snakemake", "--snakefile", "workflow/Snakefile", "--cores", "2", "--config", "profile=ci",
                "--show-failed-logs"], root, timeout=1200)
    root.joinpath("snakemake-console.txt").write_text(done.stdout + done.stderr)
    # record what Snakemake produced, as the README says (-f: DVC never ran these stages, they
    # have no lock entry yet; -d: the download stage too)
    _sh(["dvc", "commit", "-f", "-d", CI_PIPELINE], root)
    return root


def _ci_runs(root: Path) -> list[dict]:
    return json.loads(_sh([sys.executable, "-m", "at", "runs", "--profile", "ci", "--json"], root).stdout)


@pytest.mark.slow
def test_ci_snakemake_trains_every_run(ci_run):
    runs = _ci_runs(ci_run)
    assert len(runs) == 6
    for run in runs:
        metrics = json.loads((ci_run / run["out_dir"] / "metrics.json").read_text())
        assert metrics["run_id"] == run["id"] and metrics["final_epoch"] == metrics["epochs"] == 1
        assert (metrics["train_size"], metrics["test_size"]) == (128, 128)
        assert (ci_run / run["out_dir"] / "checkpoint.pt").stat().st_size > 0


CI_PIPELINE = "pipelines/ci/dvc.yaml"
SNAKEMAKE_CI = ["snakemake", "--snakefile", "workflow/Snakefile", "--config", "profile=ci"]


def _snakemake_plans(root: Path, *extra: str) -> list[dict]:
    """The jobs `snakemake -n` would run now (none: an empty list)."""
    done = _sh([*SNAKEMAKE_CI, "--dry-run", "--printshellcmds", *extra], root, timeout=300)
    if "Nothing to be done" in done.stdout + done.stderr:
        return []
    return parse_dry_run(done.stdout)


def _dvc_clean(root: Path, *targets: str) -> str:
    status = _sh(["dvc", "status", "--with-deps", *(targets or [CI_PIPELINE])], root).stdout
    assert "Data and pipelines are up to date." in status, status
    return status


@pytest.mark.slow
def test_snakemake_and_dvc_agree_that_everything_is_up_to_date(ci_run):
    # after Snakemake then `dvc commit`, neither plans anything: DVC's commit leaves the outputs'
    # modification times alone (.dvc/config: cache.type copy), which Snakemake compares
    assert _snakemake_plans(ci_run) == []
    _dvc_clean(ci_run)
    repro = _sh(["dvc", "repro", CI_PIPELINE], ci_run).stdout
    assert "Running stage" not in repro, repro
    assert _snakemake_plans(ci_run) == []
    # the console showed each member's epoch as it finished, not only Snakemake's job lines
    console = (ci_run / "snakemake-console.txt").read_text()
    for run in _ci_runs(ci_run):
        assert f"[{run['id']}] epoch 1/1 " in console, run["id"]


@pytest.mark.slow
def test_one_methods_change_makes_both_tools_plan_exactly_its_cohort(ci_run, tmp_path):
    from at import dvc_pipeline

    params = yaml.safe_load((ci_run / "params.yaml").read_text())
    at_sum_p4 = next(t for t in params["methods"]["at-sum-p4"]["terms"] if t["type"] == "at")
    at_sum_p4["beta"] = 300
    changed = ci_run / "params.yaml"
    original = changed.read_text()
    try:
        changed.write_text(yaml.safe_dump(params, sort_keys=False))
        [cohort] = [c for c in json.loads(_sh([sys.executable, "-m", "at", "runs", "--profile", "ci", "--cohorts",
                                                "--json"], ci_run).stdout)
                    if any("/at-sum-p4/" in r for r in c["runs"])]
        planned = _snakemake_plans(ci_run)
        assert sorted(j["rule"] for j in planned if j["rule"] != "all") == sorted(
            [f"train_{cohort['id'].replace('/', '_').replace('-', '_')}", "report"]), planned
        status = _sh(["dvc", "status", CI_PIPELINE], ci_run).stdout
        changed_stages = re.findall(r"^pipelines/ci/dvc\.yaml:(\S+):$", status, re.M)
        assert changed_stages == [dvc_pipeline.stage_name(cohort["id"])], status
        assert "methods.at-sum-p4" in status
    finally:
        changed.write_text(original)
    assert _snakemake_plans(ci_run) == []
    _dvc_clean(ci_run)


@pytest.mark.slow
def test_the_data_recorded_is_the_data_used(ci_run):
    """dvc.lock and MLflow record the archive the download actually fetched (the mini override),
    not params.yaml's official URL and md5."""
    from mlflow.tracking import MlflowClient

    lock = yaml.safe_load((ci_run / "pipelines" / "ci" / "dvc.lock").read_text())
    official = yaml.safe_load((ci_run / "params.yaml").read_text())["data"]["cifar10"]
    for name, stage in lock["stages"].items():
        if name.startswith("train-"):
            assert stage["params"]["data/cifar10/source.json"] == {"url": str(CIFAR_MINI), "md5": CIFAR_MINI_MD5}
    assert official["md5"] not in json.dumps(lock)
    client = MlflowClient(tracking_uri=_env(ci_run)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("attention-transfer/ci")
    trained = client.search_runs([experiment.experiment_id], "tags.`at.run_id` != ''")
    assert trained and all((r.data.tags["data_source"], r.data.tags["data_md5"]) == (str(CIFAR_MINI), CIFAR_MINI_MD5)
                           for r in trained)


@pytest.mark.slow
def test_switching_the_archive_is_seen_by_snakemake_and_dvc(ci_run, tmp_path):
    """Another archive through the same override: Snakemake plans the download and every job
    after it; once downloaded, DVC sees the new URL and md5 in every training stage's params."""
    from cifar_archives import make_cifar10, md5

    copy = tmp_path / "repo"
    shutil.copytree(ci_run, copy, symlinks=True)
    archive = tmp_path / "other-cifar-10-python.tar.gz"
    make_cifar10(archive, seed=3)
    switched = {"AT_CIFAR10_URL": str(archive), "AT_CIFAR10_MD5": md5(archive)}
    done = _sh([*SNAKEMAKE_CI, "--dry-run", "--printshellcmds"], copy, env=switched, timeout=300)
    planned = parse_dry_run(done.stdout)
    rules = sorted(j["rule"] for j in planned)
    assert "download" in rules and sum(r.startswith("train_") for r in rules) == len(
        json.loads(_sh([sys.executable, "-m", "at", "runs", "--profile", "ci", "--cohorts", "--json"], copy).stdout))
    _sh([*SNAKEMAKE_CI, "--cores", "1", "data/cifar10"], copy, env=switched, timeout=300)
    status = _sh(["dvc", "status", CI_PIPELINE], copy, env=switched).stdout
    assert status.count("data/cifar10/source.json:") == sum(r.startswith("train_") for r in rules), status
    assert "modified:           md5" in status and "modified:           url" in status, status
    # and back: the mini archive again is a change too
    assert [j["rule"] for j in _snakemake_plans(copy) if j["rule"] == "download"] == ["download"]


@pytest.mark.slow
def test_mlflow_holds_one_finished_run_per_training_job(ci_run):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_env(ci_run)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("attention-transfer/ci")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                filter_string="tags.`at.run_id` != ''")  # not the cells' and report's runs
    runs = _ci_runs(ci_run)
    assert sorted(r.data.tags.get("at.run_id") for r in found) == sorted(r["id"] for r in runs)
    for mlflow_run in found:
        assert mlflow_run.info.status == "FINISHED"
        run = next(r for r in runs if r["id"] == mlflow_run.data.tags["at.run_id"])
        with open(ci_run / run["out_dir"] / "history.csv", newline="") as f:
            history = {int(row["epoch"]): float(row["test_error"]) for row in csv.DictReader(f)}
        logged = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "test_error")}
        assert logged == pytest.approx(history) and sorted(logged) == [1]
        # the checkpoint knows its MLflow run (a resumed run continues it)
        assert (ci_run / run["out_dir"] / "mlflow_run_id").read_text().strip() == mlflow_run.info.run_id
    # the report made one parent run per cell; each run of a cell is nested under one of them
    parents = {r.data.tags["at.cell"]: r.info.run_id
               for r in client.search_runs([experiment.experiment_id], "tags.`at.kind` = 'cell'")}
    assert sorted(parents) == sorted({f"{c['table']}/{c['row']}/{c['column']}" for r in runs for c in r["cells"]})
    for mlflow_run in found:
        run = next(r for r in runs if r["id"] == mlflow_run.data.tags["at.run_id"])
        if run["cells"]:
            assert mlflow_run.data.tags["mlflow.parentRunId"] in parents.values(), run["id"]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_report_files_are_there_and_deterministic(ci_run):
    report = ci_run / "results" / "ci"
    first = _folder_bytes(report)
    # the ci profile runs Table 2 only: no file of the tables it does not run
    assert {name for name in first if name.endswith((".md", ".tex", ".csv"))} == \
        {"README.md", "table2.md", "table2.tex", "table2.csv"}
    readme = first["README.md"].decode()
    assert "ci profile" in readme and "CIFAR-10 mini subset" in readme
    # each Table 2 cell holds its one run's final test error
    errors = {}
    for run in _ci_runs(ci_run):
        metrics = json.loads((ci_run / run["out_dir"] / "metrics.json").read_text())
        for cell in run["cells"]:
            errors[cell["row"]] = metrics["final_test_error"]
    with open(report / "table2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["row"] for row in rows) == sorted(errors) and len(rows) == 5
    for row in rows:
        assert (row["n"], row["status"], row["epoch"]) == ("1", "ok", "1"), row
        assert float(row["mean"]) == pytest.approx(errors[row["row"]], abs=1e-4)
    # the figures the README shows are there, and no other (none survives from an earlier
    # render): Table 2's curves and paired differences
    shown = set(re.findall(r"\]\(([\w.-]+\.(?:png|pdf))\)", readme))
    assert shown == {name for name in first if name.endswith((".png", ".pdf"))}
    assert {"fig_curves_table2.png", "fig_paired_table2.png"} <= shown

    _sh([sys.executable, "-m", "at", "report", "--profile", "ci"], ci_run)
    assert _folder_bytes(report) == first, "a second render of the same runs changed bytes"
    _dvc_clean(ci_run)


@pytest.fixture(scope="module")
def pulled_clone(ci_run, tmp_path_factory) -> Path:
    """A fresh git clone of the ci copy, with its DVC outputs pulled from a local remote."""
    where = tmp_path_factory.mktemp("clone")
    remote = where / "dvc-remote"
    remote.mkdir()
    # --local: the remote is this machine's, not the project's (.dvc/config.local is not committed)
    _sh(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], ci_run)
    _sh(["dvc", "push", "--with-deps", CI_PIPELINE], ci_run)
    # the dvc.lock files are committed with the results they record (README)
    _git_commit_all(ci_run, "ci results")
    clone = where / "clone"
    _sh(["git", "clone", "-q", str(ci_run), str(clone)], where)
    assert not (clone / "runs").exists() and not (clone / "data").exists()
    _sh(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], clone)
    # the profile's outputs and what they depend on (a bare `dvc pull` also tries every other
    # profile's pipeline, whose stages never ran and have nothing to pull)
    _sh(["dvc", "pull", "--with-deps", CI_PIPELINE], clone)
    return clone


@pytest.mark.slow
def test_pushed_results_can_be_pulled_into_a_fresh_clone(ci_run, pulled_clone):
    for run in _ci_runs(pulled_clone):
        for name in ("checkpoint.pt", "metrics.json", "history.csv"):
            pulled = pulled_clone / run["out_dir"] / name
            assert pulled.read_bytes() == (ci_run / run["out_dir"] / name).read_bytes(), pulled
    # the report folder is not in the remote (small files, for git where a profile commits them):
    # `dvc repro` renders it from the pulled runs and trains nothing (its bytes differ from the
    # original's by the commit that rendered it, which the provenance line names)
    repro = _sh(["dvc", "repro", CI_PIPELINE], pulled_clone).stdout
    assert re.findall(r"Running stage '([^']+)'", repro) == [f"{CI_PIPELINE}:report-ci"], repro
    assert (pulled_clone / "results" / "ci" / "table2.csv").read_bytes() == (ci_run / "results" / "ci" / "table2.csv").read_bytes()
    _dvc_clean(pulled_clone)


@pytest.mark.slow
def test_dvc_repro_runs_a_training_stage_itself(pulled_clone):
    # DVC, not Snakemake, runs one stage's command (DVC deletes the outputs first): it trains
    # again and records the result
    from at import dvc_pipeline

    [run] = [r for r in _ci_runs(pulled_clone) if r["id"] == "cifar10/wrn-16-2/baseline/seed0"]
    stage = dvc_pipeline.stage_name("cifar10/wrn-16-2/seed0/cohort0")   # the teacher, alone in its cohort
    metrics = pulled_clone / run["out_dir"] / "metrics.json"
    before = metrics.stat().st_mtime_ns
    done = _sh(["dvc", "repro", "--force", "--single-item", f"{CI_PIPELINE}:{stage}"], pulled_clone)
    assert f"Running stage '{CI_PIPELINE}:{stage}'" in done.stdout, done.stdout
    assert metrics.stat().st_mtime_ns != before
    assert json.loads(metrics.read_text())["run_id"] == run["id"]
    _dvc_clean(pulled_clone, f"{CI_PIPELINE}:{stage}")


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


def _readme_using_it_commands() -> list[str]:
    """The commands of the README's "Using it" block, as written (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readmes_commands_work_as_written(ci_run):
    """Each command of "Using it" that needs no cluster, run as written but on the ci profile
    (the smoke profile's grid at a sixth of the cost) in the trained ci copy; the activation is
    the venv's bin first on PATH, which is what `source .venv/bin/activate` does."""
    commands = _readme_using_it_commands()
    assert commands[0] == "source .venv/bin/activate", "the block starts by activating the environment"
    ran = []
    for command in commands[1:]:
        if "--profile slurm" in command:
            continue   # needs a cluster: tests/slurm runs the SLURM profile
        command = command.replace("profile=smoke", "profile=ci").replace("--profile smoke", "--profile ci")
        command = command.replace("pipelines/smoke/", "pipelines/ci/")
        if " at ui " in f" {command} ":
            _check_ui(ci_run, command)
        else:
            done = subprocess.run(["bash", "-c", command], cwd=ci_run, env=_env(ci_run), capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        ran.append(command.split()[0:3])
    assert len(ran) >= 8, ran
    # and the tools still agree afterwards
    assert _snakemake_plans(ci_run) == []
    _dvc_clean(ci_run)


def _check_ui(root: Path, command: str) -> None:
    """`python -m at ui` prints the runs table's address and serves MLflow's UI there."""
    import urllib.request

    server = subprocess.Popen(["bash", "-c", f"exec {command} --port 5097"], cwd=root, env=_env(root),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = server.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:5097/#/experiments/\d+/runs\?\S+)", first)
        assert found, first
        assert "workflowType=machine_learning" in found.group(1) and "viewStateShareKey=at-runs" in found.group(1)
        deadline = time.monotonic() + 120
        while True:
            try:
                page = urllib.request.urlopen("http://127.0.0.1:5097/", timeout=5).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "MLflow's UI never answered"
                time.sleep(1)
        assert "MLflow" in page or "mlflow" in page
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_snakemakes_report_holds_the_tables_and_figures(ci_run, tmp_path):
    report = tmp_path / "report.html"
    _sh([*SNAKEMAKE_CI, "--report", str(report)], ci_run, timeout=300)
    html = report.read_text(errors="replace")
    rendered = sorted(p.name for p in (ci_run / "results" / "ci").iterdir() if p.suffix in (".csv", ".png"))
    assert rendered and all(name in html for name in rendered), rendered
    assert "Tables and figures" in html and "paired difference to the baseline" in html


@pytest.mark.slow
def test_mlflow_ui_in_a_real_browser(ci_run, tmp_path):
    """scripts/mlflow_screenshots.py in headless Chromium: the runs table opens on the Model
    training view with the metric column, a cell expands to its seeds, and the cell's page lists
    them (the script fails when a page lacks these). Needs Chromium and the playwright package,
    which the project's environment does not install: skipped without them."""
    pytest.importorskip("playwright", reason="pip install playwright (the package only) to run it")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    done = _sh([sys.executable, str(REPO / "scripts" / "mlflow_screenshots.py"), "--profile", "ci", "--out",
                str(tmp_path), "--port", "5098", "--chromium", chromium], ci_run, timeout=400)
    shots = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in shots] == ["experiment.png", "cell.png", "run.png"]
    assert all(p.stat().st_size > 20_000 for p in shots)
