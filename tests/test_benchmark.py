"""benchmarks/cohort_throughput.py: the report's structure and self-consistency, and its input checks.

No assertion on speed: timings depend on the machine and its load (measure with the
benchmark's report, never with assertions on wall time). The issue's speed and memory targets
are data in the report; here only their bookkeeping is checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from at.data.stream import DataStream

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cohort_throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_cohort_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_script()

MEMBERS = ["baseline", "at-sum-p2"]
# one precision: the other runs the same code in another arithmetic (tests/test_bf16_terms.py),
# and the report's arithmetic per precision is checked on hand-built rows below
TINY = ["--members", *MEMBERS, "--steps", "2", "--warmup", "1", "--batch", "16", "--dataset-size", "64",
        "--threads", "1", "--device", "cpu", "--precision", "float32", "--layout", "contiguous", "auto",
        "--solo", "reference", "--note", "a test"]
FLOAT32 = "float32 / compile off / layout contiguous"
FLOAT32_AUTO_LAYOUT = "float32 / compile off / layout auto"
# the paper's 8-run WRN-16-1 cohort of Tables 1 and 2, written out here rather than taken from the grid
PAPER_METHODS = {"baseline", "at-sum-p2", "at-sum-p1", "at-sum-p4", "at-max-p1", "kd", "at+kd", "factt"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, str]:
    """One run of the script as a user runs it (a subprocess, from another directory)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "reports" / "tiny.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--output", str(out)],
                          cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(out.parent.glob(".*tmp*")), "a temporary file was left beside the report"
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def report(run) -> dict:
    return run[0]


def _cpu_flags_from_proc() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_report_header(report):
    assert report["format"] == "at-benchmark-cohort" and report["version"] == 2 and report["note"] == "a test"
    device = report["device"]
    assert device["type"] == "cpu" and device["torch"] == torch.__version__
    assert device["cpu_model"] and device["torch_threads"] == 1 and device["logical_cpus"] >= 1
    if Path("/proc/cpuinfo").is_file():
        flags = _cpu_flags_from_proc()
        assert device["cpu_flags"] == {f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")}
        assert device["cpu_native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & flags)
    settings = report["settings"]
    assert (settings["batch"], settings["steps"], settings["warmup"]) == (16, 2, 1)
    assert settings["precisions"] == ["float32"]
    assert settings["auto_precision"] == ("bf16" if device["cpu_native_bf16"] else "float32")
    assert settings["optimizer"]["lr"] == 0.1 and settings["optimizer"]["momentum"] == 0.9
    assert settings["compile_flags"] == ["off"] and settings["layout_flags"] == ["contiguous", "auto"]
    assert settings["cohorts_per_device"] == [1] and settings["solo"] == "reference"
    assert settings["reference"] == FLOAT32
    for key in ("start", "end"):
        assert len(report["load_average"][key]) == 3 and all(v >= 0 for v in report["load_average"][key])


def test_members_are_the_pipelines_runs(report):
    settings = report["settings"]
    assert settings["members"] == MEMBERS
    assert settings["run_ids"] == ["cifar10/wrn-16-1/baseline/seed0", "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"]
    assert settings["students"] == ["wrn-16-1"] and settings["teachers"] == ["wrn-16-2"]
    params = bench.at_params.load(REPO / "params.yaml")
    whole = bench.cohort_specs(params, bench.COHORT, bench.PROFILE, None)
    assert {s["method_name"] for s in whole} == PAPER_METHODS
    assert {(s["student"], s["teacher"]) for s in whole} == {("wrn-16-1", None), ("wrn-16-1", "wrn-16-2")}
    assert all(s["protocol"]["batch_size"] == 128 for s in whole), "the paper's batch"


def _check_row(row: dict) -> None:
    assert row["wall_time_s"] > row["setup_s"] > 0 and row["timed_s"] > 0 and row["warmup_s"] > 0
    assert row["cpu_cores_used"] > 0
    assert row["gpu_utilisation_percent"] is None, "no GPU: nothing measured, nothing shown"
    mem = row["memory"]
    assert mem["peak_rss_mib"] >= mem["steps_peak_rss_mib"] > 0 and mem["rss_before_steps_mib"] > 0
    assert mem["steps_peak_rss_scope"] in ("steps", "process")
    assert all(math.isfinite(v) and v > 0 for v in row["mean_loss"].values())
    assert set(row["mean_loss"]) == set(row["members"])


def test_rows_per_mode_are_consistent(report):
    steps, batch = report["settings"]["steps"], report["settings"]["batch"]
    runs = report["settings"]["run_ids"]
    assert list(report["results"]) == [FLOAT32, FLOAT32_AUTO_LAYOUT]
    reference = report["reference_solo"]
    for name, mode in report["results"].items():
        assert (mode["precision"], mode["precision_asked"], mode["compile"], mode["cohorts_per_device"]) == \
            ("float32", "float32", "off", 1)
        assert set(mode["chosen"]) == {"student wrn-16-1", "teacher wrn-16-2"}
        for chosen in mode["chosen"].values():
            assert chosen["compile"] == "off" and chosen["layout"] in ("contiguous", "channels_last")
            assert chosen["layout"] == "contiguous" or mode["layout"] == "auto"
        cohort = mode["cohort"]
        # the cohort: every member trains every batch
        assert cohort["members"] == runs
        assert cohort["images"] == len(runs) * batch * steps
        assert cohort["run_images_per_s"] == pytest.approx(len(runs) * batch * steps / cohort["timed_s"])
        assert cohort["images_per_s_per_run"] == pytest.approx(batch * steps / cohort["timed_s"])
        assert cohort["step_ms"] == pytest.approx(1000 * cohort["timed_s"] / steps)
        assert cohort["run_images_per_cpu_s"] == pytest.approx(cohort["images"] / cohort["cpu_s"])
        assert cohort["cpu_s"] == pytest.approx(cohort["timed_s"] * cohort["cpu_cores_used"])
        assert mode["cohort_vs_reference_solo_per_cpu_s"] == pytest.approx(
            cohort["run_images_per_cpu_s"] / reference["run_images_per_cpu_s"])
        assert mode["cohort_vs_reference_solo"] == pytest.approx(cohort["run_images_per_s"]
                                                                 / reference["run_images_per_s"])
        assert report["speedups"]["cohort_vs_reference_solo"][name] == mode["cohort_vs_reference_solo"]
        _check_row(cohort)
    # --solo reference: the reference mode's runs alone only, and they are the reference
    solo = report["results"][FLOAT32]["solo"]
    assert report["results"][FLOAT32_AUTO_LAYOUT]["solo"] is None
    assert report["results"][FLOAT32_AUTO_LAYOUT]["cohort_vs_solo"] is None
    assert solo == reference
    assert [r["members"] for r in solo["runs"]] == [[r] for r in runs]
    assert all(r["images"] == batch * steps for r in solo["runs"])
    total_time = sum(r["timed_s"] for r in solo["runs"])
    assert solo["timed_s"] == pytest.approx(total_time)
    assert solo["run_images_per_s"] == pytest.approx(len(runs) * batch * steps / total_time)
    assert solo["run_images_per_cpu_s"] == pytest.approx(solo["images"] / sum(r["cpu_s"] for r in solo["runs"]))
    assert solo["memory"]["peak_rss_mib"] == max(r["memory"]["peak_rss_mib"] for r in solo["runs"])
    for row in solo["runs"]:
        _check_row(row)
    result = report["results"][FLOAT32]
    assert result["cohort_vs_solo"] == pytest.approx(result["cohort"]["run_images_per_s"] / solo["run_images_per_s"])
    assert report["speedups"]["cohort_vs_solo"][FLOAT32] == result["cohort_vs_solo"]
    # no mode at auto (precision, compile and layout) measured: nothing to compare
    assert report["speedups"]["cohort_auto_vs_solo_float32"] is None


def test_targets_are_data(report):
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {"cohort_auto_vs_solo_float32", "cohort_auto_vs_solo_float32_without_native_bf16",
                            "cohort_vs_solo_float32", "cohort_peak_rss_gib"}
    assert targets["cohort_vs_solo_float32"]["value"] == report["results"][FLOAT32]["cohort_vs_solo"]
    # the auto mode was not measured: no value, not met
    for name in ("cohort_auto_vs_solo_float32", "cohort_auto_vs_solo_float32_without_native_bf16",
                 "cohort_peak_rss_gib"):
        assert targets[name]["value"] is targets[name]["met"] is None
    for t in targets.values():
        assert t["applies"] is False, "2 members are not the paper's 8-run cohort"
        if t["value"] is not None:
            assert t["met"] == (t["value"] >= t["threshold"] if t["comparison"] == ">=" else t["value"] < t["threshold"])


def test_targets_apply_to_the_8_run_cohort_on_a_cpu_by_its_bf16():
    def row(run_images_per_s, peak_mib):
        return {"run_images_per_s": run_images_per_s, "memory": {"peak_rss_mib": peak_mib}}

    def mode(asked, precision, compile_mode, layout, cohort, solo=None):
        return {"precision_asked": asked, "precision": precision, "compile": compile_mode, "layout": layout,
                "cohorts_per_device": 1, "cohort": cohort, "solo": solo,
                "cohort_vs_solo": cohort["run_images_per_s"] / solo["run_images_per_s"] if solo else None}

    report = {"device": {"type": "cpu", "cpu_native_bf16": True},
              "settings": {"members": sorted(PAPER_METHODS)},
              "reference_solo": row(100, 900),
              "results": {"a": mode("float32", "float32", "off", "contiguous", row(160, 3000), row(100, 900)),
                          "b": mode("auto", "bf16", "auto", "auto", row(500, 5000))}}
    targets = {t["name"]: t for t in bench.evaluate_targets(report)}
    assert targets["cohort_auto_vs_solo_float32"]["value"] == pytest.approx(5.0)
    assert targets["cohort_auto_vs_solo_float32"]["value_per_cpu_s"] is None   # no CPU seconds in these rows
    assert targets["cohort_vs_solo_float32"]["value"] == pytest.approx(1.6)
    assert targets["cohort_peak_rss_gib"]["value"] == pytest.approx(5000 / 1024)
    assert [targets[n]["met"] for n in ("cohort_auto_vs_solo_float32", "cohort_vs_solo_float32",
                                        "cohort_peak_rss_gib")] == [True, True, False]
    assert [n for n, t in targets.items() if t["applies"]] == [
        "cohort_auto_vs_solo_float32", "cohort_vs_solo_float32", "cohort_peak_rss_gib"]
    report["device"]["cpu_native_bf16"] = False
    targets = {t["name"]: t for t in bench.evaluate_targets(report)}
    assert not targets["cohort_auto_vs_solo_float32"]["applies"]
    assert targets["cohort_auto_vs_solo_float32_without_native_bf16"]["applies"]
    assert targets["cohort_auto_vs_solo_float32_without_native_bf16"]["met"] is True   # 5.0 >= 2.5


def test_modes_are_each_precision_at_each_compile_and_layout_and_auto_once():
    import argparse

    args = argparse.Namespace(precision=["float32", "bf16", "auto"], compile=["off", "on"], layout=["auto"],
                              cohorts_per_device=[1, 2])
    names = [m["name"] for m in bench.modes(args, torch.device("cpu"))]
    assert names == ["float32 / compile off / layout auto", "float32 / compile off / layout auto / 2 cohorts",
                     "float32 / compile on / layout auto", "float32 / compile on / layout auto / 2 cohorts",
                     "bf16 / compile off / layout auto", "bf16 / compile off / layout auto / 2 cohorts",
                     "bf16 / compile on / layout auto", "bf16 / compile on / layout auto / 2 cohorts",
                     "auto / compile auto / layout auto", "auto / compile auto / layout auto / 2 cohorts"]


def test_a_report_is_committed_into_the_committed_folder(run, tmp_path, monkeypatch):
    report, _ = run
    monkeypatch.setattr(bench, "COMMITTED", tmp_path / "committed")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    target = bench.commit_report(path, "cpu-test")
    assert target == tmp_path / "committed" / "cpu-test.json" and json.loads(target.read_text()) == report
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a at-benchmark-cohort report of version 2"):
        bench.commit_report(path, "other")


def test_the_table_names_every_row(run):
    report, stdout = run
    lines = stdout.splitlines()
    for name, mode in report["results"].items():
        assert any(line.startswith(name) and " cohort " in line for line in lines), name
        assert any(line.startswith(f"{name}: student wrn-16-1 ") for line in lines), name
    assert any(line.startswith(FLOAT32) and " solo " in line for line in lines)
    assert any(line.startswith("target cohort_vs_solo_float32") for line in lines)


def test_the_stream_runs_on_past_an_epoch():
    data = bench.SyntheticData(40, 10, torch.device("cpu"), seed=0)
    stream = DataStream(data, 0, 16, torch.device("cpu"))
    batches = bench.endless_batches(stream)
    sizes = [len(next(batches)[1]) for _ in range(7)]
    assert sizes == [16, 16, 8, 16, 16, 8, 16], "three batches per epoch of 40 images, then the next epoch"


@pytest.mark.parametrize("argv, message", [
    (["--members", "nonsense"], "--members: 'nonsense' is not a method of cohort cifar10/wrn-16-1/seed0/cohort0"),
    (["--members", "kd", "kd"], "given twice"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--precision", "maybe"], "invalid choice: 'maybe'"),
    (["--compile", "on", "--warmup", "0"], "needs --warmup >= 1"),
    (["--compile", "reduce-overhead", "--device", "cpu"], "reduce-overhead needs CUDA"),
    (["--layout", "nhwc"], "invalid choice: 'nhwc'"),
    (["--cohorts-per-device", "0"], "--cohorts-per-device must be integers >= 1"),
    (["--commit", "Bad Name"], "a name of lower-case letters"),
    (["--commit-existing", "r.json"], "--commit-existing needs --commit NAME"),
    (["--dataset-size", "16", "--batch", "32"], "--dataset-size (16) must be at least --batch (32)"),
    (["--cohort", "cifar10/nothing"], "cohort 'cifar10/nothing' is not in the paper profile"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: this machine has no CUDA GPU")]))
def test_bad_arguments_are_one_line(tmp_path, argv, message, capsys, monkeypatch):
    # in this process, through the command's own entry point (the same code as the script's)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    try:
        status = bench.cli([*argv, "--output", str(out)])
    except SystemExit as e:   # argparse's refusals
        status = e.code
    err = capsys.readouterr().err
    assert status != 0
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not out.exists() and not list(tmp_path.iterdir())


def _worker(members: list[str], timed_s: float, images: int, peak_mib: float, cores: float) -> dict:
    """A worker's measurements as measure() returns them, made up by hand."""
    return {"members": members, "images": images, "timed_s": timed_s, "warmup_s": 0.5, "setup_s": 1.0,
            "cpu_cores_used": cores, "gpu_utilisation_percent": None, "mean_loss": {m: 2.0 for m in members},
            "memory": {"peak_rss_mib": peak_mib, "steps_peak_rss_mib": peak_mib - 1, "rss_before_steps_mib": 10,
                       "steps_peak_rss_scope": "steps"}}


def test_the_report_arithmetic_on_hand_built_rows():
    """Rows and the solo total, from numbers chosen so that every figure is worked out by hand:
    a 2-run cohort of 4 steps of 16 images in 2 s; the same runs alone in 1.5 s and 0.5 s."""
    cohort = bench._row(_worker(["a", "b"], 2.0, 128, 500, 1.5), 3.0, 4, (0, 0, 0), (1, 1, 1))
    assert cohort["run_images_per_s"] == 64.0            # 128 images / 2 s
    assert cohort["cpu_s"] == 3.0 and cohort["run_images_per_cpu_s"] == pytest.approx(128 / 3.0)   # 1.5 cores x 2 s
    assert cohort["images_per_s_per_run"] == 32.0        # 64 images each / 2 s
    assert cohort["step_ms"] == 500.0                    # 2 s / 4 steps
    assert cohort["wall_time_s"] == 3.0 and cohort["load_average_after"] == [1, 1, 1]
    alone = [bench._row(_worker(["a"], 1.5, 64, 300, 1.0), 2.0, 4, (0, 0, 0), (0, 0, 0)),
             bench._row(_worker(["b"], 0.5, 64, 400, 2.0), 1.0, 4, (0, 0, 0), (2, 2, 2))]
    solo = bench._solo_total(alone)
    assert solo["members"] == ["a", "b"] and solo["images"] == 128
    assert solo["timed_s"] == 2.0 and solo["run_images_per_s"] == 64.0   # 128 images / (1.5 + 0.5) s
    assert solo["wall_time_s"] == 3.0
    assert solo["cpu_cores_used"] == pytest.approx((1.0 * 1.5 + 2.0 * 0.5) / 2.0)   # time-weighted: 1.25
    assert solo["cpu_s"] == 2.5 and solo["run_images_per_cpu_s"] == pytest.approx(128 / 2.5)
    assert solo["memory"]["peak_rss_mib"] == 400 and solo["memory"]["steps_peak_rss_mib"] == 399
    assert solo["gpu_utilisation_percent_mean"] is None and solo["load_average_after"] == [2, 2, 2]
    utilised = [dict(r, gpu_utilisation_percent={"mean": u}) for r, u in zip(alone, (90.0, 50.0))]
    assert bench._solo_total(utilised)["gpu_utilisation_percent_mean"] == pytest.approx(
        (90.0 * 1.5 + 50.0 * 0.5) / 2.0)


def test_default_report_name():
    assert bench.device_kind({"type": "cpu"}) == "cpu"
    assert bench.device_kind({"type": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3"}) == "cuda-nvidia-h100-80gb-hbm3"


def test_peak_rss_sees_an_allocation_after_a_reset():
    """The mechanism behind the CPU peak: reset the high-water mark, allocate, read it back."""
    if not bench.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: the report then says steps_peak_rss_scope 'process'")
    import mmap

    before = bench.rss_bytes()
    # 64 MiB of fresh anonymous pages, each written, so resident: not memory that the allocator
    # kept from an earlier test of this worker (which would not raise the high-water mark)
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    peak, source = bench.peak_rss()
    assert source == "VmHWM"
    assert peak - before >= 60 * 2**20
    block.close()


def test_several_cohorts_run_at_once_on_the_device_and_add_up(tmp_path):
    """--cohorts-per-device 2: two copies of the cohort, each with its share of the threads,
    timed together; their run-images/s and memory add up (the CPU path of what gpu-check
    measures on a GPU)."""
    out = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--members", "baseline", "--steps", "1", "--warmup", "1",
                           "--batch", "8", "--dataset-size", "16", "--threads", "2", "--device", "cpu",
                           "--precision", "float32", "--layout", "contiguous", "--cohorts-per-device", "2",
                           "--solo", "reference", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    two = report["results"]["float32 / compile off / layout contiguous / 2 cohorts"]
    assert two["cohorts_per_device"] == 2 and two["solo"] is None and two["cohort_vs_solo"] is None
    rows = two["cohort"]["processes"]
    assert len(rows) == 2 and all(r["members"] == ["cifar10/wrn-16-1/baseline/seed0"] for r in rows)
    assert two["cohort"]["run_images_per_s"] == pytest.approx(sum(r["run_images_per_s"] for r in rows))
    assert two["cohort"]["memory"]["peak_rss_mib"] == pytest.approx(sum(r["memory"]["peak_rss_mib"] for r in rows))
    assert "x2" in proc.stdout
