"""Where a profile's numbers come from, in one line that every table and figure carries.

Smoke numbers must never pass for paper numbers: the line names the profile, the data actually
used (read from the data folder's source.json, so the CIFAR-10 mini subset is called so, with
the archive's md5), the subset sizes, the epochs, the seeds, the precision the runs computed in
(from their metrics.json: `auto` means different things on different machines) and the git
commit of the code that rendered it.
"""

from __future__ import annotations

import json
from pathlib import Path

from at import grid
from at.data import datasets
from at.data.download import read_source_record


def data_description(dataset: str, params: dict | None = None) -> str:
    """What the data folder of ``dataset`` holds: a known archive by name, else its URL and md5."""
    record = datasets.get(dataset)
    if record.user_folder:
        folder = ((params or {}).get("data") or {}).get(dataset, {}).get("folder")
        return f"{record.title} from the folder {folder}" if folder else f"{record.title} (no folder given)"
    source = read_source_record(grid.data_dir(dataset))
    if not source:
        return f"{record.title} (not downloaded yet)"
    md5 = source.get("md5")
    known = record.known_sources.get(md5)
    return f"{known} (md5 {md5})" if known else f"{record.title} from {source.get('url')} (md5 {md5})"


def precisions(runs: list[dict]) -> list[str]:
    """The precisions the runs' metrics.json record (runs not finished yet are left out)."""
    found = set()
    for run in runs:
        path = Path(run["out_dir"]) / "metrics.json"
        if path.is_file():
            try:
                found.add(json.loads(path.read_text()).get("precision") or "unrecorded")
            except (OSError, ValueError):
                continue   # the report's own checks name a broken file
    return sorted(found)


def describe(params: dict, profile: str, runs: list[dict]) -> str:
    if not runs:
        return f"{profile} profile: no runs"
    protocols = [grid.protocol_of(params, r) for r in runs]
    epochs = sorted({p.epochs for p in protocols})
    subsets = sorted({(p.train_subset, p.test_subset) for p in protocols}, key=str)
    seeds = sorted({r["seed"] for r in runs})
    parts = [f"{profile} profile", "; ".join(data_description(d, params) for d in sorted({r['dataset'] for r in runs}))]
    for train, test in subsets:
        if train or test:
            parts.append(f"first {train or 'all'} train / {test or 'all'} test images used")
    parts.append(f"{'/'.join(map(str, epochs))} epochs")
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})")
    used = precisions(runs)
    if used:
        parts.append(f"precision {'/'.join(used)}")
    from at.tracking import git_commit
    parts.append(f"code {git_commit()}")
    return ", ".join(parts)
