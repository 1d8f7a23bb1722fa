"""Runs whose folder holds another spec than params.yaml now defines: out of date for Snakemake
as they are for DVC.

The run folder is the truth. Whichever tool wrote a run's outputs (Snakemake, `dvc repro`,
`python -m at train`), the run wrote its resolved spec beside them (``spec.json``). Snakemake
decides what to run from its own record of its last run and from file times, so outputs that
another tool rewrote for another spec (a beta tried with `dvc repro`, then put back) look
current to it. Each cohort's job therefore has one more input, a stamp file of its own, which
is set to the present moment when a member's folder holds another spec than the one wanted:
its outputs are then older than an input, and Snakemake plans the job. Otherwise the stamp is
empty and dated at the epoch (set back so once the folders match again, e.g. after a dry run
with an edit since undone), so it never makes a job run on its own, and a cohort whose folders
match params.yaml (whoever trained them) is up to date for both tools.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from at import atomic, grid
from at.spec import SPEC_FILE

STAMPS = ".stamps"        # runs/<profile>/.stamps/<cohort id>.stamp


def folder_spec(out_dir: str | os.PathLike) -> dict | None:
    """The spec a run's folder says its outputs are for; None when it says none (nothing
    finished there, or outputs written before runs wrote their spec)."""
    path = Path(out_dir) / SPEC_FILE
    if not (Path(out_dir) / "metrics.json").is_file():
        return None
    try:
        if path.is_file():
            return json.loads(path.read_text())
        # outputs of earlier code, which wrote no spec.json: the checkpoint's (torch, rarely)
        from at import checkpoint

        return checkpoint.load(Path(out_dir) / "checkpoint.pt").get("spec") or {}
    except Exception:   # unreadable or damaged: not the wanted spec, so trained again
        return {}


def holds_another_spec(params: dict, run: grid.GridRun) -> bool:
    saved = folder_spec(run.out_dir)
    return saved is not None and not grid.run_spec(params, run).same_as(saved)


def stamp(cohort: grid.Cohort) -> str:
    return f"{grid.RUNS_ROOT}/{cohort.profile}/{STAMPS}/{cohort.id}.stamp"


def mark(params: dict, profile: str) -> list[str]:
    """Give every cohort of the profile its stamp, set to now for those with a member whose
    folder holds another spec; returns the ids of the runs found out of date."""
    runs = {run.id: run for run in grid.runs(params, profile)}
    found = []
    for cohort in grid.cohorts(params, profile):
        path = Path(stamp(cohort))
        outdated = [run_id for run_id in cohort.runs if holds_another_spec(params, runs[run_id])]
        found += outdated
        if outdated:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, "".join(f"{run_id}\n" for run_id in outdated))
        elif not path.exists() or path.stat().st_size:
            # new, or marked by an earlier reading (a dry run with an edit since undone): the
            # folders match params.yaml now, so the stamp must not make the job run
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, "")
            os.utime(path, (0, 0))   # never newer than any output
    return found
