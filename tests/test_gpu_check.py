"""benchmarks/gpu_check.py (`make gpu-check`): its refusal without a GPU, and the wiring of its steps.

The check itself needs a CUDA GPU; here, without one, each step's command is checked against
what it calls: the pytest marker selects the CUDA tests, the benchmark accepts its arguments, the
data step really prepares the mini data set through the environment overrides, and the training
specs are valid cohorts of the paper's runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from at.data.stream import check_shared_stream
from at.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["tests", "benchmark", "benchmark-modes", "data", "teacher", "cohort"]


def _load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _plan(folder: Path, *argv: str):
    args = gpu_check.parse_args(["--out", str(folder), *argv])
    return {step.name: step for step in gpu_check.plan(folder, args)}, args


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_refuses_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: error: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where one is"]
    assert not out.exists()


def test_dry_run_lists_the_steps_in_order_and_runs_nothing(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split(":")[0].split(". ")[1] for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert listed == STEPS
    assert "pytest -m cuda" in proc.stdout and "--device cuda --precision float32 bf16 auto" in proc.stdout
    assert "AT_CIFAR10_URL=file://" in proc.stdout
    assert not out.exists()


def test_the_tests_step_selects_the_cuda_tests(tmp_path):
    steps, _ = _plan(tmp_path)
    command = steps["tests"].command
    assert command[1:5] == ["-m", "pytest", "-m", "cuda"]
    # collected from the files that hold the CUDA tests and one that holds none (collecting the
    # whole suite costs half a minute of imports and proves nothing more)
    assert str(REPO / "tests") in command
    files = [str(REPO / "tests" / name)
             for name in ("test_cuda_cohort.py", "test_augment.py", "test_cuda_distributed.py", "test_benchmark.py")]
    narrowed = [part if part != str(REPO / "tests") else files[0] for part in command] + files[1:]
    collected = subprocess.run([*narrowed, "--collect-only"], cwd=REPO, capture_output=True, text=True,
                               timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert "tests/test_cuda_cohort.py::test_a_cohort_killed_on_the_gpu_resumes_every_member" in ids, collected.stdout
    assert any(i.startswith("tests/test_augment.py::test_cuda_batch_matches_the_reference") for i in ids)
    assert "tests/test_cuda_distributed.py::test_two_gpus_with_nccl_and_sync_bn_follow_the_one_gpu_run" in ids
    assert not any("test_benchmark" in i for i in ids), "only tests marked cuda"


def test_the_benchmark_step_is_the_cohort_benchmark_on_cuda(tmp_path):
    steps, _ = _plan(tmp_path, "--steps", "7", "--warmup", "2")
    command = steps["benchmark"].command
    assert Path(command[1]) == REPO / "benchmarks" / "cohort_throughput.py"
    args = gpu_check.cohort_throughput.parse_args(command[2:])
    assert (args.device, args.precision, args.steps, args.warmup) == ("cuda", ["float32", "bf16", "auto"], 7, 2)
    assert args.output == tmp_path / "benchmark-cohort.json" and args.members is None


def test_the_modes_step_measures_what_auto_weighs_on_cuda(tmp_path):
    """CUDA graphs (compile reduce-overhead) and several cohorts per GPU, each against eager and
    one cohort: measured by gpu-check, since they have no CPU path to measure them on here."""
    steps, _ = _plan(tmp_path, "--steps", "7", "--warmup", "2")
    command = steps["benchmark-modes"].command
    args = gpu_check.cohort_throughput.parse_args(command[2:])
    assert (args.device, args.precision, args.compile) == ("cuda", ["bf16"], ["off", "on", "reduce-overhead"])
    assert args.cohorts_per_device == [1, 2, 4] and args.solo == "reference" and args.warmup == 3
    names = [m["name"] for m in gpu_check.cohort_throughput.modes(args, __import__("torch").device("cuda"))]
    assert "bf16 / compile reduce-overhead / layout auto / 4 cohorts" in names and len(names) == 9
    assert args.output == tmp_path / "benchmark-modes.json"


def test_the_data_step_prepares_the_mini_set_through_the_overrides(tmp_path, cifar_mini_tarball):
    steps, _ = _plan(tmp_path / "check", "--mini-tarball", str(cifar_mini_tarball))
    step = steps["data"]
    proc = subprocess.run(step.command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **step.env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    from at.data import datasets, download

    root = tmp_path / "check" / "data" / "cifar10"
    assert download.read_source_record(root)["md5"] == gpu_check.MINI_MD5, "the md5 override was used"
    prepared = datasets.get("cifar10").load(root)
    assert (len(prepared.train_y), len(prepared.test_y)) == (5085, 1017)


def test_the_training_specs_are_the_papers_cohort_on_the_mini_data(tmp_path):
    steps, args = _plan(tmp_path, "--epochs", "3")
    teacher, members = gpu_check.training_specs(tmp_path, args.epochs, args.params)
    assert teacher["id"] == "cifar10/wrn-16-2/baseline/seed0" and teacher["student"] == "wrn-16-2"
    assert {m["method_name"] for m in members} == {"baseline", "at-sum-p2", "at-sum-p1", "at-sum-p4",
                                                   "at-max-p1", "kd", "at+kd", "factt"}
    check_shared_stream([RunSpec.resolve(m) for m in members])
    for spec in [teacher, *members]:
        RunSpec.resolve(spec)   # a spec the trainer accepts
        assert spec["protocol"]["epochs"] == 3 and spec["protocol"]["precision"] == "auto"
        assert spec["data_dir"] == str(tmp_path / "data" / "cifar10") == steps["data"].command[-1]
        assert Path(spec["out_dir"]).is_relative_to(tmp_path / "runs")
    for spec in members:
        if spec["teacher"]:
            assert spec["teacher_checkpoint"] == str(Path(teacher["out_dir"]) / "checkpoint.pt")
    assert steps["teacher"].command[-5:] == ["--spec", str(tmp_path / "teacher.yaml"), "--device", "cuda",
                                             "--no-progress"]
    assert steps["cohort"].needs == ("teacher",) and steps["teacher"].needs == ("data",)
    assert steps["cohort"].env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlruns.db'}"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
