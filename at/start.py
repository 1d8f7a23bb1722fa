"""The start of a cohort: one path, in one order, on every rank (one process is rank 0 of 1).

:func:`open_cohort` turns the specs of runs that share a data stream into what the loop
(at.train) steps, in this order:

1. the specs, resolved once and checked to share one stream (at.data.stream) and to ask for the
   processes this one runs among (at.distributed); on several, this rank's device and the
   process group;
2. rank 0: the tracking store checked before a file is written; from here on a stop signal is a
   flag the loop reads between steps (:class:`_StopFlag`);
3. rank 0: the run folders created and locked (at.run_folder, at.run_lock), then what each holds
   read once (at.resume); the other ranks receive what it read, or the error that stops the run;
4. the arithmetic (at.precision: a resumed run keeps the precision it started in);
5. :func:`build_cohort`: the data and this rank's stream, how each network executes
   (at.execution), each distinct teacher once (at.teachers), a member per run (at.member);
6. each member at the position its folder holds (:func:`_place_members`): resumed, or at its
   last epoch with only its outputs to write, or fresh, or finished.

A run on several processes takes the same path: rank 0 alone touches the run folders (and
later MLflow), ``ranks.is_main`` says where, and :class:`_Handshake` carries what it read. The
benchmarks build a cohort with :func:`build_cohort` alone: no folders, nothing saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from at import console, distributed, execution, resume, run_folder, run_lock
from at.data.datasets import training_data
from at.data.sources import check_batch_size
from at.data.stream import DataStream, check_shared_stream
from at.distributed import SINGLE, Ranks
from at.member import Member
from at.choices import Backend, Compile, Layout
from at.precision import Arithmetic, Precision, resolve as resolve_precision
from at.spec import RunSpec
from at.teachers import Teachers
from at.tracking import check_store

# The signals that stop a run the way it can resume: SIGTERM (a SLURM job preempted or at its
# time limit gets it before SIGKILL), SIGINT (Ctrl-C) and SIGHUP (the terminal closed). Each makes
# every member save its position between two steps (at.train.Interrupted says how it exits).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


# ---------------------------------------------------------------------------------------------
# The cohort


@dataclass
class Cohort:
    """Members on one data stream, with their teachers: what the loop (at.train) steps."""

    ranks: Ranks
    arithmetic: Arithmetic   # with each network's layout and compile mode (at.execution)
    data: object             # the data set's tensors (at.data.datasets)
    stream: DataStream       # this rank's slice of every batch, seeded (at.data.stream)
    members: list[Member]
    choices: dict            # each network's execution.Choice, where a decider resolved them

    @property
    def protocol(self):
        return self.members[0].protocol   # the members share it: one stream, one protocol

    @property
    def cuda_graphs(self) -> bool:
        return Compile.REDUCE_OVERHEAD in dict(self.arithmetic.compiles).values()


def build_cohort(specs: list[RunSpec], arithmetic: Arithmetic, data=None, ranks: Ranks = SINGLE,
                 decider: execution.Decider | None = None, started: dict | None = None) -> Cohort:
    """The data and this rank's stream, how each network executes, each distinct teacher once,
    a member per run (on several ranks, each under DistributedDataParallel), in this order.

    ``decider`` (Options.decider) resolves each network's layout and compile mode once the data's
    shape is known (at.execution; ``started``: as the runs' resume states say they started);
    without it every network has its precision's usual layout, eager. The specs must share one
    stream (:func:`open_cohort` checks it); ``data`` stands in for the data set (the benchmarks)."""
    data = data if data is not None else training_data(specs[0], arithmetic.device)
    protocol = specs[0].protocol
    check_batch_size(specs[0], data.n_train)
    distributed.check_layout(specs[0].id, protocol.batch_size, data.n_train, ranks.world_size)
    stream = DataStream(data, specs[0].seed, protocol.batch_size, arithmetic.device, ranks.rank, ranks.world_size)
    choices: dict = {}
    if decider is not None:
        arithmetic = execution.resolve(arithmetic, specs, data.input_shape, stream.steps_per_epoch * protocol.epochs,
                                       decider, started, distributed=ranks.enabled, record=choices)
    teachers = Teachers(specs, arithmetic)
    members = []
    for spec in specs:
        teacher, teacher_sha256 = teachers.of(spec)
        member = Member(spec, data, teacher, arithmetic, teacher_sha256)
        if ranks.enabled:
            member.forward = distributed.wrap(member.student, member.objective, arithmetic.device,
                                              spec.protocol.sync_bn)
            if ranks.rank > 0:
                # every rank built the same initialisation from the seed; its dropout must
                # not draw the same masks as rank 0's for its own images: a stream of its own
                member.rng = distributed.rank_rng_state(spec.seed, ranks.rank, arithmetic.device)
        members.append(member)
    # after the members' objectives have taken their shapes, so that their dry runs do not compile
    teachers.compile(arithmetic)
    return Cohort(ranks, arithmetic, data, stream, members, choices)


# ---------------------------------------------------------------------------------------------
# Opening a cohort for training


@dataclass
class OpenCohort:
    """What :func:`open_cohort` hands the loop."""

    cohort: Cohort
    saved: dict[str, resume.Saved]   # what each run's folder held, by run id (rank 0 read it)
    situations: dict[str, str]       # where each run continues from, by run id (at.resume.Saved.situation)
    stop: object                     # the flag the loop reads between steps (anything with `raised`)


@contextlib.contextmanager
def open_cohort(specs: list, options: Options, force: bool = False, ranks: Ranks | None = None,
                stop=None) -> Iterator[OpenCohort]:
    """The cohort of ``specs`` (RunSpecs, or dicts resolved here), built in the module's order,
    for the ``with`` block that trains it; the run folders stay locked (by rank 0) and the stop
    signals stay a flag until the block ends.

    ``ranks``: this process's place in a run on several processes (default: read from the
    launcher's environment, at.distributed); every rank opens the same specs. ``stop`` stands in
    for the signals' flag (tests stop a cohort at an exact step with it, in-process)."""
    if not specs:
        raise ValueError("a cohort needs at least one run")
    specs = [RunSpec.resolve(spec) for spec in specs]
    check_shared_stream(specs)
    ranks = distributed.from_environment() if ranks is None else ranks
    _check_processes(specs, ranks)
    if ranks.enabled:
        device = ranks.device(options.device)
        if device is not None:
            options = dataclasses.replace(options, device=str(device))
        ranks.start(options.resolve_device(), options.backend)
    handshake = _Handshake(ranks)
    try:
        with handshake.telling_the_ranks():
            if ranks.is_main and options.tracking:
                check_store()   # a store that cannot record the runs fails before a file is written
        # a stop signal becomes a flag from here on: the loop saves and exits between two steps,
        # and a run that is writing its outputs finishes them; the other ranks print nothing
        quiet = contextlib.nullcontext() if ranks.is_main else contextlib.redirect_stdout(io.StringIO())
        with _StopFlag() as flag, quiet, handshake.telling_the_ranks(), \
                _run_folders(specs, ranks.is_main) as created:
            try:
                saved, started_precision, started_execution = _read_folders(specs, force, handshake)
                decider = options.decider()
                arithmetic = options.arithmetic(specs, started_precision)
                if options.threads:
                    torch.set_num_threads(options.threads)
                if arithmetic.device.type == "cuda":
                    torch.backends.cudnn.benchmark = True
                cohort = build_cohort(specs, arithmetic, ranks=ranks, decider=decider, started=started_execution)
                situations = _place_members(cohort, saved, force)
            except BaseException:
                run_folder.remove_empty(created)   # nothing trained: no empty run folders left behind
                raise
            yield OpenCohort(cohort, saved, situations, stop if stop is not None else flag)
    except Exception as e:
        if not (ranks.enabled and distributed.lost_contact(e)):
            raise
        # the other ranks' gradients or decisions cannot arrive: nothing more can be saved here
        # (a position needs every rank's state); the last saved state is the run's
        raise distributed.RankLost(f"rank {ranks.rank} of {ranks.world_size}: another rank of the run is gone "
                                   f"(killed, crashed or out of memory), so this one stops too, without "
                                   f"saving") from None
    finally:
        ranks.stop()


def _check_processes(specs: list[RunSpec], ranks: Ranks) -> None:
    wanted = specs[0].protocol.processes
    if wanted != ranks.world_size:
        how = (f"start it with `torchrun --nproc-per-node {wanted} -m at train ...` (on SLURM: srun --ntasks "
               f"{wanted}), or let `python -m at train` start them" if ranks.world_size == 1
               else f"this process is rank {ranks.rank} of {ranks.world_size} ({ranks.launcher})")
        raise ValueError(f"run {specs[0].id} asks for {wanted} process(es) (protocol.processes), but it runs on "
                         f"{ranks.world_size}: {how}")


@contextlib.contextmanager
def _run_folders(specs: list[RunSpec], main: bool) -> Iterator[list[Path]]:
    """Rank 0: the run folders created (yields those it created), locked for the block (one
    writer per run folder, from before its first read to the end: at.run_lock), then cleared of
    the temporary files a kill between a write and its rename left. A folder it created is
    removed again when the lock is refused. Other ranks: nothing."""
    created = run_folder.prepare(specs) if main else []
    try:
        with run_lock.hold({spec.id: Path(spec.out_dir) for spec in specs} if main else {}):
            for spec in specs if main else []:
                run_folder.remove_temporary(Path(spec.out_dir))
            yield created
    except run_lock.LockError:
        run_folder.remove_empty(created)
        raise


def _read_folders(specs: list[RunSpec], force: bool, handshake: _Handshake):
    """What each run folder holds, read once by rank 0 with the folders locked and sent to the
    other ranks: {run id: resume.Saved}, the precision and the execution the runs started in."""
    if not handshake.ranks.is_main:
        return handshake.receive()
    saved = {spec.id: resume.Saved.read(spec, force) for spec in specs}
    read = (saved, resume.started_precision(list(saved.values())), resume.started_execution(list(saved.values())))
    handshake.send(read)
    return read


def _place_members(cohort: Cohort, saved: dict[str, resume.Saved], force: bool) -> dict[str, str]:
    """Each member where its folder says it continues from (at.resume): its saved state loaded
    where it resumes or has only its final outputs to write; a stale or discarded state removed
    (rank 0), so that it cannot become the fallback of the run's new states. Returns each run's
    situation; a finished run's member is left as built (the loop trains none of them)."""
    ranks = cohort.ranks
    situations = {}
    for member in cohort.members:
        found = saved[member.id]
        situation = "fresh" if force else found.situation(member.teacher_sha256)
        if situation in ("final", "resume"):
            member.load_state(found.state, ranks.rank)
        elif situation == "fresh" and ranks.is_main:
            member.resume_path.unlink(missing_ok=True)
            member.previous_path.unlink(missing_ok=True)
        if situation == "resume":
            console.say(f"[{member.id}] resuming from {found.state_path} at epoch {member.epoch + 1}, "
                        f"step {member.step}")
        situations[member.id] = situation
    return situations


class _Handshake:
    """Rank 0's word to the other ranks once it has read the run folders: what they hold, or
    the error that stops the run (raised on every rank, so all exit with the same status). On
    one process, a no-op."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.sent = False

    def send(self, payload) -> None:
        self.sent = True
        self.ranks.broadcast(("ok", payload))

    def receive(self):
        kind, payload = self.ranks.broadcast(None)
        if kind == "error":
            raise payload
        return payload

    @contextlib.contextmanager
    def telling_the_ranks(self):
        """Rank 0's error in the block, before it sent what it read, reaches the other ranks."""
        try:
            yield
        except BaseException as e:
            self._fail(e)
            raise

    def _fail(self, error: BaseException) -> None:
        if self.sent or not self.ranks.enabled or not self.ranks.is_main:
            return
        self.sent = True
        try:
            self.ranks.broadcast(("error", error))
        except Exception:   # an error that does not pickle: its text
            self.ranks.broadcast(("error", RuntimeError(f"rank 0: {error}")))


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
