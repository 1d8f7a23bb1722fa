"""at.paper holds exactly the numbers of the paper's tables (shared/paper/PAPER.md)."""

import pytest

from at import paper

# Written out again from PAPER.md, independently of at/paper.py.
EXPECTED = {
    "table1": {
        "nin-thin_from_nin-wide": [9.38, 8.93, 9.05, 8.55, 8.33, 7.28],
        "wrn-16-1_from_wrn-16-2": [8.77, 7.93, 8.51, 7.41, 7.51, 6.31],
        "wrn-16-1_from_wrn-40-1": [8.77, 8.25, 8.62, 8.39, 8.01, 6.58],
        "wrn-16-2_from_wrn-40-2": [6.31, 5.85, 6.24, 6.08, 5.71, 5.23],
    },
    "table2": {
        "none": [8.77], "sum-p1": [7.99], "sum-p2": [7.93], "sum-p4": [8.09], "max-p1": [8.08],
    },
    "table3": {
        "baseline": [13.5], "min-l2": [12.5], "grad-at": [12.1], "kd": [12.1],
        "symmetry": [11.8], "at": [11.2],
    },
    "table4": {
        "student": [28.5, 28.2], "kd": [27, 28.1], "at": [27, 27.1], "teacher": [26.5, 26],
    },
    "imagenet": {"resnet18": [30.4, 10.8], "resnet18_at": [29.3, 10.0]},
}
COLUMNS = {
    "table1": ["student", "at", "factt", "kd", "at+kd", "teacher"],
    "table2": ["error"],
    "table3": ["error"],
    "table4": ["cub", "scenes"],
    "imagenet": ["top1", "top5"],
}


def test_tables_and_order():
    assert paper.table_names() == ["table1", "table2", "table3", "table4", "imagenet"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_number_present_and_no_extra_cell(name):
    spec = paper.TABLES[name]
    assert list(spec["rows"]) == list(EXPECTED[name])
    assert list(spec["columns"]) == COLUMNS[name]
    assert list(spec["values"]) == list(EXPECTED[name])
    for row, numbers in EXPECTED[name].items():
        assert list(spec["values"][row]) == COLUMNS[name]
        assert [spec["values"][row][c] for c in COLUMNS[name]] == numbers
        for column, number in zip(COLUMNS[name], numbers):
            assert paper.value(name, row, column) == number


def test_cells_count_matches_paper():
    assert len(paper.cells()) == 24 + 5 + 6 + 8 + 4


def test_labels():
    t1 = paper.TABLES["table1"]
    assert list(t1["columns"].values()) == ["Student", "AT", "F-ActT", "KD", "AT+KD", "Teacher"]
    assert t1["rows"]["nin-thin_from_nin-wide"]["student"] == "NIN-thin, 0.2M"
    assert t1["rows"]["nin-thin_from_nin-wide"]["teacher"] == "NIN-wide, 1M"
    assert t1["rows"]["wrn-16-2_from_wrn-40-2"]["teacher"] == "WRN-40-2, 2.2M"
    t2 = paper.TABLES["table2"]
    assert [r["label"] for r in t2["rows"].values()] == [
        "no attention transfer", "F_sum", "F_sum^2", "F_sum^4", "F_max^1"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_table_is_described(name):
    spec = paper.TABLES[name]
    for key in ("title", "caption", "dataset", "column_header"):
        assert isinstance(spec[key], str) and spec[key].strip(), key
    for row in spec["rows"].values():
        assert row["label"]
        for header in spec["row_header"]:
            assert row[header]


def test_get_table_is_a_copy():
    t = paper.get_table("table2")
    t["values"]["none"]["error"] = 0.0
    assert paper.value("table2", "none", "error") == 8.77


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="table9"):
        paper.get_table("table9")
    with pytest.raises(ValueError, match="known rows"):
        paper.check_cell("table1", "wrn-16-1", "at")
    with pytest.raises(ValueError, match="known columns"):
        paper.check_cell("table1", "wrn-16-1_from_wrn-16-2", "fitnet")
