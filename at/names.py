"""Names that become paths, and the check that a path built from them stays where it belongs.

Profiles, tables, rows, columns, methods, data sets, models and run ids end up as folder and
file names (runs/<profile>/<run id>/, results/<profile>/<table>.md) and as MLflow run names.
params.yaml's schema restricts them to :data:`NAME_PATTERN`; :func:`inside` is the second line
of defence for every path the grid and the report compose, so that no name, however it got in
(a plugin's registry, a hand-written spec), makes a write or a Snakemake `directory()`
deletion outside runs/ or results/.
"""

from __future__ import annotations

import re
from pathlib import Path

from at.errors import shown

# one folder name: letters, digits and _ . + = -, not starting with a dot ("..", ".hidden")
NAME_MAX = 64
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.+=-]{{0,{NAME_MAX - 1}}}$"
NAME_RULE = f"at most {NAME_MAX} letters, digits and _ . + = - (starting with a letter or digit)"
_NAME = re.compile(NAME_PATTERN)


def is_name(name) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name, what: str) -> str:
    """``name``, or ValueError naming ``what`` and the rule."""
    if not is_name(name):
        raise ValueError(f"{what} {shown(name)} is not a valid name: use {NAME_RULE}")
    return name


def check_run_id(run_id, what: str = "run id") -> str:
    """A run id is names joined by '/' (e.g. cifar10/wrn-16-1/at-sum-p2/seed0)."""
    if not isinstance(run_id, str) or not all(is_name(part) for part in run_id.split("/")):
        raise ValueError(f"{what} {shown(run_id)} is not valid: use names joined by '/', each {NAME_RULE}")
    return run_id


def inside(root: str | Path, path: str | Path) -> str:
    """``path`` as given, after checking that it resolves to a place under ``root`` (symbolic
    links and '..' followed); ValueError naming both otherwise."""
    base = Path(root).resolve()
    resolved = (Path(path) if Path(path).is_absolute() else Path.cwd() / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{path} would lie outside {root}/ ({resolved}): refusing to write there")
    return str(path)
