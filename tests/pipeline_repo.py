"""What the pipeline tests share: a copy of the repository to run the real tools in, and readers
of what each tool says it runs. The tests: test_pipeline_parity.py (Snakemake and DVC plan the
same DAG as the grid, no training) and test_pipeline.py (the ci profile end to end).

Formerly one module; split so that pytest-xdist runs the two on different workers.

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

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


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
    format changed, and the parity test must say so instead of comparing empty sets. The
    Snakefile folds Snakemake's long lines (at.snakemake_log); they are joined back first.
    """
    from at.snakemake_log import unfold

    jobs: list[dict] = []
    job: dict | None = None
    for line in unfold(text).splitlines():
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
                    f"pipelines/{profile}/dvc.yaml", "dvc.yaml"):   # the root: downloads, default profile
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
                "persist": sorted(o.def_path for o in outs if o.persist),
            })
    return stages


def _train_jobs(jobs: list[dict]) -> dict[str, dict]:
    """Snakemake's training jobs by the cohort they train (one job per cohort)."""
    found = {}
    for job in jobs:
        if job["rule"].startswith("train_"):
            cohort = _option(_argv(job["shell"]), "--cohort")
            assert cohort not in found, f"cohort {cohort} has two jobs"
            found[cohort] = job
    return found
