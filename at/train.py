"""The one training loop, for teachers and students alike, with exact resume.

A run is described by its spec (see docs/interfaces.md): models, method, protocol, seed, data
and output folder. :func:`train` trains one run, :func:`train_cohort` several runs that share a
data stream (at.cohort): a run alone is a cohort of one, so both are the same loop, made of the
pieces of at.member (building a run, its state to and from the checkpoint, its epoch) and
at.cohort (the shared stream and teachers, one step for all members).

Restarted with the same spec after a kill at any moment, a run resumes from its ``last.pt``; on
the CPU with a fixed seed it ends with bit-identical weights and metrics to an uninterrupted run,
because every source of randomness (model init, data order, augmentation, dropout) comes from
RNG states that the checkpoint saves and restores. A run that finished with the same spec (and
the same teacher checkpoint) is left as it is; ``force`` retrains it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

from at import cohort as cohort_loop
from at.cohort import Interrupted
from at.member import TrainingDiverged, learning_rate
from at.precision import Arithmetic, resolve as resolve_precision
from at.schema import AUGMENTATIONS, PROTOCOL_KEYS, validate_protocol  # noqa: F401 (the protocol's schema)

# A SLURM job that is preempted or reaches its time limit gets SIGTERM before SIGKILL. The run
# saves its position and exits with this status, which marks the job failed, so Snakemake's
# retries resubmit it and the new job resumes. 128 + SIGTERM, as a shell reports it.
EXIT_INTERRUPTED = 128 + signal.SIGTERM




@dataclass
class Options:
    """How runs execute, as opposed to what they compute (the spec)."""

    device: str = "auto"
    precision: str | None = None   # overrides the protocol's `precision` (auto | float32 | bf16)
    progress: bool = True
    threads: int | None = None

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"--device {self.device} is not a device: use auto, cpu, cuda or cuda:N") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this machine has no CUDA GPU (use --device cpu or auto)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device}: only cpu and cuda are supported")
        return device

    def arithmetic(self, specs: list[dict], force: bool = False) -> Arithmetic:
        """The device and precision of a cohort. A resumed run keeps the precision it started
        in where the request is ``auto``; an explicit other precision is refused, because one
        run in two arithmetics would be recorded as neither."""
        device = self.resolve_device()
        wanted = self.precision or specs[0]["protocol"].get("precision", "auto")
        precision = resolve_precision(wanted, device)
        started = None if force else cohort_loop.started_precision(specs)
        if started is not None and started != precision:
            if wanted != "auto":
                raise ValueError(f"run {specs[0]['id']} was started in {started}: resuming it in {wanted} "
                                 f"would mix two arithmetics in one run; resume with --precision "
                                 f"{started}, or retrain with --force")
            print(f"resuming in {started}, the precision these runs started in (auto here would be "
                  f"{precision})", flush=True)
            precision = started
        return Arithmetic(device, precision)


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


def train_cohort(specs: list[dict], options: Options | None = None, force: bool = False) -> list[dict]:
    """Train (or resume, or leave alone when finished) runs sharing one data stream; return
    each run's final metrics, in the order of ``specs``."""
    options = options or Options()
    if not specs:
        raise ValueError("a cohort needs at least one run")
    for spec in specs:
        validate_protocol(spec["protocol"], f"run {spec['id']}: protocol")
    arithmetic = options.arithmetic(specs, force)
    if options.threads:
        torch.set_num_threads(options.threads)
    if arithmetic.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with _SigtermFlag() as sigterm:
        return cohort_loop.run(specs, arithmetic, progress=options.progress, force=force, sigterm=sigterm)


def train(spec: dict, options: Options | None = None, force: bool = False) -> dict:
    """Run (or resume) the training run ``spec``; return its final metrics."""
    return train_cohort([spec], options, force)[0]


@torch.no_grad()
def evaluate(model, data, batch_size: int, arithmetic: Arithmetic) -> tuple[float, float]:
    """Top-1 and top-5 test error in percent."""
    model.eval()
    wrong1 = torch.zeros((), dtype=torch.int64, device=arithmetic.device)
    wrong5 = torch.zeros((), dtype=torch.int64, device=arithmetic.device)
    for x, y in data.test_batches(batch_size):
        with arithmetic.autocast():
            logits, _ = model(arithmetic.layout(x))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1 += (top[:, 0] != y).sum()
        wrong5 += (top != y[:, None]).all(dim=1).sum()
    model.train()
    return 100.0 * int(wrong1) / data.n_test, 100.0 * int(wrong5) / data.n_test


__all__ = ["EXIT_INTERRUPTED", "Interrupted", "Options", "TrainingDiverged", "evaluate", "learning_rate",
           "train", "train_cohort", "validate_protocol"]
