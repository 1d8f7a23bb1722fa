"""Run-images/s of a cohort against the same runs trained alone, per precision and execution mode,
written to a JSON report.

A cohort (at.train) trains runs that share a data stream in one process: each batch is drawn
and augmented once, each distinct teacher's forward runs once per batch, then every member takes
its own forward, backward and SGD step. This benchmark measures what that buys on a device: the
paper's 8-run WRN-16-1 cohort of Tables 1 and 2 (``cifar10/wrn-16-1/seed0/cohort0`` of the paper
profile: baseline, AT with sum/max and p = 1, 2, 4, KD, AT+KD and F-ActT, all from a WRN-16-2
teacher), trained as one cohort, against the same runs trained alone one after another (each a
cohort of one), in each mode asked for: a precision, a compile mode and a layout (at.execution:
``auto`` as ``python -m at train`` decides it, by a measurement cached per machine), at one or
several cohorts on the device at once.

Everything timed is the trainer's own code: ``at.start.build_cohort`` builds the members (students,
objectives, optimizers) and the teacher from the grid's run specs, ``Cohort.stream`` draws the
batches and ``at.train.cohort_step`` trains them. Only the data are stand-ins: random uint8 CIFAR-shaped
images held on the device (a step costs the same whatever the pixels are, and no download is
needed), and a teacher checkpoint with random weights.

The figure of merit is **run-images/s**: images trained per second summed over the runs, i.e.
members x images per batch x steps / timed seconds. Every configuration runs in a fresh
subprocess, so that its peak memory is its own.

    python benchmarks/cohort_throughput.py                       # float32, bf16 (eager) and auto; 8-run cohort
    python benchmarks/cohort_throughput.py --members baseline at-sum-p2 --steps 5 --device cpu
    python benchmarks/cohort_throughput.py --precision bf16 --compile off on --layout contiguous channels_last
    python benchmarks/cohort_throughput.py --device cuda --compile off on reduce-overhead --cohorts-per-device 1 2 4
    python benchmarks/cohort_throughput.py ... --note "machine shared with a training job" --commit cpu-epyc-2core
    python benchmarks/cohort_throughput.py --commit-existing benchmarks/reports/cpu-cohort.json --commit NAME

The report (format ``at-benchmark-cohort``, version 2; benchmarks/README.md says more of each
field; docs/benchmarks.md is generated from the reports committed in benchmarks/committed/):

    format, version, created (UTC), git_commit, command, note (--note, or null)
    device: type, torch, python, platform, cpu_model, cpu_flags {avx512_bf16, amx_bf16, amx_tile,
        avx512f: bool}, cpu_native_bf16, logical_cpus, usable_cpus, torch_threads,
        torch_interop_threads; on CUDA gpu_name, gpu_memory_gib, gpu_capability, cuda, cudnn
    settings: device, cohort, profile, members (methods), run_ids, students, teachers, batch, steps,
        warmup, precisions (resolved), precision_flags, auto_precision, compile_flags, layout_flags,
        cohorts_per_device, solo (every | reference), reference (its name), threads,
        execution_cache (where auto's measurements are cached), dataset_size, augment, optimizer
    load_average: {start, end}: the machine's 1/5/15-minute load averages
    results: {mode name: mode}, a mode name "<precision> / compile <c> / layout <l>[ / N cohorts]":
        precision (resolved), precision_asked (auto only for the auto mode), compile, layout (as
        asked), cohorts_per_device,
        chosen: {"<role> <model>": {layout, compile, how}}: what each network executed (auto's
            decision and why; a compilation that failed shows as compile off),
        cohort: row (N cohorts at once: their sums, with `processes`, one row each),
        solo: the runs alone (totals, with `runs`, one row each), or null (not measured),
        cohort_vs_solo: cohort over its solo run-images/s, or null,
        cohort_vs_reference_solo: cohort over reference_solo's run-images/s,
        cohort_vs_solo_per_cpu_s, cohort_vs_reference_solo_per_cpu_s: the same per CPU second
    reference_solo: the runs alone in float32, eager, contiguous: what every speedup compares to
    speedups: cohort_vs_solo {mode: x}, cohort_vs_reference_solo {mode: x},
        cohort_auto_vs_solo_float32 (the auto mode's cohort over reference_solo, or null),
        per_cpu_s: the same three of run-images per CPU second
    targets: [{name, description, threshold, comparison, value, value_per_cpu_s (the speedups),
        applies, met}]: met is judged on value (wall-clock run-images/s)
    row: members, images, timed_s, run_images_per_s, images_per_s_per_run, step_ms, warmup_s,
        setup_s, wall_time_s, cpu_cores_used, cpu_s (timed_s x cpu_cores_used),
        run_images_per_cpu_s, gpu_utilisation_percent {samples, mean, max,
        interval_s} or null, memory {peak_rss_mib, steps_peak_rss_mib, steps_peak_rss_scope,
        rss_before_steps_mib, peak_rss_source; CUDA: cuda_allocated_before_steps_mib,
        cuda_peak_allocated_mib, cuda_peak_reserved_mib}, mean_loss {run: loss},
        load_average_before, load_average_after
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a plain script (python benchmarks/cohort_throughput.py), sys.path holds benchmarks/, not
# the repository root where the `at` package lives.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from at import checkpoint, grid, models  # noqa: E402
from at import params as at_params  # noqa: E402
from at.data.sources import TensorData  # noqa: E402
from at.precision import NATIVE_BF16_CPU_FLAGS, PRECISIONS, Arithmetic, cpu_flags, cpu_has_native_bf16  # noqa: E402
from at.precision import resolve as resolve_precision  # noqa: E402
from at.spec import RunSpec  # noqa: E402
from at import execution  # noqa: E402
from at.execution import COMPILE_MODES, LAYOUTS  # noqa: E402
from at.start import Options, build_cohort  # noqa: E402
from at.train import begin_epoch, check_finite, cohort_step  # noqa: E402

REPORT_FORMAT = "at-benchmark-cohort"
REPORT_VERSION = 2

PROFILE = "paper"
COHORT = "cifar10/wrn-16-1/seed0/cohort0"
CIFAR_TRAIN_SIZE = 50_000
IMAGE_SHAPE = (3, 32, 32)
MIB = 2**20
# CPU flags worth knowing when reading a bf16 figure: the native-bf16 ones, and the AMX tile unit
CPU_FLAGS_OF_INTEREST = (*NATIVE_BF16_CPU_FLAGS, "amx_tile", "avx512f")
# How often the GPU's utilisation is sampled during the timed steps (nvidia-smi takes ~20-50 ms)
GPU_SAMPLE_INTERVAL_S = 0.2

# The targets of the issues (item 8, issue 36), recorded in the report as data: whether a machine
# meets them is a measurement, never a test assertion.
TARGETS = (
    {"name": "cohort_auto_vs_solo_float32", "threshold": 4.5, "comparison": ">=",
     "description": "run-images/s of the 8-run cohort at auto (precision, compile and layout) over the same "
                    "runs trained alone in float32, eager, contiguous, on a CPU with native bf16 (avx512_bf16 "
                    "or AMX)"},
    {"name": "cohort_auto_vs_solo_float32_without_native_bf16", "threshold": 2.5, "comparison": ">=",
     "description": "the same speedup on a CPU without native bf16 (where auto is float32)"},
    {"name": "cohort_vs_solo_float32", "threshold": 1.5, "comparison": ">=",
     "description": "run-images/s of the 8-run cohort over the same runs trained alone, both in float32, eager, "
                    "on a CPU"},
    {"name": "cohort_peak_rss_gib", "threshold": 4.0, "comparison": "<",
     "description": "peak resident memory (GiB) of the process training the 8-run cohort at auto on a CPU"},
)
PAPER_COHORT_SIZE = 8
# what every speedup compares to: the runs alone as the trainer ran float32 before issue 36
REFERENCE_NAME = "float32 / compile off / layout contiguous"
COMMITTED = REPO / "benchmarks" / "committed"
COMMIT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


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
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (value if sys.platform == "darwin" else value * 1024), "ru_maxrss"


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
    flags = cpu_flags()
    info = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST},
        "cpu_native_bf16": cpu_has_native_bf16(flags),
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


class GpuUtilisation:
    """Samples the GPU's utilisation (%) with nvidia-smi in a background thread.

    ``summary()`` is None where nvidia-smi is not installed or does not answer for this GPU, so
    that a report never shows a figure that was not measured."""

    def __init__(self, device: torch.device):
        self.tool = shutil.which("nvidia-smi")
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        self.gpu = None
        if self.tool:   # the first way of naming this GPU that nvidia-smi answers for
            self.gpu = next((gpu for gpu in self._names(device) if self._query(gpu) is not None), None)

    @staticmethod
    def _names(device: torch.device) -> list[str]:
        """This GPU as nvidia-smi names it: by UUID (CUDA_VISIBLE_DEVICES renumbers the indices
        torch sees), else by the index CUDA_VISIBLE_DEVICES maps torch's index to."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        names = []
        try:
            names.append(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
        except (AttributeError, RuntimeError):
            pass
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        names.append(visible[index] if index < len(visible) else str(index))
        return names

    def _query(self, gpu: str | None = None) -> float | None:
        try:
            out = subprocess.run([self.tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", gpu or self.gpu], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(GPU_SAMPLE_INTERVAL_S):
            value = self._query()
            if value is not None:
                self.samples.append(value)

    def __enter__(self):
        if self.gpu is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict | None:
        if self.gpu is None:
            return None
        s = self.samples
        return {"samples": len(s), "mean": sum(s) / len(s) if s else None, "max": max(s) if s else None,
                "interval_s": GPU_SAMPLE_INTERVAL_S}


# ---------------------------------------------------------------------------------------------
# One configuration (inside a worker process)


class SyntheticData(TensorData):
    """TensorData holding random uint8 CIFAR-shaped images instead of a prepared folder: the
    trainer's own batching and augmentation, without a download."""

    def __init__(self, size: int, num_classes: int, device: torch.device, seed: int):
        cpu = torch.Generator().manual_seed(seed)
        self.md5 = "synthetic"
        self.train_x = torch.randint(0, 256, (size, *IMAGE_SHAPE), dtype=torch.uint8, generator=cpu).to(device)
        self.train_y = torch.randint(0, num_classes, (size,), generator=cpu).to(device)
        self.test_x, self.test_y = self.train_x[:0], self.train_y[:0]
        self.crop, self.flip = True, True  # the CIFAR protocol's crop_flip


def endless_batches(stream):
    """The stream's batches, epoch after epoch (a new epoch's order drawn as the trainer does)."""
    while True:
        stream.start_epoch()
        yield from stream.batches(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: dict) -> dict:
    """Build the cohort of ``config['specs']``, run warm-up and timed steps, return measurements."""
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer
    arithmetic = Arithmetic(device, config["precision"])
    specs = [RunSpec.resolve(spec) for spec in config["specs"]]
    setup_tick = time.perf_counter()
    data = SyntheticData(config["dataset_size"], specs[0].num_classes, device, specs[0].seed)
    # layout and compile as `python -m at train --layout ... --compile ...` resolves them (auto:
    # measured once per machine, at.execution's cache)
    options = Options(device=config["device"], layout=config["layout"], compile=config["compile"])
    cohort = build_cohort(specs, arithmetic, data=data, decider=options.decider())
    batches = endless_batches(cohort.stream)
    members = cohort.members
    for member in members:
        begin_epoch(member)   # the running sums of an epoch, as the loop starts one

    gc.collect()
    _sync(device)
    setup_peak, _ = peak_rss()
    rss_before = rss_bytes()
    peak_reset = reset_peak_rss()
    cuda_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    setup_s = time.perf_counter() - setup_tick

    warmup_tick = time.perf_counter()
    for _ in range(config["warmup"]):
        x, y = next(batches)
        cohort_step(cohort, x, y, members)
    _sync(device)
    warmup_s = time.perf_counter() - warmup_tick
    if config.get("barrier"):
        _wait_for_the_others(**config["barrier"])

    images = 0
    with GpuUtilisation(device) if device.type == "cuda" else _NoSampler() as sampler:
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _ in range(config["steps"]):
            x, y = next(batches)
            cohort_step(cohort, x, y, members)
            images += len(y) * len(members)
        _sync(device)   # the device has finished every timed step before the clock is read
        timed_s = time.perf_counter() - wall_start
        timed_cpu = time.process_time() - cpu_start

    for member in members:   # after the clock: a diverged step would make the figure meaningless
        check_finite(member, None, 0)
    steps_peak, peak_source = peak_rss()
    memory = {
        "rss_before_steps_mib": None if rss_before is None else rss_before / MIB,
        # the whole worker's high-water mark (set-up and steps): what a job must be given
        "peak_rss_mib": max(setup_peak, steps_peak) / MIB,
        "peak_rss_source": peak_source,
        # the high-water mark of the steps alone where it could be reset before them, else the
        # whole worker's ("process")
        "steps_peak_rss_mib": steps_peak / MIB,
        "steps_peak_rss_scope": "steps" if peak_reset and peak_source == "VmHWM" else "process",
    }
    if device.type == "cuda":
        memory.update({
            "cuda_allocated_before_steps_mib": cuda_before / MIB,
            "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "cuda_peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB,
        })
    chosen = {}
    for (role, model), choice in cohort.choices.items():
        networks = [m.student for m in members if m.network == (role, model)] if role == "student" else \
            [m.teacher for m in members if m.teacher_network == (role, model)]
        compiled = any(execution.is_compiled(n) for n in networks)   # a failed compilation fell back
        chosen[f"{role} {model}"] = {"layout": choice.layout, "compile": choice.compile if compiled else "off",
                                     "how": choice.how}
    return {
        "device": describe_device(device),
        "chosen": chosen,
        "members": [m.id for m in members],
        "images": images,
        "timed_s": timed_s,
        "warmup_s": warmup_s,
        "setup_s": setup_s,
        # CPU seconds of this process per wall second while timed: below the thread count, the
        # steps waited (for other processes' use of the cores, or for the GPU)
        "cpu_cores_used": timed_cpu / timed_s if timed_s > 0 else None,
        "gpu_utilisation_percent": sampler.summary(),
        "memory": memory,
        # each member's mean loss over all its steps (warm-up included): finite, and the same
        # order of magnitude in every configuration
        "mean_loss": {m.id: float(m.partial["loss"]) / m.partial["seen"] for m in members},
    }


class _NoSampler:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def summary(self):
        return None


def _wait_for_the_others(folder: str, index: int, count: int, timeout_s: float = 3600.0) -> None:
    """Several cohorts on one device: each worker, warmed up, waits for all of them, so that
    their timed steps run at the same time."""
    Path(folder, f"ready-{index}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(folder).glob("ready-*"))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the other cohorts on this device were not ready within {timeout_s:.0f} s")
        time.sleep(0.01)


def _worker_main(config_path: str, result_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    result = measure(config)
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver (parent process)


def cohort_specs(params: dict, cohort_id: str, profile: str, methods: list[str] | None) -> list[dict]:
    """The run specs of a cohort of the grid, exactly as the pipeline trains them, optionally
    narrowed to some of its methods (in the order given)."""
    found = grid.find_cohort(params, cohort_id, profile)
    specs = [grid.run_spec(params, run, profile).to_dict() for run in found.runs]
    if not methods:
        return specs
    by_method = {s["method_name"]: s for s in specs}
    chosen = []
    for method in methods:
        if method not in by_method:
            raise ValueError(f"--members: {method!r} is not a method of cohort {cohort_id}; "
                             f"its methods: {', '.join(by_method)}")
        if by_method[method] in chosen:
            raise ValueError(f"--members: {method!r} is given twice")
        chosen.append(by_method[method])
    return chosen


def benchmark_specs(specs: list[dict], batch: int, workdir: Path) -> tuple[list[dict], dict[str, str]]:
    """The specs with the benchmark's batch size, output folders that are never written, a data
    folder that is never read, and teacher checkpoints (random weights) in ``workdir``.

    Returns the specs and {teacher checkpoint path: teacher model} to create."""
    teachers: dict[str, str] = {}
    out = []
    for spec in specs:
        spec = copy.deepcopy(spec)
        spec["protocol"]["batch_size"] = batch
        spec["data_dir"] = "synthetic-data-never-read"
        spec["out_dir"] = str(workdir / "runs" / spec["id"])
        if spec["teacher"] and not spec["teacher_weights"]:
            path = str(workdir / "teachers" / f"{spec['teacher']}.pt")
            teachers[path] = spec["teacher"]
            spec["teacher_checkpoint"] = path
        out.append(spec)
    return out, teachers


def write_random_teacher(path: Path, model_name: str, num_classes: int, seed: int) -> None:
    """A teacher checkpoint as a finished teacher run leaves it, with random weights: a
    forward costs the same with trained ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.build(model_name, num_classes=num_classes)
    spec = RunSpec.resolve({
        "id": f"benchmark-teacher/{model_name}", "dataset": "cifar10", "student": model_name,
        "method_name": "baseline", "method": {"terms": [{"type": "ce"}]}, "seed": seed,
        "out_dir": "never-written", "num_classes": num_classes,
        "protocol": {"epochs": 1, "batch_size": 128, "lr": 0.1, "lr_gamma": 0.2}})
    checkpoint.save({"spec": spec.to_dict(), "model": model.state_dict()}, path)


def _spawn(config: dict, workdir: Path, copies: int = 1) -> list[tuple[dict, float]]:
    """Run a configuration in a fresh worker process; ``copies`` > 1: that many at once on the
    device (several cohorts per device), each with its share of the CPU threads, their timed
    steps started together. Returns each worker's measurements and wall time."""
    name = re.sub(r"\W+", "_", config["label"])
    barrier = workdir / f"{name}.barrier"
    procs = []
    for index in range(copies):
        own = dict(config)
        if copies > 1:
            barrier.mkdir(exist_ok=True)
            own["barrier"] = {"folder": str(barrier), "index": index, "count": copies}
            own["threads"] = max(1, (config.get("threads") or torch.get_num_threads()) // copies)
        config_path = workdir / f"{name}.{index}.config.json"
        result_path = workdir / f"{name}.{index}.result.json"
        config_path.write_text(json.dumps(own))
        procs.append((subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                        str(config_path), str(result_path)]), result_path, time.perf_counter()))
    out = []
    for proc, result_path, tick in procs:
        returncode = proc.wait()
        wall = time.perf_counter() - tick
        if returncode != 0 or not result_path.is_file():
            for other, _, _ in procs:
                if other.poll() is None:
                    other.kill()
            raise RuntimeError(f"configuration {config['label']!r} failed: its worker exited with status "
                               f"{returncode} (its error is printed above); no report written")
        out.append((json.loads(result_path.read_text()), wall))
    return out


def _row(worker: dict, wall: float, steps: int, load_before, load_after) -> dict:
    members = len(worker["members"])
    return {
        "members": worker["members"],
        "images": worker["images"],
        "timed_s": worker["timed_s"],
        "run_images_per_s": worker["images"] / worker["timed_s"],
        # one member's view: batches per second x batch size
        "images_per_s_per_run": worker["images"] / members / worker["timed_s"],
        "step_ms": 1000 * worker["timed_s"] / steps,
        "warmup_s": worker["warmup_s"],
        "setup_s": worker["setup_s"],
        "wall_time_s": wall,
        "cpu_cores_used": worker["cpu_cores_used"],
        # run-images per CPU second of the worker while timed: on a CPU shared with other work,
        # what the steps cost, whatever share of the cores the worker was given
        "cpu_s": worker["timed_s"] * worker["cpu_cores_used"],
        "run_images_per_cpu_s": _per(worker["images"], worker["timed_s"] * worker["cpu_cores_used"]),
        "gpu_utilisation_percent": worker["gpu_utilisation_percent"],
        "memory": worker["memory"],
        "mean_loss": worker["mean_loss"],
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
    }


def _per(images: float, seconds: float | None) -> float | None:
    return images / seconds if seconds else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _solo_total(rows: list[dict]) -> dict:
    """The runs trained alone one after another: images over the summed time; the peak of the
    largest run (they never run at the same time)."""
    images, timed = sum(r["images"] for r in rows), sum(r["timed_s"] for r in rows)
    memory = {k: max(r["memory"][k] for r in rows) for k in rows[0]["memory"]
              if isinstance(rows[0]["memory"][k], (int, float))}
    utilisation = [r["gpu_utilisation_percent"] for r in rows]
    return {
        "members": [m for r in rows for m in r["members"]],
        "images": images,
        "timed_s": timed,
        "run_images_per_s": images / timed,
        "cpu_s": sum(r["cpu_s"] for r in rows),
        "run_images_per_cpu_s": _per(images, sum(r["cpu_s"] for r in rows)),
        "wall_time_s": sum(r["wall_time_s"] for r in rows),
        # averages over the timed seconds of all runs
        "cpu_cores_used": sum(r["cpu_cores_used"] * r["timed_s"] for r in rows) / timed,
        "gpu_utilisation_percent_mean": (
            None if any(u is None or u["mean"] is None for u in utilisation)
            else sum(u["mean"] * r["timed_s"] for u, r in zip(utilisation, rows)) / timed),
        "memory": memory,
        "load_average_after": rows[-1]["load_average_after"],
        "runs": rows,
    }


def _auto_mode(report: dict) -> dict | None:
    """The mode that is what `python -m at train` does here by default: precision, compile and
    layout all auto, one cohort on the device."""
    for mode in report["results"].values():
        if (mode["precision_asked"], mode["compile"], mode["layout"], mode["cohorts_per_device"]) == \
                ("auto", "auto", "auto", 1):
            return mode
    return None


def _float32_eager_mode(report: dict) -> dict | None:
    """The first float32 eager mode of one cohort with its solo runs measured."""
    for mode in report["results"].values():
        if mode["precision"] == "float32" and mode["compile"] == "off" and mode["cohorts_per_device"] == 1 \
                and mode["solo"] is not None:
            return mode
    return None


def evaluate_targets(report: dict) -> list[dict]:
    """The issue's targets with this report's values: data, not assertions."""
    device = report["device"]
    full = len(report["settings"]["members"]) == PAPER_COHORT_SIZE
    on_cpu = device["type"] == "cpu"
    native = bool(device.get("cpu_native_bf16"))
    auto, eager32 = _auto_mode(report), _float32_eager_mode(report)
    reference = report.get("reference_solo")
    speedup = (auto["cohort"]["run_images_per_s"] / reference["run_images_per_s"]
               if auto is not None and reference is not None else None)
    per_cpu = (_ratio(auto["cohort"].get("run_images_per_cpu_s"), reference.get("run_images_per_cpu_s"))
               if auto is not None and reference is not None else None)
    values = {
        "cohort_auto_vs_solo_float32": (speedup, on_cpu and full and native, per_cpu),
        "cohort_auto_vs_solo_float32_without_native_bf16": (speedup, on_cpu and full and not native, per_cpu),
        "cohort_vs_solo_float32": (eager32["cohort_vs_solo"] if eager32 else None, on_cpu and full,
                                   eager32.get("cohort_vs_solo_per_cpu_s") if eager32 else None),
        "cohort_peak_rss_gib": ((auto["cohort"]["memory"]["peak_rss_mib"] / 1024) if auto is not None else None,
                                on_cpu and full, None),
    }
    out = []
    for target in TARGETS:
        value, applies, per_cpu_s = values[target["name"]]
        met = None
        if value is not None:
            met = value >= target["threshold"] if target["comparison"] == ">=" else value < target["threshold"]
        extra = {} if target["name"] == "cohort_peak_rss_gib" else {"value_per_cpu_s": per_cpu_s}
        out.append({**target, "value": value, **extra, "applies": applies, "met": met})
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(report: dict) -> str:
    cuda = report["device"]["type"] == "cuda"
    header = ["mode", "rows", "runs", "run-img/s", "vs solo", "vs ref", "img/CPU-s", "vs ref", "timed s",
              "peak alloc MiB" if cuda else "peak RSS MiB", "GPU %" if cuda else "cores used", "load 1m"]
    rows = []

    def add(name: str, kind: str, row: dict, vs_solo=None, vs_ref=None, vs_ref_cpu=None) -> None:
        mem = row["memory"]
        if cuda:
            util = row.get("gpu_utilisation_percent")
            busy = _fmt(util["mean"] if util else row.get("gpu_utilisation_percent_mean"))
        else:
            busy = _fmt(row["cpu_cores_used"], 2)
        runs = str(len(row["members"])) if kind.startswith("cohort") else f"{len(row['members'])} x 1"
        rows.append([name, kind, runs, _fmt(row["run_images_per_s"]),
                     "" if vs_solo is None else f"x{vs_solo:.2f}", "" if vs_ref is None else f"x{vs_ref:.2f}",
                     _fmt(row.get("run_images_per_cpu_s")), "" if vs_ref_cpu is None else f"x{vs_ref_cpu:.2f}",
                     _fmt(row["timed_s"], 2), _fmt(mem["cuda_peak_allocated_mib"] if cuda else mem["peak_rss_mib"]),
                     busy, _fmt(row["load_average_after"][0], 2)])

    for name, mode in report["results"].items():
        kind = "cohort" if mode["cohorts_per_device"] == 1 else f"cohort x{mode['cohorts_per_device']}"
        add(name, kind, mode["cohort"], mode["cohort_vs_solo"], mode["cohort_vs_reference_solo"],
            mode.get("cohort_vs_reference_solo_per_cpu_s"))
        if mode["solo"] is not None:
            add(name, "solo", mode["solo"])
    if report.get("reference_solo") is not None:
        add(REFERENCE_NAME, "solo", report["reference_solo"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    for name, mode in report["results"].items():
        chosen = "; ".join(f"{net} {c['layout']}, compile {c['compile']}" for net, c in mode["chosen"].items())
        lines.append(f"{name}: {chosen}")
    speedups = report["speedups"]
    if speedups["cohort_auto_vs_solo_float32"] is not None:
        lines.append(f"cohort at auto vs solo {REFERENCE_NAME}: x{speedups['cohort_auto_vs_solo_float32']:.2f}")
    for target in report["targets"]:
        state = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        per_cpu = target.get("value_per_cpu_s")
        lines.append(f"target {target['name']} {target['comparison']} {target['threshold']}: "
                     f"{_fmt(target['value'], 2)} {state}" + ("" if target["applies"] else " (does not apply here)")
                     + ("" if per_cpu is None else f"; per CPU second {per_cpu:.2f}"))
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line naming the problem (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="cohort_throughput.py",
        description="Run-images/s and peak memory of a cohort of runs against the same runs trained "
                    "alone, per precision and execution mode, written to a JSON report.")
    parser.add_argument("--cohort", default=COHORT, help="a cohort id of the grid (default: %(default)s)")
    parser.add_argument("--profile", default=PROFILE, help="the grid profile of --cohort (default: %(default)s)")
    parser.add_argument("--members", nargs="+", default=None, metavar="METHOD",
                        help="some of the cohort's methods, e.g. baseline at-sum-p2 (default: all of them)")
    parser.add_argument("--precision", nargs="+", default=["float32", "bf16", "auto"], choices=PRECISIONS,
                        help="precisions to measure (default: %(default)s); auto is the mode `python -m at "
                             "train` runs by default: precision, compile and layout auto")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=COMPILE_MODES,
                        help="compile modes to measure for each precision other than auto (default: %(default)s)")
    parser.add_argument("--layout", nargs="+", default=["auto"], choices=LAYOUTS,
                        help="layouts to measure for each precision other than auto (default: %(default)s)")
    parser.add_argument("--cohorts-per-device", nargs="+", type=int, default=[1], metavar="N",
                        help="also run N copies of each mode's cohort at once on the device (default: 1 only)")
    parser.add_argument("--solo", choices=["every", "reference"], default="every",
                        help="solo runs for every mode, or only the reference's (float32, eager, contiguous) "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before them, per configuration (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--dataset-size", type=int, default=CIFAR_TRAIN_SIZE,
                        help="images in the synthetic in-memory training set (default: %(default)s, CIFAR-10's)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="params.yaml with the grid (default: the repository's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report path (default: benchmarks/reports/<device kind>-cohort.json)")
    parser.add_argument("--note", default=None,
                        help="a sentence kept in the report, e.g. what else ran on the machine")
    parser.add_argument("--commit", metavar="NAME", default=None,
                        help="also copy the report to benchmarks/committed/NAME.json, to commit it "
                             "(docs/benchmarks.md is generated from that folder)")
    parser.add_argument("--commit-existing", metavar="REPORT", type=Path, default=None,
                        help="measure nothing: copy this existing report to benchmarks/committed/NAME.json "
                             "(with --commit NAME)")
    args = parser.parse_args(argv)
    if args.commit is not None and not COMMIT_NAME.fullmatch(args.commit):
        parser.error(f"--commit {args.commit!r}: a name of lower-case letters, digits, '.', '_' and '-'")
    if args.commit_existing is not None:
        if args.commit is None:
            parser.error("--commit-existing needs --commit NAME")
        return args
    for name, low in (("batch", 1), ("steps", 1), ("warmup", 0), ("threads", 1), ("dataset_size", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")
    if any(n < 1 for n in args.cohorts_per_device):
        parser.error("--cohorts-per-device must be integers >= 1")
    if args.dataset_size < args.batch:
        parser.error(f"--dataset-size ({args.dataset_size}) must be at least --batch ({args.batch})")
    compiles = set(args.compile) | ({"auto"} if "auto" in args.precision else set())
    if compiles - {"off"} and args.warmup < 1:
        parser.error("--compile other than off (and --precision auto, which compiles where auto says so) needs "
                     "--warmup >= 1: the first steps compile, and must not be timed")
    return args


def modes(args, device: torch.device) -> list[dict]:
    """The modes to measure, in order. Each precision asked other than auto at each --compile
    and --layout; auto as `python -m at train` runs by default (precision, compile and layout
    auto); each also at each --cohorts-per-device."""
    found, seen = [], set()
    for asked in args.precision:
        precision = resolve_precision(asked, device)
        combos = [("auto", "auto")] if asked == "auto" else [(c, lay) for c in args.compile for lay in args.layout]
        for compile_mode, layout in combos:
            for copies in sorted({1, *args.cohorts_per_device}):
                key = ("auto" if asked == "auto" else precision, compile_mode, layout, copies)
                if key in seen:
                    continue
                seen.add(key)
                name = f"{key[0]} / compile {compile_mode} / layout {layout}"
                found.append({"name": name + ("" if copies == 1 else f" / {copies} cohorts"),
                              "precision": precision, "precision_asked": key[0], "compile": compile_mode,
                              "layout": layout, "cohorts_per_device": copies})
    return found


def commit_report(report_path: Path, name: str) -> Path:
    """Copy a report into benchmarks/committed/NAME.json, once checked to be one."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{report_path}: not a readable JSON report ({e})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT or report.get("version") != REPORT_VERSION:
        raise ValueError(f"{report_path}: not a {REPORT_FORMAT} report of version {REPORT_VERSION}")
    target = COMMITTED / f"{name}.json"
    _write_atomic(target, json.dumps(report, indent=2) + "\n")
    return target


def _solo_runs(specs: list[dict], config: dict, label: str, workdir: Path, steps: int) -> dict:
    alone = []
    for spec in specs:
        print(f"{label} solo {spec['method_name']}: 1 run, {config['warmup']} warm-up + {steps} timed steps",
              flush=True)
        load_before = os.getloadavg()
        ((worker, wall),) = _spawn({**config, "label": f"{label} solo {spec['method_name']}", "specs": [spec]},
                                   workdir)
        alone.append(_row(worker, wall, steps, load_before, os.getloadavg()))
    return _solo_total(alone)


def _measure_mode(mode: dict, specs: list[dict], base: dict, workdir: Path, solo: bool) -> tuple[dict, dict]:
    """A mode's cohort (and its runs alone): its result, and the device as its worker saw it."""
    label, steps, copies = mode["name"], base["steps"], mode["cohorts_per_device"]
    config = {**base, "precision": mode["precision"], "compile": mode["compile"], "layout": mode["layout"]}
    print(f"{label} cohort: {len(specs)} run(s){f' x {copies} at once' if copies > 1 else ''}, "
          f"{base['warmup']} warm-up + {steps} timed steps", flush=True)
    load_before = os.getloadavg()
    workers = _spawn({**config, "label": f"{label} cohort", "specs": specs}, workdir, copies)
    load_after = os.getloadavg()
    rows = [_row(worker, wall, steps, load_before, load_after) for worker, wall in workers]
    cohort = rows[0] if copies == 1 else _together(rows)
    solo_row = _solo_runs(specs, config, label, workdir, steps) if solo else None
    result = {**{k: mode[k] for k in ("precision", "precision_asked", "compile", "layout", "cohorts_per_device")},
              "chosen": workers[0][0]["chosen"], "cohort": cohort, "solo": solo_row,
              "cohort_vs_solo": cohort["run_images_per_s"] / solo_row["run_images_per_s"] if solo_row else None,
              "cohort_vs_solo_per_cpu_s": _ratio(cohort["run_images_per_cpu_s"], solo_row["run_images_per_cpu_s"])
              if solo_row else None}
    return result, workers[0][0]["device"]


def _together(rows: list[dict]) -> dict:
    """Several cohorts that ran at once on one device: their run-images/s add up, and their
    memory peaks too (they were resident together)."""
    memory = {k: sum(r["memory"][k] for r in rows) for k in rows[0]["memory"]
              if isinstance(rows[0]["memory"][k], (int, float))}
    return {
        "members": [m for r in rows for m in r["members"]],
        "images": sum(r["images"] for r in rows),
        "timed_s": max(r["timed_s"] for r in rows),
        "run_images_per_s": sum(r["run_images_per_s"] for r in rows),
        "cpu_s": sum(r["cpu_s"] for r in rows),
        "run_images_per_cpu_s": _per(sum(r["images"] for r in rows), sum(r["cpu_s"] for r in rows)),
        "wall_time_s": max(r["wall_time_s"] for r in rows),
        "cpu_cores_used": sum(r["cpu_cores_used"] for r in rows),
        "gpu_utilisation_percent": rows[0]["gpu_utilisation_percent"],
        "memory": memory,
        "load_average_after": rows[-1]["load_average_after"],
        "processes": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.commit_existing is not None:
        target = commit_report(args.commit_existing, args.commit)
        print(f"committed: {target} (git add it)")
        return json.loads(target.read_text())
    params = at_params.load(args.params)
    specs = cohort_specs(params, args.cohort, args.profile, args.members)
    # fails here, before anything runs, on a bad --device or a CUDA device that is not there
    device = Options(device=args.device).resolve_device()
    auto = resolve_precision("auto", device)
    if "reduce-overhead" in args.compile and device.type != "cuda":
        raise ValueError("--compile reduce-overhead needs CUDA (CUDA graphs): it has no CPU path")
    todo = modes(args, device)

    from at.tracking import git_commit

    started = datetime.now(timezone.utc)
    code = git_commit()   # the code the workers import: read before they start
    load_start = os.getloadavg()
    results: dict[str, dict] = {}
    reference = description = None
    with tempfile.TemporaryDirectory(prefix="at-bench-cohort-") as tmp:
        workdir = Path(tmp)
        specs, teachers = benchmark_specs(specs, args.batch, workdir)
        for path, model_name in teachers.items():
            write_random_teacher(Path(path), model_name, specs[0]["num_classes"], specs[0]["seed"])
        base = {"device": str(device), "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                "dataset_size": args.dataset_size}
        for mode in todo:
            is_reference = (mode["precision_asked"], mode["compile"], mode["layout"], mode["cohorts_per_device"]) \
                == ("float32", "off", "contiguous", 1)
            solo = mode["cohorts_per_device"] == 1 and (args.solo == "every" or is_reference)
            results[mode["name"]], seen = _measure_mode(mode, specs, base, workdir, solo)
            description = description or seen
            if is_reference:
                reference = results[mode["name"]]["solo"]
        if reference is None:   # the runs alone in float32, eager, contiguous: what every speedup compares to
            reference = _solo_runs(specs, {**base, "precision": "float32", "compile": "off", "layout": "contiguous"},
                                   REFERENCE_NAME, workdir, args.steps)
    for mode in results.values():
        mode["cohort_vs_reference_solo"] = mode["cohort"]["run_images_per_s"] / reference["run_images_per_s"]
        mode["cohort_vs_reference_solo_per_cpu_s"] = _ratio(mode["cohort"]["run_images_per_cpu_s"],
                                                            reference["run_images_per_cpu_s"])

    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": started.isoformat(timespec="seconds"),
        "git_commit": code,
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "note": args.note,
        "device": description,
        "settings": {
            "device": str(device), "cohort": args.cohort, "profile": args.profile,
            "members": [s["method_name"] for s in specs], "run_ids": [s["id"] for s in specs],
            "students": sorted({s["student"] for s in specs}),
            "teachers": sorted({s["teacher"] for s in specs if s.get("teacher")}),
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "precisions": list(dict.fromkeys(m["precision"] for m in todo)), "precision_flags": args.precision,
            "auto_precision": auto, "compile_flags": args.compile, "layout_flags": args.layout,
            "cohorts_per_device": sorted({1, *args.cohorts_per_device}), "solo": args.solo,
            "reference": REFERENCE_NAME, "threads": description["torch_threads"],
            "execution_cache": str(execution.cache_path()),
            "dataset_size": args.dataset_size, "augment": specs[0]["protocol"]["augment"],
            "optimizer": {k: specs[0]["protocol"][k] for k in ("lr", "momentum", "nesterov", "weight_decay")},
        },
        # (1, 5, 15)-minute load averages of the machine: the benchmark's own threads count in
        # them; more than the thread count means other processes competed for the cores
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "results": results,
        "reference_solo": reference,
    }
    auto_mode = _auto_mode(report)
    report["speedups"] = {
        "cohort_vs_solo": {name: m["cohort_vs_solo"] for name, m in results.items()},
        "cohort_vs_reference_solo": {name: m["cohort_vs_reference_solo"] for name, m in results.items()},
        "cohort_auto_vs_solo_float32": auto_mode["cohort_vs_reference_solo"] if auto_mode else None,
        # the same ratios of run-images per CPU second (see the rows' run_images_per_cpu_s)
        "per_cpu_s": {
            "cohort_vs_solo": {name: m["cohort_vs_solo_per_cpu_s"] for name, m in results.items()},
            "cohort_vs_reference_solo": {name: m["cohort_vs_reference_solo_per_cpu_s"] for name, m in results.items()},
            "cohort_auto_vs_solo_float32": auto_mode["cohort_vs_reference_solo_per_cpu_s"] if auto_mode else None,
        },
    }
    report["targets"] = evaluate_targets(report)
    output = args.output or REPO / "benchmarks" / "reports" / f"{device_kind(description)}-cohort.json"
    _write_atomic(output, json.dumps(report, indent=2) + "\n")
    print()
    flags = ", ".join(f for f, present in description["cpu_flags"].items() if present) or "none"
    print(f"{description.get('gpu_name') or description['cpu_model']} (CPU flags of interest: {flags}), "
          f"torch {description['torch']}, {description['torch_threads']} threads, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, auto precision = {auto}, load average "
          f"{report['load_average']['start'][0]:.2f} at the start, {report['load_average']['end'][0]:.2f} at the end")
    print(format_table(report))
    print(f"report: {output}")
    if args.commit:
        print(f"committed: {commit_report(output, args.commit)} (git add it)")
    return report


def cli(argv: list[str] | None = None) -> int:
    """The command: its exit status; a refused argument or a failed configuration is one line
    on stderr (argparse's own refusals exit 2 the same way)."""
    try:
        main(argv)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(cli())
