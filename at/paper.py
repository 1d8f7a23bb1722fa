"""The paper's published numbers (test error, %), as plain data.

Source: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017
(arXiv:1612.03928), Tables 1-4, and the ImageNet numbers of the authors' README
(github.com/szagoruyko/attention-transfer); transcribed in shared/paper/PAPER.md.

The keys below (table, row and column names) are referenced by params.yaml's experiment grid:
renaming one breaks the grid. Titles and captions are our own wording.

Layout of one table:
    title, caption, dataset:  text
    row_header:               header(s) of the row-label column(s), in order
    column_header:            what the columns range over (e.g. "method")
    rows:                     {row key: {"label": text, and one text per extra row_header}}
    columns:                  {column key: display label}, in display order
    values:                   {row key: {column key: test error in %}}

Values are exactly as printed: Table 4 prints e.g. "27 (-1.5)", where the parenthesis is the
difference to the student; only the error (27) is data here.
"""

from __future__ import annotations

import copy

TABLES: dict[str, dict] = {
    "table1": {
        "title": "Table 1: activation-based attention transfer against other transfer methods",
        "caption": (
            "CIFAR-10 test error (%) of a student trained alone, with activation-based attention "
            "transfer (F_sum^2), with full-activation transfer, with knowledge distillation, and "
            "with attention transfer plus distillation, next to its teacher."
        ),
        "dataset": "CIFAR-10",
        "row_header": ["student", "teacher"],
        "column_header": "method",
        "rows": {
            "nin-thin_from_nin-wide": {
                "label": "NIN-thin, 0.2M / NIN-wide, 1M",
                "student": "NIN-thin, 0.2M",
                "teacher": "NIN-wide, 1M",
            },
            "wrn-16-1_from_wrn-16-2": {
                "label": "WRN-16-1, 0.2M / WRN-16-2, 0.7M",
                "student": "WRN-16-1, 0.2M",
                "teacher": "WRN-16-2, 0.7M",
            },
            "wrn-16-1_from_wrn-40-1": {
                "label": "WRN-16-1, 0.2M / WRN-40-1, 0.6M",
                "student": "WRN-16-1, 0.2M",
                "teacher": "WRN-40-1, 0.6M",
            },
            "wrn-16-2_from_wrn-40-2": {
                "label": "WRN-16-2, 0.7M / WRN-40-2, 2.2M",
                "student": "WRN-16-2, 0.7M",
                "teacher": "WRN-40-2, 2.2M",
            },
        },
        "columns": {
            "student": "Student",
            "at": "AT",
            "factt": "F-ActT",
            "kd": "KD",
            "at+kd": "AT+KD",
            "teacher": "Teacher",
        },
        "values": {
            "nin-thin_from_nin-wide": {
                "student": 9.38, "at": 8.93, "factt": 9.05, "kd": 8.55, "at+kd": 8.33,
                "teacher": 7.28,
            },
            "wrn-16-1_from_wrn-16-2": {
                "student": 8.77, "at": 7.93, "factt": 8.51, "kd": 7.41, "at+kd": 7.51,
                "teacher": 6.31,
            },
            "wrn-16-1_from_wrn-40-1": {
                "student": 8.77, "at": 8.25, "factt": 8.62, "kd": 8.39, "at+kd": 8.01,
                "teacher": 6.58,
            },
            "wrn-16-2_from_wrn-40-2": {
                "student": 6.31, "at": 5.85, "factt": 6.24, "kd": 6.08, "at+kd": 5.71,
                "teacher": 5.23,
            },
        },
    },
    "table2": {
        "title": "Table 2: attention mapping functions",
        "caption": (
            "CIFAR-10 test error (%) of a WRN-16-1 student taught by a WRN-16-2 teacher with "
            "activation-based attention transfer, for each function that maps an activation "
            "tensor to a spatial attention map."
        ),
        "dataset": "CIFAR-10",
        "row_header": ["mapping"],
        "column_header": "error",
        "rows": {
            "none": {"label": "no attention transfer", "mapping": "no attention transfer"},
            "sum-p1": {"label": "F_sum", "mapping": "F_sum"},
            "sum-p2": {"label": "F_sum^2", "mapping": "F_sum^2"},
            "sum-p4": {"label": "F_sum^4", "mapping": "F_sum^4"},
            "max-p1": {"label": "F_max^1", "mapping": "F_max^1"},
        },
        "columns": {"error": "Error"},
        "values": {
            "none": {"error": 8.77},
            "sum-p1": {"error": 7.99},
            "sum-p2": {"error": 7.93},
            "sum-p4": {"error": 8.09},
            "max-p1": {"error": 8.08},
        },
    },
    "table3": {
        "title": "Table 3: gradient-based attention transfer",
        "caption": (
            "CIFAR-10 test error (%) of NIN-thin without batch normalisation, trained with "
            "horizontal flips only, under input-gradient penalties (double backpropagation, "
            "gradient-based attention transfer, symmetry norm), distillation and "
            "activation-based attention transfer."
        ),
        "dataset": "CIFAR-10",
        "row_header": ["method"],
        "column_header": "error",
        "rows": {
            "baseline": {"label": "baseline (no attention transfer)",
                         "method": "baseline (no attention transfer)"},
            "min-l2": {"label": "min-l2 (Drucker & LeCun 1992)",
                       "method": "min-l2 (Drucker & LeCun 1992)"},
            "grad-at": {"label": "grad-based AT", "method": "grad-based AT"},
            "kd": {"label": "KD", "method": "KD"},
            "symmetry": {"label": "symmetry norm", "method": "symmetry norm"},
            "at": {"label": "activation-based AT", "method": "activation-based AT"},
        },
        "columns": {"error": "Error"},
        "values": {
            "baseline": {"error": 13.5},
            "min-l2": {"error": 12.5},
            "grad-at": {"error": 12.1},
            "kd": {"error": 12.1},
            "symmetry": {"error": 11.8},
            "at": {"error": 11.2},
        },
    },
    "table4": {
        "title": "Table 4: transfer from ImageNet-pretrained networks",
        "caption": (
            "Test error (%) after fine-tuning ImageNet-pretrained networks on CUB-200-2011 "
            "(birds) and MIT Indoor-67 (scenes): a ResNet-18 student alone, with distillation "
            "and with attention transfer from a fine-tuned ResNet-34 teacher, and the teacher."
        ),
        "dataset": "CUB-200-2011 and MIT Indoor-67",
        "row_header": ["type", "model"],
        "column_header": "transfer",
        "rows": {
            "student": {"label": "student (ResNet-18)", "type": "student", "model": "ResNet-18"},
            "kd": {"label": "KD (ResNet-18)", "type": "KD", "model": "ResNet-18"},
            "at": {"label": "AT (ResNet-18)", "type": "AT", "model": "ResNet-18"},
            "teacher": {"label": "teacher (ResNet-34)", "type": "teacher", "model": "ResNet-34"},
        },
        "columns": {"cub": "ImageNet->CUB", "scenes": "ImageNet->Scenes"},
        "values": {
            "student": {"cub": 28.5, "scenes": 28.2},
            "kd": {"cub": 27.0, "scenes": 28.1},
            "at": {"cub": 27.0, "scenes": 27.1},
            "teacher": {"cub": 26.5, "scenes": 26.0},
        },
    },
    "imagenet": {
        "title": "ImageNet: attention transfer from ResNet-34 to ResNet-18",
        "caption": (
            "ILSVRC2012 validation top-1 and top-5 error (%) of ResNet-18 trained alone and "
            "with activation-based attention transfer from a ResNet-34 on the outputs of its "
            "four groups (numbers from the authors' code repository)."
        ),
        "dataset": "ImageNet (ILSVRC2012)",
        "row_header": ["model"],
        "column_header": "error",
        "rows": {
            "resnet18": {"label": "ResNet-18", "model": "ResNet-18"},
            "resnet18_at": {"label": "ResNet-18 + AT from ResNet-34",
                            "model": "ResNet-18 + AT from ResNet-34"},
        },
        "columns": {"top1": "Top-1", "top5": "Top-5"},
        "values": {
            "resnet18": {"top1": 30.4, "top5": 10.8},
            "resnet18_at": {"top1": 29.3, "top5": 10.0},
        },
    },
}


def table_names() -> list[str]:
    """The tables, in the paper's order."""
    return list(TABLES)


def get_table(name: str) -> dict:
    """A copy of one table, so that callers cannot alter the published numbers by accident."""
    if name not in TABLES:
        raise ValueError(f"unknown paper table {name!r}; known tables: {table_names()}")
    return copy.deepcopy(TABLES[name])


def check_cell(table: str, row: str, column: str) -> None:
    """Raise ValueError unless (table, row, column) names a cell of the paper."""
    spec = get_table(table)
    if row not in spec["rows"]:
        raise ValueError(f"unknown row {row!r} of {table}; known rows: {list(spec['rows'])}")
    if column not in spec["columns"]:
        raise ValueError(
            f"unknown column {column!r} of {table}; known columns: {list(spec['columns'])}"
        )


def value(table: str, row: str, column: str) -> float:
    """The paper's test error (%) of one cell."""
    check_cell(table, row, column)
    return TABLES[table]["values"][row][column]


def cells() -> list[tuple[str, str, str]]:
    """Every (table, row, column) of the paper, in display order."""
    return [
        (name, row, column)
        for name, spec in TABLES.items()
        for row in spec["rows"]
        for column in spec["columns"]
    ]
