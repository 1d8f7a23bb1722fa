"""A named registry: the one place where the entries of an extensible choice live.

Attention mappings and loss-term types are chosen by name in params.yaml. Each name maps to
exactly one entry (a function, a record) that `register` checks when it is added, so a name
cannot exist without its entry and an unknown name is an error, never a silent fallback.
The registry reads like a read-only mapping (`name in r`, `r[name]`, `list(r)` in
registration order); entries are added only through `register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from at.errors import shown
from at.names import check_name

Entry = TypeVar("Entry")


class Registry(Mapping, Generic[Entry]):
    """name -> entry. `what` names the kind of entry in error messages ("attention mapping");
    `check(name, entry)` raises TypeError/ValueError when an entry is not acceptable."""

    def __init__(self, what: str, check: Callable[[str, Entry], None]) -> None:
        self.what = what
        self._check = check
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, entry: Entry) -> Entry:
        """Add `entry` under `name` and return it. Registering the same entry again under the
        same name is a no-op (a module imported twice); another entry under a taken name is
        an error: names are global and must not be redefined behind the user's back."""
        check_name(name, f"{self.what} name")   # names end up in paths (at.names)
        self._check(name, entry)
        if name in self._entries:
            if self._entries[name] is entry:
                return entry
            raise ValueError(f"{self.what} {shown(name)} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove `name` (tests and interactive sessions that registered a temporary entry)."""
        if name not in self._entries:
            raise KeyError(f"{self.what} {shown(name)} is not registered")
        del self._entries[name]

    def get_or_raise(self, name: object) -> Entry:
        """The entry of `name`, or ValueError naming the allowed names."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.what} {shown(name)}; allowed: {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


def import_plugins(modules: object, where: str = "plugins") -> None:
    """Import the user's modules named by a `plugins` list (params.yaml's top level, a method,
    a run spec): each registers its models, data sets, term types or mappings at import. They
    must be importable where the spec is read, i.e. by `python -m at train`: installed, or on
    PYTHONPATH (the repository root is on it when Snakemake runs the workflow). ``where`` names
    the list in the error."""
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"{where}: plugins must be a list of importable module names, got {shown(modules)}")
    for module in modules:
        try:
            importlib.import_module(module)
        except SystemExit as e:   # sys.exit(0) at import would end the command as a success, silently
            raise ValueError(f"{where}: plugin {shown(module)} called sys.exit({shown(e.code)}) while being imported: "
                             "a plugin registers its entries and returns") from None
        except Exception as e:  # one clear line, whatever went wrong inside the plugin
            raise ValueError(
                f"{where}: plugin {shown(module)} could not be imported ({type(e).__name__}: {e}); "
                "it must be importable by `python -m at train` (installed, or on PYTHONPATH)"
            ) from e
