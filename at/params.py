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
    except yaml_file.Refused as e:
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


def override_variables(dataset: str) -> dict[str, str]:
    """The environment variables that override a data set's source: {"url": "AT_CIFAR10_URL", ...}."""
    prefix = f"AT_{dataset.upper().replace('-', '_')}_"
    return {key: prefix + key.upper() for key in ("url", "md5")}


def data_source(params: dict, dataset: str, root: str | os.PathLike | None = None) -> dict:
    """The source of ``dataset`` (url, md5, ...), with the documented environment overrides.

    ``AT_<DATASET>_URL`` and ``AT_<DATASET>_MD5`` (e.g. AT_CIFAR10_URL) replace the url and the
    checksum, so a machine without access to the official host can use a local copy (a path or
    file:// URL) through the same download-and-verify code. With neither set and ``root`` (the
    data folder) given, the data already there stays the source while params.yaml names the
    source it was fetched for (its source.json's ``configured``): a shell without the variables
    does not switch (and re-download) the data that an override brought.
    """
    sources = params["data"]
    if dataset not in sources:
        raise ParamsError(f"data.{dataset}: unknown data set; defined: {', '.join(sorted(sources))}")
    source = dict(sources[dataset])
    variables = override_variables(dataset)
    overridden = {key: os.environ[name] for key, name in variables.items() if os.environ.get(name)}
    if overridden:
        return {**source, **overridden}
    if root is not None:
        from at.data.download import read_source_record   # at.data imports this module

        try:
            record = read_source_record(root)
        except ValueError:   # an unreadable record: the download says so, with what to do
            record = {}
        if record.get("configured") == configured_source(params, dataset) and "url" in record:
            return {**source, "url": record["url"], "md5": record.get("md5")}
    return source


def configured_source(params: dict, dataset: str) -> dict:
    """The url and md5 that params.yaml itself names for ``dataset`` (no override)."""
    entry = params["data"][dataset]
    return {"url": entry.get("url"), "md5": entry.get("md5")}


def method(params: dict, name: str) -> dict:
    methods = params["methods"]
    if name not in methods:
        raise ParamsError(f"methods.{name}: unknown method; defined: {', '.join(sorted(methods))}")
    try:
        validate_method(methods[name])
    except ValueError as e:
        raise ParamsError(f"methods.{name}: {e}") from e
    return methods[name]


def protocol(params: dict, name: str) -> dict:
    protocols = params["protocols"]
    if name not in protocols:
        raise ParamsError(f"protocols.{name}: unknown protocol; defined: {', '.join(sorted(protocols))}")
    return dict(protocols[name])
