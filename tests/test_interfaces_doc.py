"""docs/interfaces.md cannot drift: its run spec is the code's, its key lists are those of a
real tiny training's checkpoint, history.csv, metrics.json and MLflow run, and its lists of
names (models, data sets, term types, mappings, schedules, AT forms, BatchNorm inits) are the
registries' and enums' (README.md lists none of them: it points here)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
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


# The registries as at/ fills them, read in a fresh interpreter: a test of this session may have
# registered a plugin's model or term type in this one.
BUILT_IN = """
import json, re
from at import models
from at.attention import MAPPINGS
from at.data.datasets import DATASETS
from at.terms import BUILT_IN_TERM_TYPES
print(json.dumps({
    "models": [re.match("'([^']+)'", record.describe()).group(1) for record in models.MODELS.values()],
    "datasets": list(DATASETS), "terms": sorted(BUILT_IN_TERM_TYPES), "mappings": list(MAPPINGS)}))
"""


@pytest.fixture(scope="module")
def built_in() -> dict:
    done = subprocess.run([sys.executable, "-c", BUILT_IN], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _bullet(lead: str) -> str:
    """The doc's text from ``lead`` to the end of its list item."""
    start = DOC.index(lead)
    end = re.search(r"\n\s*(- |\n)", DOC[start:])
    return DOC[start:start + end.start()] if end else DOC[start:]


def test_the_documented_model_names_are_the_registrys(built_in):
    # the names, each with a remark in parentheses, up to what the ResNets' weights do
    names = _bullet("  - names:").split("`weights=")[0]
    assert re.findall(r"`([^`]+)`", names) == built_in["models"]


def test_the_documented_data_sets_are_the_registrys(built_in):
    assert _listed("the registry of data-set records (") == built_in["datasets"]


def test_the_documented_term_types_are_the_registrys(built_in):
    assert sorted(_listed("built-in term types (at.terms):")) == built_in["terms"]


def test_the_documented_mappings_and_at_forms_are_the_codes(built_in):
    from at.attention import Form
    from at.choices import names

    mappings = re.search(r'`attention_map\(activation, mapping=((?:"\w+"\|?)+)', DOC).group(1)
    assert re.findall(r'"(\w+)"', mappings) == built_in["mappings"]
    forms = re.search(r'`at_loss\(s, t, mapping="sum", p=2, form=((?:"\w+"\|?)+)\)`', DOC).group(1)
    assert tuple(re.findall(r'"(\w+)"', forms)) == names(Form)


def test_the_documented_schedules_and_their_default_are_the_codes():
    from at.choices import names
    from at.method import DEFAULT_SCHEDULE, Schedule

    sentence = _bullet("`schedule` one of").split(", and `name`")[0]
    assert tuple(re.findall(r"`(\w+)` \(", sentence)) == names(Schedule)
    assert f"`{DEFAULT_SCHEDULE}` (default)" in sentence


def test_the_documented_metrics_of_a_cell_are_the_codes():
    from at.choices import METRIC_KEYS, Metric, names

    listed = re.search(r"carry `metric` \(([\w |]+) -> metrics\.json ([`\w |]+)\)",
                       _bullet("- `runs`: at.grid.runs")).groups()
    assert tuple(listed[0].split(" | ")) == names(Metric)
    assert listed[1].replace("`", "").split(" | ") == [METRIC_KEYS[m] for m in Metric]


def test_the_documented_batchnorm_inits_are_the_codes():
    from at.choices import names
    from at.models.catalog import BnWeightInit

    sentence = _bullet("  - `bn_weight_init`:")
    assert tuple(re.findall(r"`(\w+)`", sentence)[1:]) == names(BnWeightInit)
