"""A method = a list of weighted loss terms, declared in params.yaml, composed into one objective.

A method spec is a plain dict (from YAML):

    {"terms": [{"type": "kd", "T": 4, "alpha": 0.9},
               {"type": "at", "mapping": "sum", "p": 2, "form": "code", "beta": 1000,
                "schedule": "lr"}]}

The step loss is sum_k beta_k * s_k(progress) * term_k, where s_k is the term's schedule:
"constant" (1), "lr" (current lr / initial lr: the weight decays with the learning-rate drops;
this is our choice for the paper's unpublished decaying beta of AT+KD), "linear"
(1 - epoch/epochs, epoch 0-based).

`validate_method` checks a spec without building anything (the params.yaml schema check calls
it); `Objective` builds the terms for a given student/teacher pair and computes a step's loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from at.attention import (
    FORMS,
    MAPPINGS,
    at_least_float32,
    at_loss,
    check_form,
    check_mapping,
    forward_with_input_gradient,
    full_precision,
    grad_at_loss,
    min_l2_loss,
    symmetry_loss,
)
from at.distill import ActivationProjection, check_kd_params, factt_loss, kd_loss

_REQUIRED = object()  # a key without default: the paper gives no value, the spec must


# Term type -> its keys and their defaults (besides "type" and "schedule", which every term has).
# Defaults: ce/kd/at from the paper and the authors' code (T=4, alpha=0.9, beta=1000 with the
# "code" form). factt: beta=1000 because our F-ActT is normalised to the same range as AT's
# "code" form (see at.distill). The gradient terms' weights were never published: required.
TERM_KEYS: dict[str, dict[str, object]] = {
    "ce": {"beta": 1.0},
    "kd": {"T": 4.0, "alpha": 0.9, "beta": 1.0},
    "at": {"mapping": "sum", "p": 2, "form": "code", "beta": 1000.0, "layers": "all"},
    "factt": {"beta": 1000.0, "layers": "all"},
    "grad_at": {"beta": _REQUIRED},
    "symmetry": {"beta": _REQUIRED},
    "min_l2": {"beta": _REQUIRED},
}
TERM_TYPES = tuple(TERM_KEYS)
SCHEDULES = ("constant", "lr", "linear")
TEACHER_TERMS = frozenset({"kd", "at", "factt", "grad_at"})
TAP_TERMS = frozenset({"at", "factt"})
GRADIENT_TERMS = frozenset({"grad_at", "symmetry", "min_l2"})


@dataclass(frozen=True)
class Progress:
    """Where training stands: epoch (0-based) of epochs, and lr_factor = current lr / initial lr."""

    epoch: int
    epochs: int
    lr_factor: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"Progress.epochs must be an int >= 1, got {self.epochs!r}")
        if not (isinstance(self.epoch, int) and 0 <= self.epoch < self.epochs):
            raise ValueError(f"Progress.epoch must be an int in [0, {self.epochs}), got {self.epoch!r}")
        if not (isinstance(self.lr_factor, (int, float)) and 0 <= self.lr_factor < math.inf):
            raise ValueError(f"Progress.lr_factor must be a finite number >= 0, got {self.lr_factor!r}")


@dataclass
class StepResult:
    """loss: the step's total (to backpropagate); logits: the student's on x; terms: each
    term's WEIGHTED contribution beta_eff * term, detached, keyed by term type."""

    loss: Tensor
    logits: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TeacherOutput:
    """What the frozen teacher gives for one batch: logits, taps and (for grad_at) its input
    gradient. A cohort computes it once per batch for every member that shares the teacher and
    its `Objective.teacher_key`, and hands it to each member's objective."""

    logits: Tensor
    taps: list[Tensor]
    input_gradient: Tensor | None = None


@dataclass(frozen=True)
class Term:
    """One resolved term of a method: its type, weight, schedule and type-specific options."""

    type: str
    beta: float
    schedule: str
    options: dict

    def factor(self, progress: Progress) -> float:
        return schedule_factor(self.schedule, progress)


def schedule_factor(schedule: str, progress: Progress) -> float:
    """The multiplier of beta at `progress`."""
    if schedule == "constant":
        return 1.0
    if schedule == "lr":
        return float(progress.lr_factor)
    if schedule == "linear":
        return 1.0 - progress.epoch / progress.epochs
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# Spec checking


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_term(index: int, raw: object) -> Term:
    where = f"method term {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with a 'type' key, got {raw!r}")
    kind = raw.get("type")
    if kind not in TERM_KEYS:
        raise ValueError(f"{where}: unknown type {kind!r}; allowed: {', '.join(TERM_TYPES)}")
    where = f"method term {index} (type {kind!r})"
    allowed = {"type", "schedule", *TERM_KEYS[kind]}
    for key in raw:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
    values = {}
    for key, default in TERM_KEYS[kind].items():
        if key in raw:
            values[key] = raw[key]
        elif default is _REQUIRED:
            raise ValueError(f"{where}: key {key!r} is required (the paper gives no value)")
        else:
            values[key] = default

    beta = values.pop("beta")
    if not _is_number(beta) or beta < 0:
        raise ValueError(f"{where}: beta must be a finite number >= 0, got {beta!r}")
    schedule = raw.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise ValueError(f"{where}: unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")

    if "mapping" in values and values["mapping"] not in MAPPINGS:
        raise ValueError(
            f"{where}: unknown mapping {values['mapping']!r}; allowed: {', '.join(MAPPINGS)}"
        )
    if "p" in values and (not _is_number(values["p"]) or values["p"] <= 0):
        raise ValueError(f"{where}: p must be a finite number > 0, got {values['p']!r}")
    if "form" in values and values["form"] not in FORMS:
        raise ValueError(f"{where}: unknown form {values['form']!r}; allowed: {', '.join(FORMS)}")
    if "T" in values and (not _is_number(values["T"]) or values["T"] <= 0):
        raise ValueError(f"{where}: T must be a finite number > 0, got {values['T']!r}")
    if "alpha" in values and (not _is_number(values["alpha"]) or not 0 <= values["alpha"] <= 1):
        raise ValueError(f"{where}: alpha must be a number in [0, 1], got {values['alpha']!r}")
    if "layers" in values:
        layers = values["layers"]
        ok = layers == "all" or (
            isinstance(layers, list)
            and len(layers) > 0
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            and len(set(layers)) == len(layers)
        )
        if not ok:
            raise ValueError(
                f"{where}: layers must be 'all' or a non-empty list of distinct tap indices "
                f">= 0, got {layers!r}"
            )
        values["layers"] = "all" if layers == "all" else list(layers)
    # The library functions check again; calling them keeps one definition of what is valid.
    if kind == "at":
        check_mapping(values["mapping"], values["p"])
        check_form(values["form"])
    if kind == "kd":
        check_kd_params(values["T"], values["alpha"])
    return Term(type=kind, beta=float(beta), schedule=schedule, options=values)


def resolve_method(spec: object) -> list[Term]:
    """Check a method spec and return its terms with defaults filled in."""
    if not isinstance(spec, dict):
        raise ValueError(f"a method spec must be a mapping with key 'terms', got {spec!r}")
    for key in spec:
        if key != "terms":
            raise ValueError(f"method spec: unknown key {key!r}; allowed: terms")
    raw_terms = spec.get("terms")
    if not isinstance(raw_terms, list) or not raw_terms:
        raise ValueError(f"method spec: 'terms' must be a non-empty list, got {raw_terms!r}")
    terms = [_check_term(i, raw) for i, raw in enumerate(raw_terms)]
    seen: set[str] = set()
    for term in terms:
        # Terms are reported by type (history.csv columns loss_<type>): one of each.
        if term.type in seen:
            raise ValueError(f"method spec: term type {term.type!r} appears twice; give each type once")
        seen.add(term.type)
    return terms


def validate_method(spec: object) -> None:
    """Raise ValueError naming the bad key/value (and the allowed ones) if `spec` is not a valid
    method spec. Needs no model: the params.yaml schema check calls it. Whether the method has
    the teacher it needs is checked by Objective (and by `requires_teacher` for the grid)."""
    resolve_method(spec)


def requires_teacher(spec: object) -> bool:
    """Whether the method has a term that needs a teacher (kd, at, factt, grad_at)."""
    return any(term.type in TEACHER_TERMS for term in resolve_method(spec))


def term_names(spec: object) -> list[str]:
    """The keys of StepResult.terms for this method, in spec order."""
    return [term.type for term in resolve_method(spec)]


# ---------------------------------------------------------------------------------------------
# The objective


def _split_output(output: object, who: str) -> tuple[Tensor, list[Tensor]]:
    if not (isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], (tuple, list))):
        raise ValueError(f"the {who} must return (logits, taps) with taps a list of activations")
    return output[0], list(output[1])


def _dry_run(model: nn.Module, input_shape: tuple[int, ...], who: str) -> tuple[Tensor, list[Tensor]]:
    """One forward pass of a zero batch, to learn the shapes of logits and taps.

    Eval mode (BatchNorm uses, and does not update, its running statistics) and no_grad; every
    submodule's training flag is restored afterwards, whatever it was.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            output = model(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    finally:
        for module, flag in flags:
            module.training = flag
    return _split_output(output, who)


class Objective(nn.Module):
    """The loss of one training step of a method, for one student (and teacher).

    Its only parameters/state are the F-ActT projections: add `objective.parameters()` to the
    optimizer and save `objective.state_dict()` in the checkpoint. The student and teacher are
    kept outside its module tree (their state dicts stay separate); the trainer owns them,
    moves them to the device, freezes the teacher (eval mode, requires_grad False: checked at
    every step) and sets the student's mode.

    Precision: without gradient terms the networks run under the caller's autocast and every
    loss is computed in float32. With a gradient term (grad_at, symmetry, min_l2) the whole
    step, networks included, runs with autocast off (float32): the input gradients are
    differentiated a second time, and we prefer an exact double backprop to bf16 speed there
    (the paper's gradient experiments use the small NIN-thin).
    """

    def __init__(
        self,
        spec: dict,
        student: nn.Module,
        teacher: nn.Module | None = None,
        input_shape: tuple[int, ...] = (3, 32, 32),
    ) -> None:
        super().__init__()
        self.terms = resolve_method(spec)
        kinds = {term.type for term in self.terms}
        need_teacher = sorted(kinds & TEACHER_TERMS)
        if need_teacher and teacher is None:
            raise ValueError(f"method terms {need_teacher} need a teacher, but none was given")
        self.needs_teacher = bool(need_teacher)
        self.needs_teacher_gradient = "grad_at" in kinds
        self.has_gradient_terms = bool(kinds & GRADIENT_TERMS)
        # A plain tuple: nn.Module does not register what it holds as submodules.
        self._nets = (student, teacher if self.needs_teacher else None)
        self.factt_projections = nn.ModuleDict()
        self.layers: dict[str, list[int]] = {}
        if kinds & (TAP_TERMS | {"kd"}):
            self._check_shapes(tuple(input_shape))

    @property
    def term_names(self) -> list[str]:
        return [term.type for term in self.terms]

    def _check_shapes(self, input_shape: tuple[int, ...]) -> None:
        student, teacher = self._nets
        s_logits, s_taps = _dry_run(student, input_shape, "student")
        t_logits, t_taps = _dry_run(teacher, input_shape, "teacher")
        for term in self.terms:
            if term.type == "kd" and s_logits.shape != t_logits.shape:
                raise ValueError(
                    f"term 'kd': student logits {tuple(s_logits.shape[1:])} and teacher logits "
                    f"{tuple(t_logits.shape[1:])} differ in the number of classes"
                )
            if term.type not in TAP_TERMS:
                continue
            layers = term.options["layers"]
            if layers == "all":
                if len(s_taps) != len(t_taps):
                    raise ValueError(
                        f"term {term.type!r} with layers 'all': the student has {len(s_taps)} taps "
                        f"and the teacher {len(t_taps)}; list the tap indices to pair"
                    )
                layers = list(range(len(s_taps)))
            for i in layers:
                if i >= len(s_taps) or i >= len(t_taps):
                    raise ValueError(
                        f"term {term.type!r}: tap index {i} out of range (student has "
                        f"{len(s_taps)} taps, teacher {len(t_taps)})"
                    )
                s_shape, t_shape = tuple(s_taps[i].shape[1:]), tuple(t_taps[i].shape[1:])
                if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[1:] != t_shape[1:]:
                    raise ValueError(
                        f"term {term.type!r}: tap {i} has (C, H, W) {s_shape} in the student and "
                        f"{t_shape} in the teacher; spatial sizes must match"
                    )
                if term.type == "factt":
                    projection = ActivationProjection(s_shape[0], t_shape[0])
                    first = next(iter(student.parameters()), None)
                    if first is not None:
                        projection = projection.to(device=first.device, dtype=first.dtype)
                    self.factt_projections[str(i)] = projection
            self.layers[term.type] = list(layers)

    def _check_frozen(self, teacher: nn.Module) -> None:
        if any(module.training for module in teacher.modules()):
            raise RuntimeError("the teacher must be frozen: call teacher.eval() (BatchNorm in eval mode)")
        if any(p.requires_grad for p in teacher.parameters()):
            raise RuntimeError("the teacher must be frozen: set requires_grad_(False) on its parameters")

    @property
    def teacher_key(self) -> tuple[bool, bool] | None:
        """How this objective needs its teacher run: None (no teacher), else (input gradient
        needed, full precision). Objectives of one cohort with the same teacher and key can
        share one `teacher_output` per batch: it is the same computation."""
        if not self.needs_teacher:
            return None
        return (self.needs_teacher_gradient, self.has_gradient_terms)

    def _precision(self, x: Tensor):
        return full_precision(x) if self.has_gradient_terms else contextlib.nullcontext()

    def teacher_output(self, x: Tensor, y: Tensor) -> TeacherOutput:
        """The teacher's logits and taps on x (and its input gradient for grad_at), frozen."""
        teacher = self._nets[1]
        self._check_frozen(teacher)
        with self._precision(x):
            if self.has_gradient_terms:
                x = at_least_float32(x)
            if self.needs_teacher_gradient:
                output, gradient = forward_with_input_gradient(teacher, x, y, create_graph=False)
                logits, taps = _split_output(output, "teacher")
                return TeacherOutput(logits, taps, gradient)
            with torch.no_grad():
                logits, taps = _split_output(teacher(x), "teacher")
            return TeacherOutput(logits, taps)

    def forward(self, x: Tensor, y: Tensor, progress: Progress,
                teacher_output: TeacherOutput | None = None) -> StepResult:
        """The step's loss. `teacher_output` (from `teacher_output`, possibly computed once for
        several objectives) is computed here when not given and a term needs the teacher."""
        student = self._nets[0]
        if self.needs_teacher and teacher_output is None:
            teacher_output = self.teacher_output(x, y)
        kinds = {term.type for term in self.terms}
        j = {}
        t_logits = t_taps = None
        if teacher_output is not None:
            t_logits, t_taps = teacher_output.logits, teacher_output.taps
            j["teacher"] = teacher_output.input_gradient
        with self._precision(x):
            if self.has_gradient_terms:
                x = at_least_float32(x)
                output, j["student"] = forward_with_input_gradient(student, x, y, create_graph=True)
                s_logits, s_taps = _split_output(output, "student")
                if "symmetry" in kinds:
                    _, j["student_flipped"] = forward_with_input_gradient(
                        student, x.flip(-1), y, create_graph=True
                    )
            else:
                s_logits, s_taps = _split_output(student(x), "student")

            contributions: dict[str, Tensor] = {}
            for term in self.terms:
                value = self._term_value(term, y, s_logits, s_taps, t_logits, t_taps, j)
                contributions[term.type] = (term.beta * term.factor(progress)) * value
            loss = sum(contributions.values())
        terms = {name: value.detach() for name, value in contributions.items()}
        return StepResult(loss=loss, logits=s_logits, terms=terms)

    def _term_value(self, term, y, s_logits, s_taps, t_logits, t_taps, j) -> Tensor:
        o = term.options
        if term.type == "ce":
            return F.cross_entropy(at_least_float32(s_logits), y)
        if term.type == "kd":
            return kd_loss(s_logits, t_logits, y, T=o["T"], alpha=o["alpha"])
        if term.type == "at":
            return sum(
                at_loss(s_taps[i], t_taps[i], mapping=o["mapping"], p=o["p"], form=o["form"])
                for i in self.layers["at"]
            )
        if term.type == "factt":
            return sum(
                factt_loss(self.factt_projections[str(i)](s_taps[i]), t_taps[i])
                for i in self.layers["factt"]
            )
        if term.type == "grad_at":
            return grad_at_loss(j["student"], j["teacher"])
        if term.type == "symmetry":
            return symmetry_loss(j["student"], j["student_flipped"])
        if term.type == "min_l2":
            return min_l2_loss(j["student"])
        raise AssertionError(f"unhandled term type {term.type!r}")  # resolve_method forbids it


__all__ = [
    "GRADIENT_TERMS",
    "SCHEDULES",
    "TEACHER_TERMS",
    "TERM_TYPES",
    "Objective",
    "Progress",
    "StepResult",
    "TeacherOutput",
    "Term",
    "requires_teacher",
    "resolve_method",
    "schedule_factor",
    "term_names",
    "validate_method",
]
