"""The data stream of a run: which batches it sees, in which order, with which crops and flips.

**Contract** (docs/interfaces.md, DESIGN contract 6): the stream is a function of the data set,
the protocol's data keys (:data:`STREAM_KEYS`) and the seed alone. Sample order and every
augmentation draw come from one generator seeded with the run's seed and used for nothing else;
model initialisation, dropout and F-ActT projections draw from the global torch RNG instead. So
two runs with the same (data set, data keys, seed) see the same batches whatever their models
and methods: they are paired (the report's per-seed differences rely on it), and they can train
as one cohort that computes each batch once.
"""

from __future__ import annotations

import math

import torch

# The protocol keys that decide the stream (with the data set and the seed). `epochs` is not
# among them: it decides how long a stream is read, not what it holds.
STREAM_KEYS = ("batch_size", "train_subset", "test_subset", "augment")


def stream_key(spec: dict) -> tuple:
    """What a run's stream is a function of: runs with equal keys see identical batches."""
    protocol = spec["protocol"]
    return (spec["dataset"], str(spec["data_dir"]), spec["seed"],
            *(protocol.get(k) for k in STREAM_KEYS))


class DataStream:
    """The epochs of a data set as a run (or a cohort of runs) reads them.

    ``state()`` is what a resume checkpoint keeps of it: the generator and, mid-epoch, the
    epoch's sample order.
    """

    def __init__(self, data, seed: int, batch_size: int, device: torch.device):
        self.data = data
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
        """The current epoch's batches from ``start_step`` on, augmented as they are drawn."""
        return self.data.train_batches(self.perm, start_step, self.batch_size, self.generator)

    def state(self, mid_epoch: bool) -> dict:
        return {"data": self.generator.get_state(),
                "perm": self.perm.cpu() if mid_epoch and self.perm is not None else None}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["data"])
        self.perm = state["perm"].to(self.device) if state.get("perm") is not None else None
