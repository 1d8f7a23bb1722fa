"""One training run inside a cohort: built from its spec, stepped on shared batches, saved, resumed.

A member owns everything that makes its run its own: the student, the method's objective (and
its F-ActT projections), the optimizer, its own global-RNG state (model init, dropout), its
position (epoch, step), the epoch's running sums, its history and its MLflow run. What members
of a cohort share — the batches and each teacher's forward pass — is computed by the cohort
(at.cohort) and handed in, so a member ends exactly as it would have trained alone.

Files in the run's folder (``spec["out_dir"]``):

- ``last.pt``: the resume state, written atomically after every epoch and, on SIGTERM,
  mid-epoch. After the last epoch it stays as the run's *final state*: if the final outputs are
  deleted (Snakemake and DVC delete a job's outputs before re-running it, e.g. when a run is
  added to its cohort) they are written again from it, without training.
- ``checkpoint.pt``, ``history.csv``, ``metrics.json``: the final outputs.
- ``mlflow_run_id``: the id of the run's MLflow run, so a restart continues the same MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from at import atomic, checkpoint, models
from at.method import Objective, Progress, TeacherOutput
from at.precision import Arithmetic


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


def learning_rate(protocol: dict, epoch: int) -> float:
    """lr of 0-based ``epoch``: multiplied by lr_gamma once every listed drop epoch is reached.

    With drops [60, 120, 160] (the authors' code) epochs 0-59 run at lr, 60-119 at lr*gamma, ...
    """
    drops = sum(1 for d in protocol.get("lr_drops", []) if epoch >= d)
    return protocol["lr"] * protocol.get("lr_gamma", 0.2) ** drops


def make_optimizer(params, protocol: dict, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=protocol.get("momentum", 0.9),
                           nesterov=protocol.get("nesterov", False),
                           weight_decay=protocol.get("weight_decay", 5e-4))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


class Member:
    """A run of a cohort. Build it, then ``load_state`` a saved position if there is one."""

    def __init__(self, spec: dict, data, teacher, arithmetic: Arithmetic, teacher_sha256: str | None):
        self.spec = spec
        self.id = spec["id"]
        self.protocol = spec["protocol"]
        self.out = Path(spec["out_dir"])
        self.resume_path = self.out / "last.pt"
        self.previous_path = self.out / "last.prev.pt"
        self.teacher = teacher
        self.teacher_sha256 = teacher_sha256
        self.arithmetic = arithmetic
        device = arithmetic.device
        # The member's own random state starts from its seed: its initialisation is the one it
        # would have alone, whatever else the cohort builds before or after it.
        torch.manual_seed(spec["seed"])
        self.student = arithmetic.prepare(models.build(
            spec["student"], num_classes=spec.get("num_classes", 10), weights=spec.get("weights"),
            bn_weight_init=self.protocol.get("bn_weight_init", "uniform")))
        self.objective = Objective(spec["method"], self.student, teacher,
                                   input_shape=data.input_shape).to(device)
        self.trainable = list(self.student.parameters()) + list(self.objective.parameters())
        self.optimizer = make_optimizer(self.trainable, self.protocol, learning_rate(self.protocol, 0))
        self.rng = _rng_state(device)
        self.epoch, self.step = 0, 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0
        self.mlflow_run_id: str | None = None
        self.partial: dict | None = None
        self.last_terms: dict = {}   # the last step's weighted terms, for a divergence message
        self.tracker = None

    # -- position and state ---------------------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.step)

    @property
    def done(self) -> bool:
        return self.epoch >= self.protocol["epochs"]

    @property
    def teacher_key(self):
        """Members with equal keys can share one teacher output per batch."""
        key = self.objective.teacher_key
        return None if key is None else (id(self.teacher), key)

    def state(self, stream_state: dict) -> dict:
        """The resume state: everything needed to continue exactly, with the stream's position."""
        partial = None
        if self.partial is not None and self.step > 0:
            partial = {**self.partial, "loss": self.partial["loss"].cpu(),
                       "correct": self.partial["correct"].cpu(),
                       "terms": {k: v.cpu() for k, v in self.partial["terms"].items()}}
        return {
            "spec": self.spec, "teacher_sha256": self.teacher_sha256,
            "epoch": self.epoch, "step": self.step, "partial": partial,
            "model": self.student.state_dict(), "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {**self.rng, "data": stream_state["data"]},
            "perm": stream_state["perm"] if self.step > 0 else None,
            "history": self.history, "elapsed_s": self.elapsed_s, "mlflow_run_id": self.mlflow_run_id,
            # a run resumes in the arithmetic it started in (at.cohort.started_precision)
            "precision": self.arithmetic.precision,
        }

    def load_state(self, saved: dict) -> None:
        device = self.arithmetic.device
        self.student.load_state_dict(saved["model"])
        self.objective.load_state_dict(saved["objective"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.rng = {k: v for k, v in saved["rng"].items() if k in ("torch", "cuda")}
        self.epoch, self.step = saved["epoch"], saved["step"]
        self.history, self.elapsed_s = saved["history"], saved["elapsed_s"]
        self.mlflow_run_id = saved["mlflow_run_id"]
        # where the data stream stood: a cohort restarts its stream from its earliest member's
        self.stream_state = {"data": saved["rng"]["data"], "perm": saved.get("perm")}
        partial = saved.get("partial")
        if partial is not None and self.step > 0:
            self.partial = {**partial, "loss": partial["loss"].to(device),
                            "correct": partial["correct"].to(device),
                            "terms": {k: v.to(device) for k, v in partial["terms"].items()}}
        # the optimizer's lr is set at each epoch start: a state saved mid-epoch has the right one

    def save(self, stream_state: dict) -> None:
        """Write the resume state; the one it replaces stays as ``last.prev.pt``, so a state that
        turns out unreadable (a disk that lied, a copy cut short) costs one epoch, not the run."""
        if self.resume_path.exists():
            self.resume_path.replace(self.previous_path)
        checkpoint.save(self.state(stream_state), self.resume_path)

    # -- training -----------------------------------------------------------------------------

    def lr(self, epoch: int) -> float:
        return learning_rate(self.protocol, epoch)

    def begin_epoch(self) -> None:
        """Step 0 of an epoch: momentum reset at an lr drop (the authors re-create the optimizer
        there), fresh running sums. A member resumed mid-epoch skips this."""
        lr = self.lr(self.epoch)
        if self.epoch in self.protocol.get("lr_drops", []) and self.protocol.get("reset_momentum_at_drops", True):
            self.optimizer = make_optimizer(self.trainable, self.protocol, lr)
        device = self.arithmetic.device
        self.partial = {"loss": torch.zeros((), dtype=torch.float64, device=device),
                        "correct": torch.zeros((), dtype=torch.int64, device=device),
                        "seen": 0, "terms": {}}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, teacher_output: TeacherOutput | None) -> torch.Tensor:
        """One optimisation step on a prepared batch; returns the loss, still on the device.

        Nothing here reads a value back to the host: the running sums stay on the device and are
        read once per epoch (and at the cohort's finiteness checks)."""
        if self.step == 0 or self.partial is None:
            self.begin_epoch()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.epoch)
        progress = Progress(epoch=self.epoch, epochs=self.protocol["epochs"],
                            lr_factor=self.lr(self.epoch) / self.protocol["lr"])
        device = self.arithmetic.device
        _set_rng_state(self.rng, device)   # dropout draws from this run's own stream
        self.student.train()
        with self.arithmetic.autocast():
            result = self.objective(x, y, progress, teacher_output)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        self.rng = _rng_state(device)
        n = len(y)
        loss = result.loss.detach()
        self.partial["loss"] += loss.double() * n
        self.partial["correct"] += (result.logits.detach().argmax(1) == y).sum()
        self.partial["seen"] += n
        for name, value in result.terms.items():
            self.partial["terms"][name] = self.partial["terms"].get(name, 0) + value.double() * n
        self.step += 1
        self.last_terms = result.terms
        return loss

    def check_finite(self, loss: torch.Tensor | None, since_step: int) -> None:
        """Raise TrainingDiverged if the loss of the last step (or the running sum since
        ``since_step``) is not finite. Reads one number from the device."""
        value = loss if loss is not None else self.partial["loss"]
        if bool(torch.isfinite(value)):
            return
        where = (f"step {self.step}" if loss is not None else f"between steps {since_step + 1} and {self.step}")
        terms = {k: float(v) for k, v in self.last_terms.items()}
        raise TrainingDiverged(
            f"run {self.id}: loss became {float(value)} at epoch {self.epoch + 1}, {where} "
            f"(terms {terms}, lr {self.lr(self.epoch)}); stopping instead of training on")

    def end_epoch(self, data, epoch_wall_s: float, eval_batch_size: int) -> dict:
        """Evaluate, append the epoch's row to the history, move to the next epoch."""
        from at.train import evaluate

        test_error, test_error_top5 = evaluate(self.student, data, eval_batch_size, self.arithmetic)
        seen = self.partial["seen"]
        row = {"epoch": self.epoch + 1, "lr": self.lr(self.epoch),
               "train_loss": float(self.partial["loss"]) / seen}
        row.update({f"loss_{k}": float(v) / seen for k, v in sorted(self.partial["terms"].items())})
        row.update({
            "train_error": 100.0 * (1 - int(self.partial["correct"]) / seen),
            "test_error": test_error,
            "test_error_top5": test_error_top5,
            # wall time of the cohort's epoch: what this run cost, shared batches included
            "images_per_s": seen / max(epoch_wall_s, 1e-9),
            "epoch_time_s": epoch_wall_s,
        })
        self.history.append(row)
        self.elapsed_s += epoch_wall_s
        self.epoch, self.step, self.partial = self.epoch + 1, 0, None
        return row

    # -- final outputs --------------------------------------------------------------------------

    def metrics(self, data) -> dict:
        history = self.history
        return {
            "run_id": self.id,
            "final_test_error": history[-1]["test_error"],
            "final_test_error_top5": history[-1]["test_error_top5"],
            "final_epoch": history[-1]["epoch"],
            "epochs": self.protocol["epochs"],
            "best_test_error": min(r["test_error"] for r in history),
            "student_params": models.parameter_count(self.student),
            # the frozen teacher has no trainable parameters: count all of them
            "teacher_params": (sum(p.numel() for p in self.teacher.parameters())
                               if self.objective.needs_teacher else None),
            "wall_time_s": self.elapsed_s,
            "profile": self.spec.get("profile", "custom"),
            "dataset": self.spec["dataset"],
            "data_md5": data.md5,
            "train_size": data.n_train,
            "test_size": data.n_test,
            "precision": self.arithmetic.precision,
        }

    def write_outputs(self, data) -> dict:
        """checkpoint.pt, history.csv, metrics.json (each atomically); returns the metrics."""
        metrics = self.metrics(data)
        checkpoint.save({"spec": self.spec, "teacher_sha256": self.teacher_sha256,
                         "epoch": self.history[-1]["epoch"], "model": self.student.state_dict(),
                         "objective": self.objective.state_dict(), "history": self.history,
                         "mlflow_run_id": self.mlflow_run_id, "precision": self.arithmetic.precision},
                        self.out / "checkpoint.pt")
        atomic.write_text(self.out / "history.csv", history_csv(self.history))
        atomic.write_text(self.out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        return metrics


def final_outputs_exist(out: Path) -> bool:
    return all((Path(out) / name).is_file() for name in ("checkpoint.pt", "history.csv", "metrics.json"))

