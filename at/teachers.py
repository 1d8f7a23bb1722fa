"""The teachers of a cohort: each distinct one loaded once, frozen, with a digest of its weights.

A student's run records the digest of the teacher it learnt from, so that a run whose teacher
has been retrained since is not taken for finished (at.resume).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from at import checkpoint, execution, models
from at.choices import Compile
from at.precision import TEACHER, Arithmetic
from at.spec import RunSpec


def weights_sha256(state_dict: dict) -> str:
    """A digest of a model's weights (names, dtypes, shapes, values): what a student learns
    from. Not the file's bytes: a checkpoint written again from the same state may pickle
    differently, and must still count as the same teacher."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_source(spec: RunSpec):
    """Where a run's teacher comes from (None: it has none): its checkpoint file, or a pretrained
    model and its weights. Runs with equal sources share one loaded teacher."""
    if not spec.teacher:
        return None
    if spec.teacher_weights:
        return ("pretrained", spec.teacher, spec.teacher_weights, spec.num_classes)
    if not spec.teacher_checkpoint:
        raise ValueError(f"run {spec.id}: teacher {spec.teacher!r} given without teacher_checkpoint")
    return ("checkpoint", str(Path(spec.teacher_checkpoint).resolve()))


def _load(spec: RunSpec):
    if spec.teacher_weights:
        # a pretrained model used as it is (the ImageNet table's ResNet-34): no teacher run
        model = models.build(spec.teacher, num_classes=spec.num_classes, weights=spec.teacher_weights)
        return model, f"pretrained:{spec.teacher_weights}"
    path = spec.teacher_checkpoint
    model, name = checkpoint.load_network(path)
    if name != spec.teacher:
        raise checkpoint.CheckpointError(
            f"teacher checkpoint {path} holds a {name!r}, but run {spec.id} "
            f"expects teacher {spec.teacher!r}")
    return model, weights_sha256(model.state_dict())


class Teachers:
    """Each distinct teacher of ``specs``, loaded once, frozen and prepared for ``arithmetic``."""

    def __init__(self, specs: list[RunSpec], arithmetic: Arithmetic):
        self.models: dict[tuple, torch.nn.Module] = {}
        self.hashes: dict[tuple, str | None] = {}
        self.networks: dict[tuple, tuple[str, str]] = {}
        for spec in specs:
            key = teacher_source(spec)
            if key is None or key in self.models:
                continue
            # loading builds a model, which draws from the global RNG: keep those draws out of
            # every member's random state
            with torch.random.fork_rng(devices=[]):
                model, digest = _load(spec)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.networks[key] = (TEACHER, spec.teacher)
            self.models[key] = arithmetic.prepare(model, self.networks[key])
            self.hashes[key] = digest

    def compile(self, arithmetic: Arithmetic) -> None:
        """Compile the teachers whose model at.execution chose to compile (never one that a
        student runs for its input gradient: it decides so per model). Called once the members'
        objectives have taken their shapes, so that their dry runs do not compile."""
        for key, model in self.models.items():
            mode = arithmetic.compile_of(self.networks[key])
            if mode != Compile.OFF:
                execution.compile_model(model, mode)

    def of(self, spec: RunSpec):
        """(the teacher model, its digest) of a run; (None, None) for a run without one."""
        key = teacher_source(spec)
        return (None, None) if key is None else (self.models[key], self.hashes[key])
