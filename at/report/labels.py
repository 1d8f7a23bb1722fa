"""Attention mapping functions written as mathematics: F_sum^2 as F_sum² (Markdown), as
$F_{\\mathrm{sum}}^{2}$ (LaTeX tables and matplotlib's mathtext in figures).

references.yaml spells the paper's mapping functions in plain ASCII (F_sum, F_sum^2, F_max^1),
so that the data stays easy to type; each output format gets them the way it shows mathematics.
A CSV keeps the ASCII spelling: it is read by programs.
"""

from __future__ import annotations

import re
from typing import Callable

# F_<name> with an optional ^<power>: the paper's notation (Section 3.1)
_MAPPING = re.compile(r"\bF_([A-Za-z]+)(?:\^(\d+))?")
_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _math(match: re.Match) -> str:
    name, power = match.group(1), match.group(2)
    return rf"$F_{{\mathrm{{{name}}}}}" + (f"^{{{power}}}" if power else "") + "$"


def _split(text: str, plain: Callable[[str], str], math: Callable[[re.Match], str]) -> str:
    """text with every mapping function through `math` and every other piece through `plain`."""
    out, last = [], 0
    for match in _MAPPING.finditer(text):
        out += [plain(text[last:match.start()]), math(match)]
        last = match.end()
    return "".join(out + [plain(text[last:])])


def markdown(text: str) -> str:
    """F_sum^2 -> F_sum²: readable in a Markdown table and in a terminal."""
    return _MAPPING.sub(lambda m: f"F_{m.group(1)}" + (m.group(2) or "").translate(_SUPERSCRIPT), text)


def latex(text: str, escape: Callable[[str], str]) -> str:
    """F_sum^2 -> $F_{\\mathrm{sum}}^{2}$, every other piece through `escape` (LaTeX's specials)."""
    return _split(text, escape, _math)


def mathtext(text: str) -> str:
    """For a matplotlib text: mapping functions as mathtext, any other '$' kept literal (an odd
    number of them would make matplotlib refuse the whole label)."""
    return _split(text, lambda piece: piece.replace("$", r"\$"), _math)
