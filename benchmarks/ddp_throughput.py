"""Images/s of one run trained on N processes (data parallel, at.distributed) against one process.

Each configuration trains the same run, a WRN-16-1 baseline (``--model``, ``--method``) at one
global batch size, with the trainer's own code: ``at.start.build_cohort`` builds the member (wrapped
in DistributedDataParallel on N > 1 processes, its BatchNorm global with ``--sync-bn``), its
``DataStream`` draws each rank's slice of every batch, ``at.train.cohort_step`` trains it. The data are
random uint8 CIFAR-shaped images (benchmarks/cohort_throughput.py's SyntheticData): a step costs
the same whatever the pixels are. One process runs the plain one-process path (no process
group, no DDP), started as a subprocess; N > 1 processes are started by real torchrun (gloo on
the CPU, nccl on CUDA).

The figure of merit is the run's **images/s**: global batch x timed steps / timed seconds (rank
0's clock, every rank past the same barrier before it starts and before it stops).

    python benchmarks/ddp_throughput.py --out ddp-cpu.json                      # 1 and 2 processes, CPU
    python benchmarks/ddp_throughput.py --processes 1 2 4 8 --device cuda --batch 256 --model resnet18

On a CPU, give each process its own cores (``--threads``, default 1 per process): N processes
of one thread against one process of one thread measure what data parallelism buys per core;
``--threads-single`` gives the one-process run more threads (e.g. all of them) for the other
comparison. Timings depend on what else the machine runs: read ``load_average`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # the repository's `at`, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))


def _spec(config: dict) -> dict:
    from at import params as params_mod

    params = params_mod.load(ROOT / "params.yaml")
    protocol = params_mod.protocol(params, "cifar")
    protocol.update({"batch_size": config["batch"], "precision": config["precision"],
                     "processes": config["processes"], "sync_bn": config["sync_bn"]})
    return {"id": "benchmark/ddp", "dataset": "cifar10", "data_dir": "synthetic-data-never-read",
            "student": config["model"], "method_name": config["method"],
            "method": params_mod.method(params, config["method"]), "seed": 0,
            "out_dir": str(Path(config["workdir"]) / "never-written"), "num_classes": 10, "protocol": protocol}


def worker(config_path: str, result_path: str) -> None:
    """One rank (or the one process): build the cohort of one, warm up, time, report on rank 0."""
    from cohort_throughput import SyntheticData, endless_batches

    from at import distributed
    from at.precision import Arithmetic
    from at.spec import RunSpec
    from at.start import build_cohort
    from at.train import begin_epoch, cohort_step, loss_weight

    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(config["threads"])
    ranks = distributed.from_environment()
    device = torch.device(config["device"])
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.backends.cudnn.benchmark = True
    ranks.start(device)
    spec = RunSpec.resolve(_spec(config))
    data = SyntheticData(config["dataset_size"], 10, device, seed=0)
    cohort = build_cohort([spec], Arithmetic(device, config["precision"]), data=data, ranks=ranks)
    member = cohort.members[0]
    begin_epoch(member)
    batches = endless_batches(cohort.stream)
    steps_per_epoch = cohort.stream.steps_per_epoch

    def run(steps: int, offset: int) -> None:
        for i in range(steps):
            x, y = next(batches)
            cohort_step(cohort, x, y, [member], loss_weight(cohort, (offset + i) % steps_per_epoch))

    run(config["warmup"], 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ranks.any(False)   # a barrier: every rank starts the clock together
    tick = time.perf_counter()
    run(config["steps"], config["warmup"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ranks.any(False)
    seconds = time.perf_counter() - tick
    loss_finite = bool(torch.isfinite(member.partial["loss"]))
    if ranks.is_main:
        Path(result_path).write_text(json.dumps({
            "processes": ranks.world_size, "seconds": seconds, "steps": config["steps"], "batch": config["batch"],
            "images_per_s": config["batch"] * config["steps"] / seconds, "loss_finite": loss_finite}))
    ranks.stop()


def measure(config: dict, workdir: Path) -> dict:
    name = f"p{config['processes']}"
    config_path, result_path = workdir / f"{name}.json", workdir / f"{name}.result.json"
    config_path.write_text(json.dumps(config))
    me = [str(Path(__file__).resolve()), "--worker", str(config_path), str(result_path)]
    if config["processes"] == 1:
        command = [sys.executable, *me]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={config['processes']}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
    load_before = os.getloadavg()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the {name} measurement failed:\n{done.stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    result.update(threads_per_process=config["threads"], load_average_before=load_before,
                  load_average_after=os.getloadavg(), command=" ".join(command))
    return result


def main(argv=None) -> int:
    from at.method import BASELINE_METHOD
    from at.precision import PRECISIONS, Precision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wrn-16-1")
    parser.add_argument("--method", default=BASELINE_METHOD)
    parser.add_argument("--batch", type=int, default=128, help="the global batch size")
    # a precision that names its arithmetic (auto would be whichever this machine picks)
    parser.add_argument("--precision", default=Precision.FLOAT32.value,
                        choices=[p for p in PRECISIONS if p != Precision.AUTO])
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--threads-single", type=int, help="torch threads of the one-process run (default: --threads)")
    parser.add_argument("--dataset-size", type=int, default=4096)
    parser.add_argument("--out", default="ddp-throughput.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if any(p < 1 or args.batch % p for p in args.processes):
        parser.error(f"--batch {args.batch} must split evenly over each of --processes {args.processes}")
    if args.device.startswith("cuda") and torch.cuda.device_count() < max(args.processes):
        parser.error(f"--processes {max(args.processes)} needs as many CUDA devices; this machine has "
                     f"{torch.cuda.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="at-ddp-bench-") as tmp:
        for processes in args.processes:
            threads = args.threads_single if processes == 1 and args.threads_single else args.threads
            config = {"processes": processes, "device": args.device, "model": args.model, "method": args.method,
                      "batch": args.batch, "precision": args.precision, "sync_bn": args.sync_bn,
                      "steps": args.steps, "warmup": args.warmup, "threads": threads,
                      "dataset_size": args.dataset_size, "workdir": tmp}
            rows.append(measure(config, Path(tmp)))
            print(f"{processes} process(es) x {threads} thread(s): {rows[-1]['images_per_s']:.1f} images/s",
                  flush=True)
    single = next((r["images_per_s"] for r in rows if r["processes"] == 1), None)
    report = {
        "benchmark": "ddp_throughput", "device": args.device, "model": args.model, "method": args.method,
        "batch": args.batch, "precision": args.precision, "sync_bn": args.sync_bn, "steps": args.steps,
        "warmup": args.warmup, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "rows": rows,
        "speedup_over_one_process": {str(r["processes"]): r["images_per_s"] / single for r in rows} if single else None,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
