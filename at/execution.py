"""How a cohort's networks execute, as opposed to what they compute: memory layout and torch.compile.

Two execution options, like ``--threads`` and ``--device`` (``python -m at train --layout ...
--compile ...``, ``at.start.Options``), outside the run's spec: they change speed, not the
method, and a spec is what a run's record is checked against (results/runs/*/spec.json).

- ``layout``: ``contiguous`` (NCHW tensors) | ``channels_last`` (NHWC) | ``auto``;
- ``compile``: ``off`` | ``on`` (``torch.compile``, Inductor's default mode) | ``reduce-overhead``
  (Inductor with CUDA graphs: CUDA only) | ``auto``.

``auto`` is decided per network model of the cohort (each student model, for its training step;
each teacher model, for its forward) from a short measurement on this machine, never a constant:

- layout: a few steps of the model on random data in each layout, interleaved (A, B, A, B, ...)
  so that a load that comes and goes weighs on both, the best of each kept; the faster layout
  wins, unless they are within ``TIE`` of each other, where the layout the trainer used before
  the choice existed stays (channels_last in bf16, contiguous in float32);
- compile: the compiled model's cost (its compilation, ``compile_s``) and its step against the
  eager one, in the chosen layout; compiled where the run's steps save more than the
  compilation costs (:func:`choose_compile`). Compilation costs minutes on a CPU, so it is only
  measured for a run whose eager steps on that model take at least
  ``COMPILE_WORTH_MEASURING_S``; shorter runs stay eager without measuring.

The measurements are cached per machine in ``execution.json`` under ``$AT_CACHE_DIR``, else
``$XDG_CACHE_HOME/attention-transfer``, else ``~/.cache/attention-transfer``, keyed by the
machine (CPU model and threads, or GPU name), the torch version, the precision, the model, its
input and batch size, and training or forward only: later runs on the machine read them (one
line says which). Delete the file to measure again.

The decision is per model, so a member trains in the same layout in a cohort as alone (a cohort
stays bit-identical to its runs trained alone, at.train). A run resumes in the layout and
compile mode it started in (its resume state records them, at.member), as with ``precision``.

Where compiling fails (no C compiler, an operator Inductor cannot lower), the network falls
back to eager with one line saying so (:func:`fall_back`). Not compiled: networks whose
objective differentiates input gradients a second time (grad_at, symmetry, min_l2: torch.compile
has no double backward), evaluation and an epoch's shorter last batch (they run eagerly: a
second compilation for them would cost more than it saves), runs on several processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from at import console, lazy
from at.choices import Compile, Layout, names
from at.precision import Precision

torch = lazy.module("torch")


LAYOUTS = names(Layout)
COMPILE_MODES = names(Compile)
# Layouts within this fraction of each other are a tie: the precision's usual layout stays.
TIE = 0.03
# A run whose eager steps on a model take less than this cannot pay for measuring a compilation
# (minutes on a CPU, before the run's own compilation): it stays eager without measuring.
COMPILE_WORTH_MEASURING_S = 600.0
CACHE_FILE = "execution.json"
CACHE_FORMAT = 1
MEASURE_ROUNDS = 5


def default_layout(precision: str) -> str:
    """The layout of a precision before the choice existed: what a tie keeps."""
    return (Layout.CHANNELS_LAST if precision == Precision.BF16 else Layout.CONTIGUOUS).value


def memory_format(layout: str):
    return torch.channels_last if layout == Layout.CHANNELS_LAST else torch.contiguous_format


def check_request(layout: str, compile: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")


# ---------------------------------------------------------------------------------------------
# The cache


def cache_dir() -> Path:
    if os.environ.get("AT_CACHE_DIR"):
        return Path(os.environ["AT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attention-transfer"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def machine(device) -> str:
    """The machine a measurement holds for: the GPU's name, or the CPU's model and the threads
    torch computes with."""
    from at.precision import machine as described

    return f"{device.type}: {described(device)}"


def read_cache(path: Path | None = None) -> dict:
    path = path or cache_path()
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict) or loaded.get("format") != CACHE_FORMAT:
        return {}
    entries = loaded.get("measurements")
    return entries if isinstance(entries, dict) else {}


def write_cache(key: str, value: dict, path: Path | None = None) -> None:
    """Add one measurement (read, add, write atomically: a concurrent writer loses at most its
    own entry, measured again next time). A cache that cannot be written is only a warning."""
    from at import atomic

    path = path or cache_path()
    entries = read_cache(path)
    entries[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps({"format": CACHE_FORMAT, "measurements": entries},
                                           indent=1, sort_keys=True) + "\n")
    except OSError as e:
        console.say(f"warning: could not cache the execution measurement in {path}: {e}")


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Workload:
    """One network model as a cohort runs it: a student's training step or a teacher's forward."""

    model: str
    num_classes: int
    input_shape: tuple[int, ...]
    batch: int
    precision: str
    training: bool
    device: object = None   # a torch.device

    def key(self) -> str:
        return " | ".join([machine(self.device), f"torch {torch.__version__}", self.precision, self.model,
                           f"{self.num_classes} classes", "x".join(map(str, self.input_shape)),
                           f"batch {self.batch}", "training step" if self.training else "forward"])

    def describe(self) -> str:
        return f"{self.model} ({'training' if self.training else 'forward'}, batch {self.batch}, {self.precision})"


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def workload_device(key: str) -> str:
    return key.split(":", 1)[0]


def _autocast(precision: str, device):
    if precision == Precision.BF16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# SGD's multi-tensor implementation: one call per operation for all of a member's parameters
# instead of a Python loop over them (torch picks it by itself only on CUDA). Bit-identical to
# the loop on the CPU (checked by tests/test_speed.py); the fused one is not, so it is not used.
SGD_IMPLEMENTATION = {"foreach": True}


def step_function(workload: Workload, layout: str, compile: str = Compile.OFF.value) -> Callable[[], None]:
    """One step of the workload's model on random data: forward, and for a training step
    cross-entropy, backward and an SGD step. Built without touching the global random state."""
    import torch.nn.functional as F

    from at import models

    device = workload.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        model = models.build(workload.model, num_classes=workload.num_classes).to(device)
        x = torch.randn(workload.batch, *workload.input_shape, device=device)
        y = torch.randint(0, workload.num_classes, (workload.batch,), device=device)
    model.to(memory_format=memory_format(layout))
    x = x.contiguous(memory_format=memory_format(layout))
    if workload.training:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, **SGD_IMPLEMENTATION)
    else:
        model.eval().requires_grad_(False)
    if compile != Compile.OFF:
        compile_model(model, compile)

    def step() -> None:
        with _autocast(workload.precision, device), torch.set_grad_enabled(workload.training):
            output = model(x)
        if workload.training:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates: Mapping[str, Callable[[], None]], rounds: int, device) -> dict[str, float]:
    """Seconds per call of each candidate: one untimed call each, then ``rounds`` rounds that
    call every candidate once in turn; the best round of each (the least disturbed by a load)."""
    for run in candidates.values():
        run()
    best = {name: math.inf for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            _sync(device)
            tick = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - tick)
    return best


def measure_layouts(workload: Workload, rounds: int = MEASURE_ROUNDS) -> dict[str, float]:
    """Seconds per step in each layout, eager."""
    layouts = [layout for layout in LAYOUTS if layout != Layout.AUTO]
    return time_interleaved({layout: step_function(workload, layout) for layout in layouts}, rounds,
                            workload.device)


def measure_compile(workload: Workload, layout: str, modes: Iterable[str],
                    rounds: int = MEASURE_ROUNDS) -> dict[str, dict]:
    """For each compile mode: ``compile_s`` (its first call, less an eager step) and ``step_s``,
    timed interleaved with the eager step (``off``). A mode that fails to compile is left out
    with its error."""
    eager = step_function(workload, layout)
    eager()
    _sync(workload.device)
    tick = time.perf_counter()
    eager()
    _sync(workload.device)
    eager_once = time.perf_counter() - tick
    candidates, results = {Compile.OFF.value: eager}, {}
    for mode in modes:
        run = step_function(workload, layout, mode)
        tick = time.perf_counter()
        try:
            run()
            _sync(workload.device)
        except Exception as e:   # noqa: BLE001 (a compilation that fails is a measurement)
            if not is_compile_error(e):
                raise
            results[mode] = {"error": _first_line(e)}
            continue
        results[mode] = {"compile_s": max(0.0, time.perf_counter() - tick - eager_once)}
        candidates[mode] = run
    times = time_interleaved(candidates, rounds, workload.device)
    out = {Compile.OFF.value: {"step_s": times[Compile.OFF], "compile_s": 0.0}}
    for mode, result in results.items():
        out[mode] = {**result, "step_s": times[mode]} if mode in times else result
    return out


# ---------------------------------------------------------------------------------------------
# The decisions: pure functions of measured times


def choose_layout(times: Mapping[str, float], precision: str, tie: float = TIE) -> str:
    """The faster layout; within ``tie`` of each other, the precision's usual one."""
    usual = default_layout(precision)
    best = min(times, key=times.get)
    if usual in times and times[usual] <= times[best] * (1 + tie):
        return usual
    return best


def choose_compile(modes: Mapping[str, Mapping], steps: int) -> str:
    """The mode that trains ``steps`` steps soonest: its compilation plus its steps. ``modes``
    as :func:`measure_compile` returns them (``off`` is eager; a mode with an error is out)."""
    def total(mode: str) -> float:
        m = modes[mode]
        return m.get("compile_s", 0.0) + steps * m["step_s"]

    usable = [mode for mode, m in modes.items() if "step_s" in m]
    return min(usable, key=lambda mode: (total(mode), mode != Compile.OFF))


def compile_candidates(device) -> tuple[str, ...]:
    """The compile modes ``auto`` measures against eager on a device: CUDA graphs only on CUDA."""
    cuda_graphs = (Compile.REDUCE_OVERHEAD.value,) if device.type == "cuda" else ()
    return (Compile.ON.value, *cuda_graphs)


@dataclass(frozen=True)
class Choice:
    """What one network model executes as, and how that was decided (for the log line)."""

    layout: str
    compile: str
    how: str = "asked"


@dataclass
class Decider:
    """Resolves ``--layout`` and ``--compile`` for the workloads of a cohort. ``measure_*`` can be
    replaced (tests); measurements go to, and come from, the cache."""

    layout: str = Layout.AUTO.value
    compile: str = Compile.AUTO.value
    cache: Path | None = None
    measure_layouts: Callable = measure_layouts
    measure_compile: Callable = measure_compile
    said: list = field(default_factory=list)

    def _cached(self, key: str, measure: Callable[[], dict]) -> tuple[dict, bool]:
        entry = read_cache(self.cache).get(key)
        if isinstance(entry, dict) and "result" in entry:
            return entry["result"], True
        before = _load()
        # the measurement's steps (dropout, a NIN's) draw from the global random state: not the runs'
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            result = measure()
        after = _load()
        write_cache(key, {"result": result, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                          "load_average": [before, after], "cpus": os.cpu_count()}, self.cache)
        busy = max(x for x in (before, after, 0.0) if x is not None)
        if workload_device(key) == "cpu" and busy > (os.cpu_count() or 1):
            console.say(f"warning: measured while the machine was busy (load average {busy:.1f} on "
                        f"{os.cpu_count()} CPUs): the choice may be the load's; delete {self.cache or cache_path()} "
                        f"to measure again on a quieter machine")
        return result, False

    def decide(self, workload: Workload, steps: int, compilable: bool = True) -> Choice:
        check_request(self.layout, self.compile)
        notes = []
        layout = self.layout
        if layout == Layout.AUTO:
            times, hit = self._cached(workload.key() + " | layouts", lambda: self.measure_layouts(workload))
            layout = choose_layout(times, workload.precision)
            notes.append(f"layout {layout} ({'cached' if hit else 'measured'}: "
                         + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in sorted(times.items())) + ")")
        mode = self.compile
        if mode == Compile.REDUCE_OVERHEAD and workload.device.type != "cuda":
            raise ValueError("--compile reduce-overhead needs a CUDA device (CUDA graphs); use --compile on")
        if not compilable:
            mode = Compile.OFF.value
        elif mode == Compile.AUTO:
            mode, note = self._auto_compile(workload, layout, steps)
            notes.append(note)
        choice = Choice(layout, mode, "; ".join(notes) or "asked")
        return choice

    def _auto_compile(self, workload: Workload, layout: str, steps: int) -> tuple[str, str]:
        key = workload.key() + f" | compile in {layout}"
        entry = read_cache(self.cache).get(key)
        if not (isinstance(entry, dict) and "result" in entry):
            eager = self._eager_step(workload, layout)
            if eager is not None and steps * eager < COMPILE_WORTH_MEASURING_S:
                return Compile.OFF.value, (f"compile off: {steps} steps x {1000 * eager:.0f} ms eager cannot pay for measuring "
                               f"a compilation")
        modes, hit = self._cached(key, lambda: self.measure_compile(workload, layout,
                                                                    compile_candidates(workload.device)))
        mode = choose_compile(modes, steps)
        shown = ", ".join(f"{m} {1000 * r['step_s']:.0f} ms/step" + (f" + {r['compile_s']:.0f} s" if r.get("compile_s") else "")
                          for m, r in modes.items() if "step_s" in r)
        return mode, f"compile {mode} over {steps} steps ({'cached' if hit else 'measured'}: {shown})"

    def _eager_step(self, workload: Workload, layout: str) -> float | None:
        """The eager step in ``layout``: the layouts' measurement (cached, or taken and cached)."""
        times, _ = self._cached(workload.key() + " | layouts", lambda: self.measure_layouts(workload))
        return times.get(layout)


# ---------------------------------------------------------------------------------------------
# Compiling, and falling back


def compile_model(model, mode: str) -> None:
    """torch.compile ``model`` in place (its state dict keeps its keys)."""
    model.compile(mode=None if mode == Compile.ON else mode)


def is_compiled(model) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def uncompile(model) -> None:
    model._compiled_call_impl = None


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from torch.compile's machinery (Dynamo, the backend, Inductor's C
    compiler) rather than from the model's own computation."""
    from torch._dynamo import exc as dynamo_exc

    kinds: list[type] = [dynamo_exc.TorchDynamoException]
    with contextlib.suppress(ImportError):
        from torch._inductor import exc as inductor_exc

        kinds += [getattr(inductor_exc, name) for name in ("InductorError", "CppCompileError")
                  if hasattr(inductor_exc, name)]
    return isinstance(error, tuple(kinds))


def _first_line(error: BaseException) -> str:
    """The error in one line: the compiler's own error where Dynamo wraps it."""
    inner = getattr(error, "inner_exception", None) or error.__cause__
    if isinstance(inner, BaseException):
        error = inner
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def fall_back(model, error: BaseException, what: str) -> bool:
    """After ``error`` in a step of ``model``: where it is a compiled model's compilation error,
    run it eagerly from now on, say so in one line and return True (the caller repeats the step);
    else False."""
    if not is_compiled(model) or not is_compile_error(error):
        return False
    uncompile(model)
    console.say(f"warning: torch.compile failed for {what}, running it eagerly: {_first_line(error)}")
    return True


def eager():
    """Run compiled models eagerly inside the block (evaluation, a shorter batch)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# A cohort's networks


def _has_gradient_terms(method) -> bool:
    """Whether a resolved method (at.method.Method) has a term that reads input gradients."""
    return any(term.kind.input_gradients for term in method.terms)


def networks(specs, input_shape: tuple[int, ...], precision: str, device) -> dict[tuple[str, str], tuple[Workload, bool]]:
    """Each network model of a cohort, by (role, model): its workload and whether it may be
    compiled (not where an objective differentiates input gradients twice)."""
    from at.precision import STUDENT, TEACHER

    workloads: dict[tuple[str, str], Workload] = {}
    gradients: dict[tuple[str, str], list[bool]] = {}
    for spec in specs:
        roles = [(STUDENT, spec.student, True)] + ([(TEACHER, spec.teacher, False)] if spec.teacher else [])
        for role, model, training in roles:
            workloads.setdefault((role, model), Workload(model, spec.num_classes, tuple(input_shape),
                                                         spec.protocol.batch_size, precision, training, device))
            gradients.setdefault((role, model), []).append(_has_gradient_terms(spec.method))
    # a student model is compiled for those of its members without gradient terms (at.member);
    # a teacher only if none of its students runs it for input gradients
    return {network: (workload, not all(gradients[network]) if network[0] == STUDENT else not any(gradients[network]))
            for network, workload in workloads.items()}


def resolve(arithmetic, specs, input_shape: tuple[int, ...], steps: int, decider: Decider,
            started: Mapping | None = None, distributed: bool = False, record: dict | None = None):
    """``arithmetic`` with the layout and compile mode of each network of the cohort: as the
    runs started (``started``, from their resume states), else as asked, else measured (auto).
    One line per network says what and why; ``record`` gets each network's Choice."""
    import dataclasses

    check_request(decider.layout, decider.compile)
    started = started or {}
    layouts, compiles = {}, {}
    for network, (workload, compilable) in networks(specs, input_shape, arithmetic.precision,
                                                    arithmetic.device).items():
        role, model = network
        if network in started:
            was = started[network]
            for what, asked, auto in (("layout", decider.layout, Layout.AUTO),
                                      ("compile", decider.compile, Compile.AUTO)):
                if asked != auto and asked != was[what]:
                    runs = ", ".join(sorted(was["runs"]))
                    raise ValueError(f"{runs}: started with {role} {model} in {what} {was[what]}: resuming with "
                                     f"--{what} {asked} would mix two executions in one run; resume with --{what} "
                                     f"{was[what]} (or auto), or retrain with --force")
            choice = Choice(was["layout"], was["compile"], "as the run started")
        elif distributed:
            layout = default_layout(arithmetic.precision) if decider.layout == Layout.AUTO else decider.layout
            if decider.compile not in (Compile.AUTO, Compile.OFF):
                console.say(f"execution: --compile {decider.compile} is not used in a run on several processes")
            choice = Choice(layout, Compile.OFF.value, "a run on several processes: the precision's usual layout, eager"
                            if decider.layout == Layout.AUTO else "asked; eager on several processes")
        else:
            choice = decider.decide(workload, steps, compilable)
        if not compilable and choice.compile != Compile.OFF and network not in started:
            choice = Choice(choice.layout, Compile.OFF.value, choice.how + "; not compiled (gradient terms)")
        layouts[network], compiles[network] = choice.layout, choice.compile
        if record is not None:
            record[network] = choice
        console.say(f"execution: {role} {model}: {choice.layout}, compile {choice.compile} ({choice.how})")
    return dataclasses.replace(arithmetic, layouts=tuple(sorted(layouts.items())),
                               compiles=tuple(sorted(compiles.items())))
