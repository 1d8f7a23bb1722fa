"""The structure of params.yaml as one JSON Schema: keys, types, ranges and allowed values.

:data:`PARAMS_SCHEMA` documents the file and :func:`check` enforces it, with one error line that
names the key path and what is allowed. What a schema cannot see, references between parts
(a cell's unknown model, method or teacher, a profile's unknown table), is checked by
``at.grid.validate`` after this.

Two choices beyond standard JSON Schema, both because YAML is read into Python values:

- ``number`` means a *finite* number: YAML's ``.nan`` and ``.inf`` are floats, and ``nan > 0``
  is false, so ``lr: .nan`` would pass ``exclusiveMinimum: 0``;
- ``integer`` and ``number`` never accept booleans (``epochs: true`` is not 1), as in JSON.

``x-expect`` (ignored by the validator) is the phrase the error message uses for a value that
has the wrong type or range: "must be a positive integer, got 0".
"""

from __future__ import annotations

import math

import jsonschema

from at.choices import Metric, Trained, names
from at.data.augment import Augment
from at.errors import SHOWN_MAX, ParamsError, shown
from at.names import NAME_PATTERN, NAME_RULE
from at.models.catalog import PRETRAINED_WEIGHTS, BnWeightInit
from at.precision import Precision


def _int(minimum: int, expect: str) -> dict:
    return {"type": "integer", "minimum": minimum, "x-expect": expect}


POSITIVE_INT = _int(1, "a positive integer")
POSITIVE_NUMBER = {"type": "number", "exclusiveMinimum": 0, "x-expect": "a positive (finite) number"}
OPTIONAL_POSITIVE_INT = {"type": ["integer", "null"], "minimum": 1, "x-expect": "a positive integer or null"}
SEEDS = {"type": "array", "minItems": 1, "items": _int(0, "a non-negative integer"),
         "x-expect": "a non-empty list of non-negative integers"}
NAMES = {"type": "array", "items": {"type": "string"}, "x-expect": "a list of names"}
# A name that becomes part of a path (runs/<profile>/<run id>/, results/<profile>/<table>.md, an
# MLflow run name): at.names says why and which.
NAME = {"type": "string", "pattern": NAME_PATTERN, "x-expect": f"a name of {NAME_RULE}"}
# Methods, protocols, data sets and profiles are also keys of DVC params paths
# (`methods.kd.terms`, at.dvc_pipeline.train_params), which DVC splits at every dot.
DVC_KEY_NAME = {"type": "string", "pattern": NAME_PATTERN.replace("_.+=-", "_+=-"),
                "x-expect": f"a name of {NAME_RULE.replace('_ . + = -', '_ + = -')} (no dot: DVC "
                            "splits its params paths at dots)"}


def _named(values: dict, names: dict = NAME, **extra) -> dict:
    """An object whose keys are names (:data:`NAME`) and whose values are ``values``."""
    return {"type": "object", "propertyNames": names, "additionalProperties": values, **extra}

# A protocol's keys with their types and ranges and, for the optional ones, their defaults: the
# one place where a default of the training protocol lives (at.spec.Protocol fills them in).
PROTOCOL_PROPERTIES = {
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "eval_batch_size": {**POSITIVE_INT, "default": 512},
    "lr": POSITIVE_NUMBER,
    "lr_drops": {"type": "array", "items": POSITIVE_INT, "x-expect": "a list of positive epoch numbers",
                 "default": []},
    "lr_gamma": POSITIVE_NUMBER,
    "momentum": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "x-expect": "a number in [0, 1)",
                 "default": 0.9},
    "nesterov": {"type": "boolean", "x-expect": "true or false", "default": False},
    "weight_decay": {"type": "number", "minimum": 0, "x-expect": "a non-negative number", "default": 5e-4},
    # the authors re-create the optimizer at each lr drop, which resets the momentum
    "reset_momentum_at_drops": {"type": "boolean", "x-expect": "true or false", "default": True},
    "train_subset": {**OPTIONAL_POSITIVE_INT, "default": None},
    "test_subset": {**OPTIONAL_POSITIVE_INT, "default": None},
    "augment": {"enum": list(names(Augment)), "default": Augment.CROP_FLIP.value},
    # BatchNorm weights of WRNs at init: the authors' code draws them from U(0, 1)
    "bn_weight_init": {"enum": list(names(BnWeightInit)), "default": BnWeightInit.UNIFORM.value},
    "precision": {"enum": list(names(Precision)), "default": Precision.AUTO.value},
    # data parallelism (at.distributed): how many processes (one per GPU) a run trains on, the
    # global batch split across them; and whether BatchNorm normalises over the global batch
    # (at.sync_batchnorm) or over each process's slice
    "processes": {**POSITIVE_INT, "default": 1},
    "sync_bn": {"type": "boolean", "x-expect": "true or false", "default": False},
}
PROTOCOL_KEYS = frozenset(PROTOCOL_PROPERTIES)
PROTOCOL_DEFAULTS = {k: v["default"] for k, v in PROTOCOL_PROPERTIES.items() if "default" in v}
# what a protocol (of params.yaml or a run spec) must give: the keys without a default; a
# profile overrides any subset
PROTOCOL_REQUIRED = [k for k in PROTOCOL_PROPERTIES if k not in PROTOCOL_DEFAULTS]
PROTOCOL_SCHEMA = {"type": "object", "properties": PROTOCOL_PROPERTIES, "required": PROTOCOL_REQUIRED,
                   "additionalProperties": False}
PROTOCOL_OVERRIDE_SCHEMA = {"type": "object", "properties": PROTOCOL_PROPERTIES, "additionalProperties": False}

# What a training job asks for, per process (at.grid.job_resources), where params.yaml's
# resources leave a key out: the defaults' one place.
RESOURCE_DEFAULTS = {"gpu": 0, "cpus_per_task": 1, "mem_mb": 4000, "runtime": 60}
RESOURCES_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    k: {**_int(0, "a non-negative integer"), "default": v} for k, v in RESOURCE_DEFAULTS.items()}}

# A cell's keys (a table, row or column may give any of them; at.grid merges them); the defaults
# of the optional ones are the grid's (at.grid reads CELL_DEFAULTS)
CELL_PROPERTIES = {
    "dataset": {"type": "string"}, "protocol": {"type": "string"}, "student": {"type": "string"},
    "teacher": {"type": "string"}, "method": {"type": "string"},
    "train": {"enum": list(names(Trained)), "default": Trained.STUDENT.value},
    "weights": {"enum": list(PRETRAINED_WEIGHTS), "default": None},
    "teacher_weights": {"enum": list(PRETRAINED_WEIGHTS), "default": None},
    "metric": {"enum": list(names(Metric)), "default": Metric.TOP1.value},
}
CELL_DEFAULTS = {k: v["default"] for k, v in CELL_PROPERTIES.items() if "default" in v}
CELL_SCHEMA = {"type": ["object", "null"], "properties": CELL_PROPERTIES, "additionalProperties": False}
# A row may sweep one key of a term of its method over values (at.sweep checks that the method
# has the key and that each value passes the term's own check): {beta: [100, 300]}, {at.beta: ...}
SWEEP_EXPECT = "a mapping of one term key (key or term.key) to a non-empty list of distinct numbers or names"
SWEEP_SCHEMA = {
    "type": "object", "minProperties": 1, "maxProperties": 1, "x-expect": SWEEP_EXPECT,
    "propertyNames": {"type": "string", "pattern": r"^([A-Za-z_][A-Za-z0-9_-]*\.)?[A-Za-z_][A-Za-z0-9_]*$",
                      "x-expect": "a term key: key or term.key (e.g. beta, at.beta)"},
    "additionalProperties": {"type": "array", "minItems": 1, "x-expect": SWEEP_EXPECT,
                             "items": {"type": ["number", "string"], "x-expect": "a number or a name"}},
}
ROW_SCHEMA = {**CELL_SCHEMA, "properties": {**CELL_PROPERTIES, "sweep": SWEEP_SCHEMA}}
TABLE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["rows", "columns"],
    "properties": {
        **CELL_PROPERTIES,
        "rows": _named(ROW_SCHEMA, minProperties=1),
        "columns": _named(CELL_SCHEMA, minProperties=1),
        "seeds": SEEDS,
        # models whose baseline runs the students learn from, without a cell in the paper
        "teachers": NAMES,
    },
}
# A data set's source: which keys it may have beyond num_classes is the data set's record's
# (at.data.datasets.check_source checks them); the types of the usual ones are here.
DATA_SCHEMA = {
    "type": "object", "additionalProperties": True, "required": ["num_classes"],
    "properties": {
        "url": {"type": ["string", "null"]}, "md5": {"type": ["string", "null"], "pattern": "^[0-9a-f]{32}$",
                                                    "x-expect": "32 lowercase hex digits or null"},
        "train_list": {"type": "string"}, "test_list": {"type": "string"},
        "folder": {"type": ["string", "null"]},
        "num_classes": POSITIVE_INT,
    },
}
# modules imported before anything else is checked: they register models, data sets, term
# types or mappings (at.registry) that params.yaml names
PLUGINS = {"type": "array", "items": {"type": "string", "minLength": 1},
           "x-expect": "a list of importable module names"}
PROFILE_SCHEMA = {
    "type": ["object", "null"], "additionalProperties": False,
    "properties": {
        "tables": NAMES, "seeds": SEEDS, "protocol": PROTOCOL_OVERRIDE_SCHEMA, "resources": RESOURCES_SCHEMA,
        "not_run": {"type": "object", "additionalProperties": {"type": "string"}},
        # one line the report puts first in its README and every table (at.report)
        "purpose": {"type": "string"},
        # the rows of a table the profile runs (default: all of them)
        "rows": _named(NAMES),
    },
}
PARAMS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "params.yaml of attention-transfer",
    "type": "object",
    "additionalProperties": False,
    "required": ["seeds", "data", "protocols", "methods", "tables", "profiles"],
    "properties": {
        "default_profile": {**NAME, "default": "paper"},
        "plugins": PLUGINS,
        "seeds": SEEDS,
        "data": _named(DATA_SCHEMA, DVC_KEY_NAME),
        "protocols": _named(PROTOCOL_SCHEMA, DVC_KEY_NAME),
        # a method's terms are checked by at.method.validate_method (their keys depend on the type)
        "methods": _named({
            "type": "object", "required": ["terms"], "additionalProperties": False,
            "properties": {"terms": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                           "plugins": PLUGINS}}, DVC_KEY_NAME),
        "tables": _named(TABLE_SCHEMA),
        "resources": {"type": "object", "additionalProperties": False, "properties": {"train": RESOURCES_SCHEMA}},
        "profiles": _named(PROFILE_SCHEMA, DVC_KEY_NAME, minProperties=1),
        # runs sharing a data stream train in one process (at.grid.cohorts)
        "cohort": {"type": "object", "additionalProperties": False,
                   "properties": {"max_size": {**POSITIVE_INT, "default": 8}}},
    },
}


def _is_finite_number(checker, instance) -> bool:
    return (isinstance(instance, (int, float)) and not isinstance(instance, bool)
            and math.isfinite(instance))


_BASE = jsonschema.Draft202012Validator
_Validator = jsonschema.validators.extend(
    _BASE, type_checker=_BASE.TYPE_CHECKER.redefine("number", _is_finite_number))
COHORT_DEFAULTS = {k: v["default"] for k, v in PARAMS_SCHEMA["properties"]["cohort"]["properties"].items()}
DEFAULT_PROFILE = PARAMS_SCHEMA["properties"]["default_profile"]["default"]

_Validator.check_schema(PARAMS_SCHEMA)
_PARAMS_VALIDATOR = _Validator(PARAMS_SCHEMA)
_PROTOCOL_VALIDATOR = _Validator(PROTOCOL_SCHEMA)


def _path(where: str, error: jsonschema.ValidationError) -> str:
    parts = [where] if where else []
    return ".".join(parts + [str(p) for p in error.absolute_path]) or "(top level)"


def _message(where: str, error: jsonschema.ValidationError) -> str:
    key = _path(where, error)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed), key=str)   # keys may be numbers too
        return f"{key}: unknown key(s) {shown(unknown)}; allowed: {', '.join(allowed)}"
    if error.validator == "required":
        return f"{key}: {error.message.replace('is a required property', 'is missing')}"
    if error.validator == "enum":
        allowed = ", ".join("null" if v is None else str(v) for v in error.validator_value)
        return f"{key}: unknown value {shown(error.instance)}; allowed: {allowed}"
    if "x-expect" in schema:
        return f"{key}: must be {schema['x-expect']}, got {shown(error.instance)}"
    if error.validator == "type":
        return f"{key}: must be of type {error.validator_value}, got {shown(error.instance)}"
    # jsonschema's own message quotes the value whole
    message = error.message if len(error.message) <= SHOWN_MAX else error.message[:SHOWN_MAX - 3] + "..."
    return f"{key}: {message}"


def _first_error(validator, instance):
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return jsonschema.exceptions.best_match(errors) if errors else None


def check(params: dict, source: str = "params.yaml") -> None:
    """Raise :class:`ParamsError` naming ``source``, the key path and the allowed values if
    ``params`` does not have the structure of :data:`PARAMS_SCHEMA`."""
    error = _first_error(_PARAMS_VALIDATOR, params)
    if error is not None:
        raise ParamsError(f"{source}: {_message('', error)}")


def validate_protocol(protocol: dict, where: str = "protocol") -> None:
    """Check one protocol (of params.yaml, a profile's merge, or a run spec); ``where`` names it."""
    error = _first_error(_PROTOCOL_VALIDATOR, protocol)
    if error is not None:
        raise ParamsError(_message(where, error))
