"""Committed records cannot be quietly edited or stripped (at.records): on a copy of the mini
profile's committed records, each edit that once rendered (a new cell, other curves, another
provenance line) is refused by the command a reader runs, `python -m at report --records-only`,
in one line that names the record and the file, before anything is written."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from at import checkpoint, grid, records
from at.report.inputs import unbound
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
PROFILE = "mini"
AT_RUN = "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"
SEED = "cifar10/wrn-16-1/baseline/seed1"
MANIFEST = f"results/runs/{PROFILE}/SHA256SUMS"
AGAIN = "restore it (`git checkout`), or retrain the run and export it (`python -m at report`)"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """The project's layout with the mini profile's committed records, params and references."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "results" / "runs" / PROFILE, copy / "results" / "runs" / PROFILE)
    for name in ("params.yaml", "references.yaml"):
        shutil.copy(REPO / name, copy / name)
    monkeypatch.chdir(copy)   # records' paths are relative to the project root
    return copy


def _record(run_id: str) -> Path:
    return Path("results/runs") / PROFILE / run_id


def _refused(repo: Path) -> str:
    """The one line `report --records-only` refuses with; nothing written."""
    out = repo / "out"
    done = run_cli(["--params", str(repo / "params.yaml"), "report", "--profile", PROFILE,
                    "--records-only", "--out", str(out)], cwd=repo)
    line = done.stderr.strip()
    assert done.returncode == 2 and line and "\n" not in line and "Traceback" not in line, done.stderr
    assert not out.exists()
    return line


def _history(run_id: str) -> list[dict]:
    with open(_record(run_id) / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_history(run_id: str, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (_record(run_id) / "history.csv").write_text(text.getvalue())


def _edit_metrics(run_id: str, **changes) -> None:
    path = _record(run_id) / "metrics.json"
    metrics = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def test_the_committed_records_pass_as_they_are(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert len(records.runs(params, PROFILE)) == 45


@pytest.mark.parametrize("manifest_too", [False, True], ids=["record", "record-and-manifest"])
def test_a_record_without_its_spec_is_refused_like_one_of_another_spec(repo, manifest_too):
    """The old numbers of a method whose beta params.yaml changed: refused with spec.json,
    refused without it, whatever the manifest says."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["methods"]["at-sum-p2"]["terms"][1]["beta"] = 300
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _refused(repo) == (
        f"error: run {AT_RUN}: its record {_record(AT_RUN)}/spec.json holds another spec than params.yaml "
        "now defines: the committed numbers stand for another experiment; retrain the run and export it "
        "(`python -m at report`), or restore params.yaml")
    (_record(AT_RUN) / "spec.json").unlink()
    if manifest_too:
        manifest = Path(MANIFEST)
        manifest.write_text("".join(line for line in manifest.read_text().splitlines(keepends=True)
                                    if not line.endswith(f"{AT_RUN}/spec.json\n")))
    assert _refused(repo) == (f"error: run {AT_RUN}: its record {_record(AT_RUN)} has no spec.json: nothing "
                              f"says which experiment its numbers stand for; {AGAIN}")


def test_metrics_and_history_edited_consistently_are_refused(repo):
    """One seed's final error set to 25.0 in both files: consistent with each other, so the
    report's own checks of the numbers pass; the digests do not."""
    rows = _history(SEED)
    rows[-1]["test_error"] = "25.0"
    _write_history(SEED, rows)
    errors = [float(r["test_error"]) for r in rows]
    _edit_metrics(SEED, final_test_error=25.0, best_test_error=min(errors))
    assert unbound(_record(SEED), json.loads((_record(SEED) / "metrics.json").read_text())) is None
    assert _refused(repo) == (
        f"error: run {SEED}: {_record(SEED)}/history.csv is not the file the export wrote (its sha256 "
        f"differs from the one in {MANIFEST}): {AGAIN}")


def test_one_value_in_the_middle_of_a_curve_is_refused(repo):
    rows = _history(SEED)
    rows[10]["test_error"] = str(float(rows[10]["test_error"]) - 5)
    _write_history(SEED, rows)
    assert _refused(repo) == (
        f"error: run {SEED}: {_record(SEED)}/history.csv is not the file the export wrote (its sha256 "
        f"differs from the one in {MANIFEST}): {AGAIN}")


@pytest.mark.parametrize("key, value", [("precision", "float32"), ("machine", "NVIDIA H100 80GB HBM3")])
def test_an_edited_provenance_field_is_refused(repo, key, value):
    _edit_metrics(SEED, **{key: value})
    assert _refused(repo) == (
        f"error: run {SEED}: {_record(SEED)}/metrics.json is not the file the export wrote (its sha256 "
        f"differs from the one in {MANIFEST}): {AGAIN}")


def test_a_stripped_file_or_record_is_refused(repo):
    (_record(AT_RUN) / "attention.json").unlink()   # the attention figure would be left out
    assert _refused(repo) == (
        f"error: run {AT_RUN}: {_record(AT_RUN)}/attention.json is gone, but {MANIFEST} lists it: {AGAIN}")
    shutil.rmtree(_record(SEED))   # the cell would lose a seed
    assert _refused(repo) == f"error: run {SEED}: its record {_record(SEED)} is gone, but {MANIFEST} lists it: {AGAIN}"


def test_a_record_the_export_did_not_list_is_refused(repo):
    manifest = Path(MANIFEST)
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(line for line in lines if f"  {SEED}/" not in line))
    assert _refused(repo) == (
        f"error: run {SEED}: its record {_record(SEED)} is not in {MANIFEST}: only the export of a run "
        f"finished here writes a record; {AGAIN}")
    manifest.write_text("".join(lines) + f"{'0' * 64}  {SEED}/notes.txt\n")
    assert _refused(repo) == (
        f"error: {MANIFEST}, line {len(lines) + 1}: not one '<sha256>  <run id>/<file>' of a record file "
        f"(spec.json, metrics.json, history.csv, attention.json): '{'0' * 64}  {SEED}/notes.txt'; "
        "restore it (`git checkout`)")
    manifest.unlink()
    first = grid.runs(yaml.safe_load((repo / "params.yaml").read_text()), PROFILE)[0].id
    assert _refused(repo).startswith(f"error: run {first}: its record {_record(first)} is not in {MANIFEST} "
                                     "(there is none)")


def test_the_manifest_is_no_signature(repo):
    """The limit, stated: an edit made together with its line of the manifest passes the
    report. It is one changed line of the manifest beside the record's in `git diff`, and no
    longer the digest in the run's checkpoint (where the checkpoints are, exporting again
    restores both)."""
    _edit_metrics(SEED, machine="NVIDIA H100 80GB HBM3")
    manifest = Path(MANIFEST)
    before = manifest.read_text().splitlines()
    digest = checkpoint.digest((_record(SEED) / "metrics.json").read_bytes())
    manifest.write_text("".join(f"{digest}  {SEED}/metrics.json\n" if line.endswith(f"  {SEED}/metrics.json")
                                else line + "\n" for line in before))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert len(records.runs(params, PROFILE)) == 45
    assert len(set(manifest.read_text().splitlines()) ^ set(before)) == 2   # one line out, one in
