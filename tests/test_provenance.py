"""The provenance line names profile, data (with md5), sizes, epochs, seeds, precision, machine and
code, all from the runs' own records: nothing from this checkout's data folder or commit."""

from __future__ import annotations

import json

import pytest

from at import grid, provenance, records

MINI = "1c190744c9595cc62078be24b4b038fb"


def _finish(tmp_path, run, **metrics) -> None:
    out = tmp_path / run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"data_md5": MINI, **metrics}))


def test_the_line_names_precision_seeds_machine_and_the_code_of_the_records(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no data folder and no repository here: the records say it all
    runs = grid.runs(params, "ci")
    line = provenance.describe(params, "ci", runs)
    assert "precision" not in line and "code" not in line, "no finished run: nothing claimed"
    assert "CIFAR-10 (no finished run)" in line
    for run in runs:
        _finish(tmp_path, run, precision="float32", git_commit="a" * 40, machine="AMD EPYC (2 threads)")
    line = provenance.describe(params, "ci", runs)
    assert line.startswith("ci profile, CIFAR-10 mini subset") and f"md5 {MINI}" in line
    assert "1 seed (0)" in line and "1 epochs" in line and "precision float32" in line
    assert "trained on AMD EPYC (2 threads)" in line and line.endswith(f"code {'a' * 40}")
    _finish(tmp_path, runs[0], precision="bf16", git_commit="b" * 40 + "-dirty", machine="NVIDIA H200")
    line = provenance.describe(params, "ci", runs)
    assert "precision bf16/float32" in line and "trained on AMD EPYC (2 threads) and NVIDIA H200" in line
    assert line.endswith(f"code {'a' * 40}, {'b' * 40}-dirty")
    assert provenance.footer(params, "ci", runs) == "ci · CIFAR-10 mini subset · 1 ep · code aaaaaaa, bbbbbbb-dirty"


def test_runs_of_one_data_set_on_different_data_cannot_share_a_report(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = grid.runs(params, "ci")
    for run in runs:
        _finish(tmp_path, run)
    _finish(tmp_path, runs[1], data_md5="c58f30108f718f92721af3b95e74349a")
    with pytest.raises(records.RecordError, match="cifar10 runs were trained on different data"):
        provenance.data_md5(runs)
