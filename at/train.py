"""The training loop, for teachers and students alike, in the order things happen.

A run on several processes (protocol ``processes``, at.distributed) runs this same loop on every
rank: each rank steps on its slice of every batch, with each member under DistributedDataParallel;
rank 0 alone reads and writes the run folders and MLflow, and the ranks agree on when to stop.

:func:`train_cohort` trains runs that share a data stream (the same data set, protocol data
keys and seed: at.data.stream) in one process; a run trained alone (:func:`train`) is a
cohort of one. Reading top to bottom:

1. **start**: resolve the specs, create the run folders, read what each folder holds (at.resume),
   choose the arithmetic, build the cohort (the data, each distinct teacher once, a member per
   run: at.member);
2. **one epoch** (:func:`_train`): each member begins it (lr set once, momentum reset at a drop),
   then for each batch the teachers' outputs, computed once per distinct teacher, and each
   member's step (:func:`train_step`); at its end each member is evaluated (:func:`evaluate`),
   saves its resume state and logs the epoch (history, MLflow, one console line);
3. **finish** (:func:`_finish`): MLflow gets every epoch, then the final outputs are written.

Restarted with the same spec after a kill at any moment, a run resumes from its ``last.pt``; on
the CPU with a fixed seed it ends with bit-identical weights and metrics to an uninterrupted run,
because every source of randomness (model init, data order, augmentation, dropout) comes from
RNG states that the checkpoint saves and restores. Members of a cohort killed while saving at
an epoch's end restart at different positions: the stream is replayed from the earliest one and
members further ahead wait (they skip the batches they already trained on) until it reaches
them; the replayed batches are identical. A run that finished with the same spec (and the same
teacher) is left as it is; ``force`` retrains it.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from at import console, distributed, execution, resume, run_folder, run_lock
from at.choices import Backend, Compile, Layout
from at.data.datasets import training_data
from at.data.download import read_source_record
from at.data.sources import check_batch_size
from at.data.stream import DataStream, check_shared_stream
from at.distributed import SINGLE, Ranks
from at.member import Member, TrainingDiverged, make_optimizer
from at.rng import rng_state, set_rng_state
from at.method import Progress, TeacherOutput
from at.precision import Arithmetic, Precision, resolve as resolve_precision
from at.spec import RunSpec
from at.teachers import Teachers
from at.tracking import RunTracker, check_store, git_commit

# The signals that stop a run the way it can resume: SIGTERM (a SLURM job preempted or at its
# time limit gets it before SIGKILL), SIGINT (Ctrl-C) and SIGHUP (the terminal closed). Each makes
# every member save its position between two steps; the process then exits with 128 + the
# signal's number, as a shell reports it (143, 130, 129), which marks a job failed, so
# Snakemake's retries resubmit it and the new job resumes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_INTERRUPTED = 128 + signal.SIGTERM

# On CUDA the loop never waits for the device inside an epoch except here: every this many steps
# each member's running loss sum is read to stop a diverged run early. On the CPU nothing runs
# ahead of Python, so every step is checked (and the error names the exact step).
CUDA_FINITE_CHECK_EVERY = 50


class Interrupted(Exception):
    """A stop signal arrived (:data:`STOP_SIGNALS`); the members saved their positions and the
    process must exit for a retry, with :attr:`status`."""

    def __init__(self, where: str, signum: int = signal.SIGTERM):
        super().__init__(where)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def status(self) -> int:
        return 128 + self.signum


@dataclass
class Options:
    """How runs execute, as opposed to what they compute (the spec)."""

    device: str = "auto"
    precision: str | None = None   # overrides the protocol's `precision` (auto | float32 | bf16)
    progress: bool = True
    threads: int | None = None
    tracking: bool = True   # an MLflow run per training run (off: the benchmark, some tests)
    backend: str = Backend.AUTO.value   # a run on several processes: auto (nccl on CUDA, gloo on the CPU)
    # how each network executes (at.execution): auto (measured, cached per machine) or as given
    layout: str = Layout.AUTO.value
    compile: str = Compile.AUTO.value

    def decider(self) -> execution.Decider:
        execution.check_request(self.layout, self.compile)
        return execution.Decider(layout=self.layout, compile=self.compile)

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

    def arithmetic(self, specs: list[RunSpec], started: str | None = None) -> Arithmetic:
        """The device and precision of a cohort. A resumed run keeps the precision it started
        in (``started``) where the request is ``auto``; an explicit other precision is refused,
        because one run in two arithmetics would be recorded as neither."""
        device = self.resolve_device()
        wanted = self.precision or specs[0].protocol.precision
        precision = resolve_precision(wanted, device)
        if started is not None and started != precision:
            if wanted != Precision.AUTO:
                raise ValueError(f"run {specs[0].id} was started in {started}: resuming it in {wanted} "
                                 f"would mix two arithmetics in one run; resume with --precision "
                                 f"{started}, or retrain with --force")
            console.say(f"resuming in {started}, the precision these runs started in (auto here would be "
                  f"{precision})")
            precision = started
        return Arithmetic(device, precision)


class _StopFlag:
    """Turns the stop signals (:data:`STOP_SIGNALS`) into a flag that the loop checks between
    steps; ``signum`` is the first that arrived. A signal the process was started with ignored
    stays ignored: ``nohup`` ignores SIGHUP, a shell's background job SIGINT. A second Ctrl-C
    stops at once (KeyboardInterrupt), for a person who will not wait for the current step, the
    evaluation or a store's retries to end: the run resumes from its last saved state."""

    def __init__(self):
        self.raised = False
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.raised and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not self.raised:
                self.signum = signum
            self.raised = True
        for signum in STOP_SIGNALS:
            try:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    continue
                self.previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


# ---------------------------------------------------------------------------------------------
# The cohort and one step


class Cohort:
    """Members on one data stream, with their teachers: what the loop (and the benchmark) steps.

    ``decider`` (Options.decider) resolves each network's layout and compile mode once the data's
    shape is known (at.execution; ``started``: as the runs' resume states say they started);
    without it every network has its precision's usual layout, eager."""

    def __init__(self, specs: list[RunSpec], arithmetic: Arithmetic, data=None, ranks: Ranks = SINGLE,
                 decider: execution.Decider | None = None, started: dict | None = None):
        check_shared_stream(specs)
        self.ranks = ranks
        self.data = data if data is not None else training_data(specs[0], arithmetic.device)
        protocol = specs[0].protocol
        self.epochs = protocol.epochs
        self.eval_batch_size = protocol.eval_batch_size
        self.batch_size = protocol.batch_size
        check_batch_size(specs[0], self.data.n_train)
        distributed.check_layout(specs[0].id, protocol.batch_size, self.data.n_train, ranks.world_size)
        self.stream = DataStream(self.data, specs[0].seed, protocol.batch_size, arithmetic.device,
                                 ranks.rank, ranks.world_size)
        self.choices: dict = {}   # each network's execution.Choice, where a decider resolved them
        if decider is not None:
            arithmetic = execution.resolve(arithmetic, specs, self.data.input_shape,
                                           self.stream.steps_per_epoch * self.epochs, decider, started,
                                           distributed=ranks.enabled, record=self.choices)
        self.arithmetic = arithmetic
        self.teachers = Teachers(specs, arithmetic)
        self.members = []
        for spec in specs:
            teacher, teacher_sha256 = self.teachers.of(spec)
            member = Member(spec, self.data, teacher, arithmetic, teacher_sha256)
            if ranks.enabled:
                member.forward = distributed.wrap(member.student, member.objective, arithmetic.device,
                                                  spec.protocol.sync_bn)
                if ranks.rank > 0:
                    # every rank built the same initialisation from the seed; its dropout must
                    # not draw the same masks as rank 0's for its own images: a stream of its own
                    member.rng = distributed.rank_rng_state(spec.seed, ranks.rank, arithmetic.device)
            self.members.append(member)
        self.teachers.compile(arithmetic)
        self.cuda_graphs = Compile.REDUCE_OVERHEAD in dict(arithmetic.compiles).values()

    def loss_weight(self, step: int) -> float:
        """What this rank's mean loss is multiplied by before backward, so that DDP's average of
        the ranks' gradients is the gradient of the global batch's mean loss: its share of the
        batch times the number of ranks (1, except in an epoch's shorter last batch that does
        not split evenly)."""
        if not self.ranks.enabled:
            return 1.0
        n = min(self.batch_size, self.data.n_train - step * self.batch_size)
        return distributed.loss_weight(n, self.ranks.rank, self.ranks.world_size)

    def step(self, x: torch.Tensor, y: torch.Tensor, members: list[Member], weight: float = 1.0) -> list[torch.Tensor]:
        """One batch for ``members``: each distinct teacher's output once, then each member's step.

        Each network sees the batch in its own layout (converted once per layout). A batch
        shorter than the protocol's (an epoch's last) runs compiled networks eagerly: compiling
        them again for one batch an epoch would cost more than it saves."""
        shaped: dict[str, torch.Tensor] = {}

        def laid_out(layout: str) -> torch.Tensor:
            if layout not in shaped:
                shaped[layout] = x.contiguous(memory_format=execution.memory_format(layout))
            return shaped[layout]

        shared: dict = {}
        losses = []
        full = len(y) == self.stream.batch_size
        if self.cuda_graphs:   # the outputs of the previous step's graphs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with contextlib.nullcontext() if full else execution.eager():
            for member in members:
                key = member.teacher_key
                output = None
                if key is not None:
                    output = shared.get(key)
                    if output is None:
                        output = shared[key] = self._teacher_output(member, laid_out(member.teacher_layout), y)
                losses.append(self._train_step(member, laid_out(member.layout), y, output, weight))
        return losses

    def _teacher_output(self, member: Member, x: torch.Tensor, y: torch.Tensor) -> TeacherOutput:
        while True:
            try:
                with self.arithmetic.autocast():
                    output = member.objective.teacher_output(x, y)
                if self.arithmetic.compile_of(member.teacher_network) == Compile.REDUCE_OVERHEAD:
                    # a CUDA graph's outputs live in its pool until a later graph overwrites them:
                    # the members' graphs run before the last of them reads the teacher's
                    output = TeacherOutput(output.logits.clone(), [t.clone() for t in output.taps],
                                           output.input_gradient)
                return output
            except Exception as e:
                if not execution.fall_back(member.teacher, e, f"teacher {member.spec.teacher}"):
                    raise

    def _train_step(self, member: Member, x: torch.Tensor, y: torch.Tensor, output, weight: float) -> torch.Tensor:
        while True:
            try:
                return train_step(member, x, y, output, weight)
            except Exception as e:
                if not execution.fall_back(member.student, e, f"student {member.spec.student}"):
                    raise
                # the others of its model would fail alike: eager too, without trying
                for other in self.members:
                    if other.network == member.network:
                        execution.uncompile(other.student)


def begin_epoch(member: Member) -> None:
    """Step 0 of an epoch: the epoch's lr (the authors re-create the optimizer at an lr drop,
    which resets the momentum), fresh running sums. A member resumed mid-epoch skips this: its
    optimizer was saved with the epoch's lr."""
    protocol = member.protocol
    lr = protocol.learning_rate(member.epoch)
    if member.epoch in protocol.lr_drops and protocol.reset_momentum_at_drops:
        member.optimizer = make_optimizer(member.trainable, protocol, lr)
    for group in member.optimizer.param_groups:
        group["lr"] = lr
    device = member.arithmetic.device
    member.partial = {"loss": torch.zeros((), dtype=torch.float64, device=device),
                      "correct": torch.zeros((), dtype=torch.int64, device=device),
                      "seen": 0, "terms": {}}


def train_step(member: Member, x: torch.Tensor, y: torch.Tensor,
               teacher_output: TeacherOutput | None, weight: float = 1.0) -> torch.Tensor:
    """One optimisation step of a member on a prepared batch; returns the loss, still on the device.

    Nothing here reads a value back to the host: the running sums stay on the device and are
    read once per epoch (and at the loop's finiteness checks). ``weight`` scales the loss that
    is differentiated (Cohort.loss_weight), not the one recorded."""
    protocol, device = member.protocol, member.arithmetic.device
    progress = Progress(epoch=member.epoch, epochs=protocol.epochs,
                        lr_factor=protocol.learning_rate(member.epoch) / protocol.lr)
    set_rng_state(member.rng, device)   # dropout draws from this run's own stream
    member.student.train()
    with member.arithmetic.autocast():
        result = member.forward(x, y, progress, teacher_output)
    member.optimizer.zero_grad(set_to_none=True)
    (result.loss if weight == 1.0 else result.loss * weight).backward()
    member.optimizer.step()
    member.rng = rng_state(device)
    n = len(y)
    loss = result.loss.detach()
    member.partial["loss"] += loss.double() * n
    member.partial["correct"] += (result.logits.detach().argmax(1) == y).sum()
    member.partial["seen"] += n
    for name, value in result.terms.items():
        member.partial["terms"][name] = member.partial["terms"].get(name, 0) + value.double() * n
    member.step += 1
    member.last_terms = result.terms
    return loss


def check_finite(member: Member, loss: torch.Tensor | None, since_step: int, ranks: Ranks = SINGLE) -> None:
    """Raise TrainingDiverged if the loss of the last step (or the running sum since
    ``since_step``) is not finite, on this rank or any other (all ranks stop together). Reads
    one number from the device."""
    value = loss if loss is not None else member.partial["loss"]
    if not ranks.any(not bool(torch.isfinite(value))):
        return
    where = (f"step {member.step}" if loss is not None else f"between steps {since_step + 1} and {member.step}")
    terms = {k: float(v) for k, v in member.last_terms.items()}
    raise TrainingDiverged(
        f"run {member.id}: loss became {float(value)} at epoch {member.epoch + 1}, {where} "
        f"(terms {terms}, lr {member.protocol.learning_rate(member.epoch)}); stopping instead of training on")


@torch.no_grad()
def evaluate(model, data, batch_size: int, arithmetic: Arithmetic, network: tuple[str, str] | None = None
             ) -> tuple[float, float]:
    """Top-1 and top-5 test error in percent (in the layout of ``network``; a compiled model
    runs eagerly here, at.execution)."""
    model.eval()
    wrong1 = torch.zeros((), dtype=torch.int64, device=arithmetic.device)
    wrong5 = torch.zeros((), dtype=torch.int64, device=arithmetic.device)
    for x, y in data.test_batches(batch_size):
        with arithmetic.autocast(), execution.eager():
            logits, _ = model(arithmetic.layout(x, network))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1 += (top[:, 0] != y).sum()
        wrong5 += (top != y[:, None]).all(dim=1).sum()
    model.train()
    return 100.0 * int(wrong1) / data.n_test, 100.0 * int(wrong5) / data.n_test


def end_epoch(member: Member, data, epoch_wall_s: float, eval_batch_size: int, ranks: Ranks = SINGLE) -> dict:
    """Evaluate, append the epoch's row to the history, move to the next epoch. In a run on
    several processes the running sums are summed over the ranks first (the row is the global
    batch's), and rank 0 alone evaluates (its row is the one recorded)."""
    if ranks.enabled:
        _sum_over_ranks(member.partial, ranks)
    if ranks.is_main:
        test_error, test_error_top5 = evaluate(member.student, data, eval_batch_size, member.arithmetic,
                                               member.network)
    else:
        test_error = test_error_top5 = float("nan")
    partial = member.partial
    seen = partial["seen"]
    row = {"epoch": member.epoch + 1, "lr": member.protocol.learning_rate(member.epoch),
           "train_loss": float(partial["loss"]) / seen}
    row.update({f"loss_{k}": float(v) / seen for k, v in sorted(partial["terms"].items())})
    row.update({
        "train_error": 100.0 * (1 - int(partial["correct"]) / seen),
        "test_error": test_error,
        "test_error_top5": test_error_top5,
        # wall time of the cohort's epoch: what this run cost, shared batches included
        "images_per_s": seen / max(epoch_wall_s, 1e-9),
        "epoch_time_s": epoch_wall_s,
    })
    member.history.append(row)
    member.elapsed_s += epoch_wall_s
    member.epoch, member.step, member.partial = member.epoch + 1, 0, None
    return row


def _sum_over_ranks(partial: dict, ranks: Ranks) -> None:
    """An epoch's running sums (loss, correct, seen, each term), summed over the ranks in place."""
    names = sorted(partial["terms"])
    loss = partial["loss"]
    packed = torch.stack([loss, partial["correct"].to(loss.dtype),
                          torch.tensor(float(partial["seen"]), dtype=loss.dtype, device=loss.device),
                          *(torch.as_tensor(partial["terms"][k], dtype=loss.dtype, device=loss.device) for k in names)])
    ranks.sum_(packed)
    partial["loss"], partial["correct"], partial["seen"] = packed[0], packed[1].round().long(), int(packed[2])
    partial["terms"] = {k: packed[3 + i] for i, k in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# The loop


def train_cohort(specs: list, options: Options | None = None, force: bool = False, stop=None,
                 ranks: Ranks | None = None) -> list[dict]:
    """Train (or resume, or leave alone when finished) runs sharing one data stream; return
    each run's final metrics, in the order of ``specs`` (RunSpecs, or dicts resolved here).

    A member whose loss diverges fails alone: the others train on, and TrainingDiverged is raised
    at the end, naming every diverged run. ``stop`` stands in for the signals' flag (anything with
    a ``raised`` attribute, read once per step and once per epoch end): tests stop a cohort at
    an exact step with it, in-process.

    ``ranks``: this process's place in a run on several processes (default: read from the
    launcher's environment, at.distributed); every rank calls this with the same specs. Rank 0
    holds the run folders and writes everything; the others train their slices."""
    options = options or Options()
    if not specs:
        raise ValueError("a cohort needs at least one run")
    specs = [RunSpec.resolve(spec) for spec in specs]
    check_shared_stream(specs)
    ranks = distributed.from_environment() if ranks is None else ranks
    wanted = specs[0].protocol.processes
    if wanted != ranks.world_size:
        how = (f"start it with `torchrun --nproc-per-node {wanted} -m at train ...` (on SLURM: srun --ntasks "
               f"{wanted}), or let `python -m at train` start them" if ranks.world_size == 1
               else f"this process is rank {ranks.rank} of {ranks.world_size} ({ranks.launcher})")
        raise ValueError(f"run {specs[0].id} asks for {wanted} process(es) (protocol.processes), but it runs on "
                         f"{ranks.world_size}: {how}")
    if ranks.enabled:
        return _train_ranks(specs, options, force, stop, ranks)
    if options.tracking:
        check_store()   # a store that cannot record the runs fails before a file is written
    # a stop signal becomes a flag from here on: the loop saves and exits between two steps, and
    # a run that is writing its outputs finishes them
    with _StopFlag() as flag:
        created = run_folder.prepare(specs)
        try:
            # one writer per run folder, from before its first read to the end (at.run_lock)
            with run_lock.hold({spec.id: Path(spec.out_dir) for spec in specs}):
                return _train_locked(specs, options, force, stop if stop is not None else flag, created)
        except run_lock.LockError:
            run_folder.remove_empty(created)
            raise


class _Handshake:
    """Rank 0's word to the other ranks once it has read the run folders: what they hold, or
    the error that stops the run (raised on every rank, so all exit with the same status)."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.sent = False

    def send(self, payload) -> None:
        self.sent = True
        self.ranks.broadcast(("ok", payload))

    def fail(self, error: BaseException) -> None:
        if self.sent or not self.ranks.enabled:
            return
        self.sent = True
        try:
            self.ranks.broadcast(("error", error))
        except Exception:   # an error that does not pickle: its text
            self.ranks.broadcast(("error", RuntimeError(f"rank 0: {error}")))

    def receive(self):
        kind, payload = self.ranks.broadcast(None)
        if kind == "error":
            raise payload
        return payload


def _train_ranks(specs: list[RunSpec], options: Options, force: bool, stop, ranks: Ranks) -> list[dict]:
    """train_cohort on one rank of a run on several processes."""
    device = ranks.device(options.device)
    if device is not None:
        options = Options(**{**options.__dict__, "device": str(device)})
    ranks.start(options.resolve_device(), options.backend)
    handshake = _Handshake(ranks)
    quiet = contextlib.nullcontext() if ranks.is_main else contextlib.redirect_stdout(io.StringIO())
    try:
        with _StopFlag() as flag, quiet:
            stop = stop if stop is not None else flag
            if not ranks.is_main:
                results = _train_locked(specs, options, force, stop, [], ranks, handshake)
            else:
                try:
                    if options.tracking:
                        check_store()
                    created = run_folder.prepare(specs)
                    try:
                        with run_lock.hold({spec.id: Path(spec.out_dir) for spec in specs}):
                            results = _train_locked(specs, options, force, stop, created, ranks, handshake)
                    except run_lock.LockError:
                        run_folder.remove_empty(created)
                        raise
                except BaseException as e:
                    handshake.fail(e)
                    raise
            # every rank returns rank 0's metrics, and leaves only when rank 0 has written them
            return ranks.broadcast(results)
    except Exception as e:
        if not distributed.lost_contact(e):
            raise
        # the other ranks' gradients or decisions cannot arrive: nothing more can be saved here
        # (a position needs every rank's state); the last saved state is the run's
        raise distributed.RankLost(f"rank {ranks.rank} of {ranks.world_size}: another rank of the run is gone "
                                   f"(killed, crashed or out of memory), so this one stops too, without "
                                   f"saving") from None
    finally:
        ranks.stop()


def _train_locked(specs: list[RunSpec], options: Options, force: bool, stop, created: list[Path],
                  ranks: Ranks = SINGLE, handshake: _Handshake | None = None) -> list[dict]:
    """train_cohort once every run folder is locked (by rank 0): start, train, finish."""
    main = ranks.is_main
    try:
        if main:
            for spec in specs:
                run_folder.remove_temporary(Path(spec.out_dir))   # left by a kill between a write and its rename
            saved = {spec.id: resume.Saved.read(spec, force) for spec in specs}
            started = resume.started_precision(list(saved.values()))
            started_execution = resume.started_execution(list(saved.values()))
            if handshake is not None:
                handshake.send((saved, started, started_execution))
        else:
            saved, started, started_execution = handshake.receive()
        decider = options.decider()
        arithmetic = options.arithmetic(specs, started)
        if options.threads:
            torch.set_num_threads(options.threads)
        if arithmetic.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        cohort = Cohort(specs, arithmetic, ranks=ranks, decider=decider, started=started_execution)
    except BaseException:
        if main:
            run_folder.remove_empty(created)   # nothing trained: no empty run folders left behind
        raise
    tracking = options.tracking and main
    results: dict[str, dict] = {}
    training: list[Member] = []
    for member in cohort.members:
        found = saved[member.id]
        situation = "fresh" if force else found.situation(member.teacher_sha256)
        if situation == "finished":
            if main:
                results[member.id] = _read_metrics(member)
                if tracking and _complete_tracking(member, cohort.data, found):
                    continue
            console.say(f"[{member.id}] already finished with this spec: left as it is "
                        f"(`--force` retrains it)")
            continue
        if situation in ("final", "resume"):
            member.load_state(found.state, ranks.rank)
        elif main:
            # a stale or discarded state must not become the fallback of this run's new states
            member.resume_path.unlink(missing_ok=True)
            member.previous_path.unlink(missing_ok=True)
        if situation == "final":
            if main and member.restore_outputs():
                console.say(f"[{member.id}] finished earlier; its outputs put back as they were written")
                results[member.id] = _finish(member, cohort.data, tracking, force, write=False)
                continue
            console.say(f"[{member.id}] finished earlier; writing its outputs again from {found.state_path}")
            if main:
                results[member.id] = _finish(member, cohort.data, tracking, force)
            continue
        if situation == "resume":
            console.say(f"[{member.id}] resuming from {found.state_path} at epoch {member.epoch + 1}, "
                  f"step {member.step}")
        training.append(member)
    if training:
        diverged = _train(cohort, training, progress=options.progress and main, stop=stop,
                          tracking=tracking, force=force)
        for member in training:
            if member.id not in diverged and main:
                results[member.id] = _finish(member, cohort.data, tracking, force)
        if diverged:
            raise TrainingDiverged("; ".join(str(e) for e in diverged.values()))
    return [results[spec.id] for spec in specs] if main else []


def train(spec, options: Options | None = None, force: bool = False) -> dict:
    """Run (or resume) one training run; return its final metrics."""
    return train_cohort([spec], options, force)[0]


def _label(members: list[Member]) -> str:
    return members[0].id if len(members) == 1 else f"cohort of {len(members)} ({members[0].id}, ...)"


def _train(cohort: Cohort, members: list[Member], *, progress: bool, stop, tracking: bool,
           force: bool) -> dict[str, TrainingDiverged]:
    """The epochs of the members still training; returns the members that diverged."""
    stream, arithmetic, ranks = cohort.stream, cohort.arithmetic, cohort.ranks
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
                # members further ahead (a cohort killed between its members' saves) wait
                active = [m for m in members if m.position == (epoch, step)]
                for member in active:
                    if step == 0:
                        begin_epoch(member)
                losses = cohort.step(x, y, active, cohort.loss_weight(step))
                for member, loss in zip(active, losses):
                    try:
                        if check_every == 1:
                            check_finite(member, loss, step, ranks)
                        elif (step + 1) % check_every == 0 or step + 1 == steps:
                            check_finite(member, None, since[id(member)], ranks)
                            since[id(member)] = member.step
                    except TrainingDiverged as e:
                        console.say(f"error: {e}")
                        diverged[member.id] = e
                        members.remove(member)
                        if member.tracker is not None:
                            member.tracker.failed()
                if not members:
                    break
                bar.update(1)
                # a stop signal on any rank stops every rank after the same step
                if _stopping(stop, ranks) and step + 1 < steps:
                    state = stream.state(mid_epoch=True)
                    for member in members:
                        _save(member, state, ranks)
                    raise Interrupted(f"epoch {epoch + 1}, step {step + 1}", _signum(stop))
            bar.close()
            wall = time.perf_counter() - tick
            state = stream.state(mid_epoch=False)
            for member in members:
                if member.position != (epoch, steps):
                    continue  # ahead of the replayed stream: this epoch is already in its history
                row = end_epoch(member, cohort.data, wall, cohort.eval_batch_size, ranks)
                _save(member, state, ranks)
                if tracking:
                    member.tracker.log_epochs(member.history)
                console.say(f"[{member.id}] epoch {row['epoch']}/{cohort.epochs} lr {row['lr']:.4g} "
                      f"loss {row['train_loss']:.4f} train err {row['train_error']:.2f}% "
                      f"test err {row['test_error']:.2f}% {row['images_per_s']:.0f} img/s")
            if not members:
                break
            if _stopping(stop, ranks) and epoch + 1 < cohort.epochs:
                raise Interrupted(f"end of epoch {epoch + 1}", _signum(stop))
    except Interrupted as e:
        for member in members:
            # MLflow first: after SIGHUP the terminal that the line goes to may be gone
            if member.tracker is not None:
                member.tracker.interrupted()
            console.say(f"[{member.id}] {e.signal_name}: saved {member.resume_path} at {e}; the same "
                        f"command resumes it")
        raise
    except KeyboardInterrupt:   # a second Ctrl-C (_StopFlag): stopped by a person, not failed
        for member in members:
            if member.tracker is not None:
                member.tracker.interrupted()
        raise
    except BaseException:
        for member in members:
            if member.tracker is not None:
                member.tracker.failed()
        raise
    return diverged


def _stopping(stop, ranks: Ranks) -> bool:
    """Whether a stop signal (or a test's stop flag) arrived here or, in a run on several
    processes, on any rank: every rank asks at the same points, so all stop after the same step."""
    raised = stop is not None and stop.raised
    return ranks.any(raised) if ranks.enabled else raised


def _signum(stop) -> int:
    """The signal that stopped this process; SIGTERM, what a launcher or SLURM sends, where this
    process got none (it arrived on another rank, or the stop is a test's flag)."""
    return getattr(stop, "signum", None) or signal.SIGTERM


def _save(member: Member, stream_state: dict, ranks: Ranks) -> None:
    """Write a member's resume state: rank 0 writes it, with every rank's own part in it."""
    if not ranks.enabled:
        member.save(stream_state)
        return
    every = ranks.gather(member.rank_state(stream_state))
    if ranks.is_main:
        member.save(stream_state, every)


# ---------------------------------------------------------------------------------------------
# MLflow and the final outputs


def _read_metrics(member: Member) -> dict:
    return json.loads((member.out / "metrics.json").read_text())


def _start_tracking(member: Member, data, force: bool) -> None:
    spec = member.spec
    member.tracker = RunTracker(spec, member.out / "mlflow_run_id")
    member.tracker.start(None if force else member.mlflow_run_id, tags={
        "student": spec.student, "teacher": spec.teacher or "none",
        "method": spec.method_name, "seed": spec.seed, "data_md5": data.md5,
        # where the data came from (params.yaml's URL or an override's path), as the download recorded it
        "data_source": read_source_record(spec.data_dir).get("url", "a folder of your own") if spec.data_dir else "none",
        "git_commit": git_commit(), "profile": spec.profile,
        "checkpoint_path": str((member.out / "checkpoint.pt").resolve()),
        "device": str(member.arithmetic.device), "precision": member.arithmetic.precision,
        # how its networks executed (at.execution): chosen per machine, so recorded per run
        "layout": member.layout, "compile": member.execution["student"]["compile"],
        "teacher_layout": member.teacher_layout or "none",
    })
    member.mlflow_run_id = member.tracker.run_id
    member.tracker.log_epochs(member.history)


SUMMARY_METRICS = ("final_test_error", "best_test_error", "student_params", "wall_time_s")
OUTPUT_FILES = ("metrics.json", "history.csv", "checkpoint.pt")


def _finish(member: Member, data, tracking: bool, force: bool, write: bool = True) -> dict:
    """The final outputs, with MLflow told first (every epoch) and last (FINISHED); a failure
    here (the store, a full disk) marks the MLflow run FAILED and keeps the final state, so a
    retry writes the outputs again without training. ``write=False``: the outputs are there
    already, only MLflow is finished from them."""
    try:
        if tracking:
            if member.tracker is None:   # outputs written again from the final state
                _start_tracking(member, data, force)
            # MLflow has every epoch before the outputs exist (at.tracking's policy)
            member.tracker.sync(member.history)
        metrics = member.write_outputs(data) if write else _read_metrics(member)
        if tracking:
            member.tracker.finish({k: v for k, v in metrics.items() if k in SUMMARY_METRICS},
                                  [member.out / name for name in OUTPUT_FILES])
    except BaseException:
        if member.tracker is not None:
            member.tracker.failed()
        raise
    console.say(f"[{member.id}] done: final test error {metrics['final_test_error']:.2f}% "
          f"after {metrics['final_epoch']} epochs")
    return metrics


def _complete_tracking(member: Member, data, found: resume.Saved) -> bool:
    """A finished run whose MLflow run did not finish (killed between writing its outputs and
    telling MLflow; a full disk at the artifacts): finish that MLflow run from the files,
    without training. Returns whether it did. A run recorded in another store is left alone."""
    id_file = member.out / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else (found.final or {}).get("mlflow_run_id")
    if not run_id:
        return False
    status = RunTracker(member.spec, id_file).status(run_id)
    if status in (None, "FINISHED"):
        return False
    console.say(f"[{member.id}] outputs complete but its MLflow run {run_id} is {status}: finishing it from "
          f"the files (no training)")
    member.history, member.mlflow_run_id = found.final["history"], run_id
    _finish(member, data, tracking=True, force=False, write=False)
    return True
