"""Per-run records (at.records): what the repository keeps of a run, and the report rendered from
them alone, byte for byte, on a checkout without runs/ (a fresh clone, CI).

One real tiny grid (Table 1's WRN-16-1 <- WRN-16-2 row: student, AT, teacher; 64 images, one epoch), trained once per
module through `python -m at train --cohort`, is the expensive artefact; tests that change it
work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from at import grid, records
from in_process import run_cli

pytestmark = pytest.mark.slow   # a real (tiny) training of three runs

REPO = Path(__file__).resolve().parents[1]
PROFILE = "tiny"
AT_RUN = "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"


def _tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # the row's student, AT student and teacher: the runs the attention figure needs
    params["tables"]["table1"]["columns"] = {k: v for k, v in params["tables"]["table1"]["columns"].items()
                                             if k in ("student", "at", "teacher")}
    params["profiles"][PROFILE] = {
        "tables": ["table1"], "rows": {"table1": ["wrn-16-1_from_wrn-16-2"]}, "seeds": [0],
        "protocol": {"epochs": 1, "lr_drops": [], "batch_size": 32, "train_subset": 64,
                     "test_subset": 64, "precision": "float32"}}
    return params


def _cli(project: Path, *args: str):
    return run_cli(["--params", str(project / "params.yaml"), *args], cwd=project)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_mini_dir, mlflow_template) -> Path:
    """A project folder whose tiny profile is trained and reported (records exported)."""
    project = tmp_path_factory.mktemp("records") / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(_tiny_params(), sort_keys=False))
    shutil.copy(REPO / "references.yaml", project / "references.yaml")
    (project / "data").mkdir()
    (project / "data" / "cifar10").symlink_to(cifar_mini_dir)
    shutil.copy(mlflow_template, project / "mlruns.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
        params = yaml.safe_load((project / "params.yaml").read_text())
        # teachers first (a cohort's level: how many teachers stand before it)
        for cohort in sorted(grid.cohorts(params, PROFILE), key=lambda c: c.level):
            done = _cli(project, "train", "--cohort", cohort.id, "--profile", PROFILE,
                        "--threads", "1", "--device", "cpu")
            assert done.returncode == 0, done.stdout + done.stderr
        done = _cli(project, "report", "--profile", PROFILE)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "records: 3 written, 0 kept from earlier, 0 removed" in done.stdout
    return project


@pytest.fixture
def project(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained project that a test may change."""
    copy = tmp_path / "project"
    shutil.copytree(trained, copy, symlinks=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlruns.db'}")
    return copy


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def test_a_record_is_the_runs_spec_and_the_bytes_it_wrote(trained):
    params = yaml.safe_load((trained / "params.yaml").read_text())
    for run in grid.runs(params, PROFILE):
        record = trained / "results" / "runs" / PROFILE / run.id
        for name in ("metrics.json", "history.csv"):
            assert (record / name).read_bytes() == (trained / run.out_dir / name).read_bytes()
        spec = json.loads((record / "spec.json").read_text())
        assert spec["id"] == run.id and spec["method"] == grid.run_spec(params, run).to_dict()["method"]
        assert spec["protocol"]["epochs"] == 1 and spec["protocol"]["precision"] == "float32"
        metrics = json.loads((record / "metrics.json").read_text())
        assert metrics["git_commit"] and metrics["machine"] and metrics["precision"] == "float32"
        names = sorted(p.name for p in record.iterdir())
        assert names == sorted(["spec.json", "metrics.json", "history.csv"]
                               + (["attention.json"] if run.id == AT_RUN else []))
    # no checkpoint, nothing that is not small text
    assert not list((trained / "results" / "runs").rglob("*.pt"))


def test_the_manifest_holds_the_digests_the_checkpoints_name(trained, monkeypatch):
    """SHA256SUMS: every file of every record, and for metrics.json and history.csv the very
    sha256 the run's checkpoint names."""
    from at import checkpoint

    monkeypatch.chdir(trained)
    params = yaml.safe_load((trained / "params.yaml").read_text())
    listed = records.read_manifest(PROFILE)
    assert sorted(listed) == sorted(run.id for run in grid.runs(params, PROFILE))
    for run in grid.runs(params, PROFILE):
        record = Path("results") / "runs" / PROFILE / run.id
        assert listed[run.id] == {p.name: checkpoint.digest(p.read_bytes()) for p in record.iterdir()}
        saved = checkpoint.load(Path(run.out_dir) / "checkpoint.pt", required=(), mmap=True)
        assert {k: listed[run.id][k] for k in records.COPIED} == saved[checkpoint.OUTPUT_DIGESTS]


def test_the_attention_record_holds_the_maps_of_the_checkpoints(trained):
    """attention.json against an independent computation from the two checkpoints."""
    import torch

    from at.attention import attention_map
    from at.checkpoint import load_model
    from at.data import augment, cifar

    saved = json.loads((trained / "results" / "runs" / PROFILE / AT_RUN / "attention.json").read_text())
    student, spec = load_model(trained / "runs" / PROFILE / AT_RUN / "checkpoint.pt")
    teacher, _ = load_model(trained / spec.teacher_checkpoint)
    data = cifar.load(trained / "data" / "cifar10" / "cifar-10-batches-py")
    images = torch.as_tensor(data.test_x[:4])
    assert saved["images"] == images.tolist() and saved["seed"] == 0 and saved["run"] == AT_RUN
    x = augment.normalize(images, augment.CIFAR_MEAN, augment.CIFAR_STD).double()
    with torch.no_grad():
        taps = {"teacher": teacher.double().eval()(x)[1], "student": student.double().eval()(x)[1]}
    assert len(saved["maps"]) == 3
    for j, tap in enumerate(saved["maps"]):
        for who in ("teacher", "student"):
            q = attention_map(taps[who][j], "sum", 2).numpy()
            expected = q / q.max(axis=1, keepdims=True)
            got = np.asarray(tap[who]).reshape(len(images), -1)
            np.testing.assert_allclose(got, expected, atol=5e-4 + 1e-6)


def test_the_report_renders_from_the_records_alone_byte_for_byte(project):
    committed = _files(project / "results" / PROFILE)
    assert "fig_attention_maps.png" in committed
    # a clone: no runs/, no data, no MLflow store
    shutil.rmtree(project / "runs")
    (project / "data" / "cifar10").unlink()
    (project / "mlruns.db").unlink()
    done = _cli(project, "report", "--profile", PROFILE, "--records-only", "--out", str(project / "again"))
    assert done.returncode == 0, done.stderr
    assert _files(project / "again") == committed
    assert not (project / "mlruns.db").exists(), "--records-only touches no MLflow store"


def test_records_of_runs_not_finished_here_are_kept_and_stale_ones_removed(project):
    kept = project / "results" / "runs" / PROFILE / AT_RUN
    before = _files(kept)
    shutil.rmtree(project / "runs" / PROFILE / AT_RUN)   # trained on another machine
    stale = project / "results" / "runs" / PROFILE / "cifar10" / "wrn-16-1" / "gone" / "seed0"
    stale.mkdir(parents=True)
    (stale / "spec.json").write_text("{}\n")
    manifest = project / "results" / "runs" / PROFILE / "SHA256SUMS"
    lines = manifest.read_text()
    done = _cli(project, "report", "--profile", PROFILE)
    assert done.returncode == 0, done.stderr
    assert "records: 0 written, 1 kept from earlier, 1 removed" in done.stdout
    assert _files(kept) == before and not stale.exists()
    assert manifest.read_text() == lines   # the kept record's lines stay


def test_exporting_again_restores_an_edited_record_and_its_lines(project):
    """What the manifest cannot stop, an edit of a record together with its line, the export
    of a run finished here undoes: the bytes come from the run's folder, checked against its
    checkpoint."""
    from at import checkpoint

    record = project / "results" / "runs" / PROFILE / AT_RUN
    manifest = project / "results" / "runs" / PROFILE / "SHA256SUMS"
    before = _files(project / "results")
    metrics = json.loads((record / "metrics.json").read_text())
    metrics["machine"] = "NVIDIA H100 80GB HBM3"
    edited = (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode()
    (record / "metrics.json").write_bytes(edited)
    old = checkpoint.digest((project / "runs" / PROFILE / AT_RUN / "metrics.json").read_bytes())
    manifest.write_text(manifest.read_text().replace(old, checkpoint.digest(edited)))
    done = _cli(project, "report", "--profile", PROFILE)
    assert done.returncode == 0, done.stderr
    assert "records: 1 written" in done.stdout
    assert _files(project / "results") == before


def test_a_run_folder_without_its_checkpoint_is_not_exported(project):
    (project / "runs" / PROFILE / AT_RUN / "checkpoint.pt").unlink()
    before = _files(project / "results")
    done = _cli(project, "report", "--profile", PROFILE)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (f"run {AT_RUN}: runs/{PROFILE}/{AT_RUN}/metrics.json has no checkpoint.pt beside it"
            in done.stderr), done.stderr
    assert _files(project / "results") == before


def test_a_record_of_another_spec_is_refused_not_rendered(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["methods"]["at-sum-p2"]["terms"][1]["beta"] = 300
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _files(project / "results")
    done = _cli(project, "report", "--profile", PROFILE, "--records-only")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"run {AT_RUN}: its record" in done.stderr and "another spec" in done.stderr
    # with the runs there, the export refuses first: the checkpoint is of the old spec too
    done = _cli(project, "report", "--profile", PROFILE)
    assert done.returncode == 2 and "was trained from another spec" in done.stderr, done.stderr
    assert _files(project / "results") == before


def test_outputs_that_are_not_the_runs_are_refused_at_export(project):
    metrics = project / "runs" / PROFILE / AT_RUN / "metrics.json"
    data = json.loads(metrics.read_text())
    data["final_test_error"] = 1.0
    metrics.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    record = project / "results" / "runs" / PROFILE / AT_RUN / "metrics.json"
    before = record.read_bytes()
    done = _cli(project, "report", "--profile", PROFILE)
    assert done.returncode == 2 and "is not the file the run wrote" in done.stderr, done.stderr
    assert record.read_bytes() == before


def test_the_record_folder_of_a_run_stays_under_results(params):
    with pytest.raises(ValueError, match="not valid"):
        records.folder("tiny", "../../etc/seed0")
