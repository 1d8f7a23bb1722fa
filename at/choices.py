"""Closed lists of allowed values: one typed enum each, the one place its names are spelled.

A registry (at.registry) holds an *extensible* choice: models, data sets, mappings, term
types, which a plugin adds to. The lists here are closed: the code implements each value
(a schedule's factor, a precision's arithmetic). Each is a :class:`enum.StrEnum` whose
members are the strings params.yaml and the command line spell, so a member compares equal to
the string and serialises as it (JSON, f-strings). The schema's enums, the command line's
``choices=``, the checks and the docs read :func:`names` of the enum; code that acts on one
value names its member (``Schedule.LR``), never the string again.

The lists that belong to one module live there (augmentations: at.data.augment; precisions:
at.precision; schedules: at.method; AT loss forms: at.attention; BatchNorm inits and
pretrained weights: at.models.catalog); below, those of the grid's cells and of the command
line's execution options (backend, layout, compile mode: at.precision reads the layouts too,
and at.execution imports at.precision).
"""

from __future__ import annotations

from enum import StrEnum


def names(choices: type[StrEnum]) -> tuple[str, ...]:
    """The values of a closed list as plain strings, in their order: what a schema's ``enum``,
    argparse's ``choices`` and an error message's "allowed:" take (plain strings, so that YAML
    and JSON writers never meet an enum member)."""
    return tuple(member.value for member in choices)


class Trained(StrEnum):
    """Which model of a table cell trains (params.yaml ``train``): the student, taught by the
    teacher, or the teacher itself as a baseline (a cell of teachers' numbers)."""

    STUDENT = "student"
    TEACHER = "teacher"


class Metric(StrEnum):
    """The number a table cell reports (params.yaml ``metric``); its metrics.json key is
    :data:`METRIC_KEYS`'s."""

    TOP1 = "top1"
    TOP5 = "top5"


# The metrics.json key that holds a cell's number, by the cell's metric.
METRIC_KEYS = {Metric.TOP1: "final_test_error", Metric.TOP5: "final_test_error_top5"}


class Backend(StrEnum):
    """The torch.distributed backend of a run on several processes (`python -m at train
    --backend`): auto picks nccl on CUDA and gloo on the CPU (at.distributed)."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


class Layout(StrEnum):
    """A network's memory layout (`python -m at train --layout`): at.execution says how ``auto``
    decides."""

    AUTO = "auto"
    CONTIGUOUS = "contiguous"
    CHANNELS_LAST = "channels_last"


class Compile(StrEnum):
    """Whether and how a network is compiled (`python -m at train --compile`): at.execution says
    what each mode does."""

    AUTO = "auto"
    OFF = "off"
    ON = "on"
    REDUCE_OVERHEAD = "reduce-overhead"
