"""references.yaml holds exactly the published numbers (shared/paper/PAPER.md, and Tian et al.
for `beyond`), each table with its source; at.references refuses malformed files."""

import copy
from pathlib import Path

import pytest
import yaml

from at import references

REPO = Path(__file__).resolve().parents[1]

# Written out again from PAPER.md, independently of references.yaml.
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
    # Tian et al., CRD (ICLR 2020), Table 1, WRN-40-2 -> WRN-16-2 top-1 accuracy (%) on
    # CIFAR-100: student 73.26, KD 74.92, AT 74.08, teacher 75.61; recorded as error.
    "beyond": {"student": [100 - 73.26], "kd": [100 - 74.92], "at": [100 - 74.08],
               "teacher": [100 - 75.61]},
}
COLUMNS = {
    "table1": ["student", "at", "factt", "kd", "at+kd", "teacher"],
    "table2": ["error"],
    "table3": ["error"],
    "table4": ["cub", "scenes"],
    "imagenet": ["top1", "top5"],
    "beyond": ["error"],
}


@pytest.fixture(scope="module")
def tables():
    return references.load(REPO / "references.yaml")


def test_tables_and_order(tables):
    assert list(tables) == ["table1", "table2", "table3", "table4", "imagenet", "beyond", "sensitivity"]


def test_the_sensitivity_table_quotes_the_papers_own_cells(tables):
    """Its numbers are Table 2's (no transfer, F_sum^2, F_sum^4) and Table 1's KD, F-ActT and
    AT+KD, not new ones (AT+KD at the study's best weights has none)."""
    values = tables["sensitivity"].values
    t1, t2 = tables["table1"].values, tables["table2"].values
    assert {r: v["error"] for r, v in values.items()} == {
        "none": t2["none"]["error"], "sum-p2": t2["sum-p2"]["error"], "sum-p4": t2["sum-p4"]["error"],
        "kd": t1["wrn-16-1_from_wrn-16-2"]["kd"], "factt": t1["wrn-16-1_from_wrn-16-2"]["factt"],
        "at+kd": t1["wrn-16-1_from_wrn-16-2"]["at+kd"]}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_number_present_and_no_extra_cell(tables, name):
    spec = tables[name]
    assert list(spec.rows) == list(EXPECTED[name])
    assert list(spec.columns) == COLUMNS[name]
    assert list(spec.values) == list(EXPECTED[name])
    for row, numbers in EXPECTED[name].items():
        assert list(spec.values[row]) == COLUMNS[name]
        for column, number in zip(COLUMNS[name], numbers):
            assert spec.value(row, column) == pytest.approx(number, abs=1e-9)


def test_every_table_cites_its_source(tables):
    for name, spec in tables.items():
        assert spec.source["paper"] and spec.source["table"], name
        assert "arxiv" in spec.source or "url" in spec.source, name
    assert tables["table3"].citation() == (
        'Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, Table 3, '
        "arXiv:1612.03928")
    assert "Contrastive Representation Distillation" in tables["beyond"].citation()
    assert "arXiv:1910.10699" in tables["beyond"].citation()


def test_labels(tables):
    t1 = tables["table1"]
    assert list(t1.columns.values()) == ["Student", "AT", "F-ActT", "KD", "AT+KD", "Teacher"]
    assert t1.rows["nin-thin_from_nin-wide"]["student"] == "NIN-thin, 0.2M"
    assert t1.rows["nin-thin_from_nin-wide"]["teacher"] == "NIN-wide, 1M"
    assert t1.rows["wrn-16-2_from_wrn-40-2"]["teacher"] == "WRN-40-2, 2.2M"
    assert [r["label"] for r in tables["table2"].rows.values()] == [
        "no attention transfer", "F_sum", "F_sum^2", "F_sum^4", "F_max^1"]


def test_a_cell_without_a_number_is_valid():
    data = yaml.safe_load((REPO / "references.yaml").read_text())
    del data["tables"]["table2"]["values"]["sum-p4"]
    parsed = references.parse(data)
    assert parsed["table2"].value("sum-p4", "error") is None
    assert parsed["table2"].value("sum-p1", "error") == 7.99
    assert references.parse({"tables": {}}) == {}


@pytest.mark.parametrize("mutate, fragment", [
    (lambda t: t["table2"]["values"]["none"].update(error=-1.0), "tables.table2.values.none.error"),
    (lambda t: t["table2"]["values"]["none"].update(error=101), "in [0, 100]"),
    (lambda t: t["table2"]["values"]["none"].update(error=float("nan")), "in [0, 100]"),
    (lambda t: t["table2"]["values"]["none"].update(error="8.77"), "'8.77'"),
    (lambda t: t["table2"]["values"].update(fitnet={"error": 8.0}), "values.fitnet: unknown row"),
    (lambda t: t["table1"]["values"]["nin-thin_from_nin-wide"].update(fitnet=8.0), "unknown column"),
    (lambda t: t["table3"].pop("source"), "missing ['source']"),
    (lambda t: t["table3"]["source"].pop("arxiv"), "tables.table3.source"),
    (lambda t: t["table4"]["rows"]["kd"].pop("model"), "tables.table4.rows.kd.model"),
])
def test_malformed_references_are_refused(mutate, fragment):
    data = copy.deepcopy(yaml.safe_load((REPO / "references.yaml").read_text()))
    references.parse(data)  # unmutated: valid, so the mutation is the reason
    mutate(data["tables"])
    with pytest.raises(references.ReferencesError) as info:
        references.parse(data)
    assert fragment in str(info.value)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(references.ReferencesError, match="no references file .*references.yaml"):
        references.load(tmp_path / "references.yaml")
    assert references.path_beside(tmp_path / "params.yaml") == tmp_path.resolve() / "references.yaml"
