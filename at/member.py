"""One run of a cohort: what makes it its own, and its files.

A member holds the student, the method's objective (and its F-ActT projections), the optimizer,
its own global-RNG state (model init, dropout), its position (epoch, step), the epoch's running
sums, its history and its MLflow run. What the members of a cohort share — the batches and each
teacher's forward pass — the loop (at.train) computes once and hands in, so a member ends
exactly as it would have trained alone. How a member trains is in at.train; this module builds
it and moves its state to and from files.

Files in the run's folder (``spec.out_dir``):

- ``last.pt``: the resume state, written atomically after every epoch and, on a stop signal
  (SIGTERM, SIGINT, SIGHUP: at.start, at.train), mid-epoch; the one it replaces stays as
  ``last.prev.pt``. After the last epoch it stays as the run's *final state*: if the final outputs are deleted (Snakemake and DVC delete a job's
  outputs before re-running it, e.g. when a run is added to its cohort) they are written again
  from it, without training.
- ``checkpoint.pt``, ``history.csv``, ``metrics.json``: the final outputs.
- ``mlflow_run_id``: the id of the run's MLflow run, so a restart continues the same MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from at import atomic, checkpoint, execution, models, precision
from at.choices import Compile
from at.objective import Objective
from at.precision import STUDENT, TEACHER, Arithmetic
from at.rng import rng_state
from at.spec import SPEC_FILE, Protocol, RunSpec, spec_text
from at.tracking import git_commit


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


SGD_IMPLEMENTATION = execution.SGD_IMPLEMENTATION   # how SGD steps (at.execution says why)


def make_optimizer(params, protocol: Protocol, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=protocol.momentum, nesterov=protocol.nesterov,
                           weight_decay=protocol.weight_decay, **SGD_IMPLEMENTATION)


def use_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` (which brings the saved groups' settings along, those of an
    older state included): this process's choice of implementation, not the saved one's."""
    for group in optimizer.param_groups:
        group.update(SGD_IMPLEMENTATION)


def history_csv(history: list[dict]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


# A finished run's outputs in its folder (what Snakemake and DVC list as a run's outputs)
FINAL_OUTPUTS = ("metrics.json", "history.csv", "checkpoint.pt")


def final_outputs_exist(out: Path) -> bool:
    return all((Path(out) / name).is_file() for name in FINAL_OUTPUTS)


class Member:
    """A run of a cohort. Build it, then ``load_state`` a saved position if there is one."""

    def __init__(self, spec: RunSpec, data, teacher, arithmetic: Arithmetic, teacher_sha256: str | None):
        self.spec = spec
        self.id = spec.id
        self.protocol = spec.protocol
        self.out = Path(spec.out_dir)
        self.resume_path = self.out / "last.pt"
        self.previous_path = self.out / "last.prev.pt"
        self.teacher = teacher
        self.teacher_sha256 = teacher_sha256
        self.arithmetic = arithmetic
        # the code this process trains with, read when the run starts: an edit to the checkout
        # while it trains does not make its record say `-dirty`
        self.code_version = git_commit()
        device = arithmetic.device
        # The member's own random state starts from its seed: its initialisation is the one it
        # would have alone, whatever else the cohort builds before or after it.
        torch.manual_seed(spec.seed)
        # how its networks execute (at.execution): its student's layout and compile mode, and
        # its teacher's layout, which shapes the batch the teacher sees
        self.network = (STUDENT, spec.student)
        self.teacher_network = (TEACHER, spec.teacher) if spec.teacher else None
        self.layout = arithmetic.layout_of(self.network)
        self.teacher_layout = arithmetic.layout_of(self.teacher_network) if self.teacher_network else None
        self.student = arithmetic.prepare(models.build(
            spec.student, num_classes=spec.num_classes, weights=spec.weights,
            bn_weight_init=self.protocol.bn_weight_init), self.network)
        self.objective = Objective(spec.method, self.student, teacher,
                                   input_shape=data.input_shape).to(device)
        # compiled once its objective has taken its shapes (an eval-mode dry run); never where
        # the objective differentiates input gradients twice (torch.compile has no double backward)
        compile_mode = arithmetic.compile_of(self.network)
        if compile_mode != Compile.OFF and not self.objective.has_gradient_terms:
            execution.compile_model(self.student, compile_mode)
        self.trainable = list(self.student.parameters()) + list(self.objective.parameters())
        self.optimizer = make_optimizer(self.trainable, self.protocol, self.protocol.learning_rate(0))
        self.rng = rng_state(device)
        self.epoch, self.step = 0, 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0
        self.mlflow_run_id: str | None = None
        self.partial: dict | None = None   # the epoch's running sums, on the device
        self.last_terms: dict = {}   # the last step's weighted terms, for a divergence message
        self.stream_state: dict | None = None   # where the data stream stood when this state was saved
        # what a training step calls: the objective, or its DistributedDataParallel wrapper in
        # a run on several processes (at.distributed.wrap)
        self.forward = self.objective

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.step)

    @property
    def execution(self) -> dict:
        """How its networks execute now (a compilation that failed fell back to eager): recorded
        in its resume state, so that it resumes as it started (at.execution)."""
        teacher = None
        if self.teacher_network is not None and self.objective.needs_teacher:
            teacher = {"model": self.spec.teacher, "layout": self.teacher_layout,
                       "compile": self.arithmetic.compile_of(self.teacher_network)
                       if execution.is_compiled(self.teacher) else Compile.OFF.value}
        return {"student": {"model": self.spec.student, "layout": self.layout,
                            "compile": self.arithmetic.compile_of(self.network)
                            if execution.is_compiled(self.student) else Compile.OFF.value},
                "teacher": teacher}

    @property
    def teacher_output_key(self):
        """Members with equal keys can share one teacher output per batch: the same loaded
        teacher (at.teachers), run the same way (Objective.teacher_pass). None: no teacher."""
        teacher_pass = self.objective.teacher_pass
        return None if teacher_pass is None else (id(self.teacher), teacher_pass)

    # -- the resume state -----------------------------------------------------------------------

    def partial_state(self) -> dict | None:
        """The epoch's running sums on the CPU (None at an epoch's start)."""
        if self.partial is None or self.step == 0:
            return None
        return {**self.partial, "loss": self.partial["loss"].cpu(), "correct": self.partial["correct"].cpu(),
                "terms": {k: v.cpu() for k, v in self.partial["terms"].items()}}

    def rank_state(self, stream_state: dict) -> dict:
        """What differs between the ranks of a data-parallel run: each rank's random state,
        stream generator and running sums of its slices (rank 0's resume state holds them all)."""
        return {"rng": self.rng, "data": stream_state["data"], "partial": self.partial_state()}

    def state(self, stream_state: dict, ranks: list[dict] | None = None) -> dict:
        """The resume state: everything needed to continue exactly, with the stream's position;
        in a data-parallel run, ``ranks`` (every rank's :meth:`rank_state`, in rank order)."""
        partial = self.partial_state()
        extra = {} if ranks is None else {"ranks": ranks}
        return {
            **extra,
            "spec": self.spec.to_dict(), "teacher_sha256": self.teacher_sha256,
            "epoch": self.epoch, "step": self.step, "partial": partial,
            "model": self.student.state_dict(), "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {**self.rng, "data": stream_state["data"]},
            "perm": stream_state["perm"] if self.step > 0 else None,
            "history": self.history, "elapsed_s": self.elapsed_s, "mlflow_run_id": self.mlflow_run_id,
            # the code that trained it: outputs written again from a final state keep it
            "code_version": self.code_version,
            # a run resumes in the arithmetic it started in (at.resume.started_precision), and
            # its networks in the layouts and compile modes they started in
            "precision": self.arithmetic.precision,
            "execution": self.execution,
        }

    def load_state(self, saved: dict, rank: int = 0) -> None:
        """Continue from ``saved``; rank ``rank`` of a data-parallel run takes its own random
        state, stream generator and running sums from the state's ``ranks``."""
        device = self.arithmetic.device
        if "ranks" in saved:
            mine = saved["ranks"][rank]
            saved = {**saved, "rng": {**mine["rng"], "data": mine["data"]}, "partial": mine["partial"]}
        self.student.load_state_dict(saved["model"])
        self.objective.load_state_dict(saved["objective"])
        # a state saved mid-epoch holds that epoch's lr in the optimizer; at an epoch's start the
        # loop sets the lr of the new epoch
        self.optimizer.load_state_dict(saved["optimizer"])
        use_implementation(self.optimizer)
        self.rng = {k: v for k, v in saved["rng"].items() if k in ("torch", "cuda")}
        self.epoch, self.step = saved["epoch"], saved["step"]
        self.history, self.elapsed_s = saved["history"], saved["elapsed_s"]
        self.mlflow_run_id = saved["mlflow_run_id"]
        if self.epoch >= self.protocol.epochs:
            # nothing left to train: the outputs written from this state are the ones it trained
            # to, with the commit that trained it (not a checkout edited since, `-dirty`)
            # (a state saved before states recorded their commit has none: this checkout's)
            self.code_version = saved.get("code_version", self.code_version)
        self.stream_state = {"data": saved["rng"]["data"], "perm": saved.get("perm")}
        partial = saved.get("partial")
        if partial is not None and self.step > 0:
            self.partial = {**partial, "loss": partial["loss"].to(device),
                            "correct": partial["correct"].to(device),
                            "terms": {k: v.to(device) for k, v in partial["terms"].items()}}

    def save(self, stream_state: dict, ranks: list[dict] | None = None) -> None:
        """Write the resume state; the one it replaces stays as ``last.prev.pt``, so a state that
        turns out unreadable (a disk that lied, a copy cut short) costs one epoch, not the run."""
        if self.resume_path.exists():
            self.resume_path.replace(self.previous_path)
        checkpoint.save(self.state(stream_state, ranks), self.resume_path)

    # -- the final outputs ----------------------------------------------------------------------

    def metrics(self, data) -> dict:
        history = self.history
        return {
            "run_id": self.id,
            "final_test_error": history[-1]["test_error"],
            "final_test_error_top5": history[-1]["test_error_top5"],
            "final_epoch": history[-1]["epoch"],
            "epochs": self.protocol.epochs,
            "best_test_error": min(r["test_error"] for r in history),
            "student_params": models.parameter_count(self.student),
            # the frozen teacher has no trainable parameters: count all of them
            "teacher_params": (sum(p.numel() for p in self.teacher.parameters())
                               if self.objective.needs_teacher else None),
            "wall_time_s": self.elapsed_s,
            "profile": self.spec.profile,
            "dataset": self.spec.dataset,
            "data_md5": data.md5,
            "train_size": data.n_train,
            "test_size": data.n_test,
            "precision": self.arithmetic.precision,
            # the run's provenance in its own record (results/runs/, at.records): the code that
            # wrote these numbers and what computed them
            "git_commit": self.code_version,
            "machine": precision.machine(self.arithmetic.device),
        }

    def write_outputs(self, data) -> dict:
        """checkpoint.pt, history.csv, metrics.json (each atomically); returns the metrics."""
        metrics = self.metrics(data)
        texts = {"history.csv": history_csv(self.history).encode(),
                 "metrics.json": (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode()}
        checkpoint.save({"spec": self.spec.to_dict(), "teacher_sha256": self.teacher_sha256,
                         "epoch": self.history[-1]["epoch"], "model": self.student.state_dict(),
                         "objective": self.objective.state_dict(), "history": self.history,
                         "mlflow_run_id": self.mlflow_run_id, "precision": self.arithmetic.precision,
                         "execution": self.execution,
                         checkpoint.OUTPUT_DIGESTS: {name: checkpoint.digest(b) for name, b in texts.items()}},
                        self.out / "checkpoint.pt")
        for name, data_bytes in texts.items():
            atomic.write_bytes(self.out / name, data_bytes)
        # what the outputs are for, readable without torch (at.outdated: the run folder is the truth)
        atomic.write_text(self.out / SPEC_FILE, spec_text(self.spec))
        self._keep_outputs()
        return metrics

    # Snakemake and DVC delete a job's outputs before it runs, so the members of a cohort that had
    # finished write theirs again. A second torch.save of the same state is not the same bytes
    # (torch writes a new serialization id each time), and `dvc status` would call the run
    # modified: a copy of each output is kept, and put back (as a new file: a new mtime, which
    # Snakemake compares with the job's inputs).
    KEPT = ".outputs"
    OUTPUTS = FINAL_OUTPUTS

    def _keep_outputs(self) -> None:
        kept = self.out / self.KEPT
        kept.mkdir(exist_ok=True)
        for name in self.OUTPUTS:
            atomic.copy_file(self.out / name, kept / name)

    def restore_outputs(self) -> bool:
        """Put back the outputs this run wrote when it finished, byte for byte, if they are kept
        and are this spec's (its checkpoint's spec and teacher, its digests of the texts);
        returns whether it did (False: write them again from the final state)."""
        kept = self.out / self.KEPT
        if not all((kept / name).is_file() for name in self.OUTPUTS):
            return False
        try:
            final = checkpoint.load(kept / "checkpoint.pt")
        except checkpoint.CheckpointError:
            return False
        digests = final.get(checkpoint.OUTPUT_DIGESTS) or {}
        if not (self.spec.same_as(final.get("spec")) and final.get("teacher_sha256") == self.teacher_sha256
                and all(digests.get(n) == checkpoint.digest((kept / n).read_bytes())
                        for n in ("history.csv", "metrics.json"))):
            return False
        for name in self.OUTPUTS:
            atomic.copy_file(kept / name, self.out / name)
        return True
