"""Reading params.yaml: the one definition of the experiment."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from at import schema, yaml_file
from at.errors import ParamsError
from at.method import validate_method
from at.registry import import_plugins

DEFAULT_PATH = Path("params.yaml")


def load(path: Path | str = DEFAULT_PATH) -> dict:
    """The parsed file, checked against params.yaml's schema (at.schema), with the modules of
    its ``plugins`` imported; errors name ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root or pass --params")
    try:
        params = yaml_file.load(path)
    except yaml_file.DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must hold a mapping at its top level")
    schema.check(params, str(path))
    # the user's modules register their models, data sets, term types and mappings before
    # anything names them
    try:
        import_plugins(params.get("plugins") or [], f"{path}: plugins")
    except ValueError as e:
        raise ParamsError(str(e)) from None
    return params


def data_source(params: dict, dataset: str) -> dict:
    """The source of ``dataset`` (url, md5, ...), with the documented environment overrides.

    ``AT_<DATASET>_URL`` and ``AT_<DATASET>_MD5`` (e.g. AT_CIFAR10_URL) replace the url and the
    checksum, so a machine without access to the official host can use a local copy (a path or
    file:// URL) through the same download-and-verify code.
    """
    sources = params.get("data", {})
    if dataset not in sources:
        raise ParamsError(f"data.{dataset}: unknown data set; defined: {', '.join(sorted(sources))}")
    source = dict(sources[dataset])
    prefix = f"AT_{dataset.upper().replace('-', '_')}_"
    for key in ("url", "md5"):
        if os.environ.get(prefix + key.upper()):
            source[key] = os.environ[prefix + key.upper()]
    return source


def method(params: dict, name: str) -> dict:
    methods = params.get("methods", {})
    if name not in methods:
        raise ParamsError(f"methods.{name}: unknown method; defined: {', '.join(sorted(methods))}")
    try:
        validate_method(methods[name])
    except ValueError as e:
        raise ParamsError(f"methods.{name}: {e}") from e
    return methods[name]


def protocol(params: dict, name: str) -> dict:
    protocols = params.get("protocols", {})
    if name not in protocols:
        raise ParamsError(f"protocols.{name}: unknown protocol; defined: {', '.join(sorted(protocols))}")
    return dict(protocols[name])
