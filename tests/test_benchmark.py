"""benchmarks/train_step.py: the report's structure and self-consistency, and its input checks.

No assertion on speed: timings depend on the machine and its load (DESIGN.md: measure with the
benchmark's report, never with assertions on wall time).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_script()

TINY = ["--batch", "8", "--steps", "2", "--warmup", "1", "--student", "wrn-10-1", "--teacher", "wrn-10-2",
        "--dataset-size", "32", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """One run of the script as a user runs it (a subprocess, from another directory)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "reports" / "tiny.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--device", "cpu", "--output", str(out)],
                          cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for case in ("student", "at", "kd", "grad-at"):
        assert any(line.startswith(case) for line in proc.stdout.splitlines()), f"no table row for {case}"
    assert not list(out.parent.glob(".*tmp*")), "a temporary file was left beside the report"
    return json.loads(out.read_text())


def test_report_header(report):
    assert report["format"] == "at-benchmark-train-step" and report["version"] == 1
    device = report["device"]
    assert device["type"] == "cpu"
    assert device["torch"] == torch.__version__
    assert device["cpu_model"] and device["torch_threads"] == 1 and device["logical_cpus"] >= 1
    settings = report["settings"]
    assert settings["batch"] == 8 and settings["steps"] == 2 and settings["warmup"] == 1
    # the trainer's CPU defaults: float32, contiguous (NCHW)
    assert settings["bf16"] is False and settings["channels_last"] is False
    assert settings["optimizer"]["lr"] == 0.1 and settings["optimizer"]["momentum"] == 0.9
    for key in ("start", "end"):
        assert len(report["load_average"][key]) == 3
        assert all(v >= 0 for v in report["load_average"][key])


def test_cases_and_their_models(report):
    cases = report["cases"]
    assert list(cases) == ["student", "at", "kd", "grad-at"]
    expected = {"student": ("baseline", None), "at": ("at-sum-p2", "wrn-10-2"),
                "kd": ("kd", "wrn-10-2"), "grad-at": ("grad-at", "wrn-10-2")}
    params = bench.at_params.load(REPO / "params.yaml")
    for name, (method, teacher) in expected.items():
        case = cases[name]
        assert case["method"] == method and case["teacher"] == teacher and case["student"] == "wrn-10-1"
        assert case["method_spec"] == params["methods"][method]
        assert case["student_params"] == bench.models.parameter_count(bench.models.build("wrn-10-1"))
        if teacher is None:
            assert case["teacher_params"] is None
        else:
            assert case["teacher_params"] == bench.models.parameter_count(bench.models.build(teacher))


def test_numbers_are_positive_and_consistent(report):
    batch = report["settings"]["batch"]
    for name, case in report["cases"].items():
        steps_ms = case["step_ms_all"]
        assert len(steps_ms) == report["settings"]["steps"], f"{name}: warm-up steps must not be timed"
        assert all(t > 0 for t in steps_ms)
        ms, ips = case["step_ms"], case["images_per_s"]
        assert ms["min"] == min(steps_ms) and ms["max"] == max(steps_ms)
        assert ms["mean"] == pytest.approx(sum(steps_ms) / len(steps_ms))
        # rates from the step times, computed here independently
        assert ips["max"] == pytest.approx(batch * 1000 / min(steps_ms))
        assert ips["min"] == pytest.approx(batch * 1000 / max(steps_ms))
        assert ips["median"] == pytest.approx(sum(batch * 1000 / t for t in steps_ms) / 2)  # 2 steps
        assert ips["mean"] == pytest.approx(batch * len(steps_ms) * 1000 / sum(steps_ms))
        assert 0 < ips["min"] <= ips["median"] <= ips["max"]
        mem = case["memory"]
        assert mem["rss_before_steps_mib"] > 0 and mem["peak_rss_mib"] > 0
        assert mem["step_rss_growth_mib"] >= 0
        assert mem["step_rss_growth_mib"] == pytest.approx(mem["peak_rss_mib"] - mem["rss_before_steps_mib"])
        assert mem["peak_rss_scope"] in ("steps", "process")
        assert case["wall_time_s"] > case["timed_s"] > 0 and case["setup_s"] > 0
        assert case["cpu_cores_used"] > 0
        assert case["final_loss"] > 0


def test_unknown_case_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match=r"unknown case 'nonsense'.*allowed: student, at, kd, grad-at"):
        bench.main(["--cases", "nonsense", "--output", str(out)])
    with pytest.raises(ValueError, match="given twice"):
        bench.main(["--cases", "at", "at", "--output", str(out)])
    assert not out.exists()


def test_other_params_methods_are_cases():
    params = bench.at_params.load(REPO / "params.yaml")
    assert bench.resolve_cases(["student", "at+kd", "factt"], params) == [
        ("student", "baseline"), ("at+kd", "at+kd"), ("factt", "factt")]


@pytest.mark.parametrize("argv, message", [
    (["--dataset-size", "16", "--batch", "32"], "--dataset-size"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--bf16", "maybe"], "invalid choice"),
    (["--student", "wrn-15-1"], "unknown model"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.resolve_device(bench.Options(device="cuda"))


def test_default_report_names():
    args = bench.parse_args([])
    assert bench.default_output("cpu", args) == REPO / "benchmarks" / "reports" / "cpu.json"
    args = bench.parse_args(["--bf16", "on", "--channels-last", "off"])
    assert bench.default_output("cpu", args).name == "cpu-bf16-on-channels-last-off.json"
    assert bench.device_kind({"type": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3"}) == "cuda-nvidia-h100-80gb-hbm3"


def test_peak_rss_sees_an_allocation_after_a_reset():
    """The mechanism behind the CPU peak: reset the high-water mark, allocate, read it back."""
    if not bench.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: the report then says peak_rss_scope 'process'")
    before = bench.rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
    peak, source = bench.peak_rss()
    assert source == "VmHWM"
    assert peak - before >= 60 * 2**20
    del block
