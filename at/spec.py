"""The run spec: what one training run computes, resolved once, read by every layer.

A :class:`RunSpec` is filled in from params.yaml by at.grid (or read from a spec file, or built
from `python -m at train`'s arguments) through :meth:`RunSpec.resolve`, which checks every
value against the registries (models, data sets, term types, augmentations, precisions) and
fills in every default. The trainer, the grid, Snakemake's and DVC's job parameters, the MLflow
tags and the report read that record and nothing else, so no layer has a default of its own:
leaving a key out and writing its default out give the same spec, the same data stream and
the same cohort.

The defaults live in two places, each the only one for its part: the protocol's in at.schema
(``PROTOCOL_PROPERTIES``, which also documents params.yaml) and the run's own below
(:data:`RUN_DEFAULTS`). A spec serialises to the JSON of docs/interfaces.md (:meth:`to_dict`),
which is what checkpoints, resume states and Snakemake's job parameters hold; a dict saved by
earlier code, with defaults left out, resolves to the same spec.
"""

from __future__ import annotations

import json

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from at import models, schema
from at.data import datasets
from at.errors import ParamsError, shown
from at.method import Method
from at.registry import import_plugins


@dataclass(frozen=True)
class Protocol:
    """How a run trains (types and defaults: at.schema.PROTOCOL_PROPERTIES)."""

    epochs: int
    batch_size: int
    lr: float
    lr_gamma: float
    lr_drops: tuple[int, ...]
    eval_batch_size: int
    momentum: float
    nesterov: bool
    weight_decay: float
    reset_momentum_at_drops: bool
    train_subset: int | None
    test_subset: int | None
    augment: str
    bn_weight_init: str
    precision: str
    processes: int
    sync_bn: bool

    # the keys that decide the data stream, with the data set, its folder and the seed
    # (at.data.stream). `epochs` is not among them: it decides how long a stream is read.
    STREAM_KEYS = ("batch_size", "train_subset", "test_subset", "augment")

    @classmethod
    def resolve(cls, raw: Mapping | Protocol, where: str = "protocol") -> Protocol:
        if isinstance(raw, Protocol):
            return raw
        if not isinstance(raw, Mapping):
            raise ParamsError(f"{where}: must be a mapping of protocol keys, got {shown(raw)}")
        schema.validate_protocol(dict(raw), where)
        values = {**schema.PROTOCOL_DEFAULTS, **raw}
        values["lr_drops"] = tuple(values["lr_drops"])
        for key in ("lr", "lr_gamma", "momentum", "weight_decay"):
            values[key] = float(values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["lr_drops"] = list(self.lr_drops)
        return values

    def replace(self, **changes) -> Protocol:
        """A copy with ``changes`` (checked like any protocol)."""
        return Protocol.resolve({**self.to_dict(), **changes}, "protocol")

    def learning_rate(self, epoch: int) -> float:
        """lr of 0-based ``epoch``: lr times lr_gamma once for every drop epoch reached.

        With params.yaml's cifar protocol (drops [59, 119, 159]) epochs 0-58 run at lr, 59-118 at
        lr*gamma, and so on."""
        drops = sum(1 for d in self.lr_drops if epoch >= d)
        return self.lr * self.lr_gamma ** drops


assert {f.name for f in dataclasses.fields(Protocol)} == schema.PROTOCOL_KEYS, \
    "at.spec.Protocol and at.schema.PROTOCOL_PROPERTIES must name the same keys"

# The run's keys that may be left out, with their defaults (the protocol's are in at.schema).
# `data_dir` defaults to data/<data set> and `num_classes` to the data set's record.
RUN_DEFAULTS = {"weights": None, "teacher": None, "teacher_weights": None, "teacher_checkpoint": None,
                "profile": "custom", "plugins": ()}


@dataclass(frozen=True)
class RunSpec:
    """One training run: models, method, protocol, seed, data and output folder. Build it with
    :meth:`resolve` (which fills in the defaults), not with the constructor."""

    id: str
    dataset: str
    data_dir: str
    student: str
    weights: str | None
    teacher: str | None
    teacher_weights: str | None
    teacher_checkpoint: str | None
    method_name: str
    method: Method   # the method's terms as typed records, every default filled in
    seed: int
    out_dir: str
    num_classes: int
    protocol: Protocol
    profile: str
    # modules imported before the spec is checked: they register models, data sets, term types
    # or mappings that the spec names (params.yaml's top-level `plugins`; a method lists its own)
    plugins: tuple[str, ...]

    @classmethod
    def resolve(cls, raw: Mapping | RunSpec) -> RunSpec:
        """The spec of a dict (params.yaml's grid, a spec file, a checkpoint), checked and with
        every default filled in; one ParamsError line naming the run and the key otherwise."""
        if isinstance(raw, RunSpec):
            return raw
        if not isinstance(raw, Mapping):
            raise ParamsError(f"a run spec must be a mapping, got {type(raw).__name__}")
        where = f"run {raw.get('id', '(no id)')}"
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ParamsError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
        missing = [k for k in ("id", "dataset", "student", "method_name", "method", "seed", "out_dir", "protocol")
                   if k not in raw]
        if missing:
            raise ParamsError(f"{where}: missing key(s) {missing}")
        values: dict[str, Any] = {**RUN_DEFAULTS, **raw}
        plugins = values["plugins"]
        if not isinstance(plugins, (list, tuple)) or not all(isinstance(m, str) and m for m in plugins):
            raise ParamsError(f"{where}.plugins: must be a list of importable module names, got {shown(plugins)}")
        values["plugins"] = tuple(plugins)
        try:
            import_plugins(list(plugins), f"{where}.plugins")
        except ValueError as e:
            raise ParamsError(str(e)) from None
        for key in ("id", "method_name", "out_dir", "profile"):
            if not isinstance(values[key], str) or not values[key]:
                raise ParamsError(f"{where}.{key}: must be a non-empty string, got {shown(values[key])}")
        seed = values["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ParamsError(f"{where}.seed: must be a non-negative integer, got {shown(seed)}")
        try:
            dataset = datasets.get(values["dataset"])
        except ParamsError as e:
            raise ParamsError(f"{where}.dataset: {e}") from None
        values["data_dir"] = str(values.get("data_dir") or default_data_dir(dataset.name))
        values["num_classes"] = values.get("num_classes", dataset.num_classes)
        for key, weights in (("student", "weights"), ("teacher", "teacher_weights")):
            if key == "teacher" and values[key] is None:
                continue
            try:
                models.check(values[key], values[weights])
            except ValueError as e:
                raise ParamsError(f"{where}.{key}: {e}") from None
        try:
            values["method"] = Method.resolve(values["method"])
        except ValueError as e:
            raise ParamsError(f"{where}.method ({values['method_name']}): {e}") from None
        protocol = Protocol.resolve(values["protocol"], f"{where}: protocol")
        try:
            datasets.check_augment(dataset.name, protocol.augment)
        except ParamsError as e:
            raise ParamsError(f"{where}: protocol.augment: {e}") from None
        values["protocol"] = protocol
        if values["method"].needs_teacher and values["teacher"] is None:
            raise ParamsError(f"{where}: method {values['method_name']!r} needs a teacher, but none is given")
        return cls(**values)

    def to_dict(self) -> dict:
        """The JSON form (docs/interfaces.md): what files and job parameters hold."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["protocol"] = self.protocol.to_dict()
        values["method"] = self.method.to_dict()
        values["plugins"] = list(self.plugins)
        return values

    def replace(self, **changes) -> RunSpec:
        """A copy with ``changes``, checked like any spec (a protocol may be given as a dict)."""
        return RunSpec.resolve({**self.to_dict(), **changes})

    @property
    def stream_key(self) -> tuple:
        """What the run's data stream is a function of: runs with equal keys see the same batches."""
        return (self.dataset, self.data_dir, self.seed,
                *(getattr(self.protocol, k) for k in Protocol.STREAM_KEYS))

    def same_as(self, saved: object) -> bool:
        """Whether ``saved`` (a spec dict from a checkpoint, perhaps written by earlier code with
        defaults left out) is this spec. One that no longer resolves is not."""
        try:
            return RunSpec.resolve(saved) == self
        except (ParamsError, ValueError):
            return False


# A run's resolved spec as a file: beside its outputs in the run folder (at.outdated) and in its
# record (at.records), the same bytes in both.
SPEC_FILE = "spec.json"


def spec_text(spec: RunSpec) -> str:
    return json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n"


def default_data_dir(dataset: str) -> str:
    """Where a downloaded data set lives: data/<name>."""
    return f"data/{dataset}"
