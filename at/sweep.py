"""A sweep: one key of one loss term of a cell's method, over a list of values.

Declared on a table row of params.yaml (docs/extending.md, "Sweeps")::

    sum-p4: {method: at-sum-p4, sweep: {beta: [100, 300, 1000, 3000]}}

The row stays as it is (the paper's cell), and each value adds a row of its own,
``sum-p4/beta=300``, whose method is the row's method with that key of that term set to the
value. Its runs are named by the method and the value (``.../at-sum-p4/beta=300/seed0``), so
the value is in every id, path, DVC stage and Snakemake job; a value that leaves the method as it
is (the method's own value, written out or a default) gives the method's own name, so that row is
filled by the very runs of the unswept row.

Which term a key names: ``term.key`` names the term called ``term`` (its ``name``, by default its
type); a bare ``key`` names the one term that writes the key out in params.yaml or, if none
does, the one whose type declares it (``beta`` and ``schedule`` are every term's). Where several
terms qualify the bare key is refused: ``at+kd``'s ``beta`` is ``at``'s (the only one written
out), its ``kd.beta`` must be spelled so. Ids spell the key bare wherever that names the same
term, so ``at.beta`` and ``beta`` give the same runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from at import names
from at.errors import shown
from at.method import WEIGHT_KEYS, Method, term_name
from at.term_type import TERM_TYPES

# keys of a term that a sweep may set besides its type's own (its type and name are what the
# term is, not hyperparameters)
COMMON_SWEEP_KEYS = WEIGHT_KEYS


def sweepable_keys(term) -> list[str]:
    """The keys of one resolved term (at.method.Term) that a sweep may set."""
    return [*COMMON_SWEEP_KEYS, *term.kind.keys()]


def value_text(value) -> str:
    """How a value is spelled in a row name and a run id: 300 and 300.0 alike as 300, other
    floats in their shortest exact form (0.5, 1e-05), names as they are."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Sweep:
    """One row's sweep, resolved against the method of one of its cells."""

    row: str            # the declared row
    method_name: str    # the method swept
    term: str           # the name of the term whose key is swept
    key: str            # the key of that term
    label: str          # the key as ids spell it: `key`, or `term.key` where a bare key is ambiguous
    values: tuple       # as params.yaml lists them
    own: object         # the method's own value of the key (its default where it writes none)

    def row_of(self, value) -> str:
        """The row a value adds: sum-p4/beta=300."""
        return f"{self.row}/{self.label}={value_text(value)}"

    def method(self, spec: dict, value) -> dict:
        """The method spec with the swept key of the swept term set to ``value``."""
        swept = copy.deepcopy(spec)
        for raw in swept["terms"]:
            if term_name(raw) == self.term:
                raw[self.key] = value
        return swept

    def method_name_of(self, spec: dict, value) -> str:
        """The method name in the ids of a value's runs: the method's own where the value
        changes nothing (so those runs are the unswept row's), else at-sum-p4/beta=300."""
        if Method.resolve(self.method(spec, value)) == Method.resolve(spec):
            return self.method_name
        return f"{self.method_name}/{self.label}={value_text(value)}"


def _term_of(key: str, terms: list, raw_terms: list) -> tuple[object | None, list]:
    """The term a bare key names, and the terms that qualify (several: ambiguous)."""
    declaring = [t for t in terms if key in sweepable_keys(t)]
    written = [t for t, raw in zip(terms, raw_terms) if t in declaring and key in raw]
    candidates = written or declaring
    return (candidates[0] if len(candidates) == 1 else None), candidates


def resolve(where: str, row: str, method_name: str, spec: dict, declared: dict) -> Sweep:
    """The sweep ``declared`` on ``row`` ({key: [values]}), for a cell whose method is
    ``method_name`` (``spec``); ValueError naming ``where``, the method and the keys it has."""
    (written_key, values), = declared.items()   # the schema allows one key per row
    terms = list(Method.resolve(spec).terms)
    raw_terms = spec["terms"]
    every = ", ".join(f"{t.name}.{k}" for t in terms for k in sweepable_keys(t))
    if "." in written_key:
        term_name, key = written_key.split(".", 1)
        term = next((t for t in terms if t.name == term_name), None)
        if term is None:
            raise ValueError(f"{where}: method {method_name!r} has no term named {term_name!r}; "
                             f"its terms: {', '.join(t.name for t in terms)}")
        if key not in sweepable_keys(term):
            raise ValueError(f"{where}: term {term_name!r} of method {method_name!r} has no key {key!r}; "
                             f"its terms' keys: {every}")
    else:
        key = written_key
        term, candidates = _term_of(key, terms, raw_terms)
        if not candidates:
            raise ValueError(f"{where}: no term of method {method_name!r} declares key {key!r}; "
                             f"its terms' keys: {every}")
        if term is None:
            raise ValueError(f"{where}: key {key!r} could be any of the terms "
                             f"{', '.join(t.name for t in candidates)} of method {method_name!r}: "
                             f"write term.key, e.g. {candidates[-1].name}.{key}")
    label = key if _term_of(key, terms, raw_terms)[0] is term else f"{term.name}.{key}"
    own = term.value(key)
    sweep = Sweep(row=row, method_name=method_name, term=term.name, key=key, label=label,
                  values=tuple(values), own=own)
    seen: dict[str, object] = {}
    for value in values:
        text = value_text(value)
        # the value's runs are named by it (.../at-sum-p4/beta=300/seed0): that part of their ids
        # is a folder name, so it obeys the names rule (1e308 is spelled with 309 digits)
        part = f"{label}={text}"
        if not names.is_name(part):
            length = f" ({len(part)} characters)" if len(part) > names.NAME_MAX else ""
            raise ValueError(f"{where}: value {shown(value)} would name its runs {shown(part)}{length}: "
                             f"a run-id part must be {names.NAME_RULE}")
        if text in seen:
            raise ValueError(f"{where}: values {shown(seen[text])} and {shown(value)} are the same value")
        seen[text] = value
        try:
            Method.resolve(sweep.method(spec, value))   # the term's own check of the value
        except ValueError as e:
            raise ValueError(f"{where}: value {shown(value)} of {written_key}: {e}") from None
    return sweep
