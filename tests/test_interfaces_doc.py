"""docs/interfaces.md cannot drift: its run spec is the code's, and its key lists are those of a
real tiny training's checkpoint, history.csv, metrics.json and MLflow run."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from at import checkpoint, grid
from in_process import run_cli
from at import params as params_io

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "interfaces.md").read_text()


def _listed(lead: str) -> list[str]:
    """The backquoted names after ``lead`` in the doc, up to the end of that list."""
    start = DOC.index(lead) + len(lead)
    match = re.match(r"\s*((?:`[^`]+`,?\s*)+)", DOC[start:])
    assert match, f"no list after {lead!r} in docs/interfaces.md"
    return re.findall(r"`([^`]+)`", match.group(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_mini_dir, mlflow_template):
    tmp = tmp_path_factory.mktemp("doc")
    shutil.copy(mlflow_template, tmp / "mlruns.db")   # an empty store (conftest)
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        done = run_cli(["--params", str(REPO / "params.yaml"), "train", "--student", "wrn-10-1", "--out", str(out),
                        "--id", "doc-run", "--data-dir", str(cifar_mini_dir), "--epochs", "1", "--train-subset", "64",
                        "--test-subset", "64", "--batch-size", "32", "--threads", "1", "--no-progress"], cwd=tmp)
    assert done.returncode == 0, done.stderr
    return out, uri


def test_the_documented_run_spec_is_the_codes():
    block = DOC[DOC.index("## Run spec"):]
    documented = json.loads(block[block.index("```json") + len("```json"):block.index("```\n", block.index("```json") + 7)])
    params = params_io.load(REPO / "params.yaml")
    assert documented == grid.run_spec(params, documented["id"], documented["profile"]).to_dict()


def test_the_documented_checkpoint_keys_are_the_real_ones(trained):
    out, _ = trained
    assert set(_listed("`checkpoint.pt` (the final model) keys:")) == set(checkpoint.load(out / "checkpoint.pt"))


def test_the_documented_history_columns_are_the_real_ones(trained):
    out, _ = trained
    with open(out / "history.csv", newline="") as f:
        header = next(csv.reader(f))
    documented = _listed("`history.csv` columns:")
    # `loss_<term>` stands for one column per term of the method (the baseline: CE only)
    assert [c for c in header if not c.startswith("loss_")] == [c for c in documented if c != "loss_<term>"]
    assert [c for c in header if c.startswith("loss_")] == ["loss_ce"]
    assert header.index("loss_ce") == documented.index("loss_<term>")


def test_the_documented_metrics_keys_are_the_real_ones(trained):
    out, _ = trained
    assert set(_listed("`metrics.json` keys:")) == set(json.loads((out / "metrics.json").read_text()))


def test_the_documented_mlflow_tags_are_on_a_real_run(trained):
    from mlflow.tracking import MlflowClient

    out, uri = trained
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    ours = {k for k in run.data.tags if not k.startswith("mlflow.")}
    assert set(_listed("Tags:")) == ours
    assert set(_listed("artifacts:")) == {a.path for a in client.list_artifacts(run.info.run_id)}
