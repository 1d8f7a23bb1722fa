"""Atomic writes: all or nothing, with the permissions of a plain open()."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from at import atomic
from at.errors import WriteError


def test_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def writer(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*x\.json: No space left on device \(.* MiB free"):
        atomic.write_with(target, writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "shared.md", "table")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
