"""The committed results are what their committed records render (at.records): `python -m at
report --records-only` on this checkout, which has no runs/, reproduces every file of
results/<profile>/ byte for byte. A committed results folder without records must be named
here, with the reason, and nothing else may lack them. Each profile's committed manifest
(results/runs/<profile>/SHA256SUMS) names every committed file of its records, with its sha256."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from at import checkpoint, records
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]

# Committed results that have no records (rendered before runs kept them), each with the
# reason. None today: every committed profile renders from its records.
WITHOUT_RECORDS: dict[str, str] = {}


def _tracked(prefix: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", prefix], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"git ls-files failed: {out.stderr}")
    return out.stdout.splitlines()


def _profiles(prefix: str) -> set[str]:
    return {Path(p).relative_to(prefix).parts[0] for p in _tracked(prefix) if len(Path(p).relative_to(prefix).parts) > 1}


COMMITTED = sorted(_profiles("results") - {"runs"})
RECORDED = sorted(_profiles("results/runs"))


def test_every_committed_result_has_its_records_or_a_stated_reason():
    assert COMMITTED, "results/ holds no committed profile"
    assert set(RECORDED) <= set(COMMITTED), f"records without results: {sorted(set(RECORDED) - set(COMMITTED))}"
    lacking = sorted(set(COMMITTED) - set(RECORDED))
    assert lacking == sorted(WITHOUT_RECORDS), (
        f"committed results without records: {lacking}; named as such: {sorted(WITHOUT_RECORDS)}")


@pytest.mark.parametrize("profile", RECORDED)
def test_the_committed_results_render_from_their_records_byte_for_byte(profile, tmp_path):
    out = tmp_path / profile
    done = run_cli(["--params", str(REPO / "params.yaml"), "report", "--profile", profile,
                    "--records-only", "--out", str(out)], cwd=REPO)
    assert done.returncode == 0, done.stderr
    committed = {Path(p).relative_to(f"results/{profile}").as_posix()
                 for p in _tracked(f"results/{profile}") if not Path(p).name.startswith(".")}
    rendered = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert rendered == committed, f"files differ: only rendered {sorted(rendered - committed)}, only committed {sorted(committed - rendered)}"
    # its mark is committed too, so that a clone's `python -m at report` may replace the folder
    assert (out / ".at-report").read_bytes() == (REPO / "results" / profile / ".at-report").read_bytes()
    differing = [name for name in sorted(committed) if (out / name).read_bytes() != (REPO / "results" / profile / name).read_bytes()]
    assert not differing, (f"{differing} differ from what the records render: re-render with "
                           f"`python -m at report --profile {profile} --records-only` and commit")


@pytest.mark.parametrize("profile", RECORDED)
def test_the_manifest_names_every_committed_record_file(profile, monkeypatch):
    monkeypatch.chdir(REPO)   # records' paths are relative to the project root
    manifest = f"results/runs/{profile}/{records.MANIFEST}"
    tracked = set(_tracked(f"results/runs/{profile}"))
    assert manifest in tracked, f"{manifest} is not committed: export the records (`python -m at report`)"
    listed = {f"results/runs/{profile}/{run_id}/{name}": digest
              for run_id, files in (records.read_manifest(profile) or {}).items() for name, digest in files.items()}
    assert set(listed) == tracked - {manifest}, (
        f"only listed: {sorted(set(listed) - tracked)}, only committed: {sorted(tracked - {manifest} - set(listed))}")
    assert not [path for path, digest in listed.items() if checkpoint.digest((REPO / path).read_bytes()) != digest]
    # the format is sha256sum's: a reader checks the records without this code
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "--check", "--quiet", records.MANIFEST], cwd=REPO / "results" / "runs" / profile,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
