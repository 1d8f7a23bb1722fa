"""Checkpoint files that cannot be used give one clear error naming the file and the problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from at import checkpoint
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]
# torch's refusal of a pickled object suggests retrying without the safety: never repeat that
RETRY_ADVICE = ("weights_only=False", "weights_only` set to `False`", "trusted source")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _error_of(path: Path) -> str:
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(path)
    return str(info.value)


def test_empty_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    message = _error_of(empty)
    assert str(empty) in message and "empty (0 bytes)" in message


def test_truncated_file_is_a_clear_error(tmp_path):
    whole = tmp_path / "whole.pt"
    checkpoint.save({"spec": {"id": "x"}, "model": {"w": torch.zeros(100)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:200])
    message = _error_of(cut)
    assert str(cut) in message and "corrupt" in message


@pytest.mark.parametrize("missing", [["model"], ["spec"], ["spec", "model"]])
def test_checkpoint_without_model_or_spec_names_what_is_missing(tmp_path, missing):
    path = tmp_path / "partial.pt"
    payload = {"spec": {"id": "x"}, "model": {"w": torch.zeros(1)}}
    checkpoint.save({k: v for k, v in payload.items() if k not in missing}, path)
    message = _error_of(path)
    assert str(path) in message
    for key in missing:
        assert f"no {key}" in message
    assert checkpoint.load(path, required=()) is not None, "a caller may ask for less"


def test_refused_pickle_names_the_object_and_never_advises_an_unsafe_load(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "x": _RunsCode()}, evil)
    message = _error_of(evil)
    assert str(evil) in message and "system" in message, message
    for advice in RETRY_ADVICE:
        assert advice not in message, message


def test_no_checkpoint_error_repeats_the_unsafe_advice(tmp_path):
    """Every way a load can fail, the message never suggests weights_only=False."""
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    evil = tmp_path / "evil.pt"
    torch.save([_RunsCode()], evil)
    old = tmp_path / "old.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 0}, old)
    for path in (foreign, garbage, evil, old, tmp_path / "absent.pt"):
        message = _error_of(path)
        assert str(path) in message
        assert not any(advice in message for advice in RETRY_ADVICE), message


def test_cli_reports_a_bad_teacher_checkpoint_in_one_line_without_traceback(tmp_path, cifar_mini_dir, mlflow_store):
    empty = tmp_path / "teacher.pt"
    empty.write_bytes(b"")
    result = run_cli(["--params", str(REPO / "params.yaml"), "train", "--student", "wrn-10-1",
                      "--teacher-checkpoint", str(empty), "--method", "at-sum-p2", "--out", str(tmp_path / "run"),
                      "--data-dir", str(cifar_mini_dir), "--epochs", "1", "--no-progress"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(empty) in lines[0], result.stderr
