"""Snakemake's console, folded to a readable width.

Snakemake writes each list of a job on one line: a cohort's outputs (three files per member),
the report's inputs (every file of every run: thousands of characters), the reasons of a dry
run (every rule name). The Snakefile calls `fold_long_lines` once, while Snakemake reads it, so
that every console line it prints after that is at most `WIDTH` characters where it can be
split: a line that is a comma-separated list breaks after a comma and its continuation lines
start under the list's first item. Nothing is dropped: the folded text joins back into the same
line (`unfold`), which is how the tests read a dry run's plan.
"""

from __future__ import annotations

import logging
import re

WIDTH = 120

# "    output: a, b" or "        a, b": the indentation, an optional "key: " and the list
_LIST_LINE = re.compile(r"^(\s*)((?:[A-Za-z_][\w -]*: )?)(.*)$")


def fold(line: str, width: int = WIDTH) -> list[str]:
    """One console line as lines of at most `width` characters, broken after the commas of its
    list; an item longer than the width stays whole on a line of its own."""
    if len(line) <= width or ", " not in line:
        return [line]
    indent, key, rest = _LIST_LINE.match(line).groups()
    hanging = " " * (len(indent) + len(key))
    items = rest.split(", ")
    lines, current = [], indent + key + items[0]
    for item in items[1:]:
        if len(current) + 2 + len(item) <= width:
            current += ", " + item
        else:
            lines.append(current + ",")
            current = hanging + item
    lines.append(current)
    return lines


def unfold(text: str) -> str:
    """Folded text back as Snakemake wrote it: a line that ends with a comma continues on the
    next one."""
    out: list[str] = []
    continued = False
    for line in text.splitlines():
        if continued:
            out[-1] += " " + line.lstrip()
        else:
            out.append(line)
        continued = line.endswith(",")
    return "\n".join(out)


class FoldingFormatter(logging.Formatter):
    """Snakemake's own formatter, its long list lines folded."""

    def __init__(self, inner: logging.Formatter, width: int = WIDTH):
        super().__init__()
        self.inner, self.width = inner, width

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        if not isinstance(text, str):   # Snakemake's formatter may give None for nothing to say
            return text
        return "\n".join(part for line in text.split("\n") for part in fold(line, self.width))


def fold_long_lines(logger: logging.Logger, width: int = WIDTH) -> None:
    """Fold what each of the logger's handlers prints (once: a second call leaves them as they
    are)."""
    for handler in logger.handlers:
        if handler.formatter is not None and not isinstance(handler.formatter, FoldingFormatter):
            handler.setFormatter(FoldingFormatter(handler.formatter, width))
