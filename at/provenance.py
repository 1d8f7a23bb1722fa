"""Where a profile's numbers come from: one full line, said once at the top of the profile's
report (`describe`), a short one under every figure (`footer`), and whether its numbers are on
the scale of the published ones (`full_scale`).

Smoke numbers must never pass for paper numbers: the line names the profile, the data the runs
actually used (by the md5 their records hold, so the CIFAR-10 mini subset is called so), the
subset sizes, the epochs, the seeds, the precision the runs computed in (`auto` means different
things on different machines), the machines and the git commits of the code that trained them.
Everything comes from the runs' records (at.records), none from this checkout's data folder or
commit: the same records render the same report on any clone.
"""

from __future__ import annotations

from at import grid, records
from at.data import datasets


def data_md5(runs: list[grid.GridRun]) -> dict[str, str | None]:
    """{data set: the md5 of the data its finished runs trained on}; None where none finished.
    Runs of one data set that trained on different data cannot share a report."""
    found: dict[str, str | None] = {}
    for dataset in sorted({r.dataset for r in runs}):
        md5s = records.recorded([r for r in runs if r.dataset == dataset], "data_md5")
        if len(md5s) > 1:
            raise records.RecordError(f"the {dataset} runs were trained on different data (md5 "
                                      f"{', '.join(map(str, md5s))}): they cannot share one report")
        found[dataset] = md5s[0] if md5s else None
    return found


def data_description(dataset: str, md5: str | None, params: dict | None = None) -> str:
    """The data of ``dataset`` whose archive has ``md5``: a known archive by name, else the md5."""
    record = datasets.get(dataset)
    if record.user_folder:
        sources = params["data"] if params else {}
        folder = (sources.get(dataset) or {}).get("folder")
        return f"{record.title} from the folder {folder}" if folder else f"{record.title} (no folder given)"
    if md5 is None:
        return f"{record.title} (no finished run)"
    known = record.known_sources.get(md5)
    return f"{known} (md5 {md5})" if known else f"{record.title} from an archive with md5 {md5}"


def _commits(runs: list[grid.GridRun], short: bool) -> str | None:
    found = records.recorded(runs, "git_commit")
    if not found:
        return None
    if not short:
        return ", ".join(found)
    if len(found) > 2:
        return f"{len(found)} commits"
    return ", ".join(c[:7] + ("-dirty" if c.endswith("-dirty") else "") for c in found)


def describe(params: dict, profile: str, runs: list[grid.GridRun]) -> str:
    if not runs:
        return f"{profile} profile: no runs"
    protocols = [grid.protocol_of(params, r) for r in runs]
    epochs = sorted({p.epochs for p in protocols})
    subsets = sorted({(p.train_subset, p.test_subset) for p in protocols}, key=str)
    seeds = sorted({r.seed for r in runs})
    parts = [f"{profile} profile", "; ".join(data_description(d, md5, params) for d, md5 in data_md5(runs).items())]
    for train, test in subsets:
        if train or test:
            parts.append(f"first {train or 'all'} train / {test or 'all'} test images used")
    parts.append(f"{'/'.join(map(str, epochs))} epochs")
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})")
    used = records.recorded(runs, "precision")
    if used:
        parts.append(f"precision {'/'.join(used)}")
    machines = [m if m != "unrecorded" else "a machine not recorded" for m in records.recorded(runs, "machine")]
    if machines:
        parts.append(f"trained on {' and '.join(machines)}")
    commits = _commits(runs, short=False)
    if commits:
        parts.append(f"code {commits}")
    return ", ".join(parts)


def short_data_name(dataset: str, md5: str | None) -> str:
    """The data a run used, in a few words: "CIFAR-10 mini subset", "CIFAR-10 (official"... cut
    at the first parenthesis of the known source's name; else the data set's title."""
    record = datasets.get(dataset)
    known = record.known_sources.get(md5)
    return known.split(" (")[0] if known else record.title


def footer(params: dict, profile: str, runs: list[grid.GridRun]) -> str:
    """One short line for the foot of a figure: profile · data · epochs · code (7 characters).
    No seed count: a figure says which seeds it shows (n per line, or the seed it draws)."""
    if not runs:
        return f"{profile} · no runs"
    epochs = sorted({grid.protocol_of(params, r).epochs for r in runs})
    data = ", ".join(short_data_name(d, md5) for d, md5 in data_md5(runs).items())
    commits = _commits(runs, short=True)
    code = f" · code {commits}" if commits else ""
    return f"{profile} · {data} · {'/'.join(map(str, epochs))} ep{code}"


# Keys that do not change what a run learns from or for how long: the numbers stay comparable.
_SCALE_FREE_KEYS = ("precision", "eval_batch_size")


def full_scale(params: dict, profile: str, runs: list[grid.GridRun]) -> bool:
    """Whether the profile's runs are on the published numbers' scale: each run's protocol is
    its params.yaml protocol without the profile's changes (epochs, subsets, schedule; precision
    aside), and its records say it trained on the archive params.yaml names (its md5; a data set
    without a published md5, or a folder the user supplies, is taken as the full one)."""
    import dataclasses

    from at.spec import Protocol

    for run in runs:
        ours = grid.protocol_of(params, run)
        paper = Protocol.resolve(params["protocols"][run.protocol_name], f"protocols.{run.protocol_name}")
        free = {k: getattr(paper, k) for k in _SCALE_FREE_KEYS}
        if dataclasses.replace(ours, **free) != paper:
            return False
    for dataset, md5 in data_md5(runs).items():
        published = ((params.get("data") or {}).get(dataset) or {}).get("md5")
        if datasets.get(dataset).user_folder or not published:
            continue
        if md5 != published:
            return False
    return bool(runs)
