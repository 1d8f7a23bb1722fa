"""The report's two words on provenance (at.provenance): the one-line figure footer, and whether
a profile's numbers are on the published numbers' scale (which decides diff or paired Δ)."""

from __future__ import annotations

from at import grid, provenance, tracking
from at.data.download import write_source_record

OFFICIAL = "c58f30108f718f92721af3b95e74349a"   # params.yaml's data.cifar10.md5
MINI = "1c190744c9595cc62078be24b4b038fb"       # the CIFAR-10 mini subset (at.data.datasets)


def _data(tmp_path, monkeypatch, md5: str) -> None:
    monkeypatch.chdir(tmp_path)   # data/<name> is relative to the project root
    (tmp_path / "data" / "cifar10").mkdir(parents=True, exist_ok=True)
    write_source_record(tmp_path / "data" / "cifar10", {"md5": md5, "url": "file:///x"})


def test_the_footer_is_one_short_line(params, tmp_path, monkeypatch):
    _data(tmp_path, monkeypatch, MINI)
    monkeypatch.setattr(tracking, "git_commit", lambda: "9106bbf2f130103831f032b4a57a3b0a8823a7e6")
    footer = provenance.footer(params, "mini", grid.runs(params, "mini"))
    assert footer == "mini · CIFAR-10 mini subset · 30 ep · code 9106bbf"
    monkeypatch.setattr(tracking, "git_commit", lambda: "9106bbf2f130103831f032b4a57a3b0a8823a7e6-dirty")
    assert provenance.footer(params, "smoke", grid.runs(params, "smoke")) == \
        "smoke · CIFAR-10 mini subset · 2 ep · code 9106bbf-dirty"
    # the full record stays in the README's line
    assert f"md5 {MINI}" in provenance.describe(params, "mini", grid.runs(params, "mini"))


def test_only_the_papers_protocol_on_the_official_data_is_full_scale(params, tmp_path, monkeypatch):
    _data(tmp_path, monkeypatch, OFFICIAL)
    cifar = [r for r in grid.runs(params, "paper") if r["dataset"] == "cifar10"]
    assert provenance.full_scale(params, "paper", cifar)
    # a profile that shortens the protocol (smoke: 2 epochs, 256 images; mini: 30 epochs) is not
    assert not provenance.full_scale(params, "smoke", grid.runs(params, "smoke"))
    assert not provenance.full_scale(params, "mini", grid.runs(params, "mini"))
    # precision alone changes no scale
    params["profiles"]["paper"]["protocol"] = {"precision": "bf16"}
    assert provenance.full_scale(params, "paper", cifar)
    params["profiles"]["paper"]["protocol"] = {"epochs": 100}
    assert not provenance.full_scale(params, "paper", cifar)
    params["profiles"]["paper"].pop("protocol")
    # the paper's protocol on the mini subset is not the paper's scale either
    _data(tmp_path, monkeypatch, MINI)
    assert not provenance.full_scale(params, "paper", cifar)
    assert not provenance.full_scale(params, "paper", [])
