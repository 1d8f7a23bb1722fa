"""A behaviour fingerprint of a small grid: what a refactoring of the trainer must not change.

Trains every cohort of a profile (default: smoke) through the command line, on the CPU, in
float32, eagerly and in contiguous tensors (``--compile off --layout contiguous``: the trainer's
execution before those options existed, so that fingerprints of older trees compare), then
writes one JSON record per run: its metrics.json without the wall-clock fields, the SHA-256 of
its history.csv without the timing columns, and a digest of the final checkpoint's weights. Two
trees that train the same grid bit for bit give the same JSON.

    .venv/bin/python benchmarks/fingerprint.py --out /tmp/fp-before.json   # in the old tree
    .venv/bin/python benchmarks/fingerprint.py --out /tmp/fp-after.json    # in the new tree
    cmp /tmp/fp-before.json /tmp/fp-after.json

The data set must be prepared first (`python -m at download cifar10`, with the documented
AT_CIFAR10_URL / AT_CIFAR10_MD5 override where the official host is out of reach). Runs are
written under a scratch folder (--workdir) through a copy of params.yaml, never under runs/.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # the repository's `at`, installed or not
from at.teachers import weights_sha256  # noqa: E402  (the digest a student records of its teacher)
TIMING_METRICS = ("wall_time_s",)
TIMING_COLUMNS = ("images_per_s", "epoch_time_s")


def history_digest(path: Path) -> str:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    kept = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--out", required=True, help="the JSON fingerprint to write")
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="at-fingerprint-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "references.yaml"):
        shutil.copy(ROOT / name, work / name)
    data = work / "data"
    if not data.exists():
        data.symlink_to(ROOT / "data")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlruns.db",
           "PYTHONPATH": str(ROOT)}
    at = [sys.executable, "-m", "at", "--params", "params.yaml"]
    listing = subprocess.run(at + ["runs", "--cohorts", "--json", "--profile", args.profile], cwd=work,
                             env=env, check=True, capture_output=True, text=True).stdout
    cohorts = json.loads(listing)
    for cohort in sorted(cohorts, key=lambda c: (c["level"], c["id"])):
        print(f"training {cohort['id']} ({len(cohort['runs'])} runs)", flush=True)
        subprocess.run(at + ["train", "--cohort", cohort["id"], "--profile", args.profile, "--device", "cpu",
                             "--precision", "float32", "--layout", "contiguous", "--compile", "off",
                             "--threads", "2", "--no-progress"],
                       cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    record = {}
    for cohort in cohorts:
        for run in cohort["runs"]:
            out = work / "runs" / args.profile / run
            metrics = json.loads((out / "metrics.json").read_text())
            saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            record[run] = {
                "metrics": {k: v for k, v in metrics.items() if k not in TIMING_METRICS},
                "history_sha256": history_digest(out / "history.csv"),
                "model_sha256": weights_sha256(saved["model"]),
                "objective_sha256": weights_sha256(saved["objective"]),
            }
    Path(args.out).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(record)} runs fingerprinted into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
