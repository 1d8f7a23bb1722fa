"""Cohorts: runs sharing a data stream train together and end exactly as they would alone.

The data-stream contract (at.data.stream), the exactness of a cohort against solo runs (CPU,
float32: weights, histories and metrics bit-identical), resume of members that stand at
different positions (stopped in-process at an exact step), a finished run left alone, and
outputs written again from the final state. A real process killed with SIGKILL or stopped with
SIGTERM: tests/test_cohort_processes.py.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from at import checkpoint, params as params_mod, resume
from at.data.datasets import training_data
from at.data.stream import DataStream
from at.spec import RunSpec
from at.precision import resolve as resolve_precision
from at.data.stream import check_shared_stream
from at.__main__ import main
from at.train import Interrupted, Options, TrainingDiverged, train, train_cohort

REPO = Path(__file__).resolve().parents[1]
TIMING = {"images_per_s", "epoch_time_s", "wall_time_s"}
CPU = Options(device="cpu", precision="float32", progress=False, threads=1)


@pytest.fixture(autouse=True)
def private_mlflow(mlflow_store):
    torch.set_num_threads(1)


def make_spec(out: Path, data_dir: Path, student: str, method: str, teacher: Path | None = None,
              epochs: int = 2, seed: int = 0, **protocol) -> dict:
    params = params_mod.load(REPO / "params.yaml")
    proto = params_mod.protocol(params, "cifar")
    proto.update({"epochs": epochs, "batch_size": 32, "train_subset": 256, "test_subset": 128,
                  "lr_drops": [1], "precision": "float32", **protocol})
    return {"id": f"test/{out.name}", "dataset": "cifar10", "data_dir": str(data_dir), "student": student,
            "weights": None, "teacher": "wrn-10-2" if teacher else None, "teacher_weights": None,
            "teacher_checkpoint": str(teacher) if teacher else None, "method_name": method,
            "method": params_mod.method(params, method), "seed": seed, "out_dir": str(out),
            "num_classes": 10, "protocol": proto, "profile": "custom"}


def members(root: Path, data_dir: Path, teacher: Path, epochs: int = 2) -> list[dict]:
    """A mixed cohort: the baseline, three teacher methods (one teacher forward shared), a NIN
    with dropout (its own random stream) and F-ActT (a projection initialised from the RNG).
    Eight steps of 16 images per epoch: as many steps as the other tests' 256 images in 32s
    (the stop positions below count steps), at half the arithmetic."""
    small = {"epochs": epochs, "batch_size": 16, "train_subset": 128}
    return [
        make_spec(root / "baseline", data_dir, "wrn-10-1", "baseline", **small),
        make_spec(root / "at", data_dir, "wrn-10-1", "at-sum-p2", teacher, **small),
        make_spec(root / "kd", data_dir, "wrn-10-1", "kd", teacher, **small),
        make_spec(root / "factt", data_dir, "wrn-10-1", "factt", teacher, **small),
        make_spec(root / "nin", data_dir, "nin-thin", "baseline", **small),
    ]


def _history(out: Path) -> list[dict]:
    with open(Path(out) / "history.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = checkpoint.load(Path(a) / "checkpoint.pt"), checkpoint.load(Path(b) / "checkpoint.pt")
    for part in ("model", "objective"):
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), f"{a.name}: {part} differs at {k}"
    assert _history(a) == _history(b), f"{a.name}: histories differ"
    ma, mb = (json.loads((Path(p) / "metrics.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ma.items() if k not in TIMING | {"run_id"}} == \
        {k: v for k, v in mb.items() if k not in TIMING | {"run_id"}}


def stream_key(spec: dict) -> tuple:
    return RunSpec.resolve(spec).stream_key


def relocate(specs: list[dict], root: Path) -> list[dict]:
    moved = copy.deepcopy(specs)
    for spec in moved:
        spec["out_dir"] = str(root / Path(spec["out_dir"]).name)
    return moved


# ------------------------------------------------------------------------------------------------
# The data-stream contract


def test_the_stream_depends_on_data_keys_and_seed_only(cifar_mini_dir):
    a = make_spec(Path("a"), cifar_mini_dir, "wrn-10-1", "baseline")
    b = make_spec(Path("b"), cifar_mini_dir, "nin-thin", "at-sum-p2", Path("t.pt"), lr=0.5, epochs=7,
                  weight_decay=0.0)
    assert stream_key(a) == stream_key(b), "model, method, lr, epochs and weight decay must not matter"
    for change in ({"seed": 1}, {"protocol": {**a["protocol"], "augment": "flip"}},
                   {"protocol": {**a["protocol"], "batch_size": 64}},
                   {"protocol": {**a["protocol"], "train_subset": 128}}):
        assert stream_key({**a, **change}) != stream_key(a), change

    def batches(spec, epochs=2):
        data = training_data(RunSpec.resolve(spec), torch.device("cpu"))
        stream = DataStream(data, spec["seed"], spec["protocol"]["batch_size"], torch.device("cpu"))
        out = []
        for _ in range(epochs):
            stream.start_epoch()
            out += [(x.clone(), y.clone()) for x, y in stream.batches(0)]
        return out

    first, second = batches(a), batches(b)
    assert len(first) == 16
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))
    other_seed = batches({**a, "seed": 1})
    assert not torch.equal(first[0][0], other_seed[0][0]), "another seed must give another stream"
    assert not torch.equal(first[0][0], first[8][0]), "epochs must differ (new order and crops)"


def test_runs_with_different_streams_are_refused_as_a_cohort(cifar_mini_dir, tmp_path):
    a = make_spec(tmp_path / "a", cifar_mini_dir, "wrn-10-1", "baseline")
    b = make_spec(tmp_path / "b", cifar_mini_dir, "wrn-10-1", "baseline", seed=1)
    with pytest.raises(ValueError, match=r"streams differ in \['seed'\]"):
        check_shared_stream([RunSpec.resolve(a), RunSpec.resolve(b)])
    with pytest.raises(ValueError, match="epochs"):
        check_shared_stream([RunSpec.resolve(a), RunSpec.resolve({**a, "id": "x", "out_dir": str(tmp_path / "x"),
                                                                  "protocol": {**a["protocol"], "epochs": 3}})])
    with pytest.raises(ValueError, match="twice"):
        check_shared_stream([RunSpec.resolve(a), RunSpec.resolve(a)])


# ------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.slow
def test_a_cohort_ends_bit_identical_to_each_run_alone(tmp_path, cifar_mini_dir, teacher):
    specs = members(tmp_path / "cohort", cifar_mini_dir, teacher)
    results = train_cohort(specs, Options(progress=False, threads=1))
    assert [r["run_id"] for r in results] == [s["id"] for s in specs]
    for spec in relocate(specs, tmp_path / "alone"):
        train(spec, Options(progress=False, threads=1))
    for spec in specs:
        assert_same_run(Path(spec["out_dir"]), tmp_path / "alone" / Path(spec["out_dir"]).name)
    metrics = json.loads((tmp_path / "cohort" / "at" / "metrics.json").read_text())
    assert metrics["precision"] == "float32"


class StopAfter:
    """A SIGTERM flag that is raised after `n` checks: the loop checks once per step and once at
    each epoch end, so a test can stop a cohort at an exact position (the real signal is tested
    with real processes below)."""

    def __init__(self, n: int):
        self.n = n

    @property
    def raised(self) -> bool:
        self.n -= 1
        return self.n < 0


@pytest.mark.slow
def test_members_resumed_at_different_positions_catch_up_exactly(tmp_path, cifar_mini_dir, teacher):
    reference = members(tmp_path / "reference", cifar_mini_dir, teacher, epochs=2)
    train_cohort(reference, Options(progress=False, threads=1))

    specs = relocate(reference, tmp_path / "resumed")
    # stop at the end of epoch 1 (8 step checks, the last of which cannot interrupt, then the
    # epoch-end check), keep the baseline's state there, then stop 3 steps into epoch 2
    with pytest.raises(Interrupted):
        train_cohort(specs, CPU, stop=StopAfter(7))
    behind = tmp_path / "baseline-epoch1.pt"
    shutil.copy(Path(specs[0]["out_dir"]) / "last.pt", behind)
    with pytest.raises(Interrupted):
        train_cohort(specs, CPU, stop=StopAfter(2))
    saved = [checkpoint.load(Path(s["out_dir"]) / "last.pt") for s in specs]
    assert {(s["epoch"], s["step"]) for s in saved} == {(1, 3)}, "SIGTERM saves every member mid-epoch"
    shutil.copy(behind, Path(specs[0]["out_dir"]) / "last.pt")   # as if killed between two saves
    train_cohort(specs, CPU)
    for spec in specs:
        assert_same_run(Path(spec["out_dir"]), tmp_path / "reference" / Path(spec["out_dir"]).name)


def _spec_file(path: Path, specs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump(specs))
    return path


def _cli(spec_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "train", "--spec",
            str(spec_file), "--threads", "1", "--no-progress", *extra]


def _main(spec_file: Path, capsys, *extra: str) -> tuple[int, str]:
    """`python -m at train --spec FILE` in this process: its exit status and what it printed."""
    capsys.readouterr()
    status = main(["--params", str(REPO / "params.yaml"), "train", "--spec", str(spec_file), "--threads", "1",
                   "--no-progress", *extra])
    return status, capsys.readouterr().out


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------------
# Finished runs


@pytest.mark.slow
def test_a_finished_run_is_left_alone_and_outputs_come_back_from_the_final_state(tmp_path, cifar_mini_dir, teacher,
                                                                                   capsys):
    own_teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher, own_teacher)
    specs = members(tmp_path / "c", cifar_mini_dir, own_teacher, epochs=1)[:2]
    train_cohort(specs, Options(progress=False, threads=1))
    out = Path(specs[1]["out_dir"])
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.json", "history.csv")}
    mtimes = {name: (out / name).stat().st_mtime_ns for name in before}
    spec_file = _spec_file(tmp_path / "c.yaml", specs)

    status, printed = _main(spec_file, capsys)
    assert status == 0
    assert printed.count("already finished") == 2 and "epoch 1/1" not in printed
    assert {name: (out / name).stat().st_mtime_ns for name in before} == mtimes, "a finished run must not be touched"

    # Snakemake and DVC delete a job's outputs before re-running it (a run added to its cohort):
    # the outputs come back as they were written (their kept copies, at.member), byte for byte,
    # without training
    for name in before:
        (out / name).unlink()
    status, printed = _main(spec_file, capsys)
    assert status == 0
    assert "its outputs put back as they were written" in printed and "epoch 1/1" not in printed
    assert {name: (out / name).read_bytes() for name in before} == before
    assert {name: (out / name).read_bytes() for name in ("metrics.json", "history.csv")} == \
        {name: before[name] for name in ("metrics.json", "history.csv")}
    restored, original = checkpoint.load(out / "checkpoint.pt"), torch.load(io.BytesIO(before["checkpoint.pt"]))
    assert restored.keys() == original.keys() and restored["history"] == original["history"]
    assert all(torch.equal(restored["model"][k], original["model"][k]) for k in original["model"])

    # a retrained teacher (same path, other bytes) is a changed run: its student trains again
    saved_teacher = checkpoint.load(own_teacher)
    saved_teacher["model"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in saved_teacher["model"].items()}
    checkpoint.save(saved_teacher, own_teacher)
    status, printed = _main(spec_file, capsys)
    assert status == 0
    assert printed.count("already finished") == 1 and printed.count("epoch 1/1") == 1, printed

    status, printed = _main(spec_file, capsys, "--force")
    assert status == 0
    assert printed.count("epoch 1/1") == 2
    assert_same_run(out, out)  # still loadable and whole


# ------------------------------------------------------------------------------------------------
# Resume states that cannot be read


@pytest.mark.slow
def test_an_unreadable_last_pt_falls_back_to_the_state_before_it(tmp_path, cifar_mini_dir, teacher, capsys):
    reference = [make_spec(tmp_path / "reference", cifar_mini_dir, "wrn-10-1", "at-sum-p2", teacher, epochs=3)]
    train_cohort(reference, Options(progress=False, threads=1))
    specs = relocate(reference, tmp_path / "resumed")
    out = Path(specs[0]["out_dir"])
    with pytest.raises(Interrupted):   # stop at the end of epoch 2: last.pt and last.prev.pt exist
        train_cohort(specs, CPU, stop=StopAfter(8 + 1 + 7))
    assert checkpoint.load(out / "last.pt")["epoch"] == 2 and checkpoint.load(out / "last.prev.pt")["epoch"] == 1
    (out / "last.pt").write_bytes(b"")          # an empty file, as a full disk leaves it
    status, printed = _main(_spec_file(tmp_path / "c.yaml", specs), capsys)
    assert status == 0
    assert "resuming from the state before it" in printed and "at epoch 2, step 0" in printed
    assert f"resuming from {out / 'last.prev.pt'}" in printed, "the message names the file it resumed from"
    assert_same_run(out, Path(reference[0]["out_dir"]))


def test_no_readable_resume_state_names_the_files_to_delete(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "last.prev.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError) as info:
        resume.load_resume_state(tmp_path, "some/run")
    message = str(info.value)
    assert f"delete {tmp_path / 'last.pt'} and {tmp_path / 'last.prev.pt'}" in message
    assert "weights_only=False" not in message
    assert resume.load_resume_state(tmp_path / "nothing-here", "some/run") == (None, None)


# ------------------------------------------------------------------------------------------------
# What the loop feeds and records


@pytest.mark.slow
def test_the_loop_feeds_the_schedule_and_records_top5_and_failures(tmp_path, cifar_mini_dir, teacher):
    from mlflow.tracking import MlflowClient

    spec = make_spec(tmp_path / "run", cifar_mini_dir, "wrn-10-1", "baseline", epochs=3, lr_drops=[1, 2])
    train(spec, Options(progress=False, threads=1))
    with open(Path(spec["out_dir"]) / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.02, 0.004])
    # top-5 error of the final model, recomputed independently from the checkpoint
    model, _ = checkpoint.load_model(Path(spec["out_dir"]) / "checkpoint.pt")
    data = training_data(RunSpec.resolve(spec), torch.device("cpu"))
    with torch.no_grad():
        logits = torch.cat([model(x)[0] for x, _ in data.test_batches(64)])
    labels = torch.cat([y for _, y in data.test_batches(64)])
    top5_wrong = sum(int(label not in row.topk(5).indices) for row, label in zip(logits, labels))
    assert float(rows[-1]["test_error_top5"]) == pytest.approx(100.0 * top5_wrong / len(labels))
    assert float(rows[-1]["test_error_top5"]) <= float(rows[-1]["test_error"])

    # a diverging member fails alone, its MLflow run FAILED; the other finishes
    diverging = make_spec(tmp_path / "diverging", cifar_mini_dir, "wrn-10-1", "baseline", epochs=1, lr=1e30)
    calm = make_spec(tmp_path / "calm", cifar_mini_dir, "wrn-10-1", "kd", teacher, epochs=1)
    with pytest.raises(TrainingDiverged, match="test/diverging"):
        train_cohort([diverging, calm], Options(progress=False, threads=1))
    assert (tmp_path / "calm" / "metrics.json").is_file() and not (tmp_path / "diverging" / "metrics.json").exists()
    client = MlflowClient()
    status = {name: client.get_run((tmp_path / name / "mlflow_run_id").read_text().strip()).info.status
              for name in ("diverging", "calm")}
    assert status == {"diverging": "FAILED", "calm": "FINISHED"}


def test_a_teacher_checkpoint_of_another_model_is_refused(tmp_path, cifar_mini_dir, teacher):
    spec = make_spec(tmp_path / "s", cifar_mini_dir, "wrn-10-1", "at-sum-p2", teacher)
    spec["teacher"] = "wrn-16-2"   # the checkpoint holds a wrn-10-2
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'wrn-10-2', but run test/s expects teacher 'wrn-16-2'"):
        train(spec, Options(progress=False, threads=1))
    assert not (tmp_path / "s").exists(), "no empty run folder may stay behind"


# ------------------------------------------------------------------------------------------------
# Precision across a resume


def _started_in(precision: str, out: Path, data_dir: Path) -> dict:
    """A run stopped after its first step, trained in ``precision`` (its protocol asks for auto)."""
    spec = make_spec(out, data_dir, "wrn-10-1", "baseline", epochs=1, precision="auto",
                     train_subset=64, test_subset=64)
    with pytest.raises(Interrupted):
        train_cohort([spec], Options(device="cpu", precision=precision, progress=False, threads=1,
                                     tracking=False), stop=StopAfter(0))
    assert checkpoint.load(out / "last.pt")["precision"] == precision
    return spec


def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, cifar_mini_dir, capsys):
    # the precision that auto does not mean on this machine, as on another node of a cluster
    here = resolve_precision("auto", torch.device("cpu"))
    other = "float32" if here == "bf16" else "bf16"
    spec = _started_in(other, tmp_path / "run", cifar_mini_dir)
    capsys.readouterr()

    with pytest.raises(ValueError, match=f"started in {other}.*--precision {other}"):
        train(spec, Options(progress=False, threads=1, precision=here))
    assert train(spec, Options(progress=False, threads=1))["precision"] == other
    assert f"resuming in {other}" in capsys.readouterr().out
    # --force starts again, in what auto means here
    assert train(spec, Options(progress=False, threads=1), force=True)["precision"] == here


def test_runs_started_in_different_precisions_cannot_resume_as_one_cohort(tmp_path, cifar_mini_dir):
    a = _started_in("float32", tmp_path / "a", cifar_mini_dir)
    b = _started_in("bf16", tmp_path / "b", cifar_mini_dir)
    with pytest.raises(ValueError, match="different precisions.*a in float32.*b in bf16"):
        resume.started_precision([resume.Saved.read(RunSpec.resolve(s), force=False) for s in (a, b)])
    # a state saved for another spec is discarded on resume, so it does not bind the precision
    other = resume.Saved.read(RunSpec.resolve({**b, "seed": 1}), force=False)
    assert resume.started_precision([other]) is None
