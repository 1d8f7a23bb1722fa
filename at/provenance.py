"""Where a profile's numbers come from: one full line, said once at the top of the profile's
report (`describe`), a short one under every figure (`footer`), and whether its numbers are on
the scale of the published ones (`full_scale`).

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


def short_data_name(dataset: str) -> str:
    """The data a run used, in a few words: "CIFAR-10 mini subset", "CIFAR-10 (official"... cut
    at the first parenthesis of the known source's name; else the data set's title."""
    record = datasets.get(dataset)
    source = None if record.user_folder else read_source_record(grid.data_dir(dataset))
    known = record.known_sources.get((source or {}).get("md5"))
    return known.split(" (")[0] if known else record.title


def footer(params: dict, profile: str, runs: list[dict]) -> str:
    """One short line for the foot of a figure: profile · data · epochs · code (7 characters).
    No seed count: a figure says which seeds it shows (n per line, or the seed it draws)."""
    if not runs:
        return f"{profile} · no runs"
    from at.tracking import git_commit

    epochs = sorted({grid.protocol_of(params, r).epochs for r in runs})
    data = ", ".join(short_data_name(d) for d in sorted({r["dataset"] for r in runs}))
    commit = git_commit()
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{profile} · {data} · {'/'.join(map(str, epochs))} ep · code {short}"


# Keys that do not change what a run learns from or for how long: the numbers stay comparable.
_SCALE_FREE_KEYS = ("precision", "eval_batch_size")


def full_scale(params: dict, profile: str, runs: list[dict]) -> bool:
    """Whether the profile's runs are on the published numbers' scale: each run's protocol is
    its params.yaml protocol without the profile's changes (epochs, subsets, schedule; precision
    aside), and each data folder holds the archive params.yaml names (its md5; a data set without
    a published md5, or a folder the user supplies, is taken as the full one)."""
    import dataclasses

    from at.spec import Protocol

    for run in runs:
        ours = grid.protocol_of(params, run)
        paper = Protocol.resolve(params["protocols"][run["protocol_name"]], f"protocols.{run['protocol_name']}")
        free = {k: getattr(paper, k) for k in _SCALE_FREE_KEYS}
        if dataclasses.replace(ours, **free) != paper:
            return False
    for dataset in sorted({r["dataset"] for r in runs}):
        published = ((params.get("data") or {}).get(dataset) or {}).get("md5")
        if datasets.get(dataset).user_folder or not published:
            continue
        if (read_source_record(grid.data_dir(dataset)) or {}).get("md5") != published:
            return False
    return bool(runs)
