"""The data stream of a run: which batches it sees, in which order, with which crops and flips.

**Contract** (docs/interfaces.md): the stream is a function of the data set, its folder, the
protocol's data keys (``at.spec.Protocol.STREAM_KEYS``) and the seed alone (``RunSpec.stream_key``). Sample order and every
augmentation draw come from one generator seeded with the run's seed and used for nothing else;
model initialisation, dropout and F-ActT projections draw from the global torch RNG instead. So
two runs with the same (data set, data keys, seed) see the same batches whatever their models
and methods: they are paired (the report's per-seed differences rely on it), and they can train
as one cohort that computes each batch once.

A run on N processes (at.distributed) reads the same stream: each rank draws every batch's order
and augmentation as a one-process run does, and keeps its contiguous slice of the batch
(at.distributed.bounds); the ranks' slices, concatenated in rank order, are the one-process
batch, bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

def check_shared_stream(specs: list) -> None:
    """The runs of a cohort (RunSpecs) must share the stream and its length: refuse anything
    else, naming the key that differs."""
    first = specs[0]
    for spec in specs[1:]:
        if spec.stream_key != first.stream_key:
            keys = ("dataset", "data_dir", "seed", *type(first.protocol).STREAM_KEYS)
            differs = [k for k, a, b in zip(keys, first.stream_key, spec.stream_key) if a != b]
            raise ValueError(f"runs {first.id} and {spec.id} cannot train as one cohort: their data "
                             f"streams differ in {differs}")
        if spec.protocol.epochs != first.protocol.epochs:
            raise ValueError(f"runs {first.id} and {spec.id} cannot train as one cohort: "
                             f"epochs {first.protocol.epochs} and {spec.protocol.epochs}")
        if spec.protocol.processes != first.protocol.processes:
            # a cohort is one job: its members train data-parallel on the same processes
            raise ValueError(f"runs {first.id} and {spec.id} cannot train as one cohort: they ask for "
                             f"{first.protocol.processes} and {spec.protocol.processes} processes")
        if spec.protocol.precision != first.protocol.precision:
            raise ValueError(f"runs {first.id} and {spec.id} cannot train as one cohort: "
                             f"they ask for different precisions")
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a cohort lists a run twice: {sorted(i for i in ids if ids.count(i) > 1)}")
    outs = [str(Path(s.out_dir).resolve()) for s in specs]
    if len(set(outs)) != len(outs):
        raise ValueError("two runs of a cohort write to the same folder")


class DataStream:
    """The epochs of a data set as a run (or a cohort of runs) reads them.

    ``state()`` is what a resume checkpoint keeps of it: the generator and, mid-epoch, the
    epoch's sample order.
    """

    def __init__(self, data, seed: int, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1):
        self.data = data
        # a data-parallel run's rank reads its slice of every batch (at.distributed); every rank
        # holds the same generator, so all draw the same order and the same augmentation
        self.part = (rank, world_size) if world_size > 1 else None
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.device = device
        self.perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.n_train / self.batch_size)

    def start_epoch(self) -> None:
        """Draw the next epoch's sample order."""
        self.perm = torch.randperm(self.data.n_train, generator=self.generator, device=self.device)

    def batches(self, start_step: int):
        """The current epoch's batches from ``start_step`` on, augmented as they are drawn (this
        rank's slices of them in a data-parallel run)."""
        if self.part is None:
            return self.data.train_batches(self.perm, start_step, self.batch_size, self.generator)
        return self.data.train_batches(self.perm, start_step, self.batch_size, self.generator, part=self.part)

    def state(self, mid_epoch: bool) -> dict:
        return {"data": self.generator.get_state(),
                "perm": self.perm.cpu() if mid_epoch and self.perm is not None else None}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["data"])
        self.perm = state["perm"].to(self.device) if state.get("perm") is not None else None
