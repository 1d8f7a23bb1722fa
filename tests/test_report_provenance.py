"""The report's two words on provenance (at.provenance): the one-line figure footer, and whether
a profile's numbers are on the published numbers' scale (which decides diff or paired Δ), both
from the runs' records."""

from __future__ import annotations

import json

from at import grid, provenance

OFFICIAL = "c58f30108f718f92721af3b95e74349a"   # params.yaml's data.cifar10.md5
MINI = "1c190744c9595cc62078be24b4b038fb"       # the CIFAR-10 mini subset (at.data.datasets)


def _records(tmp_path, monkeypatch, runs, md5: str, commit: str = "9106bbf2f130103831f032b4a57a3b0a8823a7e6") -> list:
    monkeypatch.chdir(tmp_path)   # runs' out_dir is relative to the project root
    for run in runs:
        out = tmp_path / run.out_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"data_md5": md5, "git_commit": commit}))
    return runs


def test_the_footer_is_one_short_line(params, tmp_path, monkeypatch):
    mini = _records(tmp_path, monkeypatch, grid.runs(params, "mini"), MINI)
    assert provenance.footer(params, "mini", mini) == "mini · CIFAR-10 mini subset · 30 ep · code 9106bbf"
    smoke = _records(tmp_path, monkeypatch, grid.runs(params, "smoke"), MINI,
                     "9106bbf2f130103831f032b4a57a3b0a8823a7e6-dirty")
    assert provenance.footer(params, "smoke", smoke) == "smoke · CIFAR-10 mini subset · 2 ep · code 9106bbf-dirty"
    # the full record stays in the README's line
    assert f"md5 {MINI}" in provenance.describe(params, "mini", mini)


def test_only_the_papers_protocol_on_the_official_data_is_full_scale(params, tmp_path, monkeypatch):
    cifar = _records(tmp_path, monkeypatch,
                     [r for r in grid.runs(params, "paper") if r.dataset == "cifar10"], OFFICIAL)
    assert provenance.full_scale(params, "paper", cifar)
    # a profile that shortens the protocol (smoke: 2 epochs, 256 images; mini: 30 epochs) is not
    assert not provenance.full_scale(params, "smoke", _records(tmp_path, monkeypatch, grid.runs(params, "smoke"), OFFICIAL))
    assert not provenance.full_scale(params, "mini", _records(tmp_path, monkeypatch, grid.runs(params, "mini"), OFFICIAL))
    # precision alone changes no scale
    params["profiles"]["paper"]["protocol"] = {"precision": "bf16"}
    assert provenance.full_scale(params, "paper", cifar)
    params["profiles"]["paper"]["protocol"] = {"epochs": 100}
    assert not provenance.full_scale(params, "paper", cifar)
    params["profiles"]["paper"].pop("protocol")
    # the paper's protocol on the mini subset is not the paper's scale either
    _records(tmp_path, monkeypatch, cifar, MINI)
    assert not provenance.full_scale(params, "paper", cifar)
    assert not provenance.full_scale(params, "paper", [])
