"""Run folders: created (and checked writable) before a cohort starts, removed again when nothing
was trained, so a refused start leaves no empty folder behind."""

from __future__ import annotations

import os
from pathlib import Path

from at import atomic
from at.run_lock import LOCK_NAME
from at.spec import RunSpec


def prepare(specs: list[RunSpec]) -> list[Path]:
    """Create each run's folder (checked writable); return those created, for :func:`remove_empty`."""
    created: list[Path] = []
    try:
        for spec in specs:
            out = Path(spec.out_dir)
            if out.exists() and not out.is_dir():
                raise ValueError(f"run {spec.id}: output folder {out} exists and is not a folder")
            missing = [p for p in [out, *out.parents] if not p.exists()]
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"run {spec.id}: cannot create output folder {out}: {e.strerror}") from e
            created += reversed(missing)
            if not os.access(out, os.W_OK | os.X_OK):
                raise ValueError(f"run {spec.id}: output folder {out} is not writable")
    except BaseException:
        remove_empty(created)
        raise
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process created that are still empty (but for this process's
    lock file, at.run_lock), innermost first."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                (folder / LOCK_NAME).unlink()
            folder.rmdir()
        except OSError:
            pass  # not empty (the run wrote something worth keeping) or already gone


def remove_temporary(folder: Path) -> None:
    """Remove the atomic writer's temporary files that a kill between a write and its rename left
    in a run folder (a resume state's is as large as the state). Call with the folder locked:
    a live writer's temporary file must not be pulled from under it."""
    for path in atomic.temporary_files(folder):
        print(f"removing {path}: a write that a kill cut short", flush=True)
        path.unlink(missing_ok=True)
