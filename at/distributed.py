"""One run on several processes: data parallelism with torch.distributed.

A run (or a cohort of runs) whose protocol says ``processes: N`` trains in N processes, one per
GPU (one per CPU core in the tests), each rank on its slice of every global batch, each member's
student wrapped in DistributedDataParallel (gradients averaged across ranks after every
backward). What the ranks agree on, and how (docs/interfaces.md, "Data-parallel runs"):

- **who they are**: :func:`from_environment` reads the launcher's variables: torchrun's
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or, for tasks
  started by ``srun``, SLURM's (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``,
  the first host of ``SLURM_STEP_NODELIST`` as the rendezvous host and a port derived from the
  job id, so that two jobs sharing a node do not collide);
- **the batches**: every rank draws the global batch's order and augmentation from the same
  generator (at.data.stream), and decodes and trains on its own slice only (:func:`bounds`);
- **the record**: rank 0 alone writes the run folder, the checkpoints and MLflow; every rank's
  own random state travels in rank 0's resume state (:meth:`Ranks.gather`), and a resumed run
  hands each rank its own back;
- **when to stop**: SIGTERM on any rank stops all of them at the same step (:meth:`Ranks.any`).

A process that dies without a word (a crash, OOM, SIGKILL) leaves the others waiting in a
collective: the launchers end them (torchrun stops the other workers; ``srun
--kill-on-bad-exit``). A rank whose collective fails because its peer is gone says so in one
line (:class:`RankLost`), and torchrun, started through ``python -m at.launch``, names the rank
that failed first in one line, instead of a traceback each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from at.choices import Backend, names

__all__ = ["RankLost", "Ranks", "SINGLE", "bounds", "check_layout", "first_host", "from_environment",
           "launch_command", "lost_contact", "loss_weight", "rank_rng_state", "slurm_port", "wrap"]

# The rendezvous port of an srun-launched run: a fixed base plus the job id modulo a span, so
# that runs of different jobs on one node get different ports (a collision needs two job ids
# equal modulo the span and on the same node at once). Below the usual ephemeral range
# (32768-60999 on Linux), so no client socket holds it.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000

BACKENDS = names(Backend)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[07-10,12],cpu1`` -> ``gpu07``.

    SLURM names a job's nodes in this compressed form (``SLURM_STEP_NODELIST``); rank 0 runs on
    the first one, which is where the others meet it. Zero padding of a range is kept."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM's node list is empty: cannot tell which host rank 0 runs on")
    match = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist)
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first + _suffix_after_bracket(nodelist, match.end())


def _suffix_after_bracket(nodelist: str, end: int) -> str:
    """Text between a bracket and the next comma (``n[1-2]-ib`` -> ``-ib``)."""
    rest = nodelist[end:]
    return rest.split(",")[0] if rest and not rest.startswith(",") else ""


def slurm_port(job_id: str | int) -> int:
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice ``[lo, hi)`` of a global batch of ``n`` images that ``rank`` trains on:
    contiguous, in rank order, the first ``n % world_size`` ranks one image more. The ranks'
    slices, concatenated in rank order, are the whole batch."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def loss_weight(n: int, rank: int, world_size: int) -> float:
    """What ``rank`` multiplies its mean loss over its slice of a batch of ``n`` by before
    backward: DDP averages the ranks' gradients, so the average of ``weight * mean over the
    slice`` must be the mean over the batch, i.e. weight = slice size x ranks / n. It is 1 where
    the slices are equal (every batch but an epoch's last, shorter one)."""
    lo, hi = bounds(n, rank, world_size)
    return (hi - lo) * world_size / n


def rank_rng_state(seed: int, rank: int, device: torch.device) -> dict:
    """The random state (at.member's form) that a member's training steps start from on ``rank``
    > 0 (dropout): seeded with the run's seed and the rank, so that ranks draw independent
    masks for their different images. Rank 0 keeps the one-process run's state."""
    from at.rng import rng_state

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + rank)
        return rng_state(device)


def check_layout(run_id: str, batch_size: int, n_train: int, world_size: int) -> None:
    """Refuse a batch that does not split into equal slices, and an epoch whose last, shorter
    batch would leave a rank without an image (BatchNorm and a mean loss need one)."""
    if world_size == 1:
        return
    if batch_size % world_size:
        raise ValueError(f"run {run_id}: batch_size {batch_size} does not split over {world_size} processes: "
                         f"choose a batch size that is a multiple of protocol.processes")
    last = n_train % batch_size
    if 0 < last < world_size:
        raise ValueError(f"run {run_id}: the last batch of an epoch has {last} image(s) ({n_train} training "
                         f"images, batch_size {batch_size}), fewer than the {world_size} processes: change "
                         f"train_subset or batch_size")


class RankLost(RuntimeError):
    """This rank's collective failed because another rank of the run is gone."""


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer is gone: torch.distributed's
    own errors (nccl, the rendezvous store), or gloo's, which torch raises as a plain
    RuntimeError whose text begins with the gloo source file that raised it."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among a run's processes, and the collectives the loop needs.

    ``SINGLE`` (one process) makes every collective a no-op, so the one-process loop runs the
    same code as before this module existed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"   # none | torchrun | srun

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up ---------------------------------------------------------------------------------

    def device(self, requested: str) -> torch.device | None:
        """The device of this rank: ``cuda:<local rank>`` where CUDA is asked for (or auto with
        CUDA present); None: let ``Options.resolve_device`` decide (one process, or the CPU)."""
        if not self.enabled:
            return None
        wants_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
        if not wants_cuda:
            return None
        if requested not in ("auto", "cuda"):
            raise ValueError(f"--device {requested}: a run on {self.world_size} processes uses one GPU per "
                             f"process, cuda:<local rank>; ask for --device cuda (or auto)")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: this machine has no CUDA GPU (use --device cpu)")
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {self.rank} has local rank {self.local_rank}, but this node has "
                             f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes "
                             f"per node")
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device, backend: str = Backend.AUTO.value) -> None:
        """Join the process group: nccl on CUDA, gloo on the CPU (``backend`` may insist)."""
        if not self.enabled:
            return
        if backend not in BACKENDS:
            raise ValueError(f"--backend {backend}: allowed: {', '.join(BACKENDS)}")
        if backend == Backend.AUTO:
            backend = (Backend.NCCL if device.type == "cuda" else Backend.GLOO).value
        if backend == Backend.NCCL and device.type != "cuda":
            raise ValueError(f"--backend nccl needs CUDA devices, but this run trains on {device}: use "
                             f"--backend gloo (or auto) on the CPU")
        import torch.distributed as dist

        if dist.is_initialized():
            return
        # torchrun set these already; for srun-launched tasks they come from SLURM's variables
        os.environ.setdefault("MASTER_ADDR", self.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(self.master_port or 29500))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                device_id=device if device.type == "cuda" else None)
        # Python objects (resume states, RNG states, decisions) and the stop flag travel over a
        # gloo group on the CPU: with nccl they would need a copy to the GPU and a device sync
        _GROUPS["cpu"] = dist.new_group(backend=Backend.GLOO.value) if backend != Backend.GLOO else dist.group.WORLD

    def stop(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            _GROUPS.clear()

    # -- collectives ------------------------------------------------------------------------------

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank must call this at the same point)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_GROUPS["cpu"])
        return bool(value.item())

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable: tensors, dicts, exceptions)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=_GROUPS["cpu"])
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=_GROUPS["cpu"])
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place (on its device: nccl or gloo)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor


_GROUPS: dict = {}
SINGLE = Ranks()


def from_environment(env: Mapping[str, str] | None = None) -> Ranks:
    """This process's place, from its launcher's environment: torchrun's variables, else those
    of an ``srun`` step with more than one task, else one process (:data:`SINGLE`)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        ranks = Ranks(rank, world, local, env.get("MASTER_ADDR"), port, "torchrun")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        # a task of an srun step (srun sets SLURM_STEP_NUM_TASKS): the step's own task count.
        # Not SLURM_NTASKS: the batch script of a job of 8 tasks has SLURM_NTASKS=8 and is one
        # process, the one that starts the step.
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        if world == 1:
            return SINGLE
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise ValueError("srun started this task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: "
                             "cannot tell which host rank 0 runs on")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env.get("SLURM_JOB_ID", "0"))
        ranks = Ranks(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                      env.get("MASTER_ADDR") or first_host(nodes), port, "srun")
    else:
        return SINGLE
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"rank {ranks.rank} of {ranks.world_size} processes: the launcher's environment "
                         f"is inconsistent")
    return ranks


class _Trainee(torch.nn.Module):
    """The student and its objective's learned state as one module, so that one
    DistributedDataParallel averages the gradients of everything the optimizer steps. Its
    forward is the objective's (which runs the student, and reads the teacher's output)."""

    def __init__(self, student: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, *args, **kwargs):
        return self.objective(*args, **kwargs)


def wrap(student: torch.nn.Module, objective: torch.nn.Module, device: torch.device, sync_bn: bool):
    """What a member's training step calls in a run on several processes: its objective under
    DistributedDataParallel, the student's BatchNorm layers made global first where ``sync_bn``.

    The student keeps its own module tree and state dict (checkpoints are a one-process
    model's); DDP broadcasts rank 0's parameters and buffers when it is built, and its
    buffers (BatchNorm's running statistics) before every forward, so every rank holds rank
    0's. Teachers are not wrapped: frozen, each rank runs its own on its slice."""
    from torch.nn.parallel import DistributedDataParallel

    from at.sync_batchnorm import convert

    if sync_bn:
        convert(student, device)
    trainee = _Trainee(student, objective)
    return DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)


# The command's own arguments reach each rank through this variable, never on the launcher's
# command line: torchrun's parser reads every `--x` after the module as a possible abbreviation of
# its own options (`--run` of --run-path, `--log` of --log-dir) and refuses or takes them.
RANK_ARGV = "AT_RANK_ARGV"


def launch_command(processes: int, argv: list[str], env: Mapping[str, str] | None = None,
                   python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command that starts ``python -m at ARGV`` as ``processes`` ranks, for a run asked of
    `python -m at train` in one process, and what it adds to the environment: ``srun`` inside a
    SLURM job (its tasks are the ranks; the job asked for them: at.grid.job_resources),
    ``torchrun`` on one machine elsewhere (``--standalone``: a free rendezvous port of its own,
    so runs on one machine do not meet), through ``python -m at.launch`` (torchrun's own entry, a
    failed rank said in one line). Each rank runs ``python -m at.rank``, which reads ARGV from
    :data:`RANK_ARGV`."""
    import json
    import sys

    env = os.environ if env is None else env
    python = python or sys.executable
    passed = {RANK_ARGV: json.dumps(list(argv))}
    if env.get("SLURM_JOB_ID"):
        # --kill-on-bad-exit: a rank that dies ends the others, which would wait for it forever
        return ["srun", f"--ntasks={processes}", "--kill-on-bad-exit=1", python, "-m", "at.rank"], passed
    return [python, "-m", "at.launch", "--standalone", f"--nproc-per-node={processes}",
            "-m", "at.rank"], passed
