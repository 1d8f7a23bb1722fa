"""The one training loop, for teachers and students alike, with exact resume.

A run is described by its spec (see docs/interfaces.md): models, method, protocol, seed, data
and output folder. Everything the run writes goes into ``spec["out_dir"]``:

- ``last.pt``: the resume checkpoint, written atomically after every epoch (and on SIGTERM,
  mid-epoch). It is not a declared output of the pipeline, because Snakemake and DVC delete a
  job's declared outputs before they re-run it, and a retried job must find its checkpoint.
- ``checkpoint.pt``, ``history.csv``, ``metrics.json``: the final outputs, written at the end.
- ``mlflow_run_id``: the id of the run's MLflow run, so a restart continues the same MLflow run.

Restarted with the same spec after a kill at any moment, a run resumes from ``last.pt``; on the
CPU with a fixed seed it ends with bit-identical weights and metrics to an uninterrupted run,
because every source of randomness (model init, data order, augmentation, dropout) comes from
RNG states that the checkpoint saves and restores.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from at import atomic, checkpoint, models
from at.data import sources
from at.method import Objective, Progress
from at.schema import AUGMENTATIONS, PROTOCOL_KEYS, validate_protocol  # noqa: F401 (the protocol's schema)

# A SLURM job that is preempted or reaches its time limit gets SIGTERM before SIGKILL. The run
# saves its position and exits with this status, which marks the job failed, so Snakemake's
# retries resubmit it and the new job resumes. 128 + SIGTERM, as a shell reports it.
EXIT_INTERRUPTED = 128 + signal.SIGTERM


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


class Interrupted(Exception):
    """SIGTERM arrived; the run saved its position and must exit for a retry to resume it."""


def learning_rate(protocol: dict, epoch: int) -> float:
    """lr of 0-based ``epoch``: multiplied by lr_gamma once every listed drop epoch is reached.

    With drops [60, 120, 160] (the authors' code) epochs 0-59 run at lr, 60-119 at lr*gamma, ...
    """
    drops = sum(1 for d in protocol.get("lr_drops", []) if epoch >= d)
    return protocol["lr"] * protocol.get("lr_gamma", 0.2) ** drops


@dataclass
class Options:
    """How a run executes, as opposed to what it computes (the spec)."""

    device: str = "auto"
    bf16: str = "auto"            # auto: on for CUDA, off (float32) on the CPU
    channels_last: str = "auto"   # auto: on for CUDA
    progress: bool = True
    threads: int | None = None

    def resolve(self) -> tuple[torch.device, bool, bool]:
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if self.device == "auto" else self.device))
        on_gpu = device.type == "cuda"
        pick = {"auto": on_gpu, "on": True, "off": False}
        for name in ("bf16", "channels_last"):
            if getattr(self, name) not in pick:
                raise ValueError(f"--{name.replace('_', '-')} must be auto, on or off, got {getattr(self, name)!r}")
        return device, pick[self.bf16], pick[self.channels_last]


def _load_teacher(spec: dict, device: torch.device):
    if not spec.get("teacher"):
        return None
    if spec.get("teacher_weights"):
        # a pretrained model used as it is (the ImageNet table's ResNet-34): no teacher run
        teacher = models.build(spec["teacher"], num_classes=spec.get("num_classes", 10), weights=spec["teacher_weights"])
    else:
        path = spec.get("teacher_checkpoint")
        if not path:
            raise ValueError(f"run {spec['id']}: teacher {spec['teacher']!r} given without teacher_checkpoint")
        teacher, teacher_spec = checkpoint.load_model(path)
        if teacher_spec["student"] != spec["teacher"]:
            raise checkpoint.CheckpointError(
                f"teacher checkpoint {path} holds a {teacher_spec['student']!r}, but run {spec['id']} "
                f"expects teacher {spec['teacher']!r}")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _history_csv(history: list[dict]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


class _SigtermFlag:
    """Turns SIGTERM into a flag that the loop checks between steps."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.raised = True
        try:
            self.previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _optimizer(params, protocol: dict, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=protocol.get("momentum", 0.9),
                           nesterov=protocol.get("nesterov", False),
                           weight_decay=protocol.get("weight_decay", 5e-4))


def train(spec: dict, options: Options | None = None) -> dict:
    """Run (or resume) the training run ``spec``; return its final metrics."""
    options = options or Options()
    validate_protocol(spec["protocol"], f"run {spec['id']}: protocol")
    device, use_bf16, use_channels_last = options.resolve()
    if options.threads:
        torch.set_num_threads(options.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    protocol = spec["protocol"]
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    resume_path = out / "last.pt"

    torch.manual_seed(spec["seed"])
    data = sources.load(spec, device)
    student = models.build(spec["student"], num_classes=spec.get("num_classes", 10), weights=spec.get("weights"),
                           bn_weight_init=protocol.get("bn_weight_init", "uniform")).to(device)
    teacher = _load_teacher(spec, device)
    objective = Objective(spec["method"], student, teacher, input_shape=data.input_shape).to(device)
    if use_channels_last:
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    trainable = list(student.parameters()) + list(objective.parameters())
    generator = torch.Generator(device=device)
    generator.manual_seed(spec["seed"])

    state = {"epoch": 0, "step": 0, "history": [], "elapsed_s": 0.0, "mlflow_run_id": None,
             "partial": None, "perm": None}
    optimizer = _optimizer(trainable, protocol, learning_rate(protocol, 0))
    saved = checkpoint.load(resume_path) if resume_path.exists() else None
    if saved is not None and saved["spec"] != spec:
        # params.yaml changed since this state was saved: it computes another run, so resuming
        # from it would mix two experiments. Start afresh (the pipeline re-runs changed specs).
        differing = sorted(k for k in set(saved["spec"]) | set(spec) if saved["spec"].get(k) != spec.get(k))
        print(f"[{spec['id']}] warning: discarding {resume_path}: it was saved for a different spec "
              f"(differs in {differing}); starting from epoch 1", flush=True)
        resume_path.unlink()
        saved = None
    if saved is not None:
        student.load_state_dict(saved["model"])
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["rng"]["data"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        state.update({k: saved[k] for k in ("epoch", "step", "history", "elapsed_s", "mlflow_run_id", "partial", "perm")})
        print(f"[{spec['id']}] resuming from {resume_path} at epoch {state['epoch'] + 1}, step {state['step']}")

    from at.tracking import RunTracker, git_commit
    tracker = RunTracker(spec, out / "mlflow_run_id")
    tracker.start(state["mlflow_run_id"], tags={
        "student": spec["student"], "teacher": spec.get("teacher") or "none",
        "method": spec["method_name"], "seed": spec["seed"], "data_md5": data.md5,
        "git_commit": git_commit(), "profile": spec.get("profile", "custom"),
        "checkpoint_path": str((out / "checkpoint.pt").resolve()), "device": str(device),
        "bf16": use_bf16, "channels_last": use_channels_last,
    })
    state["mlflow_run_id"] = tracker.run_id
    tracker.log_epochs(state["history"])

    def save_position(epoch: int, step: int, perm, partial) -> None:
        rng = {"data": generator.get_state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        checkpoint.save({
            "spec": spec, "epoch": epoch, "step": step, "perm": perm, "partial": partial,
            "model": student.state_dict(), "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng, "history": state["history"],
            "elapsed_s": state["elapsed_s"], "mlflow_run_id": tracker.run_id,
        }, resume_path)

    epochs, batch_size = protocol["epochs"], protocol["batch_size"]
    n_train = data.n_train
    steps_per_epoch = math.ceil(n_train / batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    try:
        with _SigtermFlag() as sigterm:
            for epoch in range(state["epoch"], epochs):
                lr = learning_rate(protocol, epoch)
                start_step = state["step"] if epoch == state["epoch"] else 0
                if start_step == 0:
                    if epoch in protocol.get("lr_drops", []) and protocol.get("reset_momentum_at_drops", True):
                        # the authors' code builds a new optimizer at each drop: momentum restarts
                        optimizer = _optimizer(trainable, protocol, lr)
                    perm = torch.randperm(n_train, generator=generator, device=device)
                    partial = {"loss": 0.0, "correct": 0, "seen": 0, "train_s": 0.0, "terms": {}}
                else:
                    perm, partial = state["perm"].to(device), state["partial"]
                for group in optimizer.param_groups:
                    group["lr"] = lr
                progress = Progress(epoch=epoch, epochs=epochs, lr_factor=lr / protocol["lr"])
                student.train()
                bar = tqdm(total=steps_per_epoch, initial=start_step, disable=not options.progress,
                           desc=f"{spec['id']} epoch {epoch + 1}/{epochs}", unit="batch",
                           dynamic_ncols=True, mininterval=1.0, leave=False)
                batches = data.train_batches(perm, start_step, batch_size, generator)
                tick = time.perf_counter()
                for step, (x, y) in enumerate(batches, start=start_step):
                    loss, correct, terms = training_step(objective, optimizer, x, y, progress,
                                                         autocast, use_channels_last)
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            f"run {spec['id']}: loss became {loss} at epoch {epoch + 1}, step {step + 1} "
                            f"(terms {terms}, lr {lr}); stopping instead of training on")
                    n = len(y)
                    partial["loss"] += loss * n
                    partial["correct"] += correct
                    partial["seen"] += n
                    for k, v in terms.items():
                        partial["terms"][k] = partial["terms"].get(k, 0.0) + v * n
                    now = time.perf_counter()
                    partial["train_s"] += now - tick   # batch preparation included
                    tick = now
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                    if sigterm.raised and step + 1 < steps_per_epoch:
                        save_position(epoch, step + 1, perm.cpu(), partial)
                        raise Interrupted(f"epoch {epoch + 1}, step {step + 1}")
                bar.close()

                eval_tick = time.perf_counter()
                test_error, test_error_top5 = evaluate(student, data, protocol.get("eval_batch_size", 512),
                                                       autocast, use_channels_last)
                row = {"epoch": epoch + 1, "lr": lr, "train_loss": partial["loss"] / partial["seen"]}
                row.update({f"loss_{k}": v / partial["seen"] for k, v in sorted(partial["terms"].items())})
                row.update({
                    "train_error": 100.0 * (1 - partial["correct"] / partial["seen"]),
                    "test_error": test_error,
                    "test_error_top5": test_error_top5,
                    "images_per_s": partial["seen"] / max(partial["train_s"], 1e-9),
                    "epoch_time_s": partial["train_s"] + time.perf_counter() - eval_tick,
                })
                state["history"].append(row)
                state["elapsed_s"] += row["epoch_time_s"]
                save_position(epoch + 1, 0, None, None)
                tracker.log_epochs(state["history"])
                print(f"[{spec['id']}] epoch {epoch + 1}/{epochs} lr {lr:.4g} loss {row['train_loss']:.4f} "
                      f"train err {row['train_error']:.2f}% test err {test_error:.2f}% "
                      f"{row['images_per_s']:.0f} img/s", flush=True)
                if sigterm.raised and epoch + 1 < epochs:
                    raise Interrupted(f"end of epoch {epoch + 1}")
    except Interrupted as e:
        print(f"[{spec['id']}] SIGTERM: saved {resume_path} at {e}; exiting with status "
              f"{EXIT_INTERRUPTED} so that a retry resumes", flush=True)
        tracker.interrupted()
        raise
    except BaseException:
        tracker.failed()
        raise

    metrics = _finish(spec, state, student, objective, teacher, data, tracker)
    resume_path.unlink(missing_ok=True)
    return metrics


def training_step(objective, optimizer, x: torch.Tensor, y: torch.Tensor, progress: Progress, autocast,
                  channels_last: bool) -> tuple[float, int, dict[str, float]]:
    """One optimisation step on a prepared batch: forward of the student (and the frozen
    teacher), backward, SGD. Returns the loss, the count of correct predictions and each
    weighted loss term. Reading the loss syncs the device: the caller checks it is finite."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast:
        result = objective(x, y, progress)
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    optimizer.step()
    correct = int((result.logits.argmax(1) == y).sum())
    return result.loss.item(), correct, {k: float(v) for k, v in result.terms.items()}


@torch.no_grad()
def evaluate(model, data, batch_size: int, autocast, channels_last: bool) -> tuple[float, float]:
    """Top-1 and top-5 test error in percent."""
    model.eval()
    wrong1 = wrong5 = 0
    for x, y in data.test_batches(batch_size):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits, _ = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1 += int((top[:, 0] != y).sum())
        wrong5 += int((top != y[:, None]).all(dim=1).sum())
    model.train()
    return 100.0 * wrong1 / data.n_test, 100.0 * wrong5 / data.n_test


def _finish(spec, state, student, objective, teacher, data, tracker) -> dict:
    out = Path(spec["out_dir"])
    history = state["history"]
    metrics = {
        "run_id": spec["id"],
        "final_test_error": history[-1]["test_error"],
        "final_test_error_top5": history[-1]["test_error_top5"],
        "final_epoch": history[-1]["epoch"],
        "epochs": spec["protocol"]["epochs"],
        "best_test_error": min(r["test_error"] for r in history),
        "student_params": models.parameter_count(student),
        # the frozen teacher has no trainable parameters: count all of them
        "teacher_params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else None,
        "wall_time_s": state["elapsed_s"],
        "profile": spec.get("profile", "custom"),
        "dataset": spec["dataset"],
        "data_md5": data.md5,
        "train_size": data.n_train,
        "test_size": data.n_test,
    }
    tracker.sync(history)  # MLflow has every epoch before the outputs exist (at.tracking's policy)
    checkpoint.save({"spec": spec, "epoch": history[-1]["epoch"], "model": student.state_dict(),
                     "objective": objective.state_dict(), "history": history,
                     "mlflow_run_id": tracker.run_id}, out / "checkpoint.pt")
    atomic.write_text(out / "history.csv", _history_csv(history))
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tracker.finish({k: v for k, v in metrics.items() if k in ("final_test_error", "best_test_error",
                                                               "student_params", "wall_time_s")},
                   [out / "metrics.json", out / "history.csv", out / "checkpoint.pt"])
    print(f"[{spec['id']}] done: final test error {metrics['final_test_error']:.2f}% "
          f"after {metrics['final_epoch']} epochs", flush=True)
    return metrics
