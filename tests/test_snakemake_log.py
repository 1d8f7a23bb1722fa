"""Snakemake's console folded to a readable width (at.snakemake_log); the real console of a
pipeline run is checked in test_pipeline.py."""

import logging

from at.snakemake_log import FoldingFormatter, fold, fold_long_lines, unfold

OUTPUTS = "    output: " + ", ".join(f"runs/smoke/cifar10/wrn-16-1_from_wrn-16-2/m{i}/seed0/checkpoint.pt"
                                      for i in range(40))


def test_a_long_list_line_folds_under_its_first_item_and_unfolds_to_the_same_line():
    lines = fold(OUTPUTS, width=120)
    assert len(lines) == 40   # each item is 66 characters: one a line
    assert all(len(line) <= 120 for line in lines)
    assert lines[0].startswith("    output: runs/") and lines[1].startswith(" " * 12 + "runs/")
    assert all(line.endswith(",") for line in lines[:-1]) and not lines[-1].endswith(",")
    assert unfold("\n".join(["rule x:", *lines, "    jobid: 3"])) == "\n".join(["rule x:", OUTPUTS, "    jobid: 3"])


def test_items_are_packed_up_to_the_width_and_a_line_without_a_list_is_left_whole():
    names = "        " + ", ".join(f"train_cohort{i}" for i in range(30))
    lines = fold(names, width=80)
    assert all(len(line) <= 80 for line in lines) and len(lines) < 30
    assert all(line.startswith("        train_cohort") for line in lines)
    assert unfold("\n".join(lines)) == names
    prose = "x" * 400
    assert fold(prose, width=120) == [prose]
    long_item = "    input: " + "a" * 200 + ", b"
    assert fold(long_item, width=120) == ["    input: " + "a" * 200 + ",", " " * 11 + "b"]


def test_the_handlers_of_snakemakes_logger_print_folded_lines_once_wrapped():
    logger = logging.getLogger("test_snakemake_log")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        fold_long_lines(logger)
        fold_long_lines(logger)   # a second call (the Snakefile read again) wraps nothing twice
        assert isinstance(handler.formatter, FoldingFormatter)
        assert not isinstance(handler.formatter.inner, FoldingFormatter)
        logger.warning(OUTPUTS)
    finally:
        logger.removeHandler(handler)
    [text] = records
    assert max(map(len, text.splitlines())) <= 120 and unfold(text) == OUTPUTS
