"""A cohort: runs that share a data stream, trained together in one process.

Runs with the same data set, protocol data keys and seed see the same batches (the data-stream
contract, at.data.stream). A cohort draws and augments each batch once, runs each distinct
teacher's forward pass once per batch, then gives every member its own objective, backward and
optimizer step. Each member keeps its own folder, resume state, outputs and MLflow run, and
ends bit-identical (CPU, float32, fixed seed) to the same run trained alone — a run trained alone
*is* a cohort of one.

Resume: every member saves its own ``last.pt``. A cohort killed while writing them at an epoch's
end restarts with members at different positions; the stream is replayed from the earliest one
and members further ahead wait (they skip the batches they have already trained on) until it
reaches them — the replayed batches are identical, so nothing changes for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from at import checkpoint, models
from at.data import sources
from at.data.stream import STREAM_KEYS, DataStream, stream_key
from at.member import Member, TrainingDiverged, final_outputs_exist
from at.precision import Arithmetic

# On CUDA the loop never waits for the device inside an epoch except here: every this many steps
# each member's running loss sum is read to stop a diverged run early. On the CPU nothing runs
# ahead of Python, so every step is checked (and the error names the exact step).
CUDA_FINITE_CHECK_EVERY = 50


class Interrupted(Exception):
    """SIGTERM arrived; the members saved their positions and the process must exit for a retry."""


def weights_sha256(state_dict: dict) -> str:
    """A digest of a model's weights (names, dtypes, shapes, values): what a student learns
    from. Not the file's bytes: a checkpoint written again from the same state may pickle
    differently, and must still count as the same teacher."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_shared_stream(specs: list[dict]) -> None:
    """Members must share the stream (and its length): refuse anything else, naming the key."""
    first = specs[0]
    for spec in specs[1:]:
        if stream_key(spec) != stream_key(first):
            keys = ("dataset", "data_dir", "seed", *STREAM_KEYS)
            differs = [k for k, a, b in zip(keys, stream_key(first), stream_key(spec)) if a != b]
            raise ValueError(f"runs {first['id']} and {spec['id']} cannot train as one cohort: their data "
                             f"streams differ in {differs}")
        if spec["protocol"]["epochs"] != first["protocol"]["epochs"]:
            raise ValueError(f"runs {first['id']} and {spec['id']} cannot train as one cohort: "
                             f"epochs {first['protocol']['epochs']} and {spec['protocol']['epochs']}")
        if spec["protocol"].get("precision", "auto") != first["protocol"].get("precision", "auto"):
            raise ValueError(f"runs {first['id']} and {spec['id']} cannot train as one cohort: "
                             f"they ask for different precisions")
    ids = [s["id"] for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a cohort lists a run twice: {sorted(i for i in ids if ids.count(i) > 1)}")
    outs = [str(Path(s["out_dir"]).resolve()) for s in specs]
    if len(set(outs)) != len(outs):
        raise ValueError("two runs of a cohort write to the same folder")


class Teachers:
    """Each distinct teacher of a cohort, loaded once, frozen, with a digest of its weights."""

    def __init__(self, specs: list[dict], arithmetic: Arithmetic):
        self.models: dict[tuple, torch.nn.Module] = {}
        self.hashes: dict[tuple, str | None] = {}
        for spec in specs:
            key = self.key(spec)
            if key is None or key in self.models:
                continue
            # loading builds a model, which draws from the global RNG: keep those draws out of
            # every member's random state
            with torch.random.fork_rng(devices=[]):
                model, digest = self._load(spec)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.models[key] = arithmetic.prepare(model)
            self.hashes[key] = digest

    @staticmethod
    def key(spec: dict):
        if not spec.get("teacher"):
            return None
        if spec.get("teacher_weights"):
            return ("pretrained", spec["teacher"], spec["teacher_weights"], spec.get("num_classes", 10))
        path = spec.get("teacher_checkpoint")
        if not path:
            raise ValueError(f"run {spec['id']}: teacher {spec['teacher']!r} given without teacher_checkpoint")
        return ("checkpoint", str(Path(path).resolve()))

    @staticmethod
    def _load(spec: dict):
        if spec.get("teacher_weights"):
            # a pretrained model used as it is (the ImageNet table's ResNet-34): no teacher run
            model = models.build(spec["teacher"], num_classes=spec.get("num_classes", 10),
                                 weights=spec["teacher_weights"])
            return model, f"pretrained:{spec['teacher_weights']}"
        path = spec["teacher_checkpoint"]
        model, teacher_spec = checkpoint.load_model(path)
        if teacher_spec["student"] != spec["teacher"]:
            raise checkpoint.CheckpointError(
                f"teacher checkpoint {path} holds a {teacher_spec['student']!r}, but run {spec['id']} "
                f"expects teacher {spec['teacher']!r}")
        return model, weights_sha256(model.state_dict())

    def of(self, spec: dict):
        key = self.key(spec)
        return (None, None) if key is None else (self.models[key], self.hashes[key])


def load_resume_state(out: Path, run_id: str) -> dict | None:
    """A run's resume state: ``last.pt``, or where that is missing or unreadable (a kill between
    the rotation and the write, a truncated copy) the one before it, ``last.prev.pt``, with a
    warning. None where there is neither; a clear error where neither can be read."""
    out = Path(out)
    current, previous = out / "last.pt", out / "last.prev.pt"
    problems = []
    for path in (current, previous):
        if not path.exists():
            continue
        try:
            saved = checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"[{run_id}] warning: {problems[0]}; resuming from the state before it, {path} "
                  f"(one epoch is trained again)", flush=True)
        return saved
    if problems:
        raise checkpoint.CheckpointError(
            f"run {run_id}: no readable resume state ({'; '.join(problems)}); delete {current} and "
            f"{previous} to start the run again from epoch 1")
    return None


def started_precision(specs: list[dict]) -> str | None:
    """The precision the runs of ``specs`` were started in, read from their resume states (None
    where none has one). A run must not change arithmetic halfway: ``auto`` resolves by machine,
    and a job requeued on another node, or a pipeline resumed on another laptop, may resolve it
    differently. States saved for another spec do not count (they are discarded anyway); runs
    started in different precisions cannot continue as one cohort."""
    started: dict[str, str] = {}
    for spec in specs:
        out = Path(spec["out_dir"])
        for path in (out / "last.pt", out / "last.prev.pt"):
            try:
                saved = checkpoint.load(path) if path.exists() else None
            except checkpoint.CheckpointError:
                saved = None   # load_resume_state reports it, when the cohort starts
            if saved is not None:
                if saved.get("spec") == spec and saved.get("precision"):
                    started[spec["id"]] = saved["precision"]
                break
    if len(set(started.values())) > 1:
        listed = ", ".join(f"{run} in {p}" for run, p in sorted(started.items()))
        raise ValueError(f"these runs were started in different precisions and cannot resume as one "
                         f"cohort: {listed}; resume them separately, or retrain with --force")
    return next(iter(started.values()), None)


def _saved_state(member_out: Path, spec: dict, teacher_sha256, force: bool) -> tuple[str, dict | None]:
    """What a run's folder holds for this spec: ("finished" | "final" | "resume" | "fresh", state)."""
    out = Path(member_out)
    resume_path = out / "last.pt"
    if force:
        return "fresh", None
    if final_outputs_exist(out):
        try:
            done = checkpoint.load(out / "checkpoint.pt")
        except checkpoint.CheckpointError:
            done = None
        if done is not None and done.get("spec") == spec and done.get("teacher_sha256") == teacher_sha256:
            return "finished", None
    saved = load_resume_state(out, spec["id"])
    if saved is None:
        return "fresh", None
    if saved.get("spec") != spec:
        differing = sorted(k for k in set(saved.get("spec") or {}) | set(spec)
                           if (saved.get("spec") or {}).get(k) != spec.get(k))
        print(f"[{spec['id']}] warning: discarding {resume_path}: it was saved for a different spec "
              f"(differs in {differing}); starting from epoch 1", flush=True)
        return "fresh", None
    if saved.get("teacher_sha256") != teacher_sha256:
        print(f"[{spec['id']}] warning: discarding {resume_path}: its teacher checkpoint has changed "
              f"since it was saved; starting from epoch 1", flush=True)
        return "fresh", None
    return ("final" if saved["epoch"] >= spec["protocol"]["epochs"] else "resume"), saved


class Cohort:
    """Members on one data stream, with their teachers: the pieces the trainer and the benchmark use."""

    def __init__(self, specs: list[dict], arithmetic: Arithmetic, data=None):
        check_shared_stream(specs)
        self.arithmetic = arithmetic
        self.data = data if data is not None else sources.load(specs[0], arithmetic.device)
        protocol = specs[0]["protocol"]
        self.epochs = protocol["epochs"]
        self.eval_batch_size = protocol.get("eval_batch_size", 512)
        self.stream = DataStream(self.data, specs[0]["seed"], protocol["batch_size"], arithmetic.device)
        self.teachers = Teachers(specs, arithmetic)
        self.members = []
        for spec in specs:
            teacher, teacher_sha256 = self.teachers.of(spec)
            self.members.append(Member(spec, self.data, teacher, arithmetic, teacher_sha256))

    def step(self, x: torch.Tensor, y: torch.Tensor, members: list[Member]) -> list[torch.Tensor]:
        """One batch for ``members``: each distinct teacher output once, then each member's step."""
        x = self.arithmetic.layout(x)
        shared: dict = {}
        losses = []
        for member in members:
            key = member.teacher_key
            output = None
            if key is not None:
                output = shared.get(key)
                if output is None:
                    with self.arithmetic.autocast():
                        output = shared[key] = member.objective.teacher_output(x, y)
            losses.append(member.train_step(x, y, output))
        return losses


def _label(members: list[Member]) -> str:
    return members[0].id if len(members) == 1 else f"cohort of {len(members)} ({members[0].id}, ...)"


def _prepare_folders(specs: list[dict]) -> list[Path]:
    """Create each run's folder (checked writable); return those created, for cleaning up."""
    created: list[Path] = []
    try:
        for spec in specs:
            out = Path(spec["out_dir"])
            if out.exists() and not out.is_dir():
                raise ValueError(f"run {spec['id']}: output folder {out} exists and is not a folder")
            missing = [p for p in [out, *out.parents] if not p.exists()]
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"run {spec['id']}: cannot create output folder {out}: {e.strerror}") from e
            created += reversed(missing)
            if not os.access(out, os.W_OK | os.X_OK):
                raise ValueError(f"run {spec['id']}: output folder {out} is not writable")
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process created that are still empty, innermost first."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (the run wrote something worth keeping) or already gone


def run(specs: list[dict], arithmetic: Arithmetic, *, progress: bool = True, force: bool = False,
        sigterm=None, tracking: bool = True) -> list[dict]:
    """Train (or resume, or leave alone) every run of ``specs``; return each run's metrics.

    A member whose loss diverges fails alone: the others train on, and TrainingDiverged is raised
    at the end, naming every diverged run."""
    check_shared_stream(specs)
    created = _prepare_folders(specs)
    try:
        cohort = Cohort(specs, arithmetic)
    except BaseException:
        _remove_empty(created)   # nothing trained: no empty run folders left behind
        raise
    results: dict[str, dict] = {}
    training: list[Member] = []
    for member in cohort.members:
        status, saved = _saved_state(member.out, member.spec, member.teacher_sha256, force)
        if status == "finished":
            print(f"[{member.id}] already finished with this spec: left as it is "
                  f"(`--force` retrains it)", flush=True)
            results[member.id] = _read_metrics(member.out)
            continue
        if saved is not None:
            member.load_state(saved)
        if force or status == "fresh":
            # a stale or discarded state must not become the fallback of this run's new states
            member.resume_path.unlink(missing_ok=True)
            member.previous_path.unlink(missing_ok=True)
        if status == "final":
            print(f"[{member.id}] finished earlier; writing its outputs again from {member.resume_path}",
                  flush=True)
            results[member.id] = _finish(member, cohort.data, tracking, force)
            continue
        if status == "resume":
            print(f"[{member.id}] resuming from {member.resume_path} at epoch {member.epoch + 1}, "
                  f"step {member.step}", flush=True)
        training.append(member)
    if training:
        diverged = _train(cohort, training, progress=progress, sigterm=sigterm, tracking=tracking, force=force)
        for member in training:
            if member.id not in diverged:
                results[member.id] = _finish(member, cohort.data, tracking, force)
        if diverged:
            raise TrainingDiverged("; ".join(str(e) for e in diverged.values()))
    return [results[spec["id"]] for spec in specs]


def _read_metrics(out: Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def _start_tracking(member: Member, data, force: bool) -> None:
    from at.tracking import RunTracker, git_commit

    spec = member.spec
    member.tracker = RunTracker(spec, member.out / "mlflow_run_id")
    member.tracker.start(None if force else member.mlflow_run_id, tags={
        "student": spec["student"], "teacher": spec.get("teacher") or "none",
        "method": spec["method_name"], "seed": spec["seed"], "data_md5": data.md5,
        "git_commit": git_commit(), "profile": spec.get("profile", "custom"),
        "checkpoint_path": str((member.out / "checkpoint.pt").resolve()),
        "device": str(member.arithmetic.device), "precision": member.arithmetic.precision,
    })
    member.mlflow_run_id = member.tracker.run_id
    member.tracker.log_epochs(member.history)


def _finish(member: Member, data, tracking: bool, force: bool) -> dict:
    if tracking:
        if member.tracker is None:   # outputs written again from the final state
            _start_tracking(member, data, force)
        # MLflow has every epoch before the outputs exist (at.tracking's policy)
        member.tracker.sync(member.history)
    metrics = member.write_outputs(data)
    if tracking:
        member.tracker.finish({k: v for k, v in metrics.items()
                               if k in ("final_test_error", "best_test_error", "student_params", "wall_time_s")},
                              [member.out / "metrics.json", member.out / "history.csv", member.out / "checkpoint.pt"])
    print(f"[{member.id}] done: final test error {metrics['final_test_error']:.2f}% "
          f"after {metrics['final_epoch']} epochs", flush=True)
    return metrics


def _train(cohort: Cohort, members: list[Member], *, progress: bool, sigterm, tracking: bool,
           force: bool) -> dict[str, TrainingDiverged]:
    """The epochs of the members still training; returns the members that diverged."""
    stream, arithmetic = cohort.stream, cohort.arithmetic
    steps = stream.steps_per_epoch
    # the stream starts where the member furthest behind stands, from that member's saved state
    first = min(members, key=lambda m: m.position)
    start_epoch, start_step = first.position
    if first.history or first.step:
        stream.restore(first.stream_state)
    check_every = 1 if arithmetic.device.type != "cuda" else CUDA_FINITE_CHECK_EVERY
    diverged: dict[str, TrainingDiverged] = {}
    members = list(members)   # a diverged member leaves this list, the caller's stays whole
    try:
        if tracking:
            for member in members:
                _start_tracking(member, cohort.data, force)
        for epoch in range(start_epoch, cohort.epochs):
            step0 = start_step if epoch == start_epoch else 0
            if step0 == 0:
                stream.start_epoch()
            bar = tqdm(total=steps, initial=step0, disable=not progress, unit="batch",
                       desc=f"{_label(members)} epoch {epoch + 1}/{cohort.epochs}",
                       dynamic_ncols=True, mininterval=1.0, leave=False)
            tick = time.perf_counter()
            since = {id(m): m.step for m in members}
            for step, (x, y) in enumerate(stream.batches(step0), start=step0):
                active = [m for m in members if m.position == (epoch, step)]
                losses = cohort.step(x, y, active)
                for member, loss in zip(active, losses):
                    try:
                        if check_every == 1:
                            member.check_finite(loss, step)
                        elif (step + 1) % check_every == 0 or step + 1 == steps:
                            member.check_finite(None, since[id(member)])
                            since[id(member)] = member.step
                    except TrainingDiverged as e:
                        print(f"error: {e}", flush=True)
                        diverged[member.id] = e
                        members.remove(member)
                        if member.tracker is not None:
                            member.tracker.failed()
                if not members:
                    break
                bar.update(1)
                if sigterm is not None and sigterm.raised and step + 1 < steps:
                    state = stream.state(mid_epoch=True)
                    for member in members:
                        member.save(state)
                    raise Interrupted(f"epoch {epoch + 1}, step {step + 1}")
            bar.close()
            wall = time.perf_counter() - tick
            state = stream.state(mid_epoch=False)
            for member in members:
                if member.position != (epoch, steps):
                    continue  # ahead of the replayed stream: this epoch is already in its history
                row = member.end_epoch(cohort.data, wall, cohort.eval_batch_size)
                member.save(state)
                if tracking:
                    member.tracker.log_epochs(member.history)
                print(f"[{member.id}] epoch {row['epoch']}/{cohort.epochs} lr {row['lr']:.4g} "
                      f"loss {row['train_loss']:.4f} train err {row['train_error']:.2f}% "
                      f"test err {row['test_error']:.2f}% {row['images_per_s']:.0f} img/s", flush=True)
            if not members:
                break
            if sigterm is not None and sigterm.raised and epoch + 1 < cohort.epochs:
                raise Interrupted(f"end of epoch {epoch + 1}")
    except Interrupted as e:
        for member in members:
            print(f"[{member.id}] SIGTERM: saved {member.resume_path} at {e}", flush=True)
            if member.tracker is not None:
                member.tracker.interrupted()
        raise
    except BaseException:
        for member in members:
            if member.tracker is not None:
                member.tracker.failed()
        raise
    return diverged


__all__ = ["Cohort", "Interrupted", "TrainingDiverged", "check_shared_stream", "run"]
