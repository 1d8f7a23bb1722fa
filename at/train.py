"""The training loop, for teachers and students alike, in the order things happen.

:func:`train_cohort` trains runs that share a data stream (the same data set, protocol data
keys and seed: at.data.stream) in one process, or as every rank of a run on several processes
(protocol ``processes``, at.distributed); a run trained alone (:func:`train`) is a cohort of
one. Reading top to bottom:

1. **one step** (:func:`cohort_step`): the teachers' outputs, computed once per distinct teacher, then
   each member's step (:func:`train_step`); each epoch begins with :func:`begin_epoch` (lr set
   once, momentum reset at a drop) and the loss is checked finite (:func:`check_finite`);
2. **an epoch's end** (:func:`end_epoch`): each member evaluated (:func:`evaluate`), its row in
   the history;
3. **the loop** (:func:`train_cohort`): the cohort opened by at.start (folders, locks, saved
   states, arithmetic, data, teachers, members at their positions, in one order on every rank);
   runs trained earlier have their outputs put back (:func:`_trained_earlier`); then the epochs
   (:func:`_train`), each its steps (:func:`_epoch_steps`: step, check, a stop signal's save)
   and what follows them (:func:`_after_epoch`: evaluate, save the resume state, MLflow told through
   at.tracking.Recorder); then
4. **the final outputs** (:func:`_finish`): MLflow gets every epoch, then the outputs are written.

On several ranks each steps on its slice of every batch, each member under
DistributedDataParallel; rank 0 alone reads and writes the run folders and MLflow, and the
ranks agree on when to stop.

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
import json
import signal
import time

import torch
from tqdm import tqdm

from at import console, distributed, execution
from at.choices import Compile
from at.distributed import SINGLE, Ranks
from at.member import Member, TrainingDiverged, make_optimizer
from at.method import Progress, TeacherOutput
from at.precision import Arithmetic
from at.rng import rng_state, set_rng_state
from at.start import Cohort, OpenCohort, Options, open_cohort
from at.tracking import Recorder

# A stopped run (at.start.STOP_SIGNALS) exits with 128 + the signal's number, as a shell reports
# it (143, 130, 129), which marks a job failed, so Snakemake's retries resubmit it and the new
# job resumes.
EXIT_INTERRUPTED = 128 + signal.SIGTERM

# On CUDA the loop never waits for the device inside an epoch except here: every this many steps
# each member's running loss sum is read to stop a diverged run early. On the CPU nothing runs
# ahead of Python, so every step is checked (and the error names the exact step).
CUDA_FINITE_CHECK_EVERY = 50


class Interrupted(Exception):
    """A stop signal arrived (at.start.STOP_SIGNALS); the members saved their positions and the
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


# ---------------------------------------------------------------------------------------------
# One step


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


def cohort_step(cohort: Cohort, x: torch.Tensor, y: torch.Tensor, members: list[Member],
                weight: float = 1.0) -> list[torch.Tensor]:
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
    full = len(y) == cohort.stream.batch_size
    if cohort.cuda_graphs:   # the outputs of the previous step's graphs are no longer needed
        torch.compiler.cudagraph_mark_step_begin()
    with contextlib.nullcontext() if full else execution.eager():
        for member in members:
            key = member.teacher_output_key
            output = None
            if key is not None:
                output = shared.get(key)
                if output is None:
                    output = shared[key] = _teacher_output(cohort, member, laid_out(member.teacher_layout), y)
            losses.append(_train_step(cohort, member, laid_out(member.layout), y, output, weight))
    return losses


def _teacher_output(cohort: Cohort, member: Member, x: torch.Tensor, y: torch.Tensor) -> TeacherOutput:
    while True:
        try:
            with cohort.arithmetic.autocast():
                output = member.objective.teacher_output(x, y)
            if cohort.arithmetic.compile_of(member.teacher_network) == Compile.REDUCE_OVERHEAD:
                # a CUDA graph's outputs live in its pool until a later graph overwrites them:
                # the members' graphs run before the last of them reads the teacher's
                output = TeacherOutput(output.logits.clone(), [t.clone() for t in output.taps],
                                       output.input_gradient)
            return output
        except Exception as e:
            if not execution.fall_back(member.teacher, e, f"teacher {member.spec.teacher}"):
                raise


def _train_step(cohort: Cohort, member: Member, x: torch.Tensor, y: torch.Tensor, output,
                weight: float) -> torch.Tensor:
    while True:
        try:
            return train_step(member, x, y, output, weight)
        except Exception as e:
            if not execution.fall_back(member.student, e, f"student {member.spec.student}"):
                raise
            # the others of its model would fail alike: eager too, without trying
            for other in cohort.members:
                if other.network == member.network:
                    execution.uncompile(other.student)


def loss_weight(cohort: Cohort, step: int) -> float:
    """What this rank's mean loss is multiplied by before backward, so that DDP's average of
    the ranks' gradients is the gradient of the global batch's mean loss: its share of the
    batch times the number of ranks (1, except in an epoch's shorter last batch that does
    not split evenly)."""
    ranks = cohort.ranks
    if not ranks.enabled:
        return 1.0
    batch_size = cohort.stream.batch_size
    n = min(batch_size, cohort.data.n_train - step * batch_size)
    return distributed.loss_weight(n, ranks.rank, ranks.world_size)


def train_step(member: Member, x: torch.Tensor, y: torch.Tensor,
               teacher_output: TeacherOutput | None, weight: float = 1.0) -> torch.Tensor:
    """One optimisation step of a member on a prepared batch; returns the loss, still on the device.

    Nothing here reads a value back to the host: the running sums stay on the device and are
    read once per epoch (and at the loop's finiteness checks). ``weight`` scales the loss that
    is differentiated (:func:`loss_weight`), not the one recorded."""
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


# ---------------------------------------------------------------------------------------------
# An epoch's end


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

    The cohort is opened by at.start (one path, one order, on every rank), then trained here.
    A member whose loss diverges fails alone: the others train on, and TrainingDiverged is raised
    at the end, naming every diverged run. ``stop`` stands in for the signals' flag (anything with
    a ``raised`` attribute, read once per step and once per epoch end): tests stop a cohort at
    an exact step with it, in-process.

    ``ranks``: this process's place in a run on several processes (default: read from the
    launcher's environment, at.distributed); every rank calls this with the same specs. Rank 0
    holds the run folders and writes everything; the others train their slices."""
    options = options or Options()
    with open_cohort(specs, options, force, ranks, stop) as opened:
        cohort, main = opened.cohort, opened.cohort.ranks.is_main
        recorder = Recorder(options.tracking and main, force, cohort.data.md5)
        results: dict[str, dict] = {}
        training = []
        for member in cohort.members:
            if opened.situations[member.id] in ("finished", "final"):
                _trained_earlier(member, opened, recorder, results)
            else:
                training.append(member)
        if training:
            diverged = _train(cohort, training, recorder, progress=options.progress and main, stop=opened.stop)
            for member in training:
                if member.id not in diverged and main:
                    results[member.id] = _finish(member, cohort.data, recorder)
            if diverged:
                raise TrainingDiverged("; ".join(str(e) for e in diverged.values()))
        # every rank returns rank 0's metrics, and leaves only when rank 0 has written them
        return cohort.ranks.broadcast([results[member.id] for member in cohort.members] if main else [])


def train(spec, options: Options | None = None, force: bool = False) -> dict:
    """Run (or resume) one training run; return its final metrics."""
    return train_cohort([spec], options, force)[0]


def _train(cohort: Cohort, members: list[Member], recorder: Recorder, *, progress: bool, stop
           ) -> dict[str, TrainingDiverged]:
    """The epochs of the members still training; returns the members that diverged. MLflow hears
    of each member's start, epochs, and its stop or failure here (at.tracking.Recorder)."""
    epochs, ranks = cohort.protocol.epochs, cohort.ranks
    # the stream starts where the member furthest behind stands, from that member's saved state
    first = min(members, key=lambda m: m.position)
    start_epoch, start_step = first.position
    if first.history or first.step:
        cohort.stream.restore(first.stream_state)
    diverged: dict[str, TrainingDiverged] = {}
    members = list(members)   # a diverged member leaves this list, the caller's stays whole
    try:
        for member in members:
            recorder.start(member)
        for epoch in range(start_epoch, epochs):
            wall = _epoch_steps(cohort, members, epoch, start_step if epoch == start_epoch else 0,
                                recorder, diverged, progress=progress, stop=stop)
            if not members:
                break
            _after_epoch(cohort, members, epoch, wall, recorder)
            if _stopping(stop, ranks) and epoch + 1 < epochs:
                raise Interrupted(f"end of epoch {epoch + 1}", _signum(stop))
    except Interrupted as e:
        for member in members:
            # MLflow first: after SIGHUP the terminal that the line goes to may be gone
            recorder.interrupted(member)
            console.say(f"[{member.id}] {e.signal_name}: saved {member.resume_path} at {e}; the same "
                        f"command resumes it")
        raise
    except KeyboardInterrupt:   # a second Ctrl-C (at.start._StopFlag): stopped by a person, not failed
        for member in members:
            recorder.interrupted(member)
        raise
    except BaseException:
        for member in members:
            recorder.failed(member)
        raise
    return diverged


def _epoch_steps(cohort: Cohort, members: list[Member], epoch: int, step0: int, recorder: Recorder,
                 diverged: dict[str, TrainingDiverged], *, progress: bool, stop) -> float:
    """The steps of one epoch from ``step0``: each batch, its step, the finiteness check (a
    diverged member leaves ``members`` for ``diverged``), and a stop signal's save. Returns the
    epoch's wall time in seconds."""
    stream, ranks = cohort.stream, cohort.ranks
    steps = stream.steps_per_epoch
    # on CUDA a finiteness check waits for the device: only every CUDA_FINITE_CHECK_EVERY steps
    check_every = 1 if cohort.arithmetic.device.type != "cuda" else CUDA_FINITE_CHECK_EVERY
    if step0 == 0:
        stream.start_epoch()
    bar = tqdm(total=steps, initial=step0, disable=not progress, unit="batch",
               desc=f"{_label(members)} epoch {epoch + 1}/{cohort.protocol.epochs}",
               dynamic_ncols=True, mininterval=1.0, leave=False)
    tick = time.perf_counter()
    since = {id(m): m.step for m in members}
    for step, (x, y) in enumerate(stream.batches(step0), start=step0):
        # members further ahead (a cohort killed between its members' saves) wait
        active = [m for m in members if m.position == (epoch, step)]
        for member in active:
            if step == 0:
                begin_epoch(member)
        losses = cohort_step(cohort, x, y, active, loss_weight(cohort, step))
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
                recorder.failed(member)
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
    return time.perf_counter() - tick


def _after_epoch(cohort: Cohort, members: list[Member], epoch: int, wall: float, recorder: Recorder) -> None:
    """After the steps of ``epoch``, each member that trained them: :func:`end_epoch` (evaluated,
    its history row), its resume state saved, MLflow told, one console line."""
    state = cohort.stream.state(mid_epoch=False)
    epochs, steps = cohort.protocol.epochs, cohort.stream.steps_per_epoch
    for member in members:
        if member.position != (epoch, steps):
            continue  # ahead of the replayed stream: this epoch is already in its history
        row = end_epoch(member, cohort.data, wall, cohort.protocol.eval_batch_size, cohort.ranks)
        _save(member, state, cohort.ranks)
        recorder.epoch(member)
        console.say(f"[{member.id}] epoch {row['epoch']}/{epochs} lr {row['lr']:.4g} "
                    f"loss {row['train_loss']:.4f} train err {row['train_error']:.2f}% "
                    f"test err {row['test_error']:.2f}% {row['images_per_s']:.0f} img/s")


def _label(members: list[Member]) -> str:
    return members[0].id if len(members) == 1 else f"cohort of {len(members)} ({members[0].id}, ...)"


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
# The final outputs


def _read_metrics(member: Member) -> dict:
    return json.loads((member.out / "metrics.json").read_text())


def _trained_earlier(member: Member, opened: OpenCohort, recorder: Recorder, results: dict[str, dict]) -> None:
    """A member that trained every epoch before this start (at.start put it at its position): a
    run finished with this spec is left as it is (its MLflow run finished from its outputs where
    a kill left it unfinished); one whose outputs are missing has them put back, or written again
    from its final state. Rank 0 writes; its metrics go into ``results``."""
    data, main, found = opened.cohort.data, opened.cohort.ranks.is_main, opened.saved[member.id]
    if opened.situations[member.id] == "finished":
        if main and recorder.unfinished(member, found.final):
            results[member.id] = _finish(member, data, recorder, write=False)
            return
        if main:
            results[member.id] = _read_metrics(member)
        console.say(f"[{member.id}] already finished with this spec: left as it is "
                    f"(`--force` retrains it)")
        return
    if main and member.restore_outputs():
        console.say(f"[{member.id}] finished earlier; its outputs put back as they were written")
        results[member.id] = _finish(member, data, recorder, write=False)
        return
    console.say(f"[{member.id}] finished earlier; writing its outputs again from {found.state_path}")
    if main:
        results[member.id] = _finish(member, data, recorder)


def _finish(member: Member, data, recorder: Recorder, write: bool = True) -> dict:
    """The final outputs, with MLflow told first (every epoch) and last (FINISHED); a failure
    here (the store, a full disk) marks the MLflow run FAILED and keeps the final state, so a
    retry writes the outputs again without training. ``write=False``: the outputs are there
    already, only MLflow is finished from them."""
    try:
        recorder.finishing(member)
        metrics = member.write_outputs(data) if write else _read_metrics(member)
        recorder.finished(member, metrics)
    except BaseException:
        recorder.failed(member)
        raise
    console.say(f"[{member.id}] done: final test error {metrics['final_test_error']:.2f}% "
                f"after {metrics['final_epoch']} epochs")
    return metrics
