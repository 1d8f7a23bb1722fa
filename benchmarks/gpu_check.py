"""Everything that needs a CUDA GPU, in one command (``make gpu-check``).

On a machine with a CUDA GPU this runs, each step logged to its own file in one folder
(``gpu-check/<UTC time>/`` by default):

1. ``tests``: the tests marked ``cuda`` (``pytest -m cuda``; they skip without a GPU);
2. ``benchmark``: the cohort benchmark (benchmarks/cohort_throughput.py) on CUDA, in float32
   and bf16 eager and at auto (precision, layout and compile measured as training decides them);
   ``benchmark-modes``: bf16 eager, compiled (``--compile on``) and under CUDA graphs
   (``reduce-overhead``), each at 1, 2 and 4 cohorts sharing the GPU: what ``auto`` weighs on
   CUDA, measured;
3. ``data``: the CIFAR-10 mini subset prepared by ``python -m at download cifar10``, its url
   and md5 given through AT_CIFAR10_URL / AT_CIFAR10_MD5, as a user overrides a source;
4. ``teacher`` and 5. ``cohort``: a short real training on the GPU with ``python -m at train
   --spec``: the paper's WRN-16-2 teacher, then the 8 runs of the paper's WRN-16-1 cohort from
   it, on the mini data.

Without a CUDA GPU it refuses in one line and writes nothing; ``--dry-run`` lists the steps and
their commands without running anything (and without needing a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (REPO, HERE):   # the `at` package, and the benchmark beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import cohort_throughput  # noqa: E402

MINI_MD5 = "1c190744c9595cc62078be24b4b038fb"
MINI_NAME = "cifar10-mini-python.tar.gz"


def default_tarball() -> Path:
    shared = Path(os.environ.get("AT_SHARED_DIR", REPO.parent / "shared"))
    return shared / "data" / MINI_NAME


@dataclass
class Step:
    """One command of the check: its log is ``<folder>/<name>.log``; it is skipped when a step
    it needs did not succeed."""

    name: str
    what: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()


def training_specs(folder: Path, epochs: int, params_path: Path) -> tuple[dict, list[dict]]:
    """The teacher's spec and the cohort's specs: the paper's runs (at.grid), on the mini data in
    ``folder``, trained for ``epochs`` epochs, writing into ``folder/runs``."""
    from at import grid, params as at_params

    params = at_params.load(params_path)
    found = grid.find_cohort(params, cohort_throughput.COHORT, cohort_throughput.PROFILE)
    (teacher_run,) = found.teacher_runs
    data_dir = str(folder / "data" / "cifar10")

    def local(spec: dict) -> dict:
        spec = copy.deepcopy(spec)
        spec["data_dir"] = data_dir
        spec["out_dir"] = str(folder / "runs" / spec["id"])
        spec["protocol"]["epochs"] = epochs
        return spec

    teacher = local(grid.run_spec(params, teacher_run, cohort_throughput.PROFILE).to_dict())
    members = [local(grid.run_spec(params, run, cohort_throughput.PROFILE).to_dict()) for run in found.runs]
    for spec in members:
        if spec["teacher_checkpoint"]:
            spec["teacher_checkpoint"] = str(Path(teacher["out_dir"]) / "checkpoint.pt")
    return teacher, members


def plan(folder: Path, args: argparse.Namespace) -> list[Step]:
    python = sys.executable
    at_cli = [python, "-m", "at", "--params", str(args.params)]
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns.db'}"}
    return [
        # tests/slurm is left out: its conftest.py, collected first, would shadow tests/conftest.py
        # for the test modules that import from `conftest` (and no SLURM test needs CUDA)
        Step("tests", "the tests marked cuda",
             [python, "-m", "pytest", "-m", "cuda", "-q", "-rs", str(REPO / "tests"),
              "--ignore", str(REPO / "tests" / "slurm")]),
        Step("benchmark", "the cohort benchmark on CUDA: float32 and bf16 eager, and auto (what training does)",
             [python, str(HERE / "cohort_throughput.py"), "--device", "cuda", "--precision", "float32", "bf16",
              "auto", "--steps", str(args.steps), "--warmup", str(args.warmup), "--params", str(args.params),
              "--output", str(folder / "benchmark-cohort.json")]),
        # what auto considers on CUDA, measured where it can be: torch.compile with and without
        # CUDA graphs, and several cohorts sharing the GPU (their run-images/s added up)
        Step("benchmark-modes", "bf16 eager, compiled and under CUDA graphs, 1, 2 and 4 cohorts per GPU",
             [python, str(HERE / "cohort_throughput.py"), "--device", "cuda", "--precision", "bf16",
              "--compile", "off", "on", "reduce-overhead", "--cohorts-per-device", "1", "2", "4", "--solo",
              "reference", "--steps", str(args.steps), "--warmup", str(max(args.warmup, 3)), "--params",
              str(args.params), "--output", str(folder / "benchmark-modes.json")]),
        Step("data", "the CIFAR-10 mini subset, prepared by `python -m at download`",
             [*at_cli, "download", "cifar10", "--root", str(folder / "data" / "cifar10")],
             env={"AT_CIFAR10_URL": Path(args.mini_tarball).resolve().as_uri(), "AT_CIFAR10_MD5": MINI_MD5}),
        Step("teacher", f"the WRN-16-2 teacher, {args.epochs} epoch(s) on the GPU",
             [*at_cli, "train", "--spec", str(folder / "teacher.yaml"), "--device", "cuda", "--no-progress"],
             env=tracking, needs=("data",)),
        Step("cohort", f"the paper's 8-run WRN-16-1 cohort from it, {args.epochs} epoch(s) on the GPU",
             [*at_cli, "train", "--spec", str(folder / "cohort.yaml"), "--device", "cuda", "--no-progress"],
             env=tracking, needs=("teacher",)),
    ]


def _run(step: Step, folder: Path) -> tuple[int, float]:
    """Run a step, its output both on the terminal and in its log."""
    env = {**os.environ, **step.env,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    tick = time.perf_counter()
    with open(folder / f"{step.name}.log", "w") as log:
        log.write("$ " + " ".join(step.command) + "\n")
        log.flush()
        proc = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        returncode = proc.wait()
    return returncode, time.perf_counter() - tick


def _members_outcome(members: list[dict]) -> dict:
    out = {}
    for spec in members:
        path = Path(spec["out_dir"]) / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            out[spec["id"]] = {k: metrics.get(k) for k in ("final_test_error", "final_epoch", "precision")}
        else:
            out[spec["id"]] = None
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the logs and reports (default: gpu-check/<UTC time>)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their commands; run nothing")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the short training (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50,
                        help="timed steps of each benchmark configuration (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="benchmark warm-up steps (default: %(default)s)")
    parser.add_argument("--mini-tarball", type=Path, default=default_tarball(),
                        help=f"the CIFAR-10 mini tarball (default: $AT_SHARED_DIR/data/{MINI_NAME})")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args(argv)
    for name in ("epochs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be an integer >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = (args.out or REPO / "gpu-check" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")).resolve()
    steps = plan(folder, args)
    if args.dry_run:
        print(f"gpu-check would write to {folder}:")
        for i, step in enumerate(steps, 1):
            needs = f" (after {', '.join(step.needs)})" if step.needs else ""
            env = "".join(f"{k}={v} " for k, v in step.env.items())
            print(f"{i}. {step.name}: {step.what}{needs}\n   {env}{' '.join(step.command)}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: error: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
              "run it where one is", file=sys.stderr)
        return 2
    if not Path(args.mini_tarball).is_file():
        print(f"gpu-check: error: the CIFAR-10 mini tarball {args.mini_tarball} does not exist "
              f"(set AT_SHARED_DIR or --mini-tarball)", file=sys.stderr)
        return 2
    if folder.exists() and any(folder.iterdir()):
        print(f"gpu-check: error: {folder} exists and is not empty; give another --out", file=sys.stderr)
        return 2

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    teacher, members = training_specs(folder, args.epochs, args.params)
    (folder / "teacher.yaml").write_text(yaml.safe_dump([teacher]))
    (folder / "cohort.yaml").write_text(yaml.safe_dump(members))

    outcome: dict[str, dict] = {}
    for step in steps:
        blocked = [n for n in step.needs if outcome.get(n, {}).get("status") != "ok"]
        if blocked:
            outcome[step.name] = {"status": "skipped", "because": f"{', '.join(blocked)} did not succeed",
                                  "command": step.command}
            print(f"== {step.name}: skipped ({', '.join(blocked)} did not succeed)", flush=True)
            continue
        print(f"== {step.name}: {step.what}", flush=True)
        returncode, seconds = _run(step, folder)
        outcome[step.name] = {"status": "ok" if returncode == 0 else "failed", "returncode": returncode,
                              "seconds": round(seconds, 1), "log": f"{step.name}.log", "command": step.command}
    members_outcome = _members_outcome(members)
    if outcome["cohort"]["status"] == "ok":
        wrong = [run for run, m in members_outcome.items() if m is None or m["precision"] != "bf16"]
        if wrong:   # precision auto is bf16 on CUDA: anything else means the GPU path was not taken
            outcome["cohort"].update(status="failed", problem=f"missing metrics or not bf16: {wrong}")
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "steps": outcome, "cohort_members": members_outcome}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [name for name, o in outcome.items() if o["status"] != "ok"]
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)} (logs and summary.json in {folder})", file=sys.stderr)
        return 1
    print(f"gpu-check: all {len(steps)} steps passed; logs, reports and summary.json in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
