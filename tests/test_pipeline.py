"""The ci profile end to end through the real tools, in a copy of the repository: Snakemake
trains it, `dvc commit` records it, and then both tools agree on what is up to date (after a
commit, a repro, a change of one method, a switch of archive), dvc.lock and MLflow record the data
used, the report is deterministic and in Snakemake's --report, `dvc push` / `dvc pull` bring it
to a fresh clone, and the README's commands work as written."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from at import grid as grid_mod, snakemake_log
from in_process import run_cli
from pipeline_repo import CIFAR_MINI, CIFAR_MINI_MD5, REPO, _env, _git_commit_all, _sh, copy_repository, parse_dry_run


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


def _ci_runs(root: Path, *flags: str) -> list[dict]:
    """`python -m at runs --profile ci --json` in root, in this process (what it lists is
    tested in test_grid.py; a process per call cost seconds of torch's import each)."""
    done = run_cli(["runs", "--profile", "ci", "--json", *flags], root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


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
    # (after `dvc repro`, `snakemake -n` plans nothing either: the README's commands, below)
    # the console showed each member's epoch as it finished, not only Snakemake's job lines
    console = (ci_run / "snakemake-console.txt").read_text()
    # no console line over 300 characters: Snakemake's one-line lists (the report rule's inputs
    # alone are ~1,000 here) come folded (at.snakemake_log), nothing dropped
    assert max(map(len, console.splitlines())) <= 300, [line[:120] for line in console.splitlines() if len(line) > 300]
    assert "runs/ci/" in console and "report" in console
    # a local job on a machine without an NVIDIA device is given no GPU: its resources say none
    if not Path("/dev/nvidiactl").exists():
        resources = [line for line in console.splitlines() if line.strip().startswith("resources:")]
        assert resources and not [line for line in resources if "gpu=" in line and "gpu=0" not in line], resources[:3]
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
        [cohort] = [c for c in _ci_runs(ci_run, "--cohorts")
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
    # the dvc.lock files are committed with the results they record (docs/running.md)
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
def test_a_result_another_tool_wrote_for_another_spec_is_stale_for_both(ci_run):
    """The run folder is the truth (at.outdated): beta of at-sum-p4 1000 -> 300, `dvc repro`
    retrains its cohort; Snakemake then plans nothing (the folders hold what params.yaml
    defines). Beta put back: both tools plan exactly that cohort (and Snakemake the report);
    Snakemake runs it, `dvc commit`, and both are clean with the table at beta = 1000 again."""
    from at import dvc_pipeline

    params_file = ci_run / "params.yaml"
    original = params_file.read_text()
    [cohort] = [c for c in _ci_runs(ci_run, "--cohorts") if any("/at-sum-p4/" in r for r in c["runs"])]
    stage = dvc_pipeline.stage_name(cohort["id"])
    # (after the tests that count MLflow runs and compare the report: this one trains at-sum-p4
    # twice more) from a state both tools call current
    _sh([*SNAKEMAKE_CI, "--cores", "2"], ci_run, timeout=900)
    _sh(["dvc", "commit", "-f", "-d", CI_PIPELINE], ci_run)
    assert _snakemake_plans(ci_run) == []
    _dvc_clean(ci_run)
    table_before = (ci_run / "results/ci/table2.md").read_text()
    folder_spec = ci_run / "runs/ci/cifar10/wrn-16-1_from_wrn-16-2/at-sum-p4/seed0/spec.json"
    try:
        params_file.write_text(original.replace("{type: at, mapping: sum, p: 4, form: code, beta: 1000}",
                                                "{type: at, mapping: sum, p: 4, form: code, beta: 300}"))
        assert params_file.read_text() != original
        done = _sh(["dvc", "repro", CI_PIPELINE], ci_run, timeout=900)
        retrained = json.loads(folder_spec.read_text())["method"]["terms"][1]["beta"]
        assert retrained == 300, done.stdout[-3000:]
        # (Snakemake would plan the cohort once here, its own record of the spec being β = 1000's:
        # the job would put the outputs back without training)
    finally:
        params_file.write_text(original)
    planned = sorted(j["rule"] for j in _snakemake_plans(ci_run) if j["rule"] != "all")
    assert planned == sorted([grid_mod.cohort_rule_name(cohort["id"]), "report"]), planned
    # DVC's status names the stage whose params changed, and its repro would run it (its run cache
    # holds β = 1000's outputs: restored, not retrained); the report follows once they change
    status = _sh(["dvc", "status", CI_PIPELINE], ci_run).stdout
    assert re.findall(r"^pipelines/ci/dvc\.yaml:(\S+):$", status, re.M) == [stage], status
    dry = _sh(["dvc", "repro", "--dry", CI_PIPELINE], ci_run).stdout
    assert re.findall(r"Running stage 'pipelines/ci/dvc\.yaml:([^']+)'", dry) == [stage], dry
    _sh([*SNAKEMAKE_CI, "--cores", "2"], ci_run, timeout=900)
    _sh(["dvc", "commit", "-f", "-d", CI_PIPELINE], ci_run)
    assert _snakemake_plans(ci_run) == []
    _dvc_clean(ci_run)
    assert (ci_run / "results/ci/table2.md").read_text() == table_before


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


def _readme_using_it_commands() -> list[str]:
    """The commands of the README's "Using it" block, as written (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readmes_commands_work_as_written(ci_run):
    """Each command of "Using it" that needs no cluster, run as written but on the ci profile
    (the smoke profile's grid at a sixth of the cost) in the trained ci copy; the activation is
    the venv's bin first on PATH, which is what `source .venv/bin/activate` does. (The SLURM
    lines, and every command of docs/, are checked against the tools' --help by
    tests/test_docs.py; tests/slurm runs the SLURM profile.)"""
    commands = _readme_using_it_commands()
    assert commands[0] == "source .venv/bin/activate", "the block starts by activating the environment"
    ran, skipped = [], []
    for command in commands[1:]:
        if "--profile slurm" in command:
            skipped.append(command)   # needs a cluster
            continue
        command = command.replace("profile=smoke", "profile=ci").replace("--profile smoke", "--profile ci")
        command = command.replace("pipelines/smoke/", "pipelines/ci/")
        if " at ui " in f" {command} ":
            _check_ui(ci_run, command)
        else:
            done = subprocess.run(["bash", "-c", command], cwd=ci_run, env=_env(ci_run), capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        ran.append(command)
    assert len(skipped) == 2 and len(ran) == len(commands) - 3, (ran, skipped)
    for wanted in ("snakemake -n", "dvc repro", "--records-only", "snakemake --report", " at ui "):
        assert any(wanted in f" {c}" for c in ran), wanted
    assert (ci_run / "report.html").is_file()   # `snakemake --report report.html`
    # and the tools still agree afterwards
    assert _snakemake_plans(ci_run) == []
    _dvc_clean(ci_run)


def _check_ui(root: Path, command: str) -> None:
    """`python -m at ui` prints the runs table's address and becomes `mlflow ui` on the project's
    store (what it serves is checked in a real browser, test_mlflow_ui_in_a_real_browser; the
    server's own start takes half a minute here and is MLflow's)."""
    server = subprocess.Popen(["bash", "-c", f"exec {command} --port 5097"], cwd=root, env=_env(root),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = server.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:5097/#/experiments/\d+/runs\?\S+)", first)
        assert found, first
        assert "workflowType=machine_learning" in found.group(1) and "viewStateShareKey=at-runs" in found.group(1)
        deadline = time.monotonic() + 60
        cmdline: list[str] = []
        while "mlflow" not in cmdline and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
            cmdline = Path(f"/proc/{server.pid}/cmdline").read_text().split("\0")
        assert cmdline[cmdline.index("ui") - 1:][:3] == ["mlflow", "ui", "--backend-store-uri"], cmdline
        assert cmdline[cmdline.index("--backend-store-uri") + 1] == _env(root)["MLFLOW_TRACKING_URI"]
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


def _tree(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_a_shell_without_the_override_keeps_the_data_it_brought(ci_run):
    """The README's commands in a shell without AT_CIFAR10_URL/_MD5: the data that the override
    brought stays the source (its source.json says which params.yaml source it stands in for),
    so Snakemake plans nothing, DVC agrees, and the download command fetches nothing."""
    unset = {"AT_CIFAR10_URL": "", "AT_CIFAR10_MD5": ""}
    before = _tree(ci_run / "data" / "cifar10")
    assert json.loads((ci_run / "data/cifar10/source.json").read_text())["configured"] == {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a"}
    done = _sh([*SNAKEMAKE_CI, "--dry-run"], ci_run, env=unset, timeout=300)
    assert "Nothing to be done" in done.stdout + done.stderr, done.stdout
    _dvc_clean(ci_run)
    done = _sh([sys.executable, "-m", "at", "download", "cifar10"], ci_run, env=unset)
    assert done.stdout.strip() == "cifar10 ready in data/cifar10/cifar-10-batches-py"
    assert _tree(ci_run / "data" / "cifar10") == before


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mistyped path", "unreachable host"])
def test_a_download_that_cannot_start_is_refused_before_snakemake_deletes_the_data(ci_run, where):
    """Snakemake deletes a job's outputs before the job starts: a switch of source that cannot
    be fetched is refused when Snakemake reads the workflow, in one line, the data untouched."""
    import socket

    if where == "mistyped path":
        url = str(ci_run / "no-such-dir" / "cifar-10-python.tar.gz")
    else:
        with socket.socket() as s:   # a port nobody listens on: the connection is refused at once
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"
    before = _tree(ci_run / "data" / "cifar10")
    done = _sh([*SNAKEMAKE_CI, "--cores", "1"], ci_run, env={"AT_CIFAR10_URL": url}, check=False, timeout=300)
    assert done.returncode != 0
    # Snakemake's console folds a long line after its commas (at.snakemake_log): one line, unfolded
    said = [line for line in snakemake_log.unfold(done.stdout + done.stderr).splitlines() if "cannot start" in line]
    assert len(said) == 1 and "the data is left as it is: fix or unset AT_CIFAR10_URL" in said[0], done.stderr
    assert _tree(ci_run / "data" / "cifar10") == before


@pytest.mark.slow
def test_a_failed_download_through_dvc_keeps_the_data(ci_run, tmp_path):
    """params.yaml names another source that cannot be fetched: `dvc repro` of the download stage
    fails and the data stays (the stage's output persists; the download replaces it only when
    the new data is checked)."""
    before = _tree(ci_run / "data" / "cifar10")
    params = ci_run / "params.yaml"
    original = params.read_text()
    missing = tmp_path / "gone" / "cifar-10-python.tar.gz"
    try:
        params.write_text(original.replace("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(missing)))
        done = _sh(["dvc", "repro", "dvc.yaml:download-cifar10"], ci_run,
                   env={"AT_CIFAR10_URL": "", "AT_CIFAR10_MD5": ""}, check=False, timeout=300)
        assert done.returncode != 0
        assert f"error: could not open {missing}" in done.stderr
        assert _tree(ci_run / "data" / "cifar10") == before
    finally:
        params.write_text(original)


@pytest.mark.slow
def test_switching_the_archive_is_seen_by_snakemake_and_dvc(ci_run, tmp_path):
    """Another archive through the same override: Snakemake plans the download and every job
    after it; once downloaded, DVC sees the new URL and md5 in every training stage's params.
    (The module's last test: it leaves ci_run's data switched.)"""
    from cifar_archives import make_cifar10, md5

    archive = tmp_path / "other-cifar-10-python.tar.gz"
    make_cifar10(archive, seed=3)
    switched = {"AT_CIFAR10_URL": str(archive), "AT_CIFAR10_MD5": md5(archive)}
    done = _sh([*SNAKEMAKE_CI, "--dry-run", "--printshellcmds"], ci_run, env=switched, timeout=300)
    planned = parse_dry_run(done.stdout)
    rules = sorted(j["rule"] for j in planned)
    assert "download" in rules and sum(r.startswith("train_") for r in rules) == len(
        _ci_runs(ci_run, "--cohorts"))
    _sh([*SNAKEMAKE_CI, "--cores", "1", "data/cifar10"], ci_run, env=switched, timeout=300)
    status = _sh(["dvc", "status", CI_PIPELINE], ci_run, env=switched).stdout
    assert status.count("data/cifar10/source.json:") == sum(r.startswith("train_") for r in rules), status
    assert "modified:           md5" in status and "modified:           url" in status, status
