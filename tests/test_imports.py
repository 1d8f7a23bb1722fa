"""No import cycle in the package, function-level imports included.

A cycle usually means that a function lives in the wrong module; Python tolerates most of them
at run time (one side imports inside a function), which is how they go unnoticed. This test
reads every module of `at/` with `ast`, takes every import statement wherever it stands, and
fails naming the modules of each cycle it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "at"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from at.data import cifar` imports the module at.data.cifar; `from at.x import f` at.x
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "at":
                found.add(target)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle as a list of modules (each found once, from its smallest module)."""
    cycles = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                cycles.add(tuple(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [list(c) for c in sorted(cycles)]


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    # the detector itself, on a hand-made graph and on source with an import inside a function
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from at.data import stream\n    return stream\n")
    assert imports_of("at.m", source, {"at.data", "at.data.stream", "at.m"}) == {"at.data.stream"}


def test_the_package_has_no_import_cycle():
    known = modules()
    graph = {name: imports_of(name, path, set(known)) for name, path in known.items()}
    assert graph["at.train"], "the import graph is empty: the walker reads nothing"
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles in at/: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


# What the grid side imports: Snakemake's parse of the Snakefile, `python -m at runs | dvc |
# download | tracking-init | report`. None of it trains, and torch's import costs seconds of CPU
# in each of those processes (at.lazy).
GRID_SIDE = ["at.__main__", "at.params", "at.grid", "at.dvc_pipeline", "at.data.download", "at.records",
             "at.provenance", "at.report", "at.references"]


def test_the_grid_side_does_not_import_torch():
    import subprocess
    import sys

    # a fresh interpreter: this one has torch already
    probe = ("import importlib, sys\n"
             f"for name in {GRID_SIDE!r}:\n"
             "    importlib.import_module(name)\n"
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the grid side imports torch: {done.stdout.strip()[:300]}"


def test_a_lazy_module_is_imported_at_its_first_use():
    import subprocess
    import sys

    probe = ("import sys\n"
             "from at import lazy\n"
             "decimal = lazy.module('decimal')\n"
             "assert 'decimal' not in sys.modules, 'imported when named'\n"
             "assert decimal.Decimal('1.5') * 2 == decimal.Decimal('3.0')\n"
             "assert 'decimal' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
