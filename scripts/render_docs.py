"""The generated parts of README.md and docs/*.md, written from committed evidence.

No measured number in the documentation is typed by hand: each one sits in a part generated from
the files that hold it, between two marker comments,

    <!-- generated: KIND SOURCE -->
    ...
    <!-- end generated -->

and a test (tests/test_docs.py) fails when a part is not what its source gives today. The kinds:

- ``glance results/<profile>``: the README's results at a glance, from the report's CSV tables:
  each method's paired difference to the student alone, its 95% interval, the seeds on which it
  lowered the error, beside the paper's difference;
- ``table results/<profile>/<table>.md``: the Markdown table of a rendered report file, as the
  report wrote it (its `|` lines), with the report's one-line provenance;
- ``cost results/runs/<profile>``: what each seed of a profile took, from its runs' records
  (metrics.json: wall time, machine, precision);
- ``benchmarks benchmarks/committed``: the cohort benchmark reports committed there
  (benchmarks/cohort_throughput.py's JSON), one row per report and precision; a missing or empty
  folder says so;
- ``versus results/runs/<profile>:<cell>:<method>...``: the cells of those methods against one
  reference cell, paired by seed, with 95% intervals.

    python scripts/render_docs.py           # rewrite the generated parts in place
    python scripts/render_docs.py --check   # exit 1, naming the stale files, if any part differs
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # `at` of this checkout, installed or not

MARKER = re.compile(r"(<!-- generated: ([\w-]+) (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)
# the documentation files that may hold generated parts
DOCUMENTS = ["README.md", "docs/*.md"]


# ------------------------------------------------------------------------------------------------
# The results at a glance (README)


def _number(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def glance(repo: Path, source: str) -> str:
    """One row per distinct paired cell of the report's tables: the method, Δ (our error minus
    the baseline's of the same seed, mean over the seeds), its 95% interval, on how many seeds it
    lowered the error, the paper's Δ. A cell whose runs another table already showed (Table 2's
    F_sum² is Table 1's AT) is shown once, both names in its label."""
    from at.report.labels import markdown

    folder = repo / source
    tables = sorted(folder.glob("*.csv"))
    if not tables:
        raise ValueError(f"{source}: no report tables (*.csv): render the report first")
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}
    epochs, seeds = set(), set()
    for table in tables:
        for cell in _csv_rows(table):
            if not cell["paired_n"]:
                continue   # a baseline or a teacher: no difference of its own
            label = markdown(cell["label"].split(": ", 1)[-1])   # Table 1's "WRN-16-1 ... / ...: AT" -> AT
            key = (cell["paired_seeds"], cell["paired_diffs"])
            if key in seen:
                seen[key]["label"] += f" ({label})"
                continue
            diffs = [float(d) for d in cell["paired_diffs"].split(";")]
            row = {"label": f"AT, {label}" if label.startswith("F_") else label,   # Table 2's mappings
                   "mean": _number(cell["paired_mean"]),
                   "low": _number(cell["ci_low"]), "high": _number(cell["ci_high"]),
                   "lower": sum(d < 0 for d in diffs), "n": len(diffs),
                   "reference": _number(cell["reference_diff"])}
            seen[key] = row
            rows.append(row)
            epochs.add(cell["epoch"])
            seeds.add(cell["paired_n"])
    baseline = "the student alone"
    lines = [f"| method | Δ error vs {baseline} | 95% interval | seeds where it is lower | paper's Δ |",
             "|---|--:|--:|--:|--:|"]
    for row in rows:
        interval = "—" if row["low"] is None else f"[{row['low']:+.2f}, {row['high']:+.2f}]"
        lines.append(f"| {row['label']} | {_signed(row['mean'])} | {interval} | {row['lower']} of {row['n']} "
                     f"| {_signed(row['reference'])} |")
    lines += ["", f"Test error in percentage points at the last epoch ({', '.join(sorted(epochs))}), "
                  f"our error minus the student's alone of the same seed, mean over "
                  f"{' or '.join(sorted(seeds))} seeds, with a 95% Student-t interval; the paper's Δ is the "
                  f"same difference in its Tables 1 and 2 (full CIFAR-10 and schedule). Generated from "
                  f"[{source}/]({source}/README.md) by scripts/render_docs.py."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# A report's table, copied (docs/results.md)


def table(repo: Path, source: str) -> str:
    """The Markdown table of a report file (its `|` lines, as written) and the report's one-line
    provenance from the README beside it (the bold line that starts with the profile's name)."""
    path = repo / source
    text = path.read_text()
    block = re.search(r"((?:^\|.*\n)+)", text, re.M)
    if not block:
        raise ValueError(f"{source}: no Markdown table in it")
    readme = (path.parent / "README.md").read_text()
    provenance = re.search(r"^\*\*(\S+ profile, .*)\*\* \(profile `[^`]+`\)\.$", readme, re.M)
    said = f"{provenance.group(1)}." if provenance else ""
    return block.group(1) + "\n" + (f"From [{source}](../{source}): {said}\n" if said else
                                    f"From [{source}](../{source}).\n")


# ------------------------------------------------------------------------------------------------
# What each seed of a profile took, from its runs' records (docs/results.md)


def cost(repo: Path, source: str) -> str:
    """Per seed: the machines and precision its runs name, its teacher's wall time and its
    students' longest (the members of a cohort train together, so a cohort takes about as long
    as its longest member), from each record's metrics.json and spec.json."""
    folder = repo / source
    records = []
    for metrics_path in sorted(folder.rglob("metrics.json")):
        spec_path = metrics_path.with_name("spec.json")
        if not spec_path.is_file():
            continue
        records.append((json.loads(spec_path.read_text()), json.loads(metrics_path.read_text())))
    if not records:
        raise ValueError(f"{source}: no run records (metrics.json with spec.json)")
    teachers = {str(Path(spec["teacher_checkpoint"]).parent) for spec, _ in records if spec.get("teacher_checkpoint")}
    seeds: dict[int, dict] = {}
    for spec, metrics in records:
        seed = seeds.setdefault(spec["seed"], {"machines": set(), "precisions": set(), "teacher": [],
                                               "student": [], "runs": 0})
        seed["machines"].add(metrics["machine"])
        seed["precisions"].add(metrics["precision"])
        seed["teacher" if spec["out_dir"] in teachers else "student"].append(metrics["wall_time_s"] / 60)
        seed["runs"] += 1

    def minutes(values: list[float]) -> str:
        return f"{max(values):.1f}" if values else "—"

    lines = ["| seed | runs | machine | precision | teacher (min) | longest student run (min) |",
             "|--:|--:|---|---|--:|--:|"]
    for number, seed in sorted(seeds.items()):
        lines.append(f"| {number} | {seed['runs']} | {'; '.join(sorted(seed['machines']))} | "
                     f"{', '.join(sorted(seed['precisions']))} | {minutes(seed['teacher'])} | "
                     f"{minutes(seed['student'])} |")
    lines += ["", f"Wall time of each run from its record ({source}/…/metrics.json, `wall_time_s`; "
                  "`machine`: the CPU or GPU that trained it). A cohort's members train together, so a "
                  "cohort takes about as long as its longest member; a machine that also ran other work "
                  "shows longer times."]
    return "\n".join(lines) + "\n"


def _records(folder: Path) -> dict[str, tuple[dict, dict, Path]]:
    """run id -> (spec.json, metrics.json, the record's folder) of every record under ``folder``."""
    found = {}
    for metrics_path in sorted(folder.rglob("metrics.json")):
        spec_path = metrics_path.with_name("spec.json")
        if spec_path.is_file():
            spec = json.loads(spec_path.read_text())
            found[spec["id"]] = (spec, json.loads(metrics_path.read_text()), metrics_path.parent)
    if not found:
        raise ValueError(f"{folder}: no run records (metrics.json with spec.json)")
    return found


def _cell_name(run_id: str) -> str:
    """cifar10/wrn-16-1_from_wrn-16-2/at-sum-p4/beta=100/seed0 -> at-sum-p4, beta=100 (the
    student alone: wrn-16-1 alone; a teacher: wrn-16-2 alone)."""
    parts = run_id.split("/")[1:-1]
    if parts[-1] == "baseline":
        return f"{parts[0]} alone"
    return ", ".join(parts[1:])


def _baseline_of(spec: dict, records: dict) -> str | None:
    """The run of the same student, data and seed without transfer: what a paired Δ subtracts."""
    for run_id, (other, _, _) in records.items():
        if (other["method_name"] == "baseline" and not other.get("teacher") and other["student"] == spec["student"]
                and other["dataset"] == spec["dataset"] and other["seed"] == spec["seed"]):
            return run_id
    return None


def precision(repo: Path, source: str) -> str:
    """Two profiles that trained the same runs in two precisions (the same specs but for
    ``protocol.precision``: the same initialisation and batches): each shared run's final error
    in both, seed by seed, and each method's paired Δ to the student alone on the shared seeds."""
    first, second = (repo / s for s in source.split(","))
    a, b = _records(first), _records(second)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"{source}: the two profiles share no run")

    def differs(run_id: str) -> list[str]:
        left, right = dict(a[run_id][0]), dict(b[run_id][0])
        keys = {k for k in left | right if k not in ("profile", "out_dir", "teacher_checkpoint", "protocol")}
        keys = [k for k in sorted(keys) if left.get(k) != right.get(k)]
        return keys + [f"protocol.{k}" for k in sorted(left["protocol"]) if left["protocol"][k] != right["protocol"].get(k)]

    changed = sorted({key for run_id in shared for key in differs(run_id)})
    names = {"a": first.name, "b": second.name}
    prec = {side: "/".join(sorted({m["precision"] for _, m, _ in records.values()}))
            for side, records in (("a", a), ("b", b))}
    seeds = sorted({a[r][0]["seed"] for r in shared})
    cells = sorted({_cell_name(r) for r in shared}, key=lambda c: (not c.endswith("alone"), c))
    error = {(_cell_name(r), a[r][0]["seed"]): (a[r][1]["final_test_error"], b[r][1]["final_test_error"]) for r in shared}
    lines = [f"| run | " + " | ".join(f"seed {s}: {names['a']} / {names['b']}" for s in seeds) + " |",
             "|---|" + "--:|" * len(seeds)]
    for cell in cells:
        lines.append(f"| {cell} | " + " | ".join(
            (f"{error[cell, s][0]:.2f} / {error[cell, s][1]:.2f}" if (cell, s) in error else "—") for s in seeds) + " |")
    lines += ["", f"| method | paired Δ, {names['a']} ({prec['a']}) | paired Δ, {names['b']} ({prec['b']}) |",
              "|---|--:|--:|"]
    for cell in cells:
        if cell.endswith("alone"):
            continue
        deltas = {"a": [], "b": []}
        for side, records in (("a", a), ("b", b)):
            for run_id in shared:
                if _cell_name(run_id) != cell:
                    continue
                base = _baseline_of(records[run_id][0], records)
                if base in shared:
                    deltas[side].append(records[run_id][1]["final_test_error"] - records[base][1]["final_test_error"])
        mean = {side: (sum(v) / len(v) if v else None) for side, v in deltas.items()}
        lines.append(f"| {cell} | {_signed(mean['a'])} | {_signed(mean['b'])} |")
    lines += ["", f"Final test error (%) of the runs both profiles trained ({names['a']}: {prec['a']}, "
                  f"{names['b']}: {prec['b']}), seeds {', '.join(map(str, seeds))}; their specs differ only in "
                  f"{', '.join(changed) or 'nothing'} (besides profile and folders), so each pair shares its "
                  f"initialisation and batches. Paired Δ: the method's error minus the student's alone of the "
                  f"same seed, mean over these seeds. From the records in {source.replace(',', ' and ')}."]
    return "\n".join(lines) + "\n"


def term_size(repo: Path, source: str) -> str:
    """How large each transfer term is against the cross-entropy at the start of training: per
    cell with a `loss_<term>` column in its history, the mean over seeds of the term's and of the
    cross-entropy's epoch means at epochs 1 and 3, beside the cell's final error."""
    records = _records(repo / source)
    cells: dict[str, list[dict]] = {}
    for run_id, (_, metrics, folder) in records.items():
        with open(folder / "history.csv", newline="") as f:
            history = list(csv.DictReader(f))
        terms = [k for k in history[0] if k.startswith("loss_") and k != "loss_ce"]
        if not terms:
            continue
        cells.setdefault(_cell_name(run_id), []).append({"history": history, "terms": terms,
                                                         "error": metrics["final_test_error"]})
    if not cells:
        raise ValueError(f"{source}: no record has a transfer term's loss column")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def _mean(values: list[float]) -> str:   # a method without a CE term of its own (KD mixes it in): —
        return f"{mean(values):.2f}" if values else "—"

    lines = ["| cell | seeds | term | term, epoch 1 | CE, epoch 1 | term, epoch 3 | CE, epoch 3 | final error % |",
             "|---|--:|---|--:|--:|--:|--:|--:|"]
    for name, runs in sorted(cells.items()):
        for term in runs[0]["terms"]:
            at = {epoch: [float(r["history"][epoch - 1][term]) for r in runs if len(r["history"]) >= epoch]
                  for epoch in (1, 3)}
            ce = {epoch: [float(r["history"][epoch - 1]["loss_ce"]) for r in runs
                          if len(r["history"]) >= epoch and r["history"][epoch - 1].get("loss_ce")] for epoch in (1, 3)}
            lines.append(f"| {name} | {len(runs)} | {term[len('loss_'):]} | {mean(at[1]):.2f} | {_mean(ce[1])} | "
                         f"{mean(at[3]):.2f} | {_mean(ce[3])} | {mean([r['error'] for r in runs]):.2f} |")
    lines += ["", f"The weighted term and the cross-entropy (CE) as each run's history.csv has them (the epoch's "
                  f"mean over its batches), mean over the seeds; from the records in {source}."]
    return "\n".join(lines) + "\n"


def versus(repo: Path, source: str) -> str:
    """Cells against one reference cell of the same profile, paired by seed (the same teacher,
    initialisation and batches): ``results/runs/<profile>:<reference cell>:<method>[:<method>...]`` (a cell of a sweep as in its
    run ids, ``at-sum-p2/beta=300``) lists every cell of those methods (their sweeps included) with its paired difference to the
    reference and its 95% interval (at.report.statistics, as the report computes Δ base)."""
    from at.report.statistics import paired_difference

    folder, reference, *methods = source.split(":")
    reference = reference.replace("/", ", ")   # a sweep's cell as its run ids name it: at-sum-p2/beta=300
    records = _records(repo / folder)
    error: dict[str, dict[int, float]] = {}
    for run_id, (spec, metrics, _) in records.items():
        # a sweep's runs are named after their method: factt/beta=100
        if spec["method_name"].split("/")[0] in methods or _cell_name(run_id) == reference:
            error.setdefault(_cell_name(run_id), {})[spec["seed"]] = metrics["final_test_error"]
    if reference not in error:
        raise ValueError(f"{source}: no record of the reference cell {reference!r}")
    lines = [f"| cell | seeds | mean error % | minus {reference} | 95% CI | per seed |", "|---|--:|--:|--:|--:|---|"]
    for cell in sorted(error):
        if cell == reference:
            continue
        d = paired_difference(error[cell], error[reference])
        interval = "—" if d.ci_low is None else f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]"
        per_seed = ", ".join(f"{s}: {x:+.2f}" for s, x in zip(d.seeds, d.differences))
        lines.append(f"| {cell} | {len(d.seeds)} | {sum(error[cell].values()) / len(error[cell]):.2f} | "
                     f"{_signed(d.mean if d.seeds else None)} | {interval} | {per_seed} |")
    lines += ["", f"Each cell's final test error minus {reference}'s on the same seed (Student t with n − 1 "
                  f"degrees of freedom); from the records in {folder}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The committed benchmark reports (docs/benchmarks.md)

COHORT_FORMAT = "at-benchmark-cohort"   # benchmarks/cohort_throughput.py's REPORT_FORMAT


def _device(report: dict) -> str:
    device = report.get("device") or {}
    if device.get("type") == "cuda":
        return f"{device.get('gpu_name', 'CUDA GPU')} (CUDA {device.get('cuda', '?')})"
    threads = report.get("settings", {}).get("threads") or device.get("torch_threads")
    bf16 = ", native bf16" if device.get("cpu_native_bf16") else ""
    return f"{device.get('cpu_model', 'CPU')} ({threads} threads{bf16})"


def _fmt(value, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def benchmarks(repo: Path, source: str) -> str:
    """One row per committed cohort report and precision: the device, the cohort's and the
    solo runs' run-images/s, the speedup, the cohort's peak memory, and the report's load."""
    folder = repo / source
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not paths:
        return (f"No benchmark report is committed yet: {source}/ is "
                f"{'empty' if folder.is_dir() else 'missing'}. A report written by "
                "`benchmarks/cohort_throughput.py` (`make benchmark`) and copied there appears here "
                "after `python scripts/render_docs.py`.\n")
    lines = ["| report | device | mode | batch | cohort run-img/s | solo run-img/s | cohort vs solo "
             "| vs float32 solo | cohort peak memory (MiB) | load (1 min, end) | commit |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    others = []
    for path in paths:
        report = json.loads(path.read_text())
        if report.get("format") != COHORT_FORMAT:
            others.append(f"{path.name} (format {report.get('format')!r})")
            continue
        settings = report.get("settings", {})
        cuda = (report.get("device") or {}).get("type") == "cuda"
        for mode, result in report["results"].items():
            # version 1: one result per precision; version 2: per mode (precision / compile / layout),
            # its runs alone perhaps not measured (solo null) and every mode against the float32 solo
            cohort, solo = result["cohort"], result.get("solo")
            memory = cohort["memory"].get("cuda_peak_allocated_mib" if cuda else "peak_rss_mib")
            name = f"{mode} (auto)" if mode == settings.get("auto_precision") else mode
            versus = result.get("cohort_vs_solo")
            reference = result.get("cohort_vs_reference_solo")
            lines.append(f"| [{path.name}](../{source}/{path.name}) | {_device(report)} | {name} | "
                         f"{settings.get('batch', '—')} | {_fmt(cohort['run_images_per_s'])} | "
                         f"{_fmt(solo['run_images_per_s'] if solo else None)} | "
                         f"{'—' if versus is None else f'x{versus:.2f}'} | "
                         f"{'—' if reference is None else f'x{reference:.2f}'} | {_fmt(memory)} | "
                         f"{_fmt((report.get('load_average') or {}).get('end', [None])[0], 2)} | "
                         f"{str(report.get('git_commit', ''))[:7]} |")
    lines += ["", "run-img/s: images trained per second summed over the runs; cohort: the runs trained as one "
                  "cohort, solo: the same runs one after another; vs float32 solo: the cohort against the runs "
                  "alone in float32, eager, contiguous (benchmarks/README.md). Peak memory: host "
                  "RSS on the CPU, `max_memory_allocated` on CUDA. A load above the thread count means other "
                  "work shared the machine."]
    if others:
        lines += ["", f"Not cohort reports, not shown: {', '.join(others)}."]
    return "\n".join(lines) + "\n"


KINDS = {"glance": glance, "table": table, "cost": cost, "precision": precision, "term-size": term_size,
         "versus": versus, "benchmarks": benchmarks}


# ------------------------------------------------------------------------------------------------
# The files


def documents(repo: Path = REPO) -> list[Path]:
    return sorted({path for pattern in DOCUMENTS for path in repo.glob(pattern)})


def render(text: str, repo: Path = REPO) -> str:
    """``text`` with every generated part written again from its source."""
    def part(match: re.Match) -> str:
        kind, source = match.group(2), match.group(3)
        if kind not in KINDS:
            raise ValueError(f"unknown generated part {kind!r} (known: {', '.join(KINDS)})")
        return match.group(1) + KINDS[kind](repo, source) + match.group(5)

    return MARKER.sub(part, text)


def stale(repo: Path = REPO) -> list[str]:
    """The documentation files whose generated parts differ from what their sources give."""
    return [str(path.relative_to(repo)) for path in documents(repo) if render(path.read_text(), repo) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a generated part is stale")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        if out_of_date:
            print(f"error: generated parts out of date in {', '.join(out_of_date)}: run "
                  f"`python scripts/render_docs.py`", file=sys.stderr)
            return 1
        return 0
    for path in documents():
        text = path.read_text()
        new = render(text)
        if new != text:
            path.write_text(new)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
