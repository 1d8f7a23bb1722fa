"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The bytes go to a temporary file in the target's folder (same file system, so the rename is
atomic), are flushed to disk, get the permissions a plain ``open`` would give (mkstemp's 0600
would hide results and data from the rest of a group on a shared cluster), and are renamed
over the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, IO

from at.errors import WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_SUFFIX = ".tmp"


def temporary_files(folder: str | os.PathLike) -> list[Path]:
    """The temporary files this module left in ``folder`` (a kill between write and rename)."""
    return sorted(p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file())


def _write_failed(path: Path, error: BaseException) -> WriteError:
    """One line for a write that the file system refused (full, over quota, read-only)."""
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return WriteError(f"could not write {path}: {reason} ({free}); it was left as it was: make room and "
                      f"run again")


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """WriteError naming ``folder`` unless this process can create files in it (or, where it does
    not exist yet, in its nearest existing parent): checked before a command changes anything,
    so that a read-only folder is one line and not a traceback half-way. ``what`` says what
    was to be written there."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    if os.access(path, os.W_OK | os.X_OK):   # access() also answers EROFS, even for root
        return
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    raise WriteError(f"cannot write {what}: {path} {why}; nothing was written")


class _Recording:
    """A file that remembers the OSError of a failed write: torch's checkpoint writer turns it
    into a RuntimeError of its zip container ("unexpected pos ..."), which names no reason."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_with(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> Path:
    """Call ``writer(file)`` on a temporary file, then rename it to ``path``. A write that the
    file system refuses is a :class:`WriteError` (torch's writer reports it as a RuntimeError
    of its zip container), with the temporary file removed and ``path`` untouched."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise _write_failed(path, e) from None
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _Recording(f)
            writer(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_failed(path, e) from None
    except RuntimeError as e:
        Path(tmp).unlink(missing_ok=True)
        if recorder is not None and recorder.error is not None:   # torch's writer hid an OSError
            raise _write_failed(path, recorder.error) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def copy_file(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` becomes a copy of ``source``'s bytes, atomically (a new file, a new modification
    time). A copy, not a hard link: DVC replaces an output that has a second name (its mtime
    moves, and Snakemake would call everything after it out of date)."""
    with open(source, "rb") as f:
        return write_with(path, lambda out: shutil.copyfileobj(f, out))
