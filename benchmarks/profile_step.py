"""Where a cohort step's time goes: torch.profiler over a few steps of the 8-run cohort.

Builds the cohort exactly as the throughput benchmark does (benchmarks/cohort_throughput.py: the
grid's run specs, random CIFAR-shaped images held on the device, a teacher with random weights),
runs ``--warmup`` untimed steps, then profiles ``--steps`` steps of ``at.train.cohort_step`` and prints
the operators that took the most self CPU time, with their share of the total and how many
times each was called per step. Shares are what to read on a shared machine: absolute times
move with the load, the breakdown much less.

    python benchmarks/profile_step.py --precision bf16
    python benchmarks/profile_step.py --precision float32 --steps 3 --top 25 --json /tmp/profile.json
    python benchmarks/profile_step.py --precision bf16 --compile on --layout channels_last
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import cohort_throughput as bench  # noqa: E402
from at import params as at_params  # noqa: E402
from at.execution import COMPILE_MODES, LAYOUTS  # noqa: E402
from at.precision import PRECISIONS  # noqa: E402
from at.precision import resolve as resolve_precision  # noqa: E402
from at.spec import RunSpec  # noqa: E402
from at.start import Options, build_cohort  # noqa: E402
from at.train import begin_epoch, cohort_step  # noqa: E402


def build(args, workdir: Path):
    params = at_params.load(args.params)
    specs = bench.cohort_specs(params, args.cohort, args.profile, args.members)
    specs, teachers = bench.benchmark_specs(specs, args.batch, workdir)
    for path, model_name in teachers.items():
        bench.write_random_teacher(Path(path), model_name, specs[0]["num_classes"], specs[0]["seed"])
    device = Options(device=args.device).resolve_device()
    options = Options(device=str(device), precision=args.precision, compile=args.compile, layout=args.layout)
    specs = [RunSpec.resolve(s) for s in specs]
    arithmetic = options.arithmetic(specs)
    data = bench.SyntheticData(args.dataset_size, specs[0].num_classes, device, specs[0].seed)
    cohort = build_cohort(specs, arithmetic, data=data, decider=options.decider())
    for member in cohort.members:
        begin_epoch(member)
    return cohort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES, help="(default: %(default)s)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="(default: %(default)s)")
    parser.add_argument("--cohort", default=bench.COHORT)
    parser.add_argument("--profile", default="mini", help="the grid profile (default: %(default)s)")
    parser.add_argument("--members", nargs="+", default=None, metavar="METHOD")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=20, help="operators listed (default: %(default)s)")
    parser.add_argument("--dataset-size", type=int, default=2048)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="at-profile-") as tmp:
        cohort = build(args, Path(tmp))
        members = cohort.members
        batches = bench.endless_batches(cohort.stream)
        for _ in range(args.warmup):
            x, y = next(batches)
            cohort_step(cohort, x, y, members)
        load = os.getloadavg()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tick = time.perf_counter()
            for _ in range(args.steps):
                x, y = next(batches)
                cohort_step(cohort, x, y, members)
            seconds = time.perf_counter() - tick
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "self_cpu_percent": 100.0 * e.self_cpu_time_total / total,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / args.steps,
             "calls_per_step": e.count / args.steps} for e in events]
    arithmetic = cohort.arithmetic
    networks = {f"{role} {model}": {"layout": arithmetic.layout_of((role, model)),
                                    "compile": arithmetic.compile_of((role, model))}
                for (role, model), _ in arithmetic.layouts}
    summary = {"precision": arithmetic.precision, "networks": networks, "members": len(members), "batch": args.batch,
               "steps": args.steps, "step_s": seconds / args.steps, "load_average": list(load),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "self_cpu_total_ms_per_step": total / 1000 / args.steps, "ops": rows}
    shown = "; ".join(f"{name} {n['layout']}, compile {n['compile']}" for name, n in networks.items())
    print(f"{len(members)} members, {arithmetic.precision} ({shown}), batch {args.batch}: "
          f"{summary['step_s'] * 1000:.0f} ms/step under the profiler, load {load[0]:.2f}/{load[1]:.2f}/"
          f"{load[2]:.2f}, {torch.get_num_threads()} threads")
    print(f"{'op':<44} {'self CPU %':>10} {'ms/step':>9} {'calls/step':>10}")
    for row in rows[:args.top]:
        print(f"{row['op'][:44]:<44} {row['self_cpu_percent']:>10.1f} {row['self_cpu_ms_per_step']:>9.1f} "
              f"{row['calls_per_step']:>10.0f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
