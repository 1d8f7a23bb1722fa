"""Per-run records: what the repository keeps of every run behind committed results.

A run's folder under runs/ holds checkpoints (megabytes, DVC's business); its record, under
``results/runs/<profile>/<run id>/``, holds the small text files the report is rendered from:

- ``spec.json``: the run's resolved spec (at.spec.RunSpec, every default written out);
- ``metrics.json`` and ``history.csv``: the bytes the run wrote (checked against the digests in
  its checkpoint when exported);
- ``attention.json``, for the run whose attention maps the report draws (at.report.attention_maps).

``python -m at report`` exports the records of the runs finished here, then renders the report
from the records alone; ``--records-only`` skips the export, so that a clone without checkpoints
(CI, a reader auditing the numbers) renders the committed results byte for byte. A record of a
run not finished here is kept: records of one profile may come from several machines (seed 0
trained on one, seeds 1-2 on another), each record saying which (metrics.json's machine and
git_commit). A record whose spec is not the one params.yaml now defines is refused, never
rendered: the numbers would stand for another experiment.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from at import atomic, checkpoint, grid, names
from at.spec import RunSpec

RECORDS_ROOT = "results/runs"
SPEC_FILE = "spec.json"
COPIED = ("metrics.json", "history.csv")   # as the run wrote them
FILES = (SPEC_FILE, *COPIED)


class RecordError(ValueError):
    """A record that cannot be written or read as the run's: one line naming the run and why."""


def root(profile: str) -> Path:
    return Path(names.inside(RECORDS_ROOT, f"{RECORDS_ROOT}/{profile}"))


def folder(profile: str, run_id: str) -> Path:
    return Path(names.inside(RECORDS_ROOT, f"{root(profile)}/{names.check_run_id(run_id)}"))


def spec_text(spec: RunSpec) -> str:
    return json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Exported:
    written: list[str]    # run ids whose record was written or changed
    kept: list[str]       # run ids not finished here whose committed record stays
    removed: list[str]    # records of runs that params.yaml no longer defines


def _finished_outputs(params: dict, run: dict, spec: RunSpec) -> dict[str, bytes] | None:
    """The run's metrics.json and history.csv as it wrote them; None when it has not finished
    here (no metrics.json). Refused: files of another run or profile, outputs of another spec
    or that are not the ones the run wrote (both checked where the run's checkpoint.pt is
    there), and runs trained on other data than the data folder holds."""
    out = Path(run["out_dir"])
    if not (out / "metrics.json").is_file():
        return None
    # history.csv as far as it is there (the report draws no curve without it)
    files = {name: (out / name).read_bytes() for name in COPIED if (out / name).is_file()}
    try:
        metrics = json.loads(files["metrics.json"])
    except ValueError as e:
        raise RecordError(f"run {run['id']}: cannot read {out / 'metrics.json'}: {e}") from None
    for key, expected in (("run_id", run["id"]), ("profile", run["profile"])):
        if not isinstance(metrics, dict) or metrics.get(key) != expected:
            found = metrics.get(key) if isinstance(metrics, dict) else None
            raise RecordError(f"run {run['id']!r}: {out / 'metrics.json'}: {key} is {found!r}, not "
                              f"{expected!r}: the file belongs to another run")
    final = out / "checkpoint.pt"
    if final.is_file():
        try:
            saved = checkpoint.load(final, required=("spec",), mmap=True)
        except checkpoint.CheckpointError as e:
            raise RecordError(f"run {run['id']}: {e}") from None
        if not spec.same_as(saved["spec"]):
            raise RecordError(f"run {run['id']}: {final} was trained from another spec than "
                              "params.yaml now defines: retrain it (--force) or restore params.yaml")
    # the report's own check: the bytes against the checkpoint's digests, the numbers against history.csv
    from at.report.inputs import expected_data_md5, unbound

    problem = unbound(out, metrics)
    if problem:
        raise RecordError(f"run {run['id']}: {out / 'metrics.json'}: {problem}")
    # the data it trained on is the data folder's (the report renders one data set per md5)

    expected = expected_data_md5(run["dataset"], grid.data_dir(run["dataset"], params))
    if expected is not None and metrics.get("data_md5") != expected:
        raise RecordError(f"run {run['id']}: trained on data with md5 {metrics.get('data_md5')}, but "
                          f"the {run['dataset']} data folder holds {expected}: retrain it on this data")
    return files


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
    return True


def _record_folders(base: Path) -> list[Path]:
    return sorted(p.parent for p in base.rglob(SPEC_FILE)) if base.is_dir() else []


def export(params: dict, profile: str, attention_run: str | None = None) -> Exported:
    """Write the records of every run of ``profile`` finished in runs/; keep the others'; remove
    the records of runs params.yaml no longer defines. ``attention_run``: the run whose
    attention maps the report draws (at.report.attention_maps.record writes them)."""
    from at.report import attention_maps

    runs = grid.runs(params, profile)
    base = root(profile)
    written, kept = [], []
    for run in runs:
        spec = grid.run_spec(params, run)
        outputs = _finished_outputs(params, run, spec)
        target = folder(profile, run["id"])
        if outputs is None:
            if (target / SPEC_FILE).is_file():
                kept.append(run["id"])
            continue
        files = {SPEC_FILE: spec_text(spec).encode(), **outputs}
        if run["id"] == attention_run:
            maps = attention_maps.record(Path(run["out_dir"]))
            if maps is not None:
                files[attention_maps.ATTENTION_FILE] = (json.dumps(maps, separators=(",", ":")) + "\n").encode()
        changed = [_write_if_changed(target / name, data) for name, data in sorted(files.items())]
        if any(changed):
            written.append(run["id"])
    wanted = {folder(profile, run["id"]).resolve() for run in runs}
    removed = []
    for stale in _record_folders(base):
        if stale.resolve() not in wanted:
            removed.append(stale.relative_to(base).as_posix())
            shutil.rmtree(stale)
    return Exported(written=written, kept=kept, removed=removed)


def runs(params: dict, profile: str) -> list[dict]:
    """The grid's runs of ``profile`` with ``out_dir`` at their records (the report reads those);
    a run without a record is missing. A record of another spec than params.yaml's is refused."""
    found = []
    for run in grid.runs(params, profile):
        target = folder(profile, run["id"])
        spec_path = target / SPEC_FILE
        if spec_path.is_file():
            try:
                recorded = json.loads(spec_path.read_text())
            except (OSError, ValueError) as e:
                raise RecordError(f"run {run['id']}: cannot read {spec_path}: {e}") from None
            if not grid.run_spec(params, run).same_as(recorded):
                raise RecordError(
                    f"run {run['id']}: its record {spec_path} holds another spec than params.yaml "
                    "now defines: the committed numbers stand for another experiment; retrain the "
                    "run and export it (`python -m at report`), or restore params.yaml")
        found.append({**run, "out_dir": str(target)})
    return found


def recorded(runs_: list[dict], key: str) -> list:
    """The distinct values of ``key`` in the runs' metrics.json (records), sorted; runs without
    one are left out. A record missing the key counts as "unrecorded"."""
    values = set()
    for run in runs_:
        path = Path(run["out_dir"]) / "metrics.json"
        if path.is_file():
            try:
                values.add(json.loads(path.read_text()).get(key) or "unrecorded")
            except (OSError, ValueError):
                continue   # the report's own checks name a broken file
    return sorted(values, key=str)
