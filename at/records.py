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
rendered: the numbers would stand for another experiment; so is a record without spec.json.

A record cannot be quietly edited or stripped. Beside a profile's records lies its manifest,
``results/runs/<profile>/SHA256SUMS``: one line ``<sha256>  <run id>/<file>`` per file of every
record, in ``sha256sum``'s format (``cd results/runs/<profile> && sha256sum -c SHA256SUMS``
checks it without this code). Only the export writes it, and only for runs finished here whose
checkpoint.pt names the sha256 of the metrics.json and history.csv the run wrote
(at.checkpoint.OUTPUT_DIGESTS), which the bytes must match: the manifest's lines for those files
are the checkpoint's digests. The lines of a run not finished here stay as they were, like its
record. Before anything is read, the report (:func:`runs`) refuses in one line naming the record
and the file: a file the report reads (spec.json, metrics.json, history.csv, attention.json) that
is not the one the manifest names, that the manifest names but is gone, or that it does not
name; a record the manifest does not list, or lists but is gone; a record without spec.json.

What this protects against, and what not. It catches accidental and casual edits: one file, or
several made consistent with each other (metrics.json's final error and history.csv's last row,
one value mid-curve, the precision or machine the provenance line shows), a stripped spec.json, a
stripped record. It is no signature: whoever edits a record can recompute its lines in the
manifest. Such an edit is no longer quiet: ``git diff`` shows the manifest's lines changed beside
the record's, and the new lines of metrics.json and history.csv no longer match the digests in
the run's checkpoint, so that exporting again where the checkpoints are (``dvc pull``, then
``python -m at report``) restores the record and its lines. A record dropped with its lines
leaves its run missing, which the report's README says.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from at import atomic, checkpoint, grid, names
from at.report.attention_maps import ATTENTION_FILE   # the maps of one run
from at.spec import SPEC_FILE, RunSpec, spec_text

RECORDS_ROOT = "results/runs"
COPIED = ("metrics.json", "history.csv")   # as the run wrote them
FILES = (SPEC_FILE, *COPIED)
READ = (*FILES, ATTENTION_FILE)            # what the report reads of a record
MANIFEST = "SHA256SUMS"                    # per profile: the sha256 of every record file


class RecordError(ValueError):
    """A record that cannot be written or read as the run's: one line naming the run and why."""


def root(profile: str) -> Path:
    return Path(names.inside(RECORDS_ROOT, f"{RECORDS_ROOT}/{profile}"))


def folder(profile: str, run_id: str) -> Path:
    return Path(names.inside(RECORDS_ROOT, f"{root(profile)}/{names.check_run_id(run_id)}"))


def manifest_path(profile: str) -> Path:
    return root(profile) / MANIFEST


def read_manifest(profile: str) -> dict[str, dict[str, str]] | None:
    """The profile's manifest as {run id: {file: sha256}}; None when there is none."""
    path = manifest_path(profile)
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"cannot read {path}: {e}") from None
    entries: dict[str, dict[str, str]] = {}
    for number, line in enumerate(lines, 1):
        digest, _, name = line.partition("  ")
        run_id, _, file = name.rpartition("/")
        try:
            names.check_run_id(run_id)
        except ValueError:
            run_id = ""
        if not re.fullmatch("[0-9a-f]{64}", digest) or not run_id or file not in READ \
                or file in entries.get(run_id, {}):
            raise RecordError(f"{path}, line {number}: not one '<sha256>  <run id>/<file>' of a record "
                              f"file ({', '.join(READ)}): {line[:200]!r}; restore it (`git checkout`)")
        entries.setdefault(run_id, {})[file] = digest
    return entries


def manifest_text(entries: dict[str, dict[str, str]]) -> str:
    """``sha256sum``'s lines, sorted by path."""
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(
        (f"{run_id}/{file}", digest) for run_id, files in entries.items() for file, digest in files.items()))



@dataclass(frozen=True)
class Exported:
    written: list[str]    # run ids whose record was written or changed
    kept: list[str]       # run ids not finished here whose committed record stays
    removed: list[str]    # records of runs that params.yaml no longer defines


def _finished_outputs(params: dict, run: grid.GridRun, spec: RunSpec) -> dict[str, bytes] | None:
    """The run's metrics.json and history.csv as it wrote them; None when it has not finished
    here (no metrics.json). Refused: files of another run or profile, a run without its
    checkpoint.pt, outputs of another spec or that are not the ones the run wrote (the sha256
    its checkpoint names), and runs trained on other data than the data folder holds."""
    out = Path(run.out_dir)
    if not (out / "metrics.json").is_file():
        return None
    # history.csv as far as it is there (the report draws no curve without it)
    files = {name: (out / name).read_bytes() for name in COPIED if (out / name).is_file()}
    try:
        metrics = json.loads(files["metrics.json"])
    except ValueError as e:
        raise RecordError(f"run {run.id}: cannot read {out / 'metrics.json'}: {e}") from None
    for key, expected in (("run_id", run.id), ("profile", run.profile)):
        if not isinstance(metrics, dict) or metrics.get(key) != expected:
            found = metrics.get(key) if isinstance(metrics, dict) else None
            raise RecordError(f"run {run.id!r}: {out / 'metrics.json'}: {key} is {found!r}, not "
                              f"{expected!r}: the file belongs to another run")
    # only a run's checkpoint says which outputs it wrote: without one, nothing is exported
    final = out / "checkpoint.pt"
    if not final.is_file():
        raise RecordError(f"run {run.id}: {out / 'metrics.json'} has no checkpoint.pt beside it to show "
                          "that the run wrote it: restore the checkpoint (`dvc pull`, `dvc checkout`) "
                          "or retrain the run with --force")
    try:
        saved = checkpoint.load(final, required=("spec",), mmap=True)
    except checkpoint.CheckpointError as e:
        raise RecordError(f"run {run.id}: {e}") from None
    if not spec.same_as(saved["spec"]):
        raise RecordError(f"run {run.id}: {final} was trained from another spec than "
                          "params.yaml now defines: retrain it (--force) or restore params.yaml")
    unnamed = [name for name in files if name not in (saved.get(checkpoint.OUTPUT_DIGESTS) or {})]
    if unnamed:
        raise RecordError(f"run {run.id}: {final} holds no sha256 of its {' and '.join(unnamed)}: "
                          "retrain the run with --force")
    # the report's own check: the bytes against the checkpoint's digests, the numbers against history.csv
    from at.report.inputs import expected_data_md5, unbound

    problem = unbound(out, metrics)
    if problem:
        raise RecordError(f"run {run.id}: {out / 'metrics.json'}: {problem}")
    # the data it trained on is the data folder's (the report renders one data set per md5)

    expected = expected_data_md5(run.dataset, grid.data_dir(run.dataset, params))
    if expected is not None and metrics.get("data_md5") != expected:
        raise RecordError(f"run {run.id}: trained on data with md5 {metrics.get('data_md5')}, but "
                          f"the {run.dataset} data folder holds {expected}: retrain it on this data")
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
    """Write the records of every run of ``profile`` finished in runs/, and their lines of the
    profile's manifest; keep the others' records and lines; remove the records of runs
    params.yaml no longer defines. ``attention_run``: the run whose attention maps the report
    draws (at.report.attention_maps.record writes them)."""
    from at.report import attention_maps

    runs = grid.runs(params, profile)
    base = root(profile)
    earlier = read_manifest(profile) or {}
    listed: dict[str, dict[str, str]] = {}
    written, kept = [], []
    for run in runs:
        spec = grid.run_spec(params, run)
        outputs = _finished_outputs(params, run, spec)
        target = folder(profile, run.id)
        if outputs is None:
            if (target / SPEC_FILE).is_file():
                kept.append(run.id)
            if run.id in earlier:
                listed[run.id] = earlier[run.id]
            continue
        files = {SPEC_FILE: spec_text(spec).encode(), **outputs}
        if run.id == attention_run:
            maps = attention_maps.record(Path(run.out_dir))
            if maps is not None:
                files[ATTENTION_FILE] = (json.dumps(maps, separators=(",", ":")) + "\n").encode()
        changed = [_write_if_changed(target / name, data) for name, data in sorted(files.items())]
        # the record is what this export wrote: no file of an earlier one stays beside it
        for name in READ:
            if name not in files and (target / name).is_file():
                (target / name).unlink()
                changed.append(True)
        if any(changed):
            written.append(run.id)
        listed[run.id] = {name: checkpoint.digest(data) for name, data in files.items()}
    wanted = {folder(profile, run.id).resolve() for run in runs}
    removed = []
    for stale in _record_folders(base):
        if stale.resolve() not in wanted:
            removed.append(stale.relative_to(base).as_posix())
            shutil.rmtree(stale)
    # last, so that a record written is never listed before its bytes are there
    if listed:
        _write_if_changed(manifest_path(profile), manifest_text(listed).encode())
    elif manifest_path(profile).is_file():
        manifest_path(profile).unlink()
    return Exported(written=written, kept=kept, removed=removed)


def _checked(run_id: str, target: Path, manifest: dict[str, dict[str, str]] | None, where: Path) -> bool:
    """Whether the run has a record; RecordError, naming the file, when it is not the one the
    export wrote (the manifest ``where`` says which) or has no spec.json."""
    present = {name for name in READ if (target / name).is_file()}
    listed = (manifest or {}).get(run_id, {})
    if not present and not listed:
        return False
    again = "restore it (`git checkout`), or retrain the run and export it (`python -m at report`)"
    if not present:
        raise RecordError(f"run {run_id}: its record {target} is gone, but {where} lists it: {again}")
    if SPEC_FILE not in present:
        # like a record of another spec: nothing says that its numbers are of params.yaml's experiment
        raise RecordError(f"run {run_id}: its record {target} has no {SPEC_FILE}: nothing says which "
                          f"experiment its numbers stand for; {again}")
    if not listed:
        raise RecordError(f"run {run_id}: its record {target} is not in {where}"
                          f"{' (there is none)' if manifest is None else ''}: only the export of a run "
                          f"finished here writes a record; {again}")
    for name in sorted(present | set(listed)):
        path = target / name
        if name not in listed:
            problem = f"is not in {where}"
        elif name not in present:
            problem = f"is gone, but {where} lists it"
        elif checkpoint.digest(path.read_bytes()) != listed[name]:
            problem = f"is not the file the export wrote (its sha256 differs from the one in {where})"
        else:
            continue
        raise RecordError(f"run {run_id}: {path} {problem}: {again}")
    return True


def runs(params: dict, profile: str) -> list[grid.GridRun]:
    """The grid's runs of ``profile`` with ``out_dir`` at their records (the report reads those);
    a run without a record is missing. Refused (RecordError): a record that is not the one the
    export wrote (the profile's manifest), one without spec.json, one of another spec than
    params.yaml's."""
    manifest = read_manifest(profile)
    found = []
    for run in grid.runs(params, profile):
        target = folder(profile, run.id)
        if _checked(run.id, target, manifest, manifest_path(profile)):
            spec_path = target / SPEC_FILE
            try:
                recorded = json.loads(spec_path.read_text())
            except (OSError, ValueError) as e:
                raise RecordError(f"run {run.id}: cannot read {spec_path}: {e}") from None
            if not grid.run_spec(params, run).same_as(recorded):
                raise RecordError(
                    f"run {run.id}: its record {spec_path} holds another spec than params.yaml "
                    "now defines: the committed numbers stand for another experiment; retrain the "
                    "run and export it (`python -m at report`), or restore params.yaml")
        found.append(dataclasses.replace(run, out_dir=str(target)))
    return found


def recorded(runs_: list[grid.GridRun], key: str) -> list:
    """The distinct values of ``key`` in the runs' metrics.json (records), sorted; runs without
    one are left out. A record missing the key counts as "unrecorded"."""
    values = set()
    for run in runs_:
        path = Path(run.out_dir) / "metrics.json"
        if path.is_file():
            try:
                values.add(json.loads(path.read_text()).get(key) or "unrecorded")
            except (OSError, ValueError):
                continue   # the report's own checks name a broken file
    return sorted(values, key=str)
