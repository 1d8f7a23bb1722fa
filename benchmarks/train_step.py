"""Throughput and peak memory of one full training step, written to a JSON report.

A step here is the step of ``at.train.train``, built from the same pieces: a random batch
indexed out of an in-memory uint8 CIFAR-shaped tensor on the device (``TensorData.train_batch``:
random crop with reflect padding, flip, normalisation), channels_last and bf16 autocast as
``at.train.Options`` resolves them, the method's ``Objective`` (student and frozen teacher),
backward, the trainer's SGD step, then the trainer's per-step bookkeeping (``loss.item()``,
which waits for the device, the correct count and the per-term values). The images are random
(synthetic uint8): a step costs the same whatever the pixels are, and no download is needed.

Every case runs in a fresh subprocess, so that its peak memory is its own: the CUDA peak
statistics, and the host memory, whose process-wide high-water mark only ever grows.

    python benchmarks/train_step.py                      # all cases, batch 128, this device
    python benchmarks/train_step.py --cases student at --bf16 on --channels-last on

See benchmarks/README.md for the report's fields.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a plain script (python benchmarks/train_step.py), sys.path holds benchmarks/, not the
# repository root where the `at` package lives.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from at import models  # noqa: E402
from at import params as at_params  # noqa: E402
from at.method import Objective, Progress, requires_teacher  # noqa: E402
from at.data.sources import TensorData  # noqa: E402
from at.train import Options, _optimizer, training_step  # noqa: E402

REPORT_FORMAT = "at-benchmark-train-step"
REPORT_VERSION = 1

# Case name -> params.yaml method. Any other params.yaml method name is a case too.
CASE_ALIASES = {"student": "baseline", "at": "at-sum-p2", "kd": "kd", "grad-at": "grad-at"}
DEFAULT_CASES = ("student", "at", "kd", "grad-at")
# The optimizer's hyperparameters (and the epoch count that schedules see) come from the
# CIFAR protocol of params.yaml, as in the runs being benchmarked.
PROTOCOL = "cifar"
CIFAR_TRAIN_SIZE = 50_000
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Host memory


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB elsewhere


def rss_bytes() -> int | None:
    """Current resident set size."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False where
    that is not possible, and the peak then covers the whole worker process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> tuple[int, str]:
    """(peak RSS in bytes, its source).

    VmHWM is the high-water mark of this process's own address space. getrusage's ru_maxrss
    is not used where VmHWM exists: Linux carries the parent's RSS at fork over into the
    child's ru_maxrss, so a subprocess started by a 400 MiB Python would report >= 400 MiB.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    return _ru_maxrss_bytes(), "ru_maxrss"


# ---------------------------------------------------------------------------------------------
# Device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_device(device: torch.device) -> dict:
    info = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu_name": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 2),
            "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        })
    return info


def device_kind(description: dict) -> str:
    """``cpu`` or ``cuda-<gpu name>`` in lower case, for the report's file name."""
    if description["type"] == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", description["gpu_name"].lower()).strip("-")
    return description["type"]


def resolve_device(options: Options) -> tuple[torch.device, bool, bool]:
    """Options.resolve, with a clear error for a device this machine does not have."""
    try:
        device, bf16, channels_last = options.resolve()
    except RuntimeError as e:  # torch.device("nonsense")
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {options.device!r} ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {options.device!r}: CUDA is not available on this machine; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {options.device!r}")
    return device, bf16, channels_last


# ---------------------------------------------------------------------------------------------
# The measured step (inside a worker process)


class SyntheticData(TensorData):
    """TensorData holding random uint8 images instead of a CIFAR folder: the trainer's own
    batching and augmentation (``train_batch``), without a download."""

    def __init__(self, size: int, device: torch.device, seed: int):
        cpu = torch.Generator().manual_seed(seed)
        self.md5 = "synthetic"
        self.train_x = torch.randint(0, 256, (size, *IMAGE_SHAPE), dtype=torch.uint8, generator=cpu).to(device)
        self.train_y = torch.randint(0, NUM_CLASSES, (size,), generator=cpu).to(device)
        self.test_x, self.test_y = self.train_x[:0], self.train_y[:0]
        self.crop, self.flip = True, True  # the CIFAR protocol's crop_flip


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values)}


def run_case(config: dict) -> dict:
    """Build one case, run warm-up and timed steps, return its measurements."""
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    options = Options(device=config["device"], bf16=config["bf16"], channels_last=config["channels_last"])
    device, use_bf16, use_channels_last = resolve_device(options)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer
    setup_tick = time.perf_counter()
    torch.manual_seed(config["seed"])
    data = SyntheticData(config["dataset_size"], device, config["seed"])
    student = models.build(config["student"], num_classes=NUM_CLASSES).to(device)
    teacher = None
    if config["teacher"] is not None:
        teacher = models.build(config["teacher"], num_classes=NUM_CLASSES).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    objective = Objective(config["method_spec"], student, teacher, input_shape=IMAGE_SHAPE).to(device)
    if use_channels_last:
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    protocol = config["protocol"]
    trainable = list(student.parameters()) + list(objective.parameters())
    optimizer = _optimizer(trainable, protocol, protocol["lr"])
    generator = torch.Generator(device=device)
    generator.manual_seed(config["seed"])
    progress = Progress(epoch=0, epochs=protocol["epochs"], lr_factor=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    student.train()
    batch, n = config["batch"], len(data.train_y)

    def step(idx: torch.Tensor) -> float:
        """at.train.train's step, bookkeeping included."""
        x, y = data.train_batch(idx, generator)
        loss, _, _ = training_step(objective, optimizer, x, y, progress, autocast, use_channels_last)
        if not math.isfinite(loss):
            raise RuntimeError(f"case {config['case']}: the loss became {loss}; the benchmark's step diverged")
        return loss

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    rss_before = rss_bytes()
    peak_reset = reset_peak_rss()
    setup_s = time.perf_counter() - setup_tick

    warmup, steps = config["warmup"], config["steps"]
    times: list[float] = []
    perm, position = None, n
    bar = tqdm(total=warmup + steps, desc=f"{config['case']:>8}", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not config["progress"])
    cpu_start = wall_start = 0.0
    for i in range(warmup + steps):
        if position + batch > n:  # a new epoch's order, outside the timing as in the trainer
            perm, position = torch.randperm(n, generator=generator, device=device), 0
        idx = perm[position:position + batch]
        position += batch
        if i == warmup:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
        tick = time.perf_counter()
        loss = step(idx)
        elapsed = time.perf_counter() - tick
        if i >= warmup:
            times.append(elapsed)
        bar.update(1)
        bar.set_postfix(phase="warm-up" if i < warmup else "timed", loss=f"{loss:.3f}", refresh=False)
    timed_wall = time.perf_counter() - wall_start
    timed_cpu = time.process_time() - cpu_start
    bar.close()

    peak, peak_source = peak_rss()
    memory = {
        "rss_before_steps_mib": None if rss_before is None else rss_before / MIB,
        "peak_rss_mib": peak / MIB,
        "peak_rss_source": peak_source,
        # "steps": the high-water mark was reset just before the first step; "process": it
        # covers the whole worker (import, setup), as no reset was possible.
        "peak_rss_scope": "steps" if peak_reset and peak_source == "VmHWM" else "process",
        "step_rss_growth_mib": None if rss_before is None else (peak - rss_before) / MIB,
    }
    if device.type == "cuda":
        memory.update({
            "cuda_allocated_before_steps_mib": cuda_before / MIB,
            "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "cuda_peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB,
            "cuda_step_growth_mib": (torch.cuda.max_memory_allocated(device) - cuda_before) / MIB,
        })
    return {
        "device": describe_device(device),
        "bf16": use_bf16,
        "channels_last": use_channels_last,
        "student_params": models.parameter_count(student),
        # parameter_count counts trainable parameters, and the frozen teacher has none
        "teacher_params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else None,
        "step_s": times,
        "timed_s": timed_wall,
        # CPU seconds of this process per wall second while timed: below the thread count,
        # the step waited (for other processes' use of the cores, or for the GPU).
        "cpu_cores_used": timed_cpu / timed_wall if timed_wall > 0 else None,
        "setup_s": setup_s,
        "final_loss": loss,
        "memory": memory,
    }


def _worker_main(config_path: str, result_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    result = run_case(config)
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver (parent process)


def resolve_cases(names: list[str], params: dict) -> list[tuple[str, str]]:
    """[(case name, params.yaml method name)], checked against params.yaml."""
    methods = params.get("methods", {})
    allowed = list(CASE_ALIASES) + [m for m in methods if m not in CASE_ALIASES.values()]
    cases = []
    for name in names:
        method = CASE_ALIASES.get(name, name)
        if method not in methods:
            raise ValueError(f"--cases: unknown case {name!r}; allowed: {', '.join(allowed)} "
                             f"(aliases: {', '.join(f'{k}={v}' for k, v in CASE_ALIASES.items())})")
        if name in [c for c, _ in cases]:
            raise ValueError(f"--cases: case {name!r} is given twice")
        cases.append((name, method))
    return cases


def default_output(kind: str, args: argparse.Namespace) -> Path:
    """benchmarks/reports/<device kind>.json; flags that are not `auto` are named in the file
    name, so that measuring an alternative does not overwrite the default report."""
    suffix = "".join(f"-{flag}-{value}" for flag, value in
                     (("bf16", args.bf16), ("channels-last", args.channels_last)) if value != "auto")
    return REPO / "benchmarks" / "reports" / f"{kind}{suffix}.json"


def _spawn_case(config: dict, workdir: Path) -> tuple[dict, float]:
    config_path, result_path = workdir / f"{config['case']}.config.json", workdir / f"{config['case']}.result.json"
    config_path.write_text(json.dumps(config))
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           str(config_path), str(result_path)])
    wall = time.perf_counter() - tick
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"case {config['case']!r} failed: its worker exited with status "
                           f"{proc.returncode} (its error is printed above); no report written")
    return json.loads(result_path.read_text()), wall


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(report: dict) -> str:
    cuda = report["device"]["type"] == "cuda"
    header = ["case", "img/s med", "img/s mean", "img/s min-max", "step ms med",
              "peak alloc MiB" if cuda else "peak RSS MiB", "step growth MiB", "load 1m", "wall s"]
    rows = []
    for name, case in report["cases"].items():
        ips, mem = case["images_per_s"], case["memory"]
        peak = mem["cuda_peak_allocated_mib"] if cuda else mem["peak_rss_mib"]
        growth = mem["cuda_step_growth_mib"] if cuda else mem["step_rss_growth_mib"]
        rows.append([name, _fmt(ips["median"]), _fmt(ips["mean"]), f"{ips['min']:,.0f}-{ips['max']:,.0f}",
                     _fmt(case["step_ms"]["median"], 1), _fmt(peak), _fmt(growth),
                     _fmt(case["load_average_after"][0], 2), _fmt(case["wall_time_s"], 1)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # the case name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Images/s and peak memory of a full training step (augmentation, objective "
                    "forward with the frozen teacher, backward, SGD step), written to a JSON report.")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="CASE",
                        help="student (the student alone, method baseline), at (at-sum-p2), kd, grad-at, "
                             "or any other method of params.yaml (default: %(default)s)")
    parser.add_argument("--student", default="wrn-16-1", help="student model (default: %(default)s)")
    parser.add_argument("--teacher", default="wrn-16-2",
                        help="teacher model, for the methods that need one (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before them, per case (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                        help="bf16 autocast (auto: on for CUDA, off on the CPU, as the trainer)")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="channels_last memory format (auto: on for CUDA, as the trainer)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--dataset-size", type=int, default=CIFAR_TRAIN_SIZE,
                        help="images in the synthetic in-memory training set (default: %(default)s, CIFAR-10's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="params.yaml with the methods and the cifar protocol (default: the repository's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report path (default: benchmarks/reports/<device kind>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name, low in (("batch", 1), ("steps", 1), ("warmup", 0), ("threads", 1), ("dataset_size", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")
    if args.dataset_size < args.batch:
        parser.error(f"--dataset-size ({args.dataset_size}) must be at least --batch ({args.batch})")
    for flag in ("student", "teacher"):
        if not models.is_known(getattr(args, flag)):
            parser.error(f"--{flag}: unknown model {getattr(args, flag)!r}; allowed forms: {models.ALLOWED_FORMS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    params = at_params.load(args.params)
    cases = resolve_cases(args.cases, params)
    protocol = at_params.protocol(params, PROTOCOL)
    # Fails here, before any case runs, on a bad --device or a CUDA device that is not there.
    device, use_bf16, use_channels_last = resolve_device(
        Options(device=args.device, bf16=args.bf16, channels_last=args.channels_last))

    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    results: dict[str, dict] = {}
    description = None
    with tempfile.TemporaryDirectory(prefix="at-bench-") as tmp:
        for i, (name, method) in enumerate(cases, 1):
            spec = at_params.method(params, method)
            teacher = args.teacher if requires_teacher(spec) else None
            print(f"[{i}/{len(cases)}] {name}: {args.student}"
                  + (f" from {teacher}" if teacher else "") + f", method {method}", flush=True)
            config = {"case": name, "method_spec": spec, "student": args.student, "teacher": teacher,
                      "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                      "device": str(device), "bf16": args.bf16, "channels_last": args.channels_last,
                      "threads": args.threads, "dataset_size": args.dataset_size, "seed": args.seed,
                      "protocol": protocol, "progress": not args.no_progress}
            load_before = os.getloadavg()
            worker, wall = _spawn_case(config, Path(tmp))
            description = description or worker["device"]
            per_step_ips = [args.batch / t for t in worker["step_s"]]
            results[name] = {
                "method": method, "method_spec": spec, "student": args.student, "teacher": teacher,
                "student_params": worker["student_params"], "teacher_params": worker["teacher_params"],
                "bf16": worker["bf16"], "channels_last": worker["channels_last"],
                # median/min/max of per-step rates; mean = all timed images / all timed seconds
                "images_per_s": {**_summary(per_step_ips),
                                 "mean": args.batch * len(worker["step_s"]) / sum(worker["step_s"])},
                "step_ms": _summary([1000 * t for t in worker["step_s"]]),
                "step_ms_all": [1000 * t for t in worker["step_s"]],
                "memory": worker["memory"],
                "cpu_cores_used": worker["cpu_cores_used"],
                "setup_s": worker["setup_s"],
                "timed_s": worker["timed_s"],
                "wall_time_s": wall,
                "final_loss": worker["final_loss"],
                "load_average_before": list(load_before),
                "load_average_after": list(os.getloadavg()),
            }

    from at.tracking import git_commit

    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": started.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "device": description,
        "settings": {
            "device": str(device), "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "bf16": use_bf16, "bf16_flag": args.bf16,
            "channels_last": use_channels_last, "channels_last_flag": args.channels_last,
            "threads": description["torch_threads"], "dataset_size": args.dataset_size,
            "seed": args.seed, "protocol": PROTOCOL, "augment": "crop_flip",
            "optimizer": {k: protocol.get(k) for k in ("lr", "momentum", "nesterov", "weight_decay")},
        },
        # (1, 5, 15)-minute load averages of the machine: the benchmark's own threads count
        # in them; more than the thread count means other processes competed for the cores.
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "cases": results,
    }
    output = args.output or default_output(device_kind(description), args)
    _write_atomic(output, json.dumps(report, indent=2) + "\n")
    print()
    print(f"{description.get('gpu_name') or description['cpu_model']}, torch {description['torch']}, "
          f"{description['torch_threads']} threads, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, bf16 {'on' if use_bf16 else 'off'}, "
          f"channels_last {'on' if use_channels_last else 'off'}")
    print(format_table(report))
    print(f"report: {output}")
    return report


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        try:
            main()
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
