"""Attention maps and the attention-transfer family of losses.

Activation-based attention (Zagoruyko & Komodakis 2017, section 3.1): an activation A of shape
(B, C, H, W) is reduced over its channels by a mapping F to an H x W map, flattened to Q and
L2-normalised per sample:

    F_sum^p(A) = sum_c |A_c|^p          (mapping="sum"; p=1 is the paper's F_sum)
    F_max^p(A) = max_c |A_c|^p          (mapping="max")
    Q = vec(F(A)) / ||vec(F(A))||_2

The mappings are the registry MAPPINGS (name -> function); `register_mapping` adds one.

Gradient-based attention (section 3.2): the attention of a network W on an input x is the input
gradient J = dL(W, x)/dx, and a loss on J is trained by double backpropagation.

Every loss here is one term of an objective CE + sum_k beta_k * term_k; the weights beta live in
the method spec (see at.method), not here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from at import lazy
from at.choices import names
from at.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

# the mappings' registry is read by the grid without torch (at.lazy)
torch = lazy.module("torch")
F = lazy.module("torch.nn.functional")

class Form(StrEnum):
    """How the AT loss compares two attention maps (at_loss says what each computes)."""

    CODE = "code"
    PAPER = "paper"


FORMS = names(Form)

# Same floor as F.normalize's default: an all-zero map stays all-zero instead of 0/0 = NaN.
NORM_EPS = 1e-12


def check_mapping(mapping: str, p: float) -> None:
    """Raise ValueError unless `mapping` is a registered mapping and `p` a positive number."""
    MAPPINGS.get_or_raise(mapping)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 or p == float("inf"):
        raise ValueError(f"attention exponent p must be a finite number > 0, got {p!r}")


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown AT loss form {form!r}; allowed: {', '.join(FORMS)}")


def at_least_float32(t: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32; leave float32 and float64 (tests) as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def full_precision(t: Tensor) -> contextlib.AbstractContextManager:
    """Turn autocast off for the loss arithmetic on `t`'s device.

    Attention maps are unit vectors of H*W elements, so their squared differences are of order
    1/(H*W)^2 and below; bf16's 8-bit mantissa would round them away.
    """
    if t.device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def abs_pow(a: Tensor, p: float) -> Tensor:
    """|a|^p elementwise, with a zero (not NaN) gradient at a == 0 for 0 < p < 1."""
    a = a.abs()
    if p == 1:
        return a
    if p >= 1:
        return a.pow(p)
    # For 0 < p < 1 the derivative p*|a|^(p-1) is infinite at a == 0, and activations after a
    # ReLU are exactly zero often; give those entries a zero gradient instead of inf*0 = NaN.
    nonzero = a > 0
    safe = torch.where(nonzero, a, torch.ones_like(a))
    return torch.where(nonzero, safe.pow(p), torch.zeros_like(a))


# ---------------------------------------------------------------------------------------------
# Mappings: name -> F(activation, p), (B, C, H, W) -> (B, H, W), before normalisation. They get
# the activation in at least float32 with autocast off.

Mapping = Callable[["Tensor", float], "Tensor"]


def _check_mapping_entry(name: str, function: object) -> None:
    if not callable(function):
        raise TypeError(f"attention mapping {name!r} needs a function F(activation, p), got {function!r}")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError as e:
        raise TypeError(f"attention mapping {name!r}: its function must take (activation, p): {e}") from None
    except ValueError:  # a builtin without a signature: accept, the first call will tell
        pass


MAPPINGS: Registry[Mapping] = Registry("attention mapping", _check_mapping_entry)


def register_mapping(name: str, function: Mapping) -> Mapping:
    """Make `name` a mapping of `at_loss`/`attention_map` (and of the `at` term's `mapping` key).

    `function(activation, p)` reduces a (B, C, H, W) activation over its channels to (B, H, W);
    it receives the activation in at least float32 with autocast off, and the result is
    L2-normalised by `attention_map`. Use `abs_pow` for |A|^p.
    """
    return MAPPINGS.register(name, function)


def _sum_map(activation: Tensor, p: float) -> Tensor:
    return abs_pow(activation, p).sum(dim=1)


def _max_map(activation: Tensor, p: float) -> Tensor:
    return abs_pow(activation, p).amax(dim=1)


register_mapping("sum", _sum_map)
register_mapping("max", _max_map)


def attention_map(activation: Tensor, mapping: str, p: float) -> Tensor:
    """(B, C, H, W) activation -> (B, H*W) attention map, L2-normalised per sample.

    Computed in at least float32 even under autocast. An all-zero map stays zero (no NaN).
    """
    check_mapping(mapping, p)
    reduce_channels = MAPPINGS[mapping]
    if activation.ndim != 4:
        raise ValueError(
            f"attention_map expects a (B, C, H, W) activation, got shape {tuple(activation.shape)}"
        )
    with full_precision(activation):
        reduced = reduce_channels(at_least_float32(activation), p)
        expected = (activation.shape[0], *activation.shape[2:])
        if tuple(reduced.shape) != expected:
            raise ValueError(
                f"attention mapping {mapping!r} returned shape {tuple(reduced.shape)}, expected (B, H, W) = {expected}"
            )
        return F.normalize(reduced.flatten(1), p=2, dim=1, eps=NORM_EPS)


def check_same_spatial(student_act: Tensor, teacher_act: Tensor, what: str) -> None:
    """Both (B, C, H, W) with the same B, H, W (channel counts may differ)."""
    s, t = tuple(student_act.shape), tuple(teacher_act.shape)
    if student_act.ndim != 4 or teacher_act.ndim != 4:
        raise ValueError(f"{what} expects (B, C, H, W) activations, got student {s} and teacher {t}")
    if s[0] != t[0] or s[2:] != t[2:]:
        raise ValueError(
            f"{what} needs equal batch and spatial sizes, got student {s} and teacher {t}"
        )


def at_loss(
    student_act: Tensor,
    teacher_act: Tensor,
    mapping: str,
    p: float,
    form: str,
    teacher_map: Tensor | None = None,
) -> Tensor:
    """Activation-based AT loss for one layer pair, a float32 (or float64) scalar.

    The objective is CE + beta * sum_j at_loss_j. With Q the normalised attention maps:

    - form="code" (authors' code, the at term's default: at.terms holds the options' defaults): mean over batch and H*W of (Q_s - Q_t)^2;
      with beta = 1000 this is the paper's "10^3 divided by the number of elements in the
      attention map and batch size".
    - form="paper": 0.5 * mean over the batch of ||Q_s - Q_t||_2 (the paper's beta/2 * ||.||_p,
      p = 2, not squared), averaged over the batch so that beta does not scale with it.

    The teacher's activation is a constant (detached). Channel counts may differ, spatial
    sizes must match. ``teacher_map``: the teacher's map ``attention_map(teacher_act, mapping,
    p)`` when it was computed already (a cohort computes it once per batch for every member
    that shares the teacher, at.terms); the same tensor, so the loss is the same.
    """
    check_form(form)
    check_same_spatial(student_act, teacher_act, "at_loss")
    q_s = attention_map(student_act, mapping, p)
    q_t = attention_map(teacher_act.detach(), mapping, p) if teacher_map is None else teacher_map
    with full_precision(q_s):
        diff = q_s - q_t
        if form == Form.CODE:
            return diff.pow(2).mean()
        return 0.5 * torch.linalg.vector_norm(diff, ord=2, dim=1).mean()


# ---------------------------------------------------------------------------------------------
# Gradient-based attention (double backpropagation)


def first_output(output: Tensor | tuple | list) -> Tensor:
    """The logits of a model that returns (logits, taps), or of one that returns logits only."""
    return output[0] if isinstance(output, (tuple, list)) else output


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over the batch of the per-sample cross-entropy, in at least float32.

    Summing (not averaging) makes each sample's input gradient dL_b/dx_b independent of the
    batch size: the J of a sample is its own saliency map, whatever batch it is trained in
    (up to BatchNorm's batch statistics in training mode, which couple the samples).
    """
    return F.cross_entropy(at_least_float32(logits), labels, reduction="sum")


def forward_with_input_gradient(
    model: Callable[[Tensor], object], x: Tensor, labels: Tensor, create_graph: bool
) -> tuple[object, Tensor]:
    """Run `model` on a fresh leaf copy of x and return (model output, J = dL/dx).

    L is summed_cross_entropy. With create_graph=True the graph of J (and of the output) is
    kept, so a loss on J can be backpropagated to the model's weights and the output can also
    feed the ordinary CE term of the same step.
    """
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        output = model(leaf)
        loss = summed_cross_entropy(first_output(output), labels)
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
    return output, grad


def input_gradient(
    model: Callable[[Tensor], object], x: Tensor, labels: Tensor, create_graph: bool = False
) -> Tensor:
    """J = dL/dx with L the SUM over the batch of per-sample cross-entropy (see
    summed_cross_entropy: a sample's J does not depend on the batch size)."""
    return forward_with_input_gradient(model, x, labels, create_graph)[1]


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what} needs input gradients of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _half_mean_squared_norm(d: Tensor) -> Tensor:
    with full_precision(d):
        return 0.5 * at_least_float32(d).flatten(1).pow(2).sum(dim=1).mean()


# The three gradient losses below use the SQUARED L2 norm. The paper writes beta/2 * ||J_S - J_T||_2
# (and the same for the symmetry norm), but the gradient it states on the slides,
# beta * (J_S - J_T) * d2L/(dW dx), is the gradient of beta/2 * ||J_S - J_T||_2^2, and the
# squared norm is also Drucker & LeCun's min-l2 penalty; it is smooth at J_S = J_T, where the
# plain norm's gradient is undefined.


def grad_at_loss(j_student: Tensor, j_teacher: Tensor) -> Tensor:
    """Gradient-based AT: 0.5 * mean_b ||J_s - J_t||_2^2 (teacher's J detached)."""
    _check_same_shape(j_student, j_teacher, "grad_at_loss")
    return _half_mean_squared_norm(j_student - j_teacher.detach())


def symmetry_loss(j: Tensor, j_of_flipped: Tensor) -> Tensor:
    """Symmetry norm: 0.5 * mean_b ||J - flip(J_of_flipped)||_2^2.

    J = dL/dx at x, J_of_flipped = dL/dx at flip(x), flip = horizontal flip (last dim). It is
    zero when the network's input gradient is equivariant to horizontal flips. Both sides depend
    on the weights: neither is detached.
    """
    _check_same_shape(j, j_of_flipped, "symmetry_loss")
    return _half_mean_squared_norm(j - j_of_flipped.flip(-1))


def min_l2_loss(j: Tensor) -> Tensor:
    """min-l2 (Drucker & LeCun 1992, double backpropagation): 0.5 * mean_b ||J||_2^2."""
    return _half_mean_squared_norm(j)


__all__ = [
    "FORMS",
    "Form",
    "MAPPINGS",
    "abs_pow",
    "at_loss",
    "attention_map",
    "forward_with_input_gradient",
    "grad_at_loss",
    "input_gradient",
    "min_l2_loss",
    "register_mapping",
    "symmetry_loss",
]
