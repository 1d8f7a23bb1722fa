"""A loss-term type as one record, and the registry of term types.

A term of a method spec (`{type: at, mapping: sum, p: 2, beta: 1000}`) names a term type. The
type's `TermType` record says everything the rest of the code needs to know about it:

- its keys, each with a default (or none: REQUIRED) and a check (`options`), plus the default of
  `beta`; every term also has `type`, `name` and `schedule` (handled by at.method);
- what it reads: the teacher at all (`needs_teacher`), student and teacher logits of equal
  shape (`compares_logits`), pairs of student/teacher taps chosen by its `layers` key
  (`tap_pairs`, with `same_spatial` when the pair must agree in H and W), input gradients
  (`input_gradients`: of the student, of the student on the flipped batch, of the teacher);
- its state, if any: `build` makes a module from the tap pairs' shapes (F-ActT's projections);
- its value: `value(step: StepInputs, term: BoundTerm) -> scalar Tensor`, before beta.

at.method validates specs, checks shapes and evaluates terms by reading these fields only.
`register_term` adds a type (the seven built-in ones are in at.terms); a module that registers
types can be listed in a method's `plugins` so that every process that reads the spec,
`python -m at train` included, imports it first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from at.choices import names
from at.errors import shown
from at.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor, nn

REQUIRED = object()  # the default of a key without default: the spec must give it



class GradientSource(StrEnum):
    """An input gradient J = dL/dx that a term type may read (its ``input_gradients``): of the
    student, of the student on the horizontally flipped batch, of the teacher."""

    STUDENT = "student"
    STUDENT_FLIPPED = "student_flipped"
    TEACHER = "teacher"


GRADIENT_SOURCES = names(GradientSource)
COMMON_KEYS = ("type", "name", "schedule", "beta")  # every term has them; at.method handles them
LAYERS_KEY = "layers"  # added to the keys of every term type with tap_pairs


# ---------------------------------------------------------------------------------------------
# Keys and their checks. A check gets (key, value), returns the value to use and raises
# ValueError with a message that names the key, the value and what is allowed.


@dataclass(frozen=True)
class Option:
    """One key of a term type: its default (REQUIRED: none) and its check."""

    default: object = REQUIRED
    check: Callable[[str, object], object] = lambda key, value: value


def is_number(value: object) -> bool:
    """A finite int or float (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_number(key: str, value: object) -> object:
    if not is_number(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number > 0, got {shown(value)}")
    return value


def non_negative_number(key: str, value: object) -> object:
    if not is_number(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {shown(value)}")
    return value


def unit_interval(key: str, value: object) -> object:
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{key} must be a number in [0, 1], got {shown(value)}")
    return value


def one_of(choices: Iterable[str]) -> Callable[[str, object], object]:
    """A check that the value is one of `choices`, read at check time (a registry stays live)."""

    def check(key: str, value: object) -> object:
        allowed = list(choices)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"unknown {key} {shown(value)}; allowed: {', '.join(allowed)}")
        return value

    return check


def layer_indices(key: str, value: object) -> object:
    """'all' or a non-empty list of distinct tap indices >= 0."""
    ok = value == "all" or (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
        and len(set(value)) == len(value)
    )
    if not ok:
        raise ValueError(f"{key} must be 'all' or a non-empty list of distinct tap indices >= 0, got {shown(value)}")
    return "all" if value == "all" else list(value)


# ---------------------------------------------------------------------------------------------
# What a term's value function gets


@dataclass
class StepInputs:
    """One step's tensors, as the value functions read them. Teacher fields are None without a
    teacher; `input_gradients` holds J = dL/dx for each source some term of the method needs
    (GRADIENT_SOURCES; the teacher's detached)."""

    labels: Tensor
    student_logits: Tensor
    student_taps: list[Tensor]
    teacher_logits: Tensor | None = None
    teacher_taps: list[Tensor] | None = None
    input_gradients: dict[str, Tensor] = field(default_factory=dict)
    # what terms derive from the teacher's outputs alone (its attention maps, keyed by what they
    # depend on): shared by every objective handed the same TeacherOutput, so a cohort computes
    # each once per batch, not once per member (at.terms)
    teacher_derived: dict = field(default_factory=dict)

    def from_teacher(self, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, a function of the teacher's outputs only, computed once per ``key``
        for everyone sharing this step's teacher output."""
        if key not in self.teacher_derived:
            self.teacher_derived[key] = compute()
        return self.teacher_derived[key]


@dataclass
class BoundTerm:
    """A term of one Objective: its name, resolved options, the tap indices it pairs (empty
    unless its type has tap_pairs) and its state module (None unless its type has build)."""

    name: str
    options: dict
    layers: list[int] = field(default_factory=list)
    state: nn.Module | None = None


TapShape = tuple[int, ...]  # (C, H, W)


@dataclass(frozen=True)
class TermType:
    """Everything about one loss-term type (see the module docstring)."""

    name: str
    value: Callable[[StepInputs, BoundTerm], Tensor]
    options: Mapping[str, Option] = field(default_factory=dict)
    beta: object = 1.0  # default weight, or REQUIRED
    needs_teacher: bool = False
    compares_logits: bool = False
    tap_pairs: bool = False
    same_spatial: bool = True
    input_gradients: frozenset[str] = frozenset()
    build: Callable[[list[tuple[int, TapShape, TapShape]]], nn.Module] | None = None

    def defaults(self) -> dict[str, object]:
        """Its options' defaults (those it has), as a term that writes none of them gets them."""
        return {key: option.default for key, option in self.options.items() if option.default is not REQUIRED}

    def keys(self) -> dict[str, Option]:
        """Its own keys (without the common ones), `layers` included for tap-pair types."""
        keys = dict(self.options)
        if self.tap_pairs:
            keys[LAYERS_KEY] = Option("all", layer_indices)
        return keys


def _check_term_type(name: str, record: object) -> None:
    if not isinstance(record, TermType):
        raise TypeError(f"term type {name!r} must be registered as a TermType record, got {record!r}")
    if record.name != name:
        raise ValueError(f"term type record {record.name!r} registered under another name {name!r}")
    where = f"term type {name!r}"
    if not callable(record.value):
        raise TypeError(f"{where}: value must be a function (StepInputs, BoundTerm) -> Tensor")
    if record.build is not None and not callable(record.build):
        raise TypeError(f"{where}: build must be None or a function of the tap-pair shapes")
    for key, option in record.options.items():
        if key in COMMON_KEYS or (record.tap_pairs and key == LAYERS_KEY):
            raise ValueError(f"{where}: key {key!r} is common to all terms; do not declare it")
        if not isinstance(option, Option):
            raise TypeError(f"{where}: key {key!r} must be declared as an Option, got {option!r}")
    if record.beta is not REQUIRED:
        non_negative_number(f"{where}: default beta", record.beta)
    unknown = set(record.input_gradients) - set(GRADIENT_SOURCES)
    if unknown:
        raise ValueError(f"{where}: unknown input gradients {sorted(unknown)}; allowed: {', '.join(GRADIENT_SOURCES)}")
    reads_teacher = record.compares_logits or record.tap_pairs or GradientSource.TEACHER in record.input_gradients
    if reads_teacher and not record.needs_teacher:
        raise ValueError(f"{where}: it reads the teacher's logits, taps or input gradient: set needs_teacher=True")
    if record.build is not None and not record.tap_pairs:
        raise ValueError(f"{where}: build gets the tap-pair shapes, so it needs tap_pairs=True")


TERM_TYPES: Registry[TermType] = Registry("term type", _check_term_type)


def register_term(record: TermType) -> TermType:
    """Make `record.name` a term type of method specs, for this process.

    For `python -m at train` (a subprocess of Snakemake) to know it, register it at the import
    of a module that the method lists in `plugins` (see at.method). Names are global: a second,
    different record under a taken name is an error.
    """
    if not isinstance(record, TermType):
        raise TypeError(f"register_term needs a TermType record, got {record!r}")
    return TERM_TYPES.register(record.name, record)


__all__ = [
    "GRADIENT_SOURCES",
    "GradientSource",
    "REQUIRED",
    "TERM_TYPES",
    "BoundTerm",
    "Option",
    "StepInputs",
    "TermType",
    "layer_indices",
    "non_negative_number",
    "one_of",
    "positive_number",
    "register_term",
    "unit_interval",
]
