"""Bad input at the edges (issue 38, "Reliability, round three"): each is one line naming the
problem, a non-zero exit, within seconds, nothing lost or half-written.

Real parts where the claim is about them: a real process (with a memory limit) for the YAML
bombs and for a plugin's exit, a real symbolic link, folder, FIFO and hard link in place of a
run's lock file, a real read-only bind mount (root only) under the report. The data-parallel
rank killed mid-epoch is in tests/test_distributed_processes.py (real torchrun ranks).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from at import grid, run_lock, yaml_file
from at.errors import SHOWN_MAX, ParamsError
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
PARAMS_TEXT = (REPO / "params.yaml").read_text()
SEEDS_LINE = "seeds: [0, 1, 2]\n"


def _params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _python(args: list[str], cwd: Path, memory_bytes: int = 1 << 30, timeout: float = 60,
            pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    """`python ARGS` in a real process whose address space is capped at ``memory_bytes``."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [REPO, *pythonpath]))}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


# ------------------------------------------------------------------------------------------------
# 1. A sweep value whose run-id part breaks the names rule


def test_a_sweep_value_too_long_for_a_run_id_is_refused_when_params_yaml_is_read(params, tmp_path):
    import yaml

    params["tables"]["beta-sweep"]["rows"]["sum-p2"]["sweep"] = {"beta": [100, 1.0e308]}
    with pytest.raises(ParamsError) as info:
        grid.validate(params)
    message = str(info.value)
    # 1e308 is an integer-valued float, spelled in ids with all its 309 digits
    assert "tables.beta-sweep.rows.sum-p2.sweep: value 1e+308 would name its runs 'beta=1000" in message
    assert "(314 characters): a run-id part must be at most 64 letters" in message
    assert len(message) < 400
    # the command line of `python -m at runs` (what Snakemake and DVC read too)
    path = _params_file(tmp_path, PARAMS_TEXT.replace("sum-p2: {method: at-sum-p2, sweep: {beta: [100, 1000]}}",
                                                      "sum-p2: {method: at-sum-p2, sweep: {beta: [100, 1.0e+308]}}"))
    assert yaml.safe_load(path.read_text())["tables"]["beta-sweep"]["rows"]["sum-p2"]["sweep"]["beta"][1] == 1e308
    ran = run_cli(["--params", str(path), "runs", "--profile", "sweep-smoke"])
    assert ran.returncode == 2 and ran.stdout == ""
    assert "value 1e+308 would name its runs" in _one_line(ran.stderr)


def test_sweep_values_within_the_names_rule_still_name_their_runs(params):
    params["tables"]["beta-sweep"]["rows"]["sum-p2"]["sweep"] = {"beta": [1e-300, 123456789.125, 1000]}
    ids = {r.id for r in grid.runs(params, "sweep-smoke")}
    assert "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/beta=1e-300/seed0" in ids
    assert "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/beta=123456789.125/seed0" in ids


# ------------------------------------------------------------------------------------------------
# 2. YAML bombs: refused while composing, before anything is built


def _laughs(levels: int = 9) -> list[str]:
    """The anchors of a billion laughs: level i is nine aliases of level i - 1 (9^10 values)."""
    return ["lol0: &l0 [0, 0, 0, 0, 0, 0, 0, 0, 0]"] + [
        f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]


BOMB_INSIDE_SEEDS = PARAMS_TEXT.replace(SEEDS_LINE, "seeds: [0, {" + ", ".join(_laughs()) + "}]\n", 1)
# the anchors in a data set's free-form keys, before `seeds` names the last of them
BOMB_FROM_SEEDS = PARAMS_TEXT.replace(SEEDS_LINE, "", 1).replace(
    "    num_classes: 1000\n", "    num_classes: 1000\n    laughs: {" + ", ".join(_laughs()) + "}\n", 1
) + "seeds: *l9\n"


def test_the_loader_refuses_aliases_that_stand_for_too_many_values():
    text = "\n".join(_laughs()) + "\n"
    start = time.monotonic()
    with pytest.raises(yaml_file.AliasError, match=r"^line 5: aliases \(\*name\) stand for more than 10000 values"):
        yaml_file.loads(text)
    assert time.monotonic() - start < 1
    # what the project's files do with aliases is far below the bound
    assert yaml_file.loads("a: &a {x: 1, y: [1, 2]}\nb: {<<: *a, y: 3}\nc: [*a, *a]\n")["b"] == {"x": 1, "y": 3}
    reused = yaml_file.loads("a: &a [" + ", ".join(["1"] * 99) + "]\nb: [" + ", ".join(["*a"] * 99) + "]\n")
    assert len(reused["b"]) == 99


def test_the_loader_refuses_an_alias_inside_the_node_it_names():
    with pytest.raises(yaml_file.AliasError, match=r"^line 1: alias \*a lies inside the node it names"):
        yaml_file.loads("a: &a [1, *a]\n")


@pytest.mark.parametrize("text", [BOMB_INSIDE_SEEDS, BOMB_FROM_SEEDS], ids=["inside-seeds", "from-seeds"])
def test_a_yaml_bomb_in_params_yaml_is_one_line_in_a_second(tmp_path, text):
    path = _params_file(tmp_path, text)
    start = time.monotonic()
    # a real process capped at 1 GiB: the bombs took 3 and 5.7 GiB (49 s, 114 s) before
    done = _python(["-m", "at", "--params", str(path), "runs", "--profile", "smoke"], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert done.returncode == 2 and done.stdout == ""
    line = _one_line(done.stderr)
    assert line.startswith(f"error: {path}: line ") and "stand for more than 10000 values" in line, line
    assert elapsed < 15, f"{elapsed:.1f} s (the process's start included)"


def test_a_value_quoted_in_an_error_is_cut_short(params):
    from at import schema

    params["seeds"] = ["x" * 100_000]
    with pytest.raises(ParamsError) as info:
        schema.check(params)
    message = str(info.value)
    assert message.startswith("params.yaml: seeds") and "'xxxx" in message and "..." in message
    assert len(message) < 2 * SHOWN_MAX
    params["seeds"] = [0]
    params["protocols"]["cifar"]["augment"] = list(range(10**6))
    with pytest.raises(ParamsError, match=r"unknown value \[0, 1, 2, 3, \.\.\.\]; allowed"):
        schema.check(params)
    # past the schema: a term's option, a name
    from at import names
    from at.method import validate_method

    for refused in (lambda: validate_method({"terms": [{"type": "at", "p": "x" * 100_000}]}),
                    lambda: validate_method({"terms": [{"type": "at", "layers": list(range(-1, 10**6))}]}),
                    lambda: names.check_name("x" * 100_000, "profile")):
        with pytest.raises(ValueError) as info:
            refused()
        assert "..." in str(info.value) and len(str(info.value)) < 2 * SHOWN_MAX, str(info.value)[:300]


# ------------------------------------------------------------------------------------------------
# 3. The run's lock file is never followed and must be a plain file


def _train_args(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--params", str(REPO / "params.yaml"), "train", "--student", "wrn-10-1", "--out", str(out),
            "--id", "edges", "--data-dir", str(data_dir), "--train-subset", "64", "--test-subset", "64",
            "--batch-size", "32", "--lr-drops", "", "--epochs", "1", "--threads", "1", "--no-progress", *extra]


def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_left_alone(tmp_path, cifar_mini_dir,
                                                                             mlflow_store):
    target = tmp_path / "precious.txt"
    target.write_text("the user's file\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    ran = run_cli(_train_args(out, cifar_mini_dir))
    assert ran.returncode == 2
    assert _one_line(ran.stderr) == (f"error: run edges: its lock file {out / '.lock'} is a symbolic link "
                                     f"(to {target}): a lock is never followed, and its target was left as "
                                     f"it is; remove the link")
    assert target.read_text() == "the user's file\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "nothing else written"


def test_a_lock_that_is_a_folder_is_one_line(tmp_path, cifar_mini_dir, mlflow_store):
    out = tmp_path / "run"
    (out / ".lock" / "inside").mkdir(parents=True)
    ran = run_cli(_train_args(out, cifar_mini_dir))
    assert ran.returncode == 2
    assert _one_line(ran.stderr) == (f"error: run edges: its lock file {out / '.lock'} is a folder: move it "
                                     f"aside (the run's lock is a file)")
    assert sorted(p.name for p in out.iterdir()) == [".lock"] and (out / ".lock" / "inside").is_dir()


def test_a_lock_that_is_a_fifo_or_a_hard_link_is_refused(tmp_path):
    fifo, linked = tmp_path / "fifo", tmp_path / "linked"
    fifo.mkdir()
    linked.mkdir()
    os.mkfifo(fifo / ".lock")
    other = tmp_path / "other.txt"
    other.write_text("kept\n")
    os.link(other, linked / ".lock")
    start = time.monotonic()
    with pytest.raises(run_lock.LockError, match=r"\.lock is not a plain file"):
        with run_lock.hold({"f": fifo}):
            pass
    assert time.monotonic() - start < 5, "a FIFO is not waited on"
    with pytest.raises(run_lock.LockError, match=r"\.lock is a hard link \(2 names for one file\)"):
        with run_lock.hold({"l": linked}):
            pass
    assert other.read_text() == "kept\n"
    (tmp_path / "plain").mkdir()
    with run_lock.hold({"p": tmp_path / "plain"}):
        assert (tmp_path / "plain" / ".lock").is_file()   # a plain lock, as before


# ------------------------------------------------------------------------------------------------
# 4. A read-only results/ (a real read-only bind mount)


@pytest.fixture
def read_only_results(tmp_path):
    """A copy of the repository's params, references and committed results, with results/ a
    read-only bind mount of itself (root only; unmounted afterwards)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root (chmod does not stop root's writes)")
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("params.yaml", "references.yaml"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "results", work / "results")
    results = work / "results"
    done = subprocess.run(["mount", "--bind", str(results), str(results)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(results)], check=True, capture_output=True)
        yield work
    finally:
        subprocess.run(["umount", str(results)], check=False)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_read_only_results_folder_is_one_line_naming_it(read_only_results, tmp_path):
    work = read_only_results
    before = _tree(work / "results")
    ran = run_cli(["--params", "params.yaml", "report", "--profile", "mini", "--records-only"], cwd=work)
    assert ran.returncode == 2
    assert _one_line(ran.stderr) == ("error: cannot write the report results/mini: results is on a read-only "
                                     "file system; nothing was written")
    # rendered elsewhere, the records it would export are still under the read-only results/:
    # said before MLflow is opened
    ran = run_cli(["--params", "params.yaml", "report", "--profile", "mini", "--out", str(tmp_path / "out")],
                  cwd=work)
    assert ran.returncode == 2
    assert _one_line(ran.stderr) == ("error: cannot write the records results/runs/mini: results/runs/mini is "
                                     "on a read-only file system; nothing was written")
    assert not (tmp_path / "out").exists() and not (work / "mlruns.db").exists()
    assert _tree(work / "results") == before


# ------------------------------------------------------------------------------------------------
# 5. A batch larger than the training images


def test_a_batch_larger_than_the_data_is_refused_like_a_subset(tmp_path, cifar_mini_dir, mlflow_store):
    out = tmp_path / "run"
    args = _train_args(out, cifar_mini_dir)
    args[args.index("--batch-size") + 1] = "1000000000"
    ran = run_cli(args)
    assert ran.returncode == 2
    assert _one_line(ran.stderr) == ("error: run edges: protocol.batch_size is 1000000000, but the run has only "
                                     "64 training images (protocol.train_subset): lower it to at most 64")
    assert not out.exists(), "nothing left behind"


# ------------------------------------------------------------------------------------------------
# 6. A plugin that exits while being imported


def test_a_plugin_that_calls_sys_exit_at_import_fails_the_command(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "leaving.py").write_text("import sys\n\nsys.exit(0)\n")
    path = _params_file(tmp_path, "plugins: [leaving]\n" + PARAMS_TEXT)
    done = _python(["-m", "at", "--params", str(path), "runs", "--profile", "smoke"], cwd=tmp_path,
                   pythonpath=[plugins])
    assert done.returncode == 2 and done.stdout == ""
    assert _one_line(done.stderr) == (f"error: {path}: plugins: plugin 'leaving' called sys.exit(0) while being "
                                      f"imported: a plugin registers its entries and returns")
