"""README.md and docs/ cannot drift from the repository: their generated parts are what the
committed evidence gives today, every relative link resolves (anchors included), every command
of their shell blocks names files, make targets, subcommands and flags that exist, no torchrun
typed by hand is given the flags its own parser takes, `make help` lists every target, the
command line's help says where things go, and no measured time, throughput or speedup is typed
by hand into their prose. (The README's "Using it" commands are also run as written, on the ci
profile: tests/test_pipeline.py::test_the_readmes_commands_work_as_written.)"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_docs = _render_docs()


# ------------------------------------------------------------------------------------------------
# Generated parts


def test_the_generated_parts_are_what_the_evidence_gives_today():
    assert render_docs.stale() == [], "run `python scripts/render_docs.py` and commit the result"


def test_every_generated_part_names_a_known_kind_and_an_existing_source():
    parts = [(path, m.group(2), m.group(3)) for path in DOCS for m in render_docs.MARKER.finditer(path.read_text())]
    assert {kind for _, kind, _ in parts} >= {"glance", "table", "cost", "precision", "term-size", "benchmarks"}
    for path, kind, source in parts:
        assert kind in render_docs.KINDS, (path, kind)
        if kind != "benchmarks":   # the benchmarks' folder may be missing: the page then says so
            assert all((REPO / s.split(":")[0]).exists() for s in source.split(",")), (path, source)
    # an opening marker without its end would leave the part unchecked
    for path in DOCS:
        text = path.read_text()
        assert text.count("<!-- generated: ") == text.count("<!-- end generated -->") == len(
            list(render_docs.MARKER.finditer(text))), path


def test_the_readme_glance_shows_each_paired_cell_once_with_the_papers_delta(tmp_path):
    header = ("table,row,column,label,n,mean,std,reference,diff,baseline_row,baseline_column,paired_n,paired_seeds,"
              "paired_diffs,paired_mean,ci_low,ci_high,reference_diff,sign_agrees,epoch,status\n")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "table1.csv").write_text(
        header + "table1,p,student,\"A / B: Student\",2,30,1,8.77,,,,,,,,,,,,30,ok\n"
        "table1,p,at,\"A / B: AT\",2,29,1,7.93,,p,student,2,0;1,-1.5;0.5,-0.5,-13.2,12.2,-0.84,yes,30,ok\n")
    (tmp_path / "r" / "table2.csv").write_text(
        header + "table2,sum-p2,error,F_sum^2,2,29,1,7.93,,none,error,2,0;1,-1.5;0.5,-0.5,-13.2,12.2,-0.84,yes,30,ok\n"
        "table2,sum-p4,error,F_sum^4,2,31,1,8.09,,none,error,2,0;1,1.0;2.0,1.5,-4.9,7.9,-0.68,no,30,ok\n")
    text = render_docs.glance(tmp_path, "r")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| AT (F_sum²) | -0.50 | [-13.20, +12.20] | 1 of 2 | -0.84 |",
                    "| AT, F_sum⁴ | +1.50 | [-4.90, +7.90] | 0 of 2 | -0.68 |"]
    assert "at the last epoch (30)" in text and "over 2 seeds" in text


def _cohort_report(**device) -> dict:
    row = {"members": ["a", "b"], "run_images_per_s": 300.0, "memory": {"peak_rss_mib": 1800.0}}
    return {"format": "at-benchmark-cohort", "git_commit": "abcdef0123", "load_average": {"end": [1.5, 1, 1]},
            "device": {"type": "cpu", "cpu_model": "Some CPU", "cpu_native_bf16": False, **device},
            "settings": {"batch": 128, "threads": 2, "auto_precision": "float32"},
            "results": {"float32": {"cohort": row, "solo": {**row, "run_images_per_s": 200.0}, "cohort_vs_solo": 1.5}}}


def test_the_benchmarks_page_says_when_nothing_is_committed_and_lists_what_is(tmp_path):
    assert "benchmarks/committed/ is missing" in render_docs.benchmarks(tmp_path, "benchmarks/committed")
    folder = tmp_path / "benchmarks" / "committed"
    folder.mkdir(parents=True)
    assert "benchmarks/committed/ is empty" in render_docs.benchmarks(tmp_path, "benchmarks/committed")
    (folder / "cpu-cohort.json").write_text(json.dumps(_cohort_report()))
    (folder / "ddp.json").write_text(json.dumps({"format": "something-else"}))
    text = render_docs.benchmarks(tmp_path, "benchmarks/committed")
    assert ("| [cpu-cohort.json](../benchmarks/committed/cpu-cohort.json) | Some CPU (2 threads) | float32 (auto) | "
            "128 | 300 | 200 | x1.50 | — | 1,800 | 1.50 | abcdef0 |") in text   # a version-1 report: no reference
    assert "Not cohort reports, not shown: ddp.json (format 'something-else')." in text


def test_an_unknown_generated_part_is_an_error():
    with pytest.raises(ValueError, match="unknown generated part 'nope'"):
        render_docs.render("<!-- generated: nope x -->\n<!-- end generated -->\n")


# ------------------------------------------------------------------------------------------------
# The README's shape, and what no prose may hold


def test_the_readme_is_two_screens_in_the_agreed_order():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == ["The results at a glance", "Two commands", "Using it", "What is in here", "Troubleshooting",
                        "Documentation"]
    # the main job exactly as the project states it, and the tests
    assert ("AT_CIFAR10_URL=../shared/data/cifar10-mini-python.tar.gz AT_CIFAR10_MD5=1c190744c9595cc62078be24b4b038fb "
            "make pipeline\n") in text
    assert "\nmake test\n" in text
    assert "![" in text.split("## Two commands")[0], "one figure at a glance"
    for page in (REPO / "docs").glob("*.md"):   # every page of docs/ is reachable from the README
        assert f"(docs/{page.name})" in text, page.name


def _prose(text: str) -> str:
    """text without its generated parts, fenced code blocks and inline code."""
    text = render_docs.MARKER.sub("", text)
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


MEASURED = re.compile(r"\d+(?:\.\d+)?\s?(?:ms|s|sec|min|minutes?|h|hours?|seconds?)\b"   # a time
                      r"|\d[\d,.]*\s?(?:run-)?(?:images?|img)/s"                         # a throughput
                      r"|\bx\d+(?:\.\d+)?\b|\b\d+(?:\.\d+)?x\b")                         # a speedup


# Times that are settings, not measurements: the tracking store's timeouts and retry budgets
# (at/tracking.py's *_S constants)
SETTINGS = {"interfaces.md": {"5 s", "2 min", "30 s"}}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_measured_time_throughput_or_speedup_is_typed_into_the_prose(path):
    found = [m for m in MEASURED.findall(_prose(path.read_text())) if m not in SETTINGS.get(path.name, ())]
    assert not found, f"{path.name}: {found}: quote a measurement only from a generated part (scripts/render_docs.py)"


# A paired difference with its interval, as the prose quotes it from a generated table: "+0.10 [-0.39, +0.59]"
QUOTED_DIFFERENCE = re.compile(r"([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]")


def _quoted_differences_not_generated(text: str) -> list[str]:
    """The differences the prose quotes that no generated row of the same page holds."""
    generated = " ".join(m.group(4) for m in render_docs.MARKER.finditer(text))
    prose = " ".join(_prose(text).split())   # a quote may wrap across lines
    return [" ".join(q) for q in QUOTED_DIFFERENCE.findall(prose)
            if f"| {q[0]} | [{q[1]}, {q[2]}] |" not in generated]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_difference_quoted_in_the_prose_is_a_generated_row_of_its_page(path):
    """Numbers typed into prose go stale: a quoted difference and interval must be read, to the
    digit, from a generated table of the same page, so re-rendered evidence that changes it fails here."""
    stale = _quoted_differences_not_generated(path.read_text())
    assert not stale, f"{path.name}: {stale} quoted but in no generated row: quote the table as it is now"


def test_the_quote_check_catches_a_quote_the_tables_do_not_hold():
    page = ("<!-- generated: table x -->\n| a | -1.00 | [-2.00, +0.00] |\n<!-- end generated -->\n"
            "It helps (-1.00 [-2.00,\n+0.00]) and once (-1.10 [-2.00, +0.00]).\n")
    assert _quoted_differences_not_generated(page) == ["-1.10 -2.00 +0.00"]


# ------------------------------------------------------------------------------------------------
# Links


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, inline code's backquotes and punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.md"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_every_relative_link_between_the_docs_and_to_repository_files_resolves():
    broken = []
    files = _markdown_files()
    assert REPO / "README.md" in files and REPO / "docs" / "results.md" in files
    for path in files:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue   # http(s), mailto: not ours to check offline
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.relative_to(REPO)}: {target} (no heading #{anchor} in {linked.name})")
            elif not linked.is_relative_to(REPO):
                broken.append(f"{path.relative_to(REPO)}: {target} (outside the repository)")
    assert not broken, "\n".join(broken)


def test_the_anchor_rule_is_githubs():
    assert _slug("Data-parallel runs (`at.distributed`, `at.sync_batchnorm`)") == \
        "data-parallel-runs-atdistributed-atsync_batchnorm"
    assert _slug("Run spec (input of `python -m at train`, produced by at.grid)") == \
        "run-spec-input-of-python--m-at-train-produced-by-atgrid"


# ------------------------------------------------------------------------------------------------
# Commands


def _shell_commands(path: Path) -> list[str]:
    """The simple commands of a file's ```sh blocks: continuation lines joined, comments dropped,
    `&&`, `;`, `|` and `&` split."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", path.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            current: list[str] = []
            for token in tokens + ["&&"]:
                if token in ("&&", ";", "|", "&", "||"):
                    if current:
                        commands.append(shlex.join(current))
                    current = []
                else:
                    current.append(token)
    return commands


@functools.cache
def _help(*command: str) -> str:
    if command[0] == "at":
        done = run_cli([*command[1:], "--help"])
        assert done.returncode == 0, (command, done.stderr)
        return done.stdout
    beside = Path(sys.executable).parent / command[0]   # the project's environment first
    tool = str(beside) if beside.is_file() else shutil.which(command[0]) or command[0]
    done = subprocess.run([tool, *command[1:], "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (command, done.stderr[-2000:])
    return done.stdout


def _has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def _profiles() -> set[str]:
    import yaml

    return set(yaml.safe_load((REPO / "params.yaml").read_text())["profiles"])


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and a != "-"]


def _check_at(args: list[str], problems: list[str], where: str) -> None:
    """`python -m at ARGS`: the subcommand exists and knows every flag; a profile exists."""
    if args[:1] == ["--params"]:
        args = args[2:]
    subcommands = re.search(r"\{([\w,-]+)\}", _help("at")).group(1).split(",")
    if not args or args[0] not in subcommands:
        problems.append(f"{where}: `python -m at {' '.join(args)}`: no such subcommand ({', '.join(subcommands)})")
        return
    text = _help("at", args[0])
    problems += [f"{where}: `python -m at {args[0]}` has no {flag}" for flag in _flags(args[1:])
                 if not _has_flag(text, flag)]
    for i, arg in enumerate(args[:-1]):
        if arg == "--profile" and args[i + 1] not in _profiles():
            problems.append(f"{where}: no profile {args[i + 1]!r} in params.yaml")
    # a run or cohort of the grid exists in its profile, where the grid has its data set here
    # (ImageNet's runs exist only where data.imagenet.folder is set)
    profile = args[args.index("--profile") + 1] if "--profile" in args[:-1] else None
    for flag in ("--run", "--cohort"):
        if flag in args[:-1] and profile in _profiles():
            wanted = args[args.index(flag) + 1]
            ids = _grid_ids(profile, flag == "--cohort")
            if wanted.split("/")[0] in {i.split("/")[0] for i in ids} and wanted not in ids:
                problems.append(f"{where}: no {flag[2:]} {wanted} in profile {profile}")


@functools.cache
def _grid_ids(profile: str, cohorts: bool) -> frozenset[str]:
    done = run_cli(["runs", "--profile", profile, "--json", *(["--cohorts"] if cohorts else [])], REPO)
    assert done.returncode == 0, done.stderr
    return frozenset(item["id"] for item in json.loads(done.stdout))


def _check_command(command: str, where: str, problems: list[str]) -> None:
    tokens = shlex.split(command)
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]   # VAR=value before the command
    program, args = Path(tokens[0]).name, tokens[1:]
    if program == "python":
        if args[:2] == ["-m", "at"]:
            _check_at(args[2:], problems, where)
        elif args and args[0].endswith(".py"):
            script = REPO / args[0]
            if not script.is_file():
                problems.append(f"{where}: {args[0]} does not exist")
            else:
                source = script.read_text()
                problems += [f"{where}: {args[0]} has no {flag}" for flag in _flags(args[1:])
                             if f'"{flag}"' not in source]
        else:
            problems.append(f"{where}: `{command}`: not a command this test knows how to check")
    elif program == "make":
        for target in (a for a in args if "=" not in a and not a.startswith("-")):
            done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                problems.append(f"{where}: make has no target {target!r}: {done.stderr.strip()}")
    elif program == "snakemake":
        problems += [f"{where}: snakemake has no {flag}" for flag in _flags(args)
                     if not _has_flag(_help("snakemake"), flag)]
        for i, arg in enumerate(args[:-1]):
            if arg == "--profile" and not (REPO / args[i + 1] / "config.yaml").is_file():
                problems.append(f"{where}: no Snakemake profile {args[i + 1]}/config.yaml")
            if arg == "--snakefile" and not (REPO / args[i + 1]).is_file():
                problems.append(f"{where}: no {args[i + 1]}")
            if arg == "--config":
                for setting in args[i + 1:]:
                    if setting.startswith("profile=") and setting.split("=", 1)[1] not in _profiles():
                        problems.append(f"{where}: no profile {setting} in params.yaml")
    elif program == "dvc":
        sub = args[:2] if args[0] in ("plots", "metrics", "params", "remote", "exp") else args[:1]
        text = _help("dvc", *sub)
        problems += [f"{where}: `dvc {' '.join(sub)}` has no {flag}" for flag in _flags(args[len(sub):])
                     if not _has_flag(text, flag)]
        for arg in args[len(sub):]:
            pipeline = arg.split(":", 1)[0]
            if pipeline.endswith("dvc.yaml") and not (REPO / pipeline).is_file():
                problems.append(f"{where}: no {pipeline}")
    elif program == "torchrun":
        at = args.index("at") if "at" in args else None
        if at is None or args[at - 1] != "-m":
            problems.append(f"{where}: `{command}`: torchrun of something other than `-m at`")
            return
        # torchrun's parser takes --run and --log for its --run-path and --log-dir (or refuses them)
        problems += [f"{where}: `{command}`: torchrun would take {flag} for its own" for flag in _flags(args[at + 1:])
                     if flag in ("--run", "--log")]
        _check_at(args[at + 1:], problems, where)
    elif program not in ("source", "export", "git", "cd", "mlflow", "cmp", "conda"):
        problems.append(f"{where}: `{command}`: a program this test does not know how to check ({program})")


def test_every_documented_command_names_what_exists():
    problems: list[str] = []
    checked = 0
    for path in DOCS:
        for command in _shell_commands(path):
            _check_command(command, path.name, problems)
            checked += 1
    assert checked >= 40, checked
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_what_it_is_for():
    problems: list[str] = []
    for command in ["python -m at train --no-such-flag", "python -m at nope", "make no-such-target",
                    "snakemake --cores 8 --config profile=nope",
                    "python -m at train --run cifar10/wrn-16-1/nope/seed0 --profile paper",
                    "torchrun --nproc-per-node 2 -m at train --run x",
                    "dvc repro pipelines/nope/dvc.yaml", "python benchmarks/nope.py", "rm -rf /"]:
        before = len(problems)
        _check_command(command, "t", problems)
        assert len(problems) > before, command


# ------------------------------------------------------------------------------------------------
# make help, and the command line's own help


def _make_targets() -> list[str]:
    text = (REPO / "Makefile").read_text()
    return [t for t in re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M)]


def test_make_help_lists_every_target_in_one_line():
    done = subprocess.run(["make", "--no-print-directory"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr   # `make` alone is `make help`: no set-up runs
    lines = done.stdout.splitlines()
    targets = _make_targets()
    assert {"pipeline", "test", "benchmark", "gpu-check", "clean-runs", "install", "help"} <= set(targets)
    for target in targets:
        listed = [line for line in lines if line.startswith(f"make {target} ")]
        assert len(listed) == 1, (target, lines)
    assert len(lines) == len(targets), lines


def test_the_documented_precisions_are_the_codes():
    from at.precision import PRECISIONS

    listed = re.search(r"`--precision ([\w|]+)`", (REPO / "docs" / "running.md").read_text()).group(1)
    assert tuple(listed.split("|")) == PRECISIONS


def test_the_command_lines_help_names_the_profile_and_where_things_go():
    top = _help("at")
    for place in ("params.yaml", "--profile", "data/<dataset>/", "runs/<P>/", "results/<P>/", "mlruns.db",
                  "pipelines/<P>/dvc.yaml", "README.md"):
        assert place in top, place
    subcommands = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
    writes = {"download": "data/<dataset>", "train": "runs/<profile>/", "report": "results/<profile>/",
              "dvc": "pipelines/<profile>/dvc.yaml", "ui": "MLFLOW_TRACKING_URI", "tracking-init": "MLFLOW_TRACKING_URI",
              "runs": "writes nothing"}
    assert set(subcommands) == set(writes), "a new subcommand: say here where it writes"
    for sub, place in writes.items():
        text = " ".join(_help("at", sub).split())   # argparse wraps lines
        assert place in text, (sub, place)
        if sub != "download":
            assert "--profile" in text, sub


def test_versus_pairs_cells_with_the_reference_by_seed(tmp_path):
    """A hand-worked case: F-ActT minus AT on seeds 0-2 is -1, +0.5, -2, mean -0.83, 95% interval
    -0.83 ± t(0.975, 2) · 1.2583 / √3 = [-3.96, +2.29]; a cell with one seed has no interval; a
    method not asked for is left out."""
    errors = {"at-sum-p2": {0: 30.0, 1: 31.0, 2: 32.0}, "factt": {0: 29.0, 1: 31.5, 2: 30.0},
              "factt/beta=100": {0: 28.0}, "kd": {0: 20.0, 1: 20.0}}
    for cell, per_seed in errors.items():
        for seed, error in per_seed.items():
            run_id = f"cifar10/wrn-16-1_from_wrn-16-2/{cell}/seed{seed}"
            folder = tmp_path / "results/runs/p" / run_id
            folder.mkdir(parents=True)
            (folder / "spec.json").write_text(json.dumps({"id": run_id, "seed": seed, "method_name": cell}))
            (folder / "metrics.json").write_text(json.dumps({"final_test_error": error}))
    text = render_docs.versus(tmp_path, "results/runs/p:at-sum-p2:factt")
    assert "| factt | 3 | 30.17 | -0.83 | [-3.96, +2.29] | 0: -1.00, 1: +0.50, 2: -2.00 |" in text
    assert "| factt, beta=100 | 1 | 28.00 | -2.00 | — | 0: -2.00 |" in text
    assert "kd" not in text.replace("records in", "")
    assert "| factt | 1 | 30.17 | +1.00 | — | 0: +1.00 |" in render_docs.versus(tmp_path, "results/runs/p:factt/beta=100:factt")
    with pytest.raises(ValueError, match="no record of the reference cell 'at-sum-p4'"):
        render_docs.versus(tmp_path, "results/runs/p:at-sum-p4:factt")
