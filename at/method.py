"""A method = a list of weighted loss terms, declared in params.yaml, composed into one objective.

A method spec is a plain dict (from YAML):

    {"terms": [{"type": "kd", "T": 4, "alpha": 0.9},
               {"type": "at", "mapping": "sum", "p": 2, "form": "code", "beta": 1000,
                "schedule": "lr"}]}

Every term has a type (a TermType record of at.term_type's registry: the built-in ones are in
at.terms, `register_term` adds more), an optional `name` (default: its type; unique in the
method: it keys StepResult.terms), `beta` and `schedule`. A spec may list `plugins`: modules
imported before its terms are checked, which register the term types they define (how a
user's type reaches `python -m at train`).

The step loss is sum_k beta_k * s_k(progress) * term_k, where s_k is the term's schedule:
"constant" (1), "lr" (current lr / initial lr: the weight decays with the learning-rate drops;
this is our choice for the paper's unpublished decaying beta of AT+KD), "linear"
(1 - epoch/epochs, epoch 0-based).

`validate_method` checks a spec without building anything (the params.yaml schema check calls
it); `at.objective.Objective` builds the terms for a given student/teacher pair and computes
a step's loss (the training side: this module is read without torch, at.lazy).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from at.choices import names
from at.errors import shown
from at.registry import import_plugins
from at.terms import BUILT_IN_TERM_TYPES  # importing at.terms registers the built-in term types
from at.term_type import (
    COMMON_KEYS,
    REQUIRED,
    TERM_TYPES,
    BoundTerm,
    StepInputs,
    TermType,
    non_negative_number,
    one_of,
    register_term,
)

class Schedule(StrEnum):
    """How a term's weight changes over training (the module docstring says how)."""

    CONSTANT = "constant"
    LR = "lr"
    LINEAR = "linear"


SCHEDULES = names(Schedule)
# a term's schedule where its spec writes none
DEFAULT_SCHEDULE = Schedule.CONSTANT.value
SPEC_KEYS = ("terms", "plugins")
# The method of params.yaml that trains a model alone: the grid's teachers train with it
# (at.grid), the report's paired differences are taken to it (at.report.cells), and a run from
# command-line arguments uses it where --method is not given.
BASELINE_METHOD = "baseline"
# the keys of every term beside its type and name: its weight and how the weight changes
WEIGHT_KEYS = ("beta", "schedule")
# A term's name keys StepResult.terms, the history.csv column loss_<name>, the MLflow metric and
# (for terms with state) a submodule of the Objective: letters, digits, _ and -, not a dot.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

if TYPE_CHECKING:
    from torch import Tensor


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
    term's WEIGHTED contribution beta_eff * term, detached, keyed by term name."""

    loss: Tensor
    logits: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TeacherOutput:
    """What the frozen teacher gives for one batch: logits, taps and (for grad_at) its input
    gradient. A cohort computes it once per batch for every member that shares the teacher and
    its `Objective.teacher_pass`, and hands it to each member's objective; what the terms derive
    from it (the teacher's attention maps) is computed once too, in `derived`."""

    logits: Tensor
    taps: list[Tensor]
    input_gradient: Tensor | None = None
    # what the terms derive from these outputs (StepInputs.from_teacher), filled as they ask
    derived: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Term:
    """One resolved term of a method: its name (unique in the method; default: its type), type,
    weight, schedule and type-specific options (defaults filled in, each checked by its type's
    record). Built once by :func:`resolve_method`; what reads a term reads these fields."""

    name: str
    type: str
    beta: float
    schedule: str
    options: dict = field(hash=False)

    @property
    def kind(self) -> TermType:
        """The term's type record (at.term_type): what it reads and how it computes."""
        return TERM_TYPES[self.type]

    def factor(self, progress: Progress) -> float:
        return schedule_factor(self.schedule, progress)

    def value(self, key: str) -> object:
        """The term's value of ``key``: beta, schedule or one of its type's options."""
        return getattr(self, key) if key in WEIGHT_KEYS else self.options[key]

    def to_dict(self) -> dict:
        """The term with every default written out, as a spec file holds it."""
        return {"name": self.name, "type": self.type, "beta": self.beta, "schedule": self.schedule,
                **copy.deepcopy(self.options)}


@dataclass(frozen=True)
class Method:
    """A method's terms, resolved and checked once (:meth:`resolve`), and the plugins that
    register their types. A run spec holds one (at.spec.RunSpec.method); the objective, the
    sweep and the grid read its terms instead of checking a dict again."""

    terms: tuple[Term, ...]
    plugins: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, spec: object) -> Method:
        """The method of a spec dict (params.yaml's, a spec file's), checked, with every
        default filled in; a Method as it is. ValueError naming the term and key otherwise."""
        if isinstance(spec, Method):
            return spec
        terms = tuple(resolve_method(spec))
        plugins = spec.get("plugins") if isinstance(spec, Mapping) else None
        return cls(terms=terms, plugins=tuple(plugins or ()))

    @property
    def needs_teacher(self) -> bool:
        """Whether a term's type needs a teacher (kd, at, factt, grad_at, ...)."""
        return any(term.kind.needs_teacher for term in self.terms)

    def to_dict(self) -> dict:
        """The JSON form (docs/interfaces.md): two specs that differ only in defaults left out
        or written out give the same dict."""
        terms = [term.to_dict() for term in self.terms]
        return {"plugins": list(self.plugins), "terms": terms} if self.plugins else {"terms": terms}


def schedule_factor(schedule: str, progress: Progress) -> float:
    """The multiplier of beta at `progress`."""
    if schedule == Schedule.CONSTANT:
        return 1.0
    if schedule == Schedule.LR:
        return float(progress.lr_factor)
    if schedule == Schedule.LINEAR:
        return 1.0 - progress.epoch / progress.epochs
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# Spec checking


def _taken_by_module_dict(name: str) -> bool:
    """Whether a term of this name cannot key the Objective's ModuleDict of term state (its own
    attributes: ``update``, ``keys``, ``train``, ...). Imports torch, so it is asked only of names
    other than the built-in types' (free, tests/test_method.py checks): a grid of built-in terms
    is checked without torch (at.lazy)."""
    from torch import nn

    return hasattr(nn.ModuleDict(), name)


def _check_term(index: int, raw: object) -> Term:
    where = f"method term {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with a 'type' key, got {shown(raw)}")
    record = _known_type(where, raw.get("type"))
    where = f"method term {index} (type {record.name!r})"
    keys = record.keys()
    allowed = [*COMMON_KEYS, *keys]
    for key in raw:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {shown(key)}; allowed: {', '.join(sorted(allowed))}")
    try:
        options = {}
        for key, option in keys.items():
            if key in raw:
                options[key] = option.check(key, raw[key])
            elif option.default is REQUIRED:
                raise ValueError(f"key {shown(key)} is required (term type {record.name!r} has no default)")
            else:
                options[key] = copy.deepcopy(option.default)  # a list default is not shared
        if "beta" not in raw and record.beta is REQUIRED:
            raise ValueError(f"key 'beta' is required (term type {record.name!r} has no default weight)")
        beta = non_negative_number("beta", raw.get("beta", record.beta))
        schedule = one_of(SCHEDULES)("schedule", raw.get("schedule", DEFAULT_SCHEDULE))
        name = term_name(raw)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"name must be letters, digits, '_' or '-' (not starting with a digit or '-'), got {shown(name)}"
            )
        if name not in BUILT_IN_TERM_TYPES and _taken_by_module_dict(name):
            raise ValueError(f"name {shown(name)} is taken by torch's ModuleDict, which holds term state; "
                             "choose another")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return Term(name=name, type=record.name, beta=float(beta), schedule=schedule, options=options)


def term_name(raw: Mapping) -> object:
    """The name of a term as its spec writes it: its ``name``, else its type."""
    return raw.get("name", raw.get("type"))


def _known_type(where: str, kind: object) -> TermType:
    try:
        return TERM_TYPES.get_or_raise(kind)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def resolve_method(spec: object) -> list[Term]:
    """Check a method spec and return its terms with defaults filled in (importing its plugins
    first, so that the term types they register are known). A resolved :class:`Method`'s terms
    as they are."""
    if isinstance(spec, Method):
        return list(spec.terms)
    if not isinstance(spec, dict):
        raise ValueError(f"a method spec must be a mapping with key 'terms', got {shown(spec)}")
    for key in spec:
        if key not in SPEC_KEYS:
            raise ValueError(f"method spec: unknown key {shown(key)}; allowed: {', '.join(SPEC_KEYS)}")
    if "plugins" in spec:
        import_plugins(spec["plugins"], "method spec")
    raw_terms = spec.get("terms")
    if not isinstance(raw_terms, list) or not raw_terms:
        raise ValueError(f"method spec: 'terms' must be a non-empty list, got {shown(raw_terms)}")
    terms = [_check_term(i, raw) for i, raw in enumerate(raw_terms)]
    seen: set[str] = set()
    for term in terms:
        # Terms are reported by name (history.csv columns loss_<name>): one term per name.
        if term.name in seen:
            raise ValueError(
                f"method spec: term name {term.name!r} appears twice; give the terms distinct "
                "'name' keys (a term's name defaults to its type)"
            )
        seen.add(term.name)
    return terms


def validate_method(spec: object) -> None:
    """Raise ValueError naming the bad key/value (and the allowed ones) if `spec` is not a valid
    method spec. Needs no model: the params.yaml schema check calls it. Whether the method has
    the teacher it needs is checked by Objective (and by `requires_teacher` for the grid)."""
    resolve_method(spec)


def requires_teacher(spec: object) -> bool:
    """Whether the method (a spec dict, checked, or a resolved :class:`Method`) has a term whose
    type needs a teacher."""
    return Method.resolve(spec).needs_teacher


def normalise_method(spec: object) -> dict:
    """The method spec with every term's defaults written out (name, beta, schedule, options):
    two specs that differ only in defaults left out or written out give the same dict."""
    return Method.resolve(spec).to_dict()


__all__ = [
    "BASELINE_METHOD",
    "DEFAULT_SCHEDULE",
    "SCHEDULES",
    "TERM_TYPES",
    "BoundTerm",
    "Method",
    "Schedule",
    "Progress",
    "StepInputs",
    "StepResult",
    "TeacherOutput",
    "Term",
    "TermType",
    "import_plugins",
    "register_term",
    "requires_teacher",
    "resolve_method",
    "normalise_method",
    "schedule_factor",
    "validate_method",
]
