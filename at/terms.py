"""The built-in loss-term types, one TermType record each (see at.term_type).

Default weights: ce/kd/at from the paper and the authors' code (T=4, alpha=0.9, beta=1000 with
the "code" form). factt: beta=1000 because our F-ActT is normalised to the same range as AT's
"code" form (see at.distill). The gradient terms' weights were never published: required.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from at import lazy
from at.attention import (
    FORMS,
    MAPPINGS,
    Form,
    at_least_float32,
    at_loss,
    attention_map,
    grad_at_loss,
    min_l2_loss,
    symmetry_loss,
)
from at.term_type import (
    REQUIRED,
    BoundTerm,
    GradientSource,
    Option,
    StepInputs,
    TermType,
    one_of,
    positive_number,
    register_term,
    unit_interval,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

# imported when a term computes, not when a grid reads the term types (at.lazy)
F = lazy.module("torch.nn.functional")
torch_nn = lazy.module("torch.nn")
distill = lazy.module("at.distill")


def _ce(step: StepInputs, term: BoundTerm) -> Tensor:
    return F.cross_entropy(at_least_float32(step.student_logits), step.labels)


def _kd(step: StepInputs, term: BoundTerm) -> Tensor:
    o = term.options
    return distill.kd_loss(step.student_logits, step.teacher_logits, step.labels, T=o["T"], alpha=o["alpha"])


def _teacher_map(step: StepInputs, i: int, mapping: str, p: float) -> Tensor:
    """The teacher's attention map of tap ``i``, once per batch for all who share the teacher
    output; its float32 copy of the tap (a bf16 step's) once for all mappings."""
    def upcast():
        return at_least_float32(step.teacher_taps[i].detach())

    def compute():
        return attention_map(step.from_teacher(("float32 tap", i), upcast), mapping, p)

    return step.from_teacher(("attention map", i, mapping, p), compute)


def _at(step: StepInputs, term: BoundTerm) -> Tensor:
    o = term.options
    return sum(
        at_loss(step.student_taps[i], step.teacher_taps[i], mapping=o["mapping"], p=o["p"], form=o["form"],
                teacher_map=_teacher_map(step, i, o["mapping"], o["p"]))
        for i in term.layers
    )


def _factt_projections(pairs) -> nn.Module:
    # keyed by tap index; the learned projection of the student's tap to the teacher's channels
    return torch_nn.ModuleDict({str(i): distill.ActivationProjection(s[0], t[0]) for i, s, t in pairs})


def _factt(step: StepInputs, term: BoundTerm) -> Tensor:
    return sum(
        distill.factt_loss(term.state[str(i)](step.student_taps[i]), step.teacher_taps[i]) for i in term.layers
    )


def _grad_at(step: StepInputs, term: BoundTerm) -> Tensor:
    return grad_at_loss(step.input_gradients[GradientSource.STUDENT], step.input_gradients[GradientSource.TEACHER])


def _symmetry(step: StepInputs, term: BoundTerm) -> Tensor:
    return symmetry_loss(step.input_gradients[GradientSource.STUDENT],
                         step.input_gradients[GradientSource.STUDENT_FLIPPED])


def _min_l2(step: StepInputs, term: BoundTerm) -> Tensor:
    return min_l2_loss(step.input_gradients[GradientSource.STUDENT])


CE = register_term(TermType("ce", _ce, beta=1.0))
KD = register_term(TermType(
    "kd", _kd, beta=1.0, needs_teacher=True, compares_logits=True,
    options={"T": Option(4.0, positive_number), "alpha": Option(0.9, unit_interval)},
))
AT = register_term(TermType(
    "at", _at, beta=1000.0, needs_teacher=True, tap_pairs=True,
    options={"mapping": Option("sum", one_of(MAPPINGS)), "p": Option(2, positive_number),
             "form": Option(Form.CODE.value, one_of(FORMS))},
))
FACTT = register_term(TermType(
    "factt", _factt, beta=1000.0, needs_teacher=True, tap_pairs=True, build=_factt_projections,
))
GRAD_AT = register_term(TermType(
    "grad_at", _grad_at, beta=REQUIRED, needs_teacher=True,
    input_gradients=frozenset({GradientSource.STUDENT, GradientSource.TEACHER}),
))
SYMMETRY = register_term(TermType(
    "symmetry", _symmetry, beta=REQUIRED,
    input_gradients=frozenset({GradientSource.STUDENT, GradientSource.STUDENT_FLIPPED}),
))
MIN_L2 = register_term(TermType("min_l2", _min_l2, beta=REQUIRED, input_gradients=frozenset({GradientSource.STUDENT})))

# the types registered here (their names are free as ModuleDict keys: at.method checks the others)
BUILT_IN_TERM_TYPES = frozenset(t.name for t in (CE, KD, AT, FACTT, GRAD_AT, SYMMETRY, MIN_L2))
