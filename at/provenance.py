"""Where a profile's numbers come from, in one line that every table and figure carries.

Smoke numbers must never pass for paper numbers: the line names the profile, the data actually
used (read from the data folder's source.json, so the CIFAR-10 mini subset is called so), the
subset sizes and the epochs.
"""

from __future__ import annotations

from at import grid
from at.data.download import read_source_record

KNOWN_SOURCES = {
    "c58f30108f718f92721af3b95e74349a": "CIFAR-10 (official, 50000 train / 10000 test images)",
    "1c190744c9595cc62078be24b4b038fb": "CIFAR-10 mini subset (real images: the first 1017 of each batch, 5085 train / 1017 test)",
}


def data_description(dataset: str) -> str:
    record = read_source_record(grid.data_dir(dataset))
    if not record:
        return f"{dataset} (not downloaded yet)"
    md5 = record.get("md5")
    return KNOWN_SOURCES.get(md5, f"{dataset} from {record.get('url')} (md5 {md5})")


def describe(params: dict, profile: str, runs: list[dict]) -> str:
    if not runs:
        return f"{profile} profile: no runs"
    protocols = [grid.protocol_of(params, r) for r in runs]
    epochs = sorted({p["epochs"] for p in protocols})
    subsets = sorted({(p.get("train_subset"), p.get("test_subset")) for p in protocols}, key=str)
    seeds = sorted({r["seed"] for r in runs})
    parts = [f"{profile} profile", "; ".join(data_description(d) for d in sorted({r['dataset'] for r in runs}))]
    for train, test in subsets:
        if train or test:
            parts.append(f"first {train or 'all'} train / {test or 'all'} test images used")
    parts.append(f"{'/'.join(map(str, epochs))} epochs")
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}")
    return ", ".join(parts)
