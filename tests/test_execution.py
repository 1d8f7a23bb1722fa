"""Layout and torch.compile as execution options (at.execution, issue 36.2): the choice from
measured times, the per-machine cache, a run resumed as it started, a failed compilation falling
back to eager, and compiled training agreeing with eager training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from at import execution, resume
from at.execution import Decider, Workload, choose_compile, choose_layout
from at.precision import STUDENT, TEACHER, Arithmetic

CPU = torch.device("cpu")


def _workload(model="wrn-10-1", precision="float32", batch=32, training=True) -> Workload:
    return Workload(model, 10, (3, 32, 32), batch, precision, training, CPU)


# ------------------------------------------------------------------------------------------------
# The decisions, from measured times


@pytest.mark.parametrize("times, precision, chosen", [
    ({"contiguous": 1.0, "channels_last": 0.8}, "float32", "channels_last"),   # clearly faster
    ({"contiguous": 0.8, "channels_last": 1.0}, "bf16", "contiguous"),
    ({"contiguous": 1.0, "channels_last": 0.99}, "float32", "contiguous"),      # a tie keeps the usual one
    ({"contiguous": 0.99, "channels_last": 1.0}, "bf16", "channels_last"),
])
def test_the_layout_is_the_faster_one_and_a_tie_keeps_the_precisions_usual_one(times, precision, chosen):
    assert choose_layout(times, precision) == chosen


def test_compile_is_chosen_where_the_runs_steps_pay_for_it():
    modes = {"off": {"step_s": 1.0, "compile_s": 0.0}, "on": {"step_s": 0.6, "compile_s": 120.0},
             "reduce-overhead": {"error": "RuntimeError: no CUDA graphs"}}
    assert choose_compile(modes, steps=100) == "off"       # 100 s eager < 120 + 60 s compiled
    assert choose_compile(modes, steps=1000) == "on"       # 1000 s eager > 120 + 600 s compiled
    assert choose_compile({**modes, "reduce-overhead": {"step_s": 0.3, "compile_s": 150.0}}, 1000) == "reduce-overhead"
    assert choose_compile({"off": {"step_s": 1.0}, "on": {"step_s": 1.0, "compile_s": 0.0}}, 10) == "off"


class Measurer:
    """Stand-in measurements that count their calls."""

    def __init__(self, layouts=None, compiled=None):
        self.layouts = layouts or {"contiguous": 0.010, "channels_last": 0.005}
        self.compiled = compiled or {"off": {"step_s": 0.010, "compile_s": 0.0},
                                     "on": {"step_s": 0.004, "compile_s": 30.0}}
        self.calls = []

    def measure_layouts(self, workload, rounds=3):
        self.calls.append(("layouts", workload.model))
        return dict(self.layouts)

    def measure_compile(self, workload, layout, modes, rounds=3):
        self.calls.append(("compile", workload.model, layout, tuple(modes)))
        return copy.deepcopy(self.compiled)


def _decider(tmp_path, measurer, **asked) -> Decider:
    return Decider(cache=tmp_path / "execution.json", measure_layouts=measurer.measure_layouts,
                   measure_compile=measurer.measure_compile, **asked)


def test_a_measurement_is_cached_per_machine_and_workload(tmp_path):
    measurer = Measurer()
    choice = _decider(tmp_path, measurer).decide(_workload(), steps=10)
    assert (choice.layout, choice.compile) == ("channels_last", "off")   # 10 steps cannot pay for a compile
    assert measurer.calls == [("layouts", "wrn-10-1")] and "measured" in choice.how
    cached = json.loads((tmp_path / "execution.json").read_text())["measurements"]
    (key,) = cached
    for part in (f"torch {torch.__version__}", "float32", "wrn-10-1", "batch 32", "training step", "cpu: "):
        assert part in key
    assert cached[key]["result"] == measurer.layouts and "load_average" in cached[key]

    again = _decider(tmp_path, measurer).decide(_workload(), steps=10)      # a later run: a cache hit
    assert again.layout == "channels_last" and "cached" in again.how and len(measurer.calls) == 1
    _decider(tmp_path, measurer).decide(_workload(batch=64), steps=10)       # another workload: measured
    _decider(tmp_path, measurer).decide(_workload(precision="bf16"), steps=10)
    assert len(measurer.calls) == 3


def test_compilation_is_measured_only_for_a_run_long_enough_to_pay_for_it(tmp_path):
    measurer = Measurer()
    long_run = int(2 * execution.COMPILE_WORTH_MEASURING_S / measurer.layouts["channels_last"])
    choice = _decider(tmp_path, measurer).decide(_workload(), steps=long_run)
    assert choice.compile == "on" and ("compile", "wrn-10-1", "channels_last", ("on",)) in measurer.calls
    # once measured, the cached times decide for any run length, without measuring again
    calls = len(measurer.calls)
    assert _decider(tmp_path, measurer).decide(_workload(), steps=100).compile == "off"   # 1 s < 30 s compiling
    assert _decider(tmp_path, measurer).decide(_workload(), steps=long_run).compile == "on"
    assert len(measurer.calls) == calls


def test_explicit_options_are_not_measured_and_reduce_overhead_needs_cuda(tmp_path):
    measurer = Measurer()
    choice = _decider(tmp_path, measurer, layout="contiguous", compile="on").decide(_workload(), steps=10)
    assert (choice.layout, choice.compile, measurer.calls) == ("contiguous", "on", [])
    assert _decider(tmp_path, measurer, layout="contiguous", compile="on").decide(
        _workload(), steps=10, compilable=False).compile == "off"
    with pytest.raises(ValueError, match="reduce-overhead needs a CUDA device"):
        _decider(tmp_path, measurer, layout="contiguous", compile="reduce-overhead").decide(_workload(), steps=10)
    with pytest.raises(ValueError, match="--layout must be one of"):
        _decider(tmp_path, measurer, layout="nhwc").decide(_workload(), steps=10)


def test_a_real_measurement_leaves_the_global_random_state_alone(tmp_path):
    """NIN has dropout: the measured steps draw random numbers, never from the runs' state."""
    state = torch.get_rng_state()
    choice = Decider(cache=tmp_path / "execution.json", compile="off").decide(
        Workload("nin-thin", 10, (3, 32, 32), 4, "float32", True, CPU), steps=1)
    assert choice.layout in ("contiguous", "channels_last") and choice.compile == "off"
    assert torch.equal(state, torch.get_rng_state())
    entry = next(iter(json.loads((tmp_path / "execution.json").read_text())["measurements"].values()))
    assert set(entry["result"]) == {"contiguous", "channels_last"} and all(v > 0 for v in entry["result"].values())


def test_auto_considers_cuda_graphs_on_cuda_only():
    assert execution.compile_candidates(torch.device("cpu")) == ("on",)
    assert execution.compile_candidates(torch.device("cuda")) == ("on", "reduce-overhead")


def test_an_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "execution.json").write_text("{not json")
    measurer = Measurer()
    assert _decider(tmp_path, measurer).decide(_workload(), steps=10).layout == "channels_last"
    assert json.loads((tmp_path / "execution.json").read_text())["format"] == execution.CACHE_FORMAT


# ------------------------------------------------------------------------------------------------
# A cohort's networks, and resuming as they started


def _spec(student="wrn-10-1", method="at-sum-p2", teacher="wrn-10-2", run="a"):
    from at import params as params_mod
    from at.spec import RunSpec

    params = params_mod.load(Path(__file__).resolve().parents[1] / "params.yaml")
    return RunSpec.resolve({
        "id": f"test/{run}", "dataset": "cifar10", "data_dir": "unused", "student": student,
        "teacher": teacher, "teacher_checkpoint": "unused.pt" if teacher else None, "method_name": method,
        "method": params_mod.method(params, method), "seed": 0, "out_dir": f"unused/{run}", "num_classes": 10,
        "protocol": {"epochs": 1, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2}})


def test_each_network_model_is_decided_once_and_gradient_terms_are_not_compiled(tmp_path, capsys):
    specs = [_spec(run="a"), _spec(method="kd", run="b"), _spec(student="nin-thin", method="baseline",
                                                                 teacher=None, run="c")]
    measurer = Measurer()
    arithmetic = execution.resolve(Arithmetic(CPU, "float32"), specs, (3, 32, 32), 10, _decider(tmp_path, measurer))
    assert sorted(measurer.calls) == [("layouts", "nin-thin"), ("layouts", "wrn-10-1"), ("layouts", "wrn-10-2")]
    assert arithmetic.layout_of((STUDENT, "wrn-10-1")) == "channels_last"
    assert arithmetic.layout_of((TEACHER, "wrn-10-2")) == "channels_last"
    out = capsys.readouterr().out
    assert out.count("execution: ") == 3 and "execution: teacher wrn-10-2: channels_last, compile off" in out

    networks = execution.networks([_spec(method="grad-at", run="g"), _spec(run="a")], (3, 32, 32), "float32", CPU)
    assert networks[(STUDENT, "wrn-10-1")][1] is True, "compiled for its members without gradient terms"
    assert networks[(TEACHER, "wrn-10-2")][1] is False, "a teacher run for input gradients stays eager"


class _Saved:
    def __init__(self, spec, state):
        self.spec, self.state, self.state_is_this_spec = spec, state, True


def test_a_run_resumes_in_the_layout_and_compile_mode_it_started_in(tmp_path):
    spec = _spec()
    started = resume.started_execution([_Saved(spec, {"precision": "float32", "execution": {
        "student": {"model": "wrn-10-1", "layout": "contiguous", "compile": "on"},
        "teacher": {"model": "wrn-10-2", "layout": "channels_last", "compile": "off"}}})])
    measurer = Measurer()
    arithmetic = execution.resolve(Arithmetic(CPU, "float32"), [spec], (3, 32, 32), 10, _decider(tmp_path, measurer),
                                   started)
    assert measurer.calls == [] and arithmetic.layout_of((STUDENT, "wrn-10-1")) == "contiguous"
    assert arithmetic.compile_of((STUDENT, "wrn-10-1")) == "on"
    assert arithmetic.layout_of((TEACHER, "wrn-10-2")) == "channels_last"
    with pytest.raises(ValueError, match="started with student wrn-10-1 in layout contiguous.*--layout contiguous"):
        execution.resolve(Arithmetic(CPU, "float32"), [spec], (3, 32, 32), 10,
                          _decider(tmp_path, measurer, layout="channels_last"), started)

    # a state saved before the choice existed: its precision's usual layout, eager
    old = resume.started_execution([_Saved(spec, {"precision": "bf16"})])
    assert old[(STUDENT, "wrn-10-1")]["layout"] == "channels_last" and old[(STUDENT, "wrn-10-1")]["compile"] == "off"
    with pytest.raises(ValueError, match="executing differently.*cannot resume as one cohort"):
        resume.started_execution([_Saved(spec, {"precision": "bf16"}),
                                  _Saved(_spec(run="b"), {"precision": "float32"})])


# ------------------------------------------------------------------------------------------------
# Compiling: a failure falls back to eager; compiled agrees with eager


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu(self.bn(self.conv(x)))
        return self.fc(a.mean((2, 3))), [a]


def _train_tiny(compile_mode: str, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Tiny()
    if compile_mode != "off":
        execution.compile_model(model, compile_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x)[0], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_training_agrees_with_eager_within_tolerance():
    eager_losses, eager_weights = _train_tiny("off")
    compiled_losses, compiled_weights = _train_tiny("on")
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for a, b in zip(eager_weights, compiled_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _fail(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_a_failed_compilation_falls_back_to_eager_in_one_line(tmp_path, cifar_mini_dir, teacher, monkeypatch,
                                                             capsys):
    """A compiler that fails (here a backend that raises) leaves the run training eagerly, each
    model of the cohort once, and the run ends exactly as an eager one."""
    from test_cohort import assert_same_run, members, relocate

    from at.train import Options, train_cohort

    monkeypatch.setattr(execution, "compile_model", lambda model, mode: model.compile(backend=_fail))
    specs = members(tmp_path / "compiled", cifar_mini_dir, teacher, epochs=1)[:3]
    options = dict(device="cpu", progress=False, threads=1, tracking=False, layout="contiguous")
    capsys.readouterr()
    train_cohort(specs, Options(**options, compile="on"))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 2, out   # the teacher wrn-10-2 and the student wrn-10-1, once each
    assert all("running it eagerly" in line and "this backend cannot compile anything" in line for line in warnings)
    saved = torch.load(Path(specs[1]["out_dir"]) / "checkpoint.pt", weights_only=True)
    assert saved["execution"]["student"]["compile"] == "off"
    eager = relocate(specs, tmp_path / "eager")
    train_cohort(eager, Options(**options, compile="off"))
    for spec in specs:
        assert_same_run(Path(spec["out_dir"]), tmp_path / "eager" / Path(spec["out_dir"]).name)


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly_within_its_mode(tmp_path, cifar_mini_dir, capsys):
    """Stopped mid-epoch and resumed, a compiled run ends bit-identical to the same run compiled
    and uninterrupted (compiled code is deterministic on the CPU), and resumes compiled."""
    from test_cohort import StopAfter, assert_same_run, make_spec

    from at.train import Interrupted, Options, train

    options = Options(device="cpu", precision="float32", progress=False, threads=1, tracking=False,
                      layout="contiguous", compile="on")
    small = {"epochs": 2, "batch_size": 16, "train_subset": 128}
    reference = make_spec(tmp_path / "reference", cifar_mini_dir, "wrn-10-1", "baseline", **small)
    train(reference, options)
    resumed = make_spec(tmp_path / "resumed", cifar_mini_dir, "wrn-10-1", "baseline", **small)
    with pytest.raises(Interrupted):
        from at.train import train_cohort
        train_cohort([resumed], options, stop=StopAfter(11))   # 3 steps into epoch 2
    saved = torch.load(Path(resumed["out_dir"]) / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 3) and saved["execution"]["student"]["compile"] == "on"
    capsys.readouterr()
    train(resumed, Options(**{**options.__dict__, "compile": "auto", "layout": "auto"}))
    assert "execution: student wrn-10-1: contiguous, compile on (as the run started)" in capsys.readouterr().out
    assert_same_run(Path(resumed["out_dir"]), Path(reference["out_dir"]))
