"""Term-type records and the registries: what cannot be registered, and what a record drives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import at.terms
from at.attention import MAPPINGS, register_mapping
from at.method import Progress, requires_teacher, validate_method
from at.objective import Objective
from at.registry import Registry
from at.term_type import (
    GRADIENT_SOURCES,
    REQUIRED,
    TERM_TYPES,
    Option,
    TermType,
    positive_number,
    register_term,
)


def _value(step, term):
    return step.student_logits.float().pow(2).mean()


@pytest.mark.parametrize(
    "make,error,needle",
    [
        (lambda: "not a record", TypeError, "needs a TermType record"),
        (lambda: TermType("t_bad", None), TypeError, "value must be a function"),
        (lambda: TermType("t_bad", _value, options={"beta": Option(1.0)}), ValueError, "'beta' is common"),
        (lambda: TermType("t_bad", _value, options={"name": Option("x")}), ValueError, "'name' is common"),
        (lambda: TermType("t_bad", _value, tap_pairs=True, needs_teacher=True, options={"layers": Option("all")}),
         ValueError, "'layers' is common"),
        (lambda: TermType("t_bad", _value, options={"k": 3}), TypeError, "must be declared as an Option"),
        (lambda: TermType("t_bad", _value, beta=-1.0), ValueError, "default beta must be a finite number >= 0"),
        (lambda: TermType("t_bad", _value, input_gradients=frozenset({"teacher_flipped"})), ValueError,
         "unknown input gradients ['teacher_flipped']; allowed: student, student_flipped, teacher"),
        (lambda: TermType("t_bad", _value, compares_logits=True), ValueError, "set needs_teacher=True"),
        (lambda: TermType("t_bad", _value, tap_pairs=True), ValueError, "set needs_teacher=True"),
        (lambda: TermType("t_bad", _value, input_gradients=frozenset({"teacher"})), ValueError, "set needs_teacher"),
        (lambda: TermType("t_bad", _value, build=lambda pairs: None), ValueError, "needs tap_pairs=True"),
        (lambda: TermType("at", _value), ValueError, "term type 'at' is already registered"),
        (lambda: TermType("", _value), ValueError, "term type name '' is not a valid name"),
    ],
)
def test_register_term_refuses_incomplete_or_inconsistent_records(make, error, needle):
    before = list(TERM_TYPES)
    with pytest.raises(error) as err:
        register_term(make())
    assert needle in str(err.value)
    assert list(TERM_TYPES) == before


def test_registries_are_read_only_mappings():
    with pytest.raises(TypeError):
        TERM_TYPES["t_new"] = TermType("t_new", _value)
    with pytest.raises(TypeError):
        MAPPINGS["mean"] = lambda a, p: a.abs().pow(p).mean(1)
    assert "t_new" not in TERM_TYPES and "mean" not in MAPPINGS


def test_registering_the_same_record_twice_is_a_no_op_and_unregister_undoes():
    record = TermType("t_twice", _value)
    assert register_term(record) is record
    try:
        assert register_term(record) is record
        assert list(TERM_TYPES).count("t_twice") == 1
        with pytest.raises(ValueError, match="already registered"):
            register_term(TermType("t_twice", _value))
    finally:
        TERM_TYPES.unregister("t_twice")
    assert "t_twice" not in TERM_TYPES
    with pytest.raises(KeyError, match="not registered"):
        TERM_TYPES.unregister("t_twice")


def _int_entry(name, entry):
    if not isinstance(entry, int):
        raise TypeError(f"colour {name!r} needs an int")


def test_registry_checks_entries_with_its_own_check():
    registry = Registry("colour", _int_entry)
    registry.register("red", 1)
    with pytest.raises(TypeError, match="colour 'blue' needs an int"):
        registry.register("blue", "b")
    with pytest.raises(ValueError, match="unknown colour 'blue'; allowed: red"):
        registry.get_or_raise("blue")
    assert dict(registry) == {"red": 1} and len(registry) == 1


def test_the_seven_built_in_types_and_what_their_records_say():
    assert list(TERM_TYPES)[:7] == ["ce", "kd", "at", "factt", "grad_at", "symmetry", "min_l2"]
    records = {r.name: r for r in (at.terms.CE, at.terms.KD, at.terms.AT, at.terms.FACTT, at.terms.GRAD_AT,
                                   at.terms.SYMMETRY, at.terms.MIN_L2)}
    assert all(TERM_TYPES[name] is record for name, record in records.items())
    assert {n for n, r in records.items() if r.needs_teacher} == {"kd", "at", "factt", "grad_at"}
    assert {n for n, r in records.items() if r.tap_pairs} == {"at", "factt"}
    assert {n: set(r.input_gradients) for n, r in records.items() if r.input_gradients} == {
        "grad_at": {"student", "teacher"}, "symmetry": {"student", "student_flipped"}, "min_l2": {"student"}}
    assert {n for n, r in records.items() if r.beta is REQUIRED} == {"grad_at", "symmetry", "min_l2"}
    assert set(GRADIENT_SOURCES) == {"student", "student_flipped", "teacher"}


class _TwoTaps(torch.nn.Module):
    """Taps of different spatial sizes in student and teacher when `pool` differs."""

    def __init__(self, width, pool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.pool = pool
        self.fc = torch.nn.Linear(width, 4)

    def forward(self, x):
        a = torch.tanh(self.conv(x))
        tap = F.avg_pool2d(a, self.pool) if self.pool > 1 else a
        return self.fc(a.mean((2, 3))), [tap]


def _channel_means_l2(step, term):
    """A tap-pair term that compares per-channel means, so it tolerates unequal H, W."""
    total = 0
    for i in term.layers:
        s, t = step.student_taps[i].mean((2, 3)), step.teacher_taps[i].mean((2, 3))
        total = total + (s.mean(1) - t.mean(1)).pow(2).mean() * term.options["scale"]
    return total


def test_a_record_decides_spatial_matching_options_and_teacher_need():
    record = TermType("t_channel_means", _channel_means_l2, needs_teacher=True, tap_pairs=True,
                      same_spatial=False, options={"scale": Option(REQUIRED, positive_number)})
    register_term(record)
    try:
        torch.manual_seed(0)
        student, teacher = _TwoTaps(2, pool=1), _TwoTaps(3, pool=2).eval().requires_grad_(False)
        spec = {"terms": [{"type": "t_channel_means", "scale": 2.0}]}
        assert requires_teacher(spec)
        with pytest.raises(ValueError, match="key 'scale' is required"):
            validate_method({"terms": [{"type": "t_channel_means"}]})
        with pytest.raises(ValueError, match="scale must be a finite number > 0, got 0"):
            validate_method({"terms": [{"type": "t_channel_means", "scale": 0}]})
        with pytest.raises(ValueError, match="need a teacher"):
            Objective(spec, student, None, (3, 8, 8))
        # 8x8 against 4x4 taps: accepted because the record says so, while AT refuses them
        objective = Objective(spec, student, teacher, (3, 8, 8))
        with pytest.raises(ValueError, match="spatial sizes must match"):
            Objective({"terms": [{"type": "at"}]}, student, teacher, (3, 8, 8))
        x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
        result = objective(x, y, Progress(0, 1))
        s_tap, t_tap = student(x)[1][0], teacher(x)[1][0]
        want = 2.0 * (s_tap.mean((1, 2, 3)) - t_tap.mean((1, 2, 3))).pow(2).mean()
        torch.testing.assert_close(result.terms["t_channel_means"], want.detach())
    finally:
        TERM_TYPES.unregister("t_channel_means")


def test_register_mapping_refuses_an_entry_without_a_function():
    before = list(MAPPINGS)
    for entry, needle in ((None, "needs a function F(activation, p)"), ("sum", "needs a function"),
                          (lambda a: a, "must take (activation, p)")):
        with pytest.raises(TypeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            register_mapping("mean", entry)
    with pytest.raises(ValueError, match="attention mapping 'sum' is already registered"):
        register_mapping("sum", lambda a, p: a)
    assert list(MAPPINGS) == before
