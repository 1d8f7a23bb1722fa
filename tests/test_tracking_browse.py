"""MLflow as a user browses it, walked through the MLflow client after real tiny trainings:
experiment of the profile -> a cell's parent run (mean, std, n) -> its seeds' runs -> each
seed's per-epoch metrics, checkpoint artifact and data set input; the report's files."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from at import grid, tracking
from at.train import Options, train
from at import params as params_io

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
BASELINE = "cifar10/wrn-16-1/baseline/seed0"
CELL = {"table": "table2", "row": "none", "column": "error", "metric": "top1"}
# the same run counts in a cell of Table 1 too (its student column)
SHARED_CELL = {"table": "table1", "row": "wrn-16-1_from_wrn-16-2", "column": "student", "metric": "top1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, cifar_mini_dir, mlflow_template):
    """Two seeds of the ci grid's baseline cell, trained for real into one SQLite store."""
    tmp = tmp_path_factory.mktemp("browse")
    shutil.copy(mlflow_template, tmp / "mlruns.db")   # an empty store (conftest)
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    params = params_io.load(REPO / "params.yaml")
    specs = []
    for seed in (0, 1):
        spec = grid.run_spec(params, BASELINE, "ci").to_dict()
        spec.update(id=BASELINE.replace("seed0", f"seed{seed}"), seed=seed, data_dir=str(cifar_mini_dir),
                    out_dir=str(tmp / f"seed{seed}"))
        spec["protocol"].update(epochs=EPOCHS, train_subset=64, test_subset=64, batch_size=32)
        with pytest.MonkeyPatch.context() as mp:   # trained in this process, into the test's store
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            train(spec, Options(device="cpu", progress=False, threads=1))
        specs.append(spec)
    return tmp, uri, specs


def _final_errors(specs) -> list[float]:
    return [json.loads((Path(s["out_dir"]) / "metrics.json").read_text())["final_test_error"] for s in specs]


def _cells(specs, mean_shift: float = 0.0) -> list[dict]:
    errors = _final_errors(specs)
    stats = {"mean": statistics.mean(errors) + mean_shift, "std": statistics.stdev(errors), "n": len(errors),
             "run_ids": [s["id"] for s in specs]}
    return [{**CELL, **stats}, {**SHARED_CELL, **stats}]


def _search(client, experiment_id, filter_string):
    return client.search_runs([experiment_id], filter_string, max_results=1000)


def test_from_the_experiment_to_a_cell_to_its_seeds_to_their_epochs_and_checkpoints(store, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp, uri, specs = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    report_dir = tmp / "results"
    report_dir.mkdir()
    (report_dir / "table2.md").write_text("| n | mean |\n")
    (report_dir / "README.md").write_text("# report\n")
    tracking.record_cells("ci", _cells(specs), report_dir)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("attention-transfer/ci")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    parents = _search(client, experiment.experiment_id, "tags.`at.cell` = 'table2/none/error'")
    assert len(parents) == 1
    parent = parents[0]
    errors = _final_errors(specs)
    assert parent.data.metrics["mean"] == pytest.approx(statistics.mean(errors))
    assert parent.data.metrics["std"] == pytest.approx(statistics.stdev(errors))
    assert parent.data.metrics["n"] == 2
    # the name says what tells cells apart first; the cell shows the seeds' metric column too
    assert parent.info.run_name == "none | table2" and parent.info.status == "FINISHED"
    assert parent.data.metrics["test_error"] == pytest.approx(statistics.mean(errors))
    # a summary, not a computation: no duration in the runs table
    assert parent.info.end_time == parent.info.start_time
    # its seeds are nested under the other cell they count in (the first by key): the view's
    # column "seeds" and the description say which row to expand
    shared_name = "wrn-16-1←16-2 student | table1"
    assert parent.data.tags["seeds"] == f"expand {shared_name}"
    assert f"nested under **{shared_name}**" in parent.data.tags["mlflow.note.content"]

    # every cell lists and links each run it aggregates, the shared ones included, whichever
    # cell MLflow nests them under
    seed_runs = {r.data.tags["at.run_id"]: r for r in _search(client, experiment.experiment_id, "tags.`at.run_id` != ''")}
    for key in ("table2/none/error", "table1/wrn-16-1_from_wrn-16-2/student"):
        cell_run = _search(client, experiment.experiment_id, f"tags.`at.cell` = '{key}'")[0]
        description = cell_run.data.tags["mlflow.note.content"]
        for spec in specs:
            run = seed_runs[spec["id"]]
            name = run.info.run_name.replace("|", "\\|")   # a bare '|' would end the table's cell
            link = (f"[{name}](#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
                    f"?workflowType=machine_learning)")
            assert link in description, (key, description)
            assert f"| {spec['seed']} | {link} | {run.data.metrics['test_error']:.2f} |" in description
        other = ({"table2/none/error", "table1/wrn-16-1_from_wrn-16-2/student"} - {key}).pop()
        assert description.count(other) == len(specs), "each shared run says which other cell it counts in"

    # the shared run nests under one of its cells (the first, by name) and lists both
    shared_parent = _search(client, experiment.experiment_id,
                            "tags.`at.cell` = 'table1/wrn-16-1_from_wrn-16-2/student'")[0]
    assert shared_parent.info.run_name == shared_name and shared_parent.data.tags["seeds"] == "expand this row"
    assert "nested under" not in shared_parent.data.tags["mlflow.note.content"]
    seeds = _search(client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{shared_parent.info.run_id}'")
    assert sorted(r.data.tags["at.run_id"] for r in seeds) == sorted(s["id"] for s in specs)
    for seed_run, spec in zip(sorted(seeds, key=lambda r: r.data.tags["at.run_id"]), specs):
        assert json.loads(seed_run.data.tags["at.cells"]) == ["table1/wrn-16-1_from_wrn-16-2/student",
                                                              "table2/none/error"]
        with open(Path(spec["out_dir"]) / "history.csv", newline="") as f:
            history = {int(row["epoch"]): float(row["test_error"]) for row in csv.DictReader(f)}
        logged = {m.step: m.value for m in client.get_metric_history(seed_run.info.run_id, "test_error")}
        assert logged == pytest.approx(history) and sorted(logged) == list(range(1, EPOCHS + 1))
        artifacts = {a.path for a in client.list_artifacts(seed_run.info.run_id)}
        assert {"checkpoint.pt", "metrics.json", "history.csv"} <= artifacts
        local = client.download_artifacts(seed_run.info.run_id, "checkpoint.pt", str(tmp / "dl" / spec["id"]))
        assert Path(local).read_bytes() == (Path(spec["out_dir"]) / "checkpoint.pt").read_bytes()
        (data_input,) = seed_run.inputs.dataset_inputs
        md5 = json.loads((Path(spec["out_dir"]) / "metrics.json").read_text())["data_md5"]
        assert (data_input.dataset.name, data_input.dataset.digest) == ("cifar10", md5)

    reports = _search(client, experiment.experiment_id, "tags.`at.kind` = 'report'")
    assert len(reports) == 1 and reports[0].info.end_time == reports[0].info.start_time
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id)} == {"README.md", "table2.md"}

    # the report again (new numbers): the same parent runs, updated, none added
    tracking.record_cells("ci", _cells(specs, mean_shift=1.0), report_dir)
    again = _search(client, experiment.experiment_id, "tags.`at.kind` = 'cell'")
    assert len(again) == 2
    updated = client.get_run(parent.info.run_id)
    assert updated.data.metrics["mean"] == pytest.approx(statistics.mean(errors) + 1.0)
    assert updated.info.end_time == updated.info.start_time == parent.info.start_time
    assert len(_search(client, experiment.experiment_id, "tags.`at.kind` = 'report'")) == 1
    # the training runs are still one per seed, finished
    trained = _search(client, experiment.experiment_id, "tags.`at.run_id` != ''")
    assert sorted(r.data.tags["at.run_id"] for r in trained) == sorted(s["id"] for s in specs)
    assert all(r.info.status == "FINISHED" for r in trained)


def test_runs_in_no_cell_sit_under_one_teachers_run_not_among_the_cells(store, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp, uri, specs = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    only_first = [{**cell, "run_ids": [specs[0]["id"]]} for cell in _cells(specs)]
    # the second seed's run stands for a teacher that is in no table (Table 3's NIN-wide)
    tracking.record_cells("ci", only_first, None, outside_cells=[specs[0]["id"], specs[1]["id"]])
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("attention-transfer/ci")
    [group] = _search(client, experiment.experiment_id, "tags.`at.kind` = 'group'")
    assert group.info.run_name.startswith("teachers") and group.info.status == "FINISHED"
    assert group.info.end_time == group.info.start_time
    runs = {r.data.tags["at.run_id"]: r for r in _search(client, experiment.experiment_id, "tags.`at.run_id` != ''")}
    assert runs[specs[1]["id"]].data.tags["mlflow.parentRunId"] == group.info.run_id
    # a run that fills a cell stays under its cell, even when also listed as outside
    cell_parents = {r.info.run_id for r in _search(client, experiment.experiment_id, "tags.`at.kind` = 'cell'")}
    assert runs[specs[0]["id"]].data.tags["mlflow.parentRunId"] in cell_parents
    # again: the same group run, not a second one
    tracking.record_cells("ci", only_first, None, outside_cells=[specs[1]["id"]])
    assert len(_search(client, experiment.experiment_id, "tags.`at.kind` = 'group'")) == 1
