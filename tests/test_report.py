"""at.report: honest, deterministic tables and figures from fake run folders."""

import csv
import json
import re
import statistics
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from at import paper, report
from at.report import attention_maps, cells, figures, inputs, tables

DESC = "smoke profile, CIFAR-10 mini subset (5085 train / 1017 test images), 2 epochs"
T1ROW = "wrn-16-1_from_wrn-16-2"


def cell(table, row, column):
    return {"table": table, "row": row, "column": column}


def write_run(root, run_id, seed, cells, error=None, final_epoch=2, epochs=2, top5=None,
              history=True):
    """A run folder; error None: the run did not finish (no metrics.json)."""
    out = Path(root) / run_id
    out.mkdir(parents=True)
    if error is not None:
        metrics = {"run_id": run_id, "final_test_error": error, "final_epoch": final_epoch,
                   "epochs": epochs}
        if top5 is not None:
            metrics["final_test_error_top5"] = top5
        (out / "metrics.json").write_text(json.dumps(metrics))
        if history:
            lines = ["epoch,lr,train_loss,loss_ce,train_error,test_error,images_per_s,epoch_time_s"]
            for e in range(1, final_epoch + 1):
                # the last epoch's test error is the final one
                te = error + (final_epoch - e) * 5.0
                lines.append(f"{e},0.1,1.0,1.0,50.0,{te},1000.0,1.0")
            (out / "history.csv").write_text("\n".join(lines) + "\n")
    return {"id": run_id, "out_dir": str(out), "cells": cells, "seed": seed,
            "student": "wrn-16-1", "teacher": "wrn-16-2", "method_name": run_id.split("/")[1],
            "dataset": "cifar10"}


# Numbers of the fake grid, kept here to recompute the expected statistics independently.
AT_ERRORS = [61.25, 58.5, 60.0]          # 3 seeds, AT sum-p2: table1 AT and table2 sum-p2
STUDENT_ERRORS = [70.0, 66.5]            # 2 seeds: table1 student and table2 "none"
TEACHER_ERRORS = [55.125]                # 1 seed
KD_ERRORS = [None, 64.0, 63.0]           # seed 0 missing: partial
SUMP1_ERRORS = [59.0, 57.5]


def build_grid(root):
    runs = []
    for s, e in enumerate(AT_ERRORS):
        runs.append(write_run(root, f"at-sum-p2/seed{s}", s,
                              [cell("table1", T1ROW, "at"), cell("table2", "sum-p2", "error")], e))
    for s, e in enumerate(STUDENT_ERRORS):
        runs.append(write_run(root, f"student/seed{s}", s,
                              [cell("table1", T1ROW, "student"), cell("table2", "none", "error")], e))
    for s, e in enumerate(TEACHER_ERRORS):
        runs.append(write_run(root, f"teacher/seed{s}", s, [cell("table1", T1ROW, "teacher")], e))
    for s, e in enumerate(KD_ERRORS):
        runs.append(write_run(root, f"kd/seed{s}", s, [cell("table1", T1ROW, "kd")], e))
    for s, e in enumerate(SUMP1_ERRORS):
        runs.append(write_run(root, f"at-sum-p1/seed{s}", s, [cell("table2", "sum-p1", "error")], e))
    # F-ActT: its only run never finished.
    runs.append(write_run(root, "factt/seed0", 0, [cell("table1", T1ROW, "factt")], None))
    # A run that stopped before its planned epochs (table3 AT).
    runs.append(write_run(root, "nin-at/seed0", 0, [cell("table3", "at", "error")], 40.0,
                          final_epoch=1, epochs=2))
    runs.append(write_run(root, "imagenet/seed0", 0,
                          [cell("imagenet", "resnet18", "top1"), cell("imagenet", "resnet18", "top5")],
                          45.5, top5=20.25))
    context = {"profile": "smoke", "description": DESC,
               "not_run": {"table4": "CUB and Scenes are not downloaded in the smoke profile"}}
    return runs, context


@pytest.fixture
def grid(tmp_path):
    return build_grid(tmp_path / "runs")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One render of the fake grid, shared by the tests that only read its output."""
    root = tmp_path_factory.mktemp("rendered")
    runs, context = build_grid(root / "runs")
    report.render(runs, root / "out", context)
    return root / "out", runs, context


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["row"], r["column"]): r for r in csv.DictReader(f)}


def test_render_is_byte_identical(grid, tmp_path):
    runs, context = grid
    a = report.render(runs, tmp_path / "a", context)
    b = report.render(list(reversed(runs)), tmp_path / "b", context)
    names_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    names_b = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names_a == names_b == sorted(p.name for p in a) == sorted(p.name for p in b)
    for name in names_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    expected = {f"{t}.{ext}" for t in paper.table_names() for ext in ("md", "tex", "csv")}
    expected |= {f"{figures.FIG_CURVES}.png", f"{figures.FIG_CURVES}.pdf",
                 f"{figures.FIG_BARS}.png", f"{figures.FIG_BARS}.pdf", "README.md"}
    assert set(names_a) == expected  # no attention figure: no checkpoint; no temp files left
    assert b"CreationDate" not in (tmp_path / "a" / f"{figures.FIG_BARS}.pdf").read_bytes()


def test_statistics_against_independent_computation(rendered):
    tmp_path, runs, context = rendered
    t1 = read_csv(tmp_path / "table1.csv")

    def check(row, values, paper_value, status):
        mean = statistics.mean(values)
        assert row["n"] == str(len(values))
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4)
        if len(values) > 1:
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        else:
            assert row["std"] == ""
        assert float(row["paper"]) == paper_value
        assert float(row["diff"]) == pytest.approx(mean - paper_value, abs=1e-4)
        assert row["status"] == status

    check(t1[(T1ROW, "at")], AT_ERRORS, 7.93, "ok")
    check(t1[(T1ROW, "student")], STUDENT_ERRORS, 8.77, "ok")
    check(t1[(T1ROW, "teacher")], TEACHER_ERRORS, 6.31, "ok")
    check(t1[(T1ROW, "kd")], [64.0, 63.0], 7.41, "partial")
    t2 = read_csv(tmp_path / "table2.csv")
    check(t2[("sum-p1", "error")], SUMP1_ERRORS, 7.99, "ok")
    imagenet = read_csv(tmp_path / "imagenet.csv")
    check(imagenet[("resnet18", "top1")], [45.5], 30.4, "ok")
    check(imagenet[("resnet18", "top5")], [20.25], 10.8, "ok")

    # Markdown: 2 decimals, std as a dash for n = 1.
    md = (tmp_path / "table1.md").read_text()
    at_mean, at_std = statistics.mean(AT_ERRORS), statistics.stdev(AT_ERRORS)
    assert f"| 3 | {at_mean:.2f} | {at_std:.2f} | 7.93 | {at_mean - 7.93:+.2f} | 2 | ok |" in md
    assert f"| 1 | {TEACHER_ERRORS[0]:.2f} | — | 6.31 | {TEACHER_ERRORS[0] - 6.31:+.2f} |" in md


def test_csv_columns_and_every_paper_cell(rendered):
    tmp_path, runs, context = rendered
    for name in paper.table_names():
        with open(tmp_path / f"{name}.csv", newline="") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == tables.CSV_COLUMNS
            rows = list(reader)
        assert [(r["table"], r["row"], r["column"]) for r in rows] == [
            c for c in paper.cells() if c[0] == name]


def test_shared_run_fills_table1_and_table2(rendered):
    tmp_path, runs, context = rendered
    t1 = read_csv(tmp_path / "table1.csv")[(T1ROW, "at")]
    t2 = read_csv(tmp_path / "table2.csv")[("sum-p2", "error")]
    for key in ("n", "mean", "std"):
        assert t1[key] == t2[key]
    assert t2["diff"] != t1["diff"] or t1["paper"] == t2["paper"]  # each against its own paper cell
    none = read_csv(tmp_path / "table2.csv")[("none", "error")]
    assert float(none["mean"]) == pytest.approx(statistics.mean(STUDENT_ERRORS), abs=1e-4)


def test_missing_is_never_a_number(rendered):
    tmp_path, runs, context = rendered
    factt = read_csv(tmp_path / "table1.csv")[(T1ROW, "factt")]
    assert factt["status"] == "missing"
    assert factt["n"] == "0"
    assert factt["mean"] == factt["std"] == factt["diff"] == factt["epoch"] == ""
    md = (tmp_path / "table1.md").read_text()
    assert "| WRN-16-1, 0.2M | WRN-16-2, 0.7M | F-ActT | 0 | missing | — | 8.51 | — | — | missing |" in md
    assert "`factt/seed0`" in md and "`kd/seed0`" in md
    readme = (tmp_path / "README.md").read_text()
    assert "run `factt/seed0`: missing" in readme
    assert "run `kd/seed0`: missing" in readme
    # the partial KD cell averages only the finished seeds: not (0 + 64 + 63) / 3
    kd = read_csv(tmp_path / "table1.csv")[(T1ROW, "kd")]
    assert float(kd["mean"]) == pytest.approx(63.5)


def test_not_run_table_and_unfilled_cells(rendered):
    tmp_path, runs, context = rendered
    t4 = read_csv(tmp_path / "table4.csv")
    assert len(t4) == 8 and all(r["status"] == "not run" and r["mean"] == "" for r in t4.values())
    md = (tmp_path / "table4.md").read_text()
    assert "CUB and Scenes are not downloaded in the smoke profile" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "ResNet" in line]
    assert len(rows) == 8
    pattern = re.compile(r"\| 0 \| not run \| — \| [0-9.]+ \| — \| — \| not run \|$")
    assert all(pattern.search(line) for line in rows), rows
    # table3 cells no run fills are "not run", with the reason
    t3 = read_csv(tmp_path / "table3.csv")
    assert t3[("min-l2", "error")]["status"] == "not run"
    assert "no run of this profile's grid fills this cell" in (tmp_path / "table3.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "not run: CUB and Scenes are not downloaded" in readme
    assert "table3: no run of this profile's grid fills 5 of 6 cells: baseline" in readme
    assert "min-l2 (Drucker & LeCun 1992)" in readme


def test_epoch_is_stated(rendered):
    tmp_path, runs, context = rendered
    assert "Reported epoch: the last one, epoch 2" in (tmp_path / "table1.md").read_text()
    t3 = (tmp_path / "table3.md").read_text()
    assert "Reported epoch: the last one, epoch 1 (planned: 2)" in t3
    assert "`nin-at/seed0` (1 of 2)" in t3
    assert read_csv(tmp_path / "table3.csv")[("at", "error")]["epoch"] == "1"


def test_differing_final_epochs_are_said(tmp_path):
    runs = [
        write_run(tmp_path / "r", "a/seed0", 0, [cell("table2", "none", "error")], 10.0,
                  final_epoch=2, epochs=2),
        write_run(tmp_path / "r", "a/seed1", 1, [cell("table2", "none", "error")], 12.0,
                  final_epoch=1, epochs=2),
    ]
    report.render(runs, tmp_path / "out", {"profile": "smoke", "description": DESC})
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "Runs of this table differ in final epoch (1, 2)" in md
    assert read_csv(tmp_path / "out" / "table2.csv")[("none", "error")]["epoch"] == "1;2"


def test_table1_not_run_skips_its_figures(tmp_path):
    runs = [write_run(tmp_path / "r", "a/seed0", 0, [cell("table2", "none", "error")], 10.0)]
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{figures.FIG_BARS}.png").write_bytes(b"from an earlier render")
    written = report.render(runs, out, {"profile": "smoke", "description": DESC,
                                        "not_run": {"table1": "no teachers in this profile"}})
    assert not any(p.suffix in (".png", ".pdf") for p in written)
    assert not (out / f"{figures.FIG_BARS}.png").exists()
    readme = (out / "README.md").read_text()
    assert readme.count("Not drawn: Table 1 is not run: no teachers in this profile") == 3


def test_description_everywhere(rendered):
    tmp_path, runs, context = rendered
    for name in paper.table_names():
        assert DESC in (tmp_path / f"{name}.md").read_text()
        tex = (tmp_path / f"{name}.tex").read_text()
        assert tables.tex_escape(DESC) in tex
        assert r"\caption{" in tex and r"\end{table}" in tex
    assert DESC in (tmp_path / "README.md").read_text().splitlines()[2]
    summaries = cells.summarize(inputs.load_runs(runs), context["not_run"])
    series, _ = figures.curve_series(summaries)
    for fig in (figures.curves_figure(series, DESC), figures.bars_figure(summaries["table1"], DESC)):
        assert DESC in fig._suptitle.get_text()


def test_curves_average_seeds(grid):
    runs, context = grid
    summaries = cells.summarize(inputs.load_runs(runs), context["not_run"])
    series, notes = figures.curve_series(summaries)
    epochs, mean, n = series[T1ROW]["at"]
    assert epochs == [1, 2] and n == 3
    assert mean == pytest.approx([statistics.mean(AT_ERRORS) + 5.0, statistics.mean(AT_ERRORS)])
    assert "factt" not in series[T1ROW]  # missing runs draw no curve
    assert notes == []


def test_tex_escaping():
    assert tables.tex_escape("F_sum^2 & 5% #1 ImageNet->CUB ± —") == (
        r"F\_sum\^{}2 \& 5\% \#1 ImageNet$\to$CUB $\pm$ ---")


def test_bad_inputs_are_refused(grid, tmp_path):
    runs, context = grid
    out = tmp_path / "out"
    bad = dict(runs[0], cells=[cell("table1", T1ROW, "fitnet")])
    with pytest.raises(ValueError, match="fitnet"):
        report.render([bad], out, context)
    with pytest.raises(ValueError, match="same seed"):
        report.render([runs[0], dict(runs[1], seed=0)], out, context)
    with pytest.raises(ValueError, match="description"):
        report.render(runs, out, {"profile": "smoke"})
    with pytest.raises(ValueError, match="not_run"):
        report.render(runs, out, dict(context, not_run={"table1": "no"}))
    with pytest.raises(ValueError, match="table9"):
        report.render(runs, out, dict(context, not_run={"table9": "no"}))
    with pytest.raises(ValueError, match="twice"):
        report.render([runs[0], runs[0]], out, context)
    broken = write_run(tmp_path / "r", "x/seed0", 0, [cell("table2", "sum-p4", "error")], 1.0)
    (Path(broken["out_dir"]) / "metrics.json").write_text('{"final_test_error": 1.0}')
    with pytest.raises(ValueError, match="metrics.json lacks key 'epochs'"):
        report.render([broken], out, context)
    assert not out.exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------
# Attention-map figure, with tiny models


class TinyNet(torch.nn.Module):
    """Two conv stages; taps at 8x8 and 4x4, like the group outputs of a WRN."""

    def __init__(self, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(2 * width, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        a1 = torch.relu(self.c1(x))
        a2 = torch.relu(self.c2(a1))
        return self.fc(a2.mean((2, 3))), [a1, a2]


def l2_attention(act):
    q = act.pow(2).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)


def tiny_images(n=3, size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, images.float() / 255.0 - 0.5


def test_attention_figure_with_tiny_models(tmp_path):
    teacher, student = TinyNet(6, 1).eval(), TinyNet(3, 2).eval()
    images, inputs = tiny_images()
    fig = attention_maps.attention_figure(teacher, student, images, inputs, f"maps\n{DESC}",
                                  attention_fn=l2_attention)
    assert DESC in fig._suptitle.get_text()
    axes = fig.get_axes()
    assert len(axes) == 3 * (1 + 2 * 2)
    # the teacher's group-2 map of image 1 is what l2_attention gives, reshaped to 4x4
    shown = np.asarray(axes[1 * 5 + 3].get_images()[0].get_array())
    with torch.no_grad():
        expected = l2_attention(teacher(inputs)[1][1])[1].reshape(4, 4).numpy()
    np.testing.assert_allclose(shown, expected, rtol=1e-6)
    (tmp_path / "a").mkdir()
    paths = figures.save_figure(fig, tmp_path / "a", "att")
    assert sorted(p.name for p in paths) == ["att.pdf", "att.png"]
    assert (tmp_path / "a" / "att.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a" / "att.pdf").read_bytes()[:5] == b"%PDF-"
    fig2 = attention_maps.attention_figure(teacher, student, images, inputs, f"maps\n{DESC}",
                                   attention_fn=l2_attention)
    (tmp_path / "b").mkdir()
    figures.save_figure(fig2, tmp_path / "b", "att")
    for name in ("att.png", "att.pdf"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_attention_figure_refuses_unpaired_taps():
    class OneTap(TinyNet):
        def forward(self, x):
            logits, taps = super().forward(x)
            return logits, taps[:1]

    images, inputs = tiny_images()
    with pytest.raises(ValueError, match="taps"):
        attention_maps.attention_figure(TinyNet(4, 0), OneTap(4, 1), images, inputs, "t",
                                attention_fn=l2_attention)


def test_render_draws_attention_from_checkpoints(grid, tmp_path, monkeypatch):
    """The checkpoint/data path of render, with stand-ins for at.checkpoint and at.data."""
    runs, context = grid
    at_seed0 = Path(runs[0]["out_dir"])
    (at_seed0 / "checkpoint.pt").write_bytes(b"stand-in")
    teacher_ckpt = tmp_path / "teacher.pt"
    teacher_ckpt.write_bytes(b"stand-in")
    data_dir = tmp_path / "data" / "cifar-10-batches-py"
    data_dir.mkdir(parents=True)
    (data_dir / "test_batch").write_bytes(b"stand-in")
    images, _ = tiny_images(n=6)
    loaded = []

    def load_model(path):
        loaded.append(Path(path))
        if Path(path) == teacher_ckpt:
            return TinyNet(6, 1), {"student": "wrn-16-2"}
        return TinyNet(3, 2), {"student": "wrn-16-1", "teacher": "wrn-16-2",
                               "teacher_checkpoint": str(teacher_ckpt),
                               "data_dir": str(tmp_path / "data")}

    fakes = {
        "at.checkpoint": types.SimpleNamespace(load_model=load_model),
        "at.data.cifar": types.SimpleNamespace(
            load=lambda folder: types.SimpleNamespace(test_x=images, test_y=torch.zeros(6))),
        "at.data.augment": types.SimpleNamespace(
            CIFAR_MEAN=(0.5, 0.5, 0.5), CIFAR_STD=(0.25, 0.25, 0.25),
            normalize=lambda x, m, s: (x.float() / 255 - 0.5) / 0.25),
        "at.attention": types.SimpleNamespace(attention_map=lambda act, mapping, p: l2_attention(act)),
    }
    import at.data

    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(at.data, "cifar", fakes["at.data.cifar"], raising=False)
    monkeypatch.setattr(at.data, "augment", fakes["at.data.augment"], raising=False)
    written = report.render(runs, tmp_path / "out", context)
    assert loaded == [at_seed0 / "checkpoint.pt", teacher_ckpt]
    names = {p.name for p in written}
    assert {f"{figures.FIG_ATTENTION}.png", f"{figures.FIG_ATTENTION}.pdf"} <= names
    assert f"({figures.FIG_ATTENTION}.png)" in (tmp_path / "out" / "README.md").read_text()
    # without the checkpoint the figure is skipped, said in the README, and the old one removed
    (at_seed0 / "checkpoint.pt").unlink()
    report.render(runs, tmp_path / "out", context)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Not drawn: no finished AT run of WRN-16-1 from WRN-16-2 has a checkpoint.pt" in readme
    assert not (tmp_path / "out" / f"{figures.FIG_ATTENTION}.png").exists()
