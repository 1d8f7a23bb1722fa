"""Reading the project's YAML files (params.yaml, references.yaml, run specs) strictly.

PyYAML keeps the last of two equal keys in a mapping without a word: a second ``table2:``
block silently replaced Table 2's rows, a repeated ``seeds:`` doubled a profile's grid. Here a
repeated key is an error naming the key and the lines of both occurrences.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue   # `<<: *base` then a key of base is an override, YAML's own way
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:   # an unhashable key: the base class says so
                    break
                if first is not None:
                    raise DuplicateKeyError(
                        f"key {key!r} is given twice, at line {first + 1} and at line "
                        f"{key_node.start_mark.line + 1}: keep one")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def loads(text: str):
    """Parse ``text`` like ``yaml.safe_load``, refusing duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_StrictLoader)   # noqa: S506 - a SafeLoader subclass


def load(path: str | Path):
    return loads(Path(path).read_text())
