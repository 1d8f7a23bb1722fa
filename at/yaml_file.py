"""Reading the project's YAML files (params.yaml, references.yaml, run specs) strictly.

PyYAML keeps the last of two equal keys in a mapping without a word: a second ``table2:``
block silently replaced Table 2's rows, a repeated ``seeds:`` doubled a profile's grid. Here a
repeated key is an error naming the key and the lines of both occurrences.

An alias (``*name``) stands for the whole node its anchor names, so nine lines of aliases to
aliases ("billion laughs") stand for 10^9 values: PyYAML builds them as shared references, and
the schema's check then walked them for 49 s and 3 GiB, or a message's repr of them ended in a
MemoryError. The composer here counts, as it composes, the values each alias stands for and
refuses a file whose aliases add more than :data:`MAX_ALIASED_VALUES` before anything is built
(a hand-written file reuses a block a few times: references.yaml adds a dozen values), and an
alias inside the node it names (a structure containing itself).
"""

from __future__ import annotations

from pathlib import Path

import yaml

# values that all the aliases of one file may add together; see the module docstring
MAX_ALIASED_VALUES = 10_000


class Refused(yaml.YAMLError):
    """The file is YAML, but of a form the project refuses; the message is one line."""


class DuplicateKeyError(Refused):
    """A mapping gives the same key twice."""


class AliasError(Refused):
    """Aliases that stand for too many values, or for a node that contains them."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping and aliases beyond a bound."""

    def __init__(self, stream):
        super().__init__(stream)
        self._values: dict[int, int] = {}   # id(node) -> values it stands for, aliases expanded
        self._aliased = 0                   # values added by the aliases so far

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)   # None: the base class names the undefined alias
            if node is not None:
                line = event.start_mark.line + 1
                if id(node) not in self._values:   # its anchor's node is still being composed
                    raise AliasError(f"line {line}: alias *{event.anchor} lies inside the node it names "
                                     f"(a structure that contains itself): write the values out")
                self._aliased += self._values[id(node)]
                if self._aliased > MAX_ALIASED_VALUES:
                    raise AliasError(f"line {line}: aliases (*name) stand for more than {MAX_ALIASED_VALUES} "
                                     f"values in all (nested aliases multiply): refused before building "
                                     f"them; write the values out")
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        self._values[id(node)] = 1 + sum(self._values[id(child)] for child in children)
        return node

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
    """Parse ``text`` like ``yaml.safe_load``, refusing duplicate keys (:class:`DuplicateKeyError`)
    and aliases beyond a bound (:class:`AliasError`): both :class:`Refused`, one line."""
    return yaml.load(text, Loader=_StrictLoader)   # noqa: S506 - a SafeLoader subclass


def load(path: str | Path):
    return loads(Path(path).read_text())
