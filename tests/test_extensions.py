"""The four extension points, used the way docs/extending.md tells a user to use them: a data set and a
model registered from the user's own module named in params.yaml's top-level `plugins`, a loss
term and an attention mapping registered from a module named in a method's `plugins`; none of
them in the package. The same params.yaml goes through `python -m at runs`, Snakemake's dry run,
the dvc.yaml writer, `python -m at download` and real `python -m at train --cohort` runs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The user's data set (a tiny synthetic one generated from a `seed` key of its own source entry,
# so nothing is downloaded) and the user's model, a two-stage convolutional net.
DATA_AND_MODEL = '''
import hashlib
import types
from pathlib import Path

import torch
from torch import nn

from at.data import download
from at.data.datasets import Dataset, register_dataset
from at.models import Architecture, register_model


def prepare(root, source, progress):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(source["seed"])
    data = {"train_x": torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, 4, (96,), generator=g),
            "test_x": torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=g),
            "test_y": torch.randint(0, 4, (32,), generator=g)}
    torch.save(data, root / "toy.pt")
    md5 = hashlib.md5((root / "toy.pt").read_bytes()).hexdigest()
    download.write_source_record(root, {"dataset": "toy", "md5": md5})
    return root


def load(folder):
    return types.SimpleNamespace(**torch.load(Path(folder) / "toy.pt"))


register_dataset(Dataset(
    name="toy", title="Toy squares", protocol="toy", augments=("flip", "none"), mean=(0.5,) * 3,
    std=(0.25,) * 3, load=load, prepare=prepare, num_classes=4, source_keys=("seed",),
    required_keys=("seed",)))


class TinyNet(nn.Module):
    def __init__(self, width, num_classes):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        a = self.stage1(x)
        b = self.stage2(a)
        return self.head(b.mean((2, 3))), [a, b]


def _parse(name):
    width = name.removeprefix("tiny-")
    if not width.isdigit() or width != str(int(width)) or int(width) < 1:
        raise ValueError("not of the form tiny-W (W a positive integer)")


register_model(Architecture(
    "tiny", lambda name, num_classes, weights, bn_weight_init: TinyNet(int(name[5:]), num_classes),
    prefix="tiny-", parse=_parse, forms="'tiny-W' (W channels)"))
'''

# The user's loss term (L1 between logits) and mapping (mean |A| over channels).
TERM_AND_MAPPING = '''
from at.attention import register_mapping
from at.method import TermType, register_term


def _l1(step, term):
    return (step.student_logits.float() - step.teacher_logits.float()).abs().mean()


register_term(TermType("logit_l1", _l1, beta=1.0, needs_teacher=True, compares_logits=True))
register_mapping("absmean", lambda activation, p: activation.abs().mean(1))
'''

COHORT_TEACHER = "toy/tiny-8/seed0/cohort0"
COHORT_STUDENTS = "toy/tiny-4/seed0/cohort0"
STUDENT_RUNS = ["toy/tiny-4/baseline/seed0", "toy/tiny-4_from_tiny-8/mine/seed0"]


@pytest.fixture(scope="module")
def user_project(tmp_path_factory, mlflow_template) -> tuple[Path, dict]:
    """A folder with the user's two modules and a params.yaml naming them; the environment that
    makes them importable (as a user's PYTHONPATH would)."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_data_and_model.py").write_text(textwrap.dedent(DATA_AND_MODEL))
    (root / "my_terms.py").write_text(textwrap.dedent(TERM_AND_MAPPING))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["plugins"] = ["my_data_and_model"]
    params["data"]["toy"] = {"seed": 7, "num_classes": 4}
    params["protocols"]["toy"] = {"epochs": 2, "batch_size": 32, "lr": 0.05, "lr_drops": [1], "lr_gamma": 0.2,
                                  "augment": "flip", "precision": "float32"}
    params["methods"]["mine"] = {"plugins": ["my_terms"], "terms": [
        {"type": "ce"}, {"type": "at", "mapping": "absmean", "p": 1, "beta": 100},
        {"type": "logit_l1", "name": "l1", "beta": 0.5}]}
    params["tables"]["mine"] = {"dataset": "toy", "protocol": "toy",
                                "rows": {"tiny-4_from_tiny-8": {"student": "tiny-4", "teacher": "tiny-8"}},
                                "columns": {"teacher": {"train": "teacher", "method": "baseline"},
                                            "baseline": {"method": "baseline"}, "mine": {"method": "mine"}}}
    params["profiles"]["mine"] = {"tables": ["mine"], "seeds": [0]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "references.yaml").write_text((REPO / "references.yaml").read_text())
    shutil.copy(mlflow_template, root / "mlruns.db")   # an empty store (conftest)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAKEMAKE_", "MLFLOW_", "AT_"))}
    env.update({"PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),   # the venv's tools
                "PYTHONPATH": os.pathsep.join([str(REPO), str(root)]),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}"})
    return root, env


def _at(root: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "at", "--params", "params.yaml", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_the_grid_snakemake_and_dvc_see_the_users_runs(user_project):
    root, env = user_project
    cohorts = json.loads(_at(root, env, "runs", "--profile", "mine", "--cohorts", "--json").stdout)
    assert {c["id"]: c["runs"] for c in cohorts} == {
        COHORT_STUDENTS: STUDENT_RUNS, COHORT_TEACHER: ["toy/tiny-8/baseline/seed0"]}
    dry = subprocess.run(["snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--config",
                          "params=params.yaml", "profile=mine", "--dry-run", "--printshellcmds", "--forceall",
                          "--nolock"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    for cohort in (COHORT_TEACHER, COHORT_STUDENTS):
        assert f"train --cohort {cohort} --profile mine" in dry.stdout
    assert "python -m at download toy" in dry.stdout
    _at(root, env, "dvc", "--profile", "mine")
    stages = {**yaml.safe_load((root / "pipelines" / "mine" / "dvc.yaml").read_text())["stages"],
              **yaml.safe_load((root / "dvc.yaml").read_text())["stages"]}   # the root: downloads
    commands = " ".join(str(s.get("cmd")) for s in stages.values())
    assert f"--cohort {COHORT_STUDENTS}" in commands and "download toy" in commands


@pytest.mark.slow
def test_the_users_data_set_model_term_and_mapping_train_real_runs(user_project):
    root, env = user_project
    _at(root, env, "download", "toy")
    _at(root, env, "train", "--cohort", COHORT_TEACHER, "--profile", "mine", "--threads", "1", "--no-progress")
    _at(root, env, "train", "--cohort", COHORT_STUDENTS, "--profile", "mine", "--threads", "1", "--no-progress")
    for run in STUDENT_RUNS:
        metrics = json.loads((root / "runs" / "mine" / run / "metrics.json").read_text())
        assert (metrics["train_size"], metrics["test_size"], metrics["dataset"]) == (96, 32, "toy")
        assert metrics["final_epoch"] == 2 and 0 <= metrics["final_test_error"] <= 100
    with open(root / "runs" / "mine" / STUDENT_RUNS[1] / "history.csv") as f:
        rows = list(csv.DictReader(f))
    # each of the user's terms trained and was reported under its name; the lr dropped at epoch 2
    assert len(rows) == 2 and all(float(r["loss_l1"]) > 0 and float(r["loss_at"]) > 0 for r in rows)
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.01])
