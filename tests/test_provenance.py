"""The provenance line names profile, data (with md5), sizes, epochs, seeds, precision and code."""

from __future__ import annotations

import json

from at import grid, provenance
from at.tracking import git_commit


def test_the_line_names_precision_seeds_and_the_code(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no data folder here: "not downloaded yet"
    runs = grid.runs(params, "ci")
    assert "precision" not in provenance.describe(params, "ci", runs), "no finished run: no precision claimed"
    for run in runs:
        out = tmp_path / run["out_dir"]
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"precision": "float32"}))
    line = provenance.describe(params, "ci", runs)
    assert line.startswith("ci profile, CIFAR-10")
    assert "1 seed (0)" in line and "1 epochs" in line and "precision float32" in line
    assert line.endswith(f"code {git_commit()}")
    (tmp_path / runs[0]["out_dir"] / "metrics.json").write_text(json.dumps({"precision": "bf16"}))
    assert "precision bf16/float32" in provenance.describe(params, "ci", runs)
