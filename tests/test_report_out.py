"""`python -m at report --out DIR` writes only into an empty folder or one it wrote before: a
folder of the user's, a tracked folder of the project's or a run record is refused in one line,
and nothing in it (nor any record or MLflow run) is touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
PROFILE = "mini"   # a committed profile: its records render without runs/ (--records-only)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _report(out: Path, *extra: str):
    return run_cli(["--params", str(REPO / "params.yaml"), "report", "--profile", PROFILE,
                    "--records-only", "--out", str(out), *extra], cwd=REPO)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    done = _report(out)
    assert done.returncode == 0, done.stderr
    return out


def test_a_folder_of_the_users_is_refused_and_kept(tmp_path):
    notes = tmp_path / "my-notes"
    notes.mkdir()
    (notes / "ideas.md").write_text("try beta = 300\n")
    (notes / "numbers.csv").write_text("1,2\n")
    done = _report(notes)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "holds what the report did not write (ideas.md, numbers.csv)" in done.stderr
    assert _snapshot(notes) == {"ideas.md": b"try beta = 300\n", "numbers.csv": b"1,2\n"}


@pytest.mark.parametrize("tracked", ["slurm", "results/runs/mini/cifar10/wrn-16-1/baseline/seed0"])
def test_a_tracked_folder_of_the_project_is_refused_and_kept(tracked, tmp_path):
    # a copy of the tracked folder, so that a regression deletes nothing of the checkout
    target = tmp_path / Path(tracked).name
    shutil.copytree(REPO / tracked, target)
    before = _snapshot(target)
    done = _report(target)
    assert done.returncode == 2 and "holds what the report did not write" in done.stderr
    assert _snapshot(target) == before


def test_its_own_folder_is_replaced_and_an_added_file_stops_it(rendered):
    before = _snapshot(rendered)
    again = _report(rendered)
    assert again.returncode == 0, again.stderr
    assert _snapshot(rendered) == before   # same records, same bytes; the mark included
    (rendered / "my-plot.png").write_bytes(b"mine")
    done = _report(rendered)
    assert done.returncode == 2 and "(my-plot.png)" in done.stderr
    assert (rendered / "my-plot.png").read_bytes() == b"mine"
    (rendered / "my-plot.png").unlink()


def test_an_empty_or_new_folder_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        done = _report(out)
        assert done.returncode == 0, done.stderr
        assert (out / "README.md").is_file() and (out / ".at-report").is_file()
