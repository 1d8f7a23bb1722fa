"""torch.compile's CUDA-graph mode and auto's measurement on a CUDA GPU (at.execution, issue 36.4).

Marked ``cuda``: skipped without a GPU, run by ``make gpu-check`` (``pytest -m cuda``), which
also measures the modes in its benchmark steps (several cohorts per GPU included). The decision
logic itself is tested on the CPU (tests/test_execution.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from at import execution

from test_cohort import make_spec, members, private_mlflow  # noqa: F401

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_cohort_trains_under_cuda_graphs_close_to_eager(tmp_path, cifar_mini_dir, teacher):
    from at.train import Options, train_cohort

    specs = members(tmp_path / "graphs", cifar_mini_dir, teacher, epochs=1)[:3]
    eager = [{**s, "out_dir": str(tmp_path / "eager" / Path(s["out_dir"]).name)} for s in specs]
    options = dict(device="cuda", precision="float32", progress=False, tracking=False, layout="contiguous")
    graphs = train_cohort(specs, Options(**options, compile="reduce-overhead"))
    plain = train_cohort(eager, Options(**options, compile="off"))
    for a, b in zip(graphs, plain):
        # cuDNN's algorithms and CUDA graphs are not bit-exact: the same training, within noise
        assert abs(a["final_test_error"] - b["final_test_error"]) < 15.0
    saved = torch.load(Path(specs[1]["out_dir"]) / "checkpoint.pt", weights_only=True)
    assert saved["execution"]["student"]["compile"] in ("reduce-overhead", "off")   # off: it fell back, said so


def test_auto_measures_cuda_graphs_against_eager_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AT_CACHE_DIR", str(tmp_path))
    workload = execution.Workload("wrn-10-1", 10, (3, 32, 32), 64, "bf16", True, torch.device("cuda"))
    modes = execution.measure_compile(workload, "channels_last", execution.compile_candidates(workload.device),
                                      rounds=2)
    assert set(modes) == {"off", "on", "reduce-overhead"}
    for name, result in modes.items():
        assert "error" in result or result["step_s"] > 0, (name, result)
    decider = execution.Decider(layout="channels_last", compile="auto",
                                measure_compile=lambda *a, **k: modes)
    choice = decider.decide(workload, steps=100_000)
    assert choice.compile in ("off", "on", "reduce-overhead") and "measured" in choice.how
    assert json.loads((tmp_path / "execution.json").read_text())["measurements"]
