"""What makes a cohort step cheaper without changing what it computes (issue 36): the teacher's
attention maps computed once per batch for every member, SGD's multi-tensor implementation, and
no value read back to the host inside a step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from at import models, terms
from at.attention import at_loss
from at.method import Progress
from at.objective import Objective

PROGRESS = Progress(epoch=0, epochs=2)
AT = {"type": "at", "mapping": "sum", "p": 2}


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    student = models.build("wrn-10-1")
    teacher = models.build("wrn-10-2").eval().requires_grad_(False)
    return student, teacher


def test_each_teacher_map_is_computed_once_per_tap_and_mapping(monkeypatch):
    """Three members of a cohort (AT with p = 2 twice, once beside KD, and p = 4) share one
    teacher output: the teacher's map of each tap is computed once per (mapping, p), not once per
    member, and every member's loss is the one it computes alone, bit for bit."""
    methods = [[{"type": "ce"}, AT], [{"type": "kd"}, {**AT, "beta": 500}],
               [{"type": "ce"}, {**AT, "p": 4}], [{"type": "ce"}, {**AT, "mapping": "max", "p": 1}]]
    student, teacher = _pair()
    objectives = [Objective({"terms": m}, copy.deepcopy(student), teacher, input_shape=(3, 16, 16))
                  for m in methods]
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 7, 0, 3])
    alone = [objective(x, y, PROGRESS) for objective in objectives]

    calls = []
    real = terms.attention_map
    monkeypatch.setattr(terms, "attention_map", lambda a, mapping, p: calls.append((a.shape, mapping, p))
                        or real(a, mapping, p))
    shared = objectives[0].teacher_output(x, y)
    together = [objective(x, y, PROGRESS, shared) for objective in objectives]
    taps = len(shared.taps)
    assert len(calls) == 3 * taps, "one map per tap for each of (sum, 2), (sum, 4), (max, 1)"
    assert len(set(calls)) == 3 * taps
    for a, b in zip(alone, together):
        assert torch.equal(a.loss, b.loss)
        assert a.terms.keys() == b.terms.keys() and all(torch.equal(a.terms[k], b.terms[k]) for k in a.terms)


def test_a_shared_teacher_map_is_the_map_at_loss_computes():
    student, teacher = _pair(1)
    x = torch.randn(3, 3, 16, 16)
    s_taps, t_taps = student(x)[1], teacher(x)[1]
    for mapping, p in (("sum", 1), ("sum", 2), ("sum", 4), ("max", 1), ("sum", 0.5)):
        for s, t in zip(s_taps, t_taps):
            from at.attention import attention_map

            given = at_loss(s, t, mapping, p, "code", teacher_map=attention_map(t, mapping, p))
            assert torch.equal(given, at_loss(s, t, mapping, p, "code"))


def _sgd_weights(implementation: dict, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = models.build("wrn-10-1")
    x, y = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **implementation)
    for _ in range(steps):
        loss = F.cross_entropy(model(x)[0], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_the_multi_tensor_sgd_is_bit_identical_to_the_loop():
    """The trainer's SGD implementation changes the speed, not the weights (the float32
    fingerprint of benchmarks/fingerprint.py relies on it)."""
    from at.member import SGD_IMPLEMENTATION

    loop = _sgd_weights({"foreach": False})
    chosen = _sgd_weights(SGD_IMPLEMENTATION)
    assert all(torch.equal(a, b) for a, b in zip(loop, chosen))


def test_a_resumed_optimizer_uses_this_processes_implementation():
    from at.member import SGD_IMPLEMENTATION, use_implementation

    model = models.build("wrn-10-1")
    old = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)    # a state saved before foreach
    new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **SGD_IMPLEMENTATION)
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["foreach"] is None
    use_implementation(new)
    assert all(new.param_groups[0][k] == v for k, v in SGD_IMPLEMENTATION.items())


class _NoReadBack:
    """Every way Python reads a tensor's value back raises inside the block: on a GPU each
    of them waits for the device."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"Tensor.{_name} inside a step: a host synchronisation on a GPU")
            self.monkeypatch.setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()


def test_a_cohort_step_reads_nothing_back_to_the_host(tmp_path, cifar_mini_dir, teacher, monkeypatch):
    from test_cohort import members

    from at.spec import RunSpec
    from at.start import Options, build_cohort
    from at.train import begin_epoch, cohort_step

    specs = [RunSpec.resolve(s) for s in members(tmp_path, cifar_mini_dir, teacher)]
    options = Options(device="cpu", precision="float32", progress=False, threads=1, layout="contiguous",
                      compile="off")
    cohort = build_cohort(specs, options.arithmetic(specs), decider=options.decider())
    for member in cohort.members:
        begin_epoch(member)
    cohort.stream.start_epoch()
    batches = cohort.stream.batches(0)
    x, y = next(batches)
    with _NoReadBack(monkeypatch):
        losses = cohort_step(cohort, x, y, cohort.members)
    assert len(losses) == len(cohort.members) and all(torch.isfinite(loss) for loss in losses)
