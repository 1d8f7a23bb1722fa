"""at.report.labels: the paper's mapping functions as mathematics, in each output format."""

import pytest

from at import report
from at.report import figures, labels, tables
from test_report import FOOTER, build_grid, summaries_of


@pytest.mark.parametrize("plain, markdown, math", [
    ("F_sum^2", "F_sum²", r"$F_{\mathrm{sum}}^{2}$"),
    ("F_max^1", "F_max¹", r"$F_{\mathrm{max}}^{1}$"),
    ("F_sum^10", "F_sum¹⁰", r"$F_{\mathrm{sum}}^{10}$"),
    ("F_sum", "F_sum", r"$F_{\mathrm{sum}}$"),
])
def test_each_format_writes_a_mapping_function_its_way(plain, markdown, math):
    assert labels.markdown(plain) == markdown
    assert labels.mathtext(plain) == math
    assert labels.latex(plain, tables.tex_escape) == math
    # inside other words: only the function changes
    assert labels.mathtext(f"AT with {plain} (n=3)") == f"AT with {math} (n=3)"
    assert labels.latex(f"{plain} & 5%", tables.tex_escape) == math + r" \& 5\%"


def test_other_text_is_left_alone():
    for text in ("AT+KD", "WRN-16-1, 0.2M / WRN-16-2, 0.7M", "no attention transfer", "ImageNet->CUB"):
        assert labels.markdown(text) == labels.mathtext(text) == text
    # a lone '$' stays a dollar sign in a figure instead of starting mathematics
    assert labels.mathtext("costs $5 per F_sum^2") == r"costs \$5 per $F_{\mathrm{sum}}^{2}$"


def test_matplotlib_draws_every_label():
    from matplotlib.mathtext import MathTextParser

    parser = MathTextParser("agg")
    for text in ("F_sum^2 (n=5)", "F_max^1", "AT with F_sum^4 and $5"):
        parser.parse(labels.mathtext(text), dpi=100)   # raises on a mathtext error


def test_tables_and_figures_use_them(tmp_path):
    runs, context = build_grid(tmp_path / "runs")
    report.render(runs, tmp_path / "out", context)
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "| F_sum² | 3 |" in md and "F_sum^2" not in md
    tex = (tmp_path / "out" / "table2.tex").read_text()
    assert r"$F_{\mathrm{sum}}^{2}$ & 3 &" in tex
    # Table 1's caption names the mapping too
    assert r"($F_{\mathrm{sum}}^{2}$)" in (tmp_path / "out" / "table1.tex").read_text()
    # the CSV is for programs: the ASCII spelling of references.yaml
    assert "F_sum^2" in (tmp_path / "out" / "table2.csv").read_text()
    summaries, checked = summaries_of(runs, context)
    fig = figures.paired_figure(checked.tables["table2"], summaries["table2"], FOOTER)
    ticks = [t.get_text() for t in fig.get_axes()[0].get_yticklabels()]
    assert ticks == [r"$F_{\mathrm{sum}}$ (n=2)", r"$F_{\mathrm{sum}}^{2}$ (n=2)"]
