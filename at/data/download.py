"""Download, verify and unpack data set files, leaving nothing half-written on disk.

Every source goes through one code path: an ``http(s)://`` URL, a ``file://`` URL, or a plain
local path (the documented way to point a data set at a local copy on machines without
internet) is streamed by urllib into a temp file beside the destination, hashed while it
streams, checked, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from at import atomic

__all__ = [
    "ArchiveError",
    "ChecksumError",
    "DownloadError",
    "Remote",
    "SOURCE_RECORD",
    "archive_name",
    "extract",
    "fetch_and_hash",
    "file_md5",
    "prepare_archive",
    "read_source_record",
    "check_reachable",
    "check_redownload",
    "remember_source",
    "write_source_record",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
SOURCE_RECORD = "source.json"
_MD5_RE = re.compile(r"[0-9a-f]{32}")
_URL_SCHEMES = ("http", "https", "file")


class ChecksumError(ValueError):
    """A downloaded (or supplied) file does not have the expected md5."""


class DownloadError(OSError):
    """A source could not be read completely (HTTP error, network error, short body)."""


class ArchiveError(ValueError):
    """An archive is corrupt, truncated, of an unknown format, or holds an unsafe member."""


def _check_md5(md5: str | None) -> str | None:
    if md5 is None:
        return None
    if not isinstance(md5, str) or not _MD5_RE.fullmatch(md5.lower()):
        raise ValueError(f"md5 must be 32 hexadecimal characters or None, got {md5!r}")
    return md5.lower()


def _as_url(source: str | os.PathLike) -> str:
    """Turns a plain local path into a file:// URL so that it takes the same path as a download."""
    text = os.fspath(source)
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in _URL_SCHEMES:
        return text
    # An empty scheme is a local path; a single letter would be a Windows drive ("C:\...").
    if scheme == "" or len(scheme) == 1:
        return Path(text).expanduser().resolve().as_uri()
    raise ValueError(
        f"unsupported source {text!r}: give an http://, https:// or file:// URL, or a local path"
    )


def archive_name(source: str | os.PathLike) -> str:
    """The file name at the end of a URL or path (what the downloaded file is called)."""
    url = _as_url(source)
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name:
        raise ValueError(f"source {os.fspath(source)!r} does not end in a file name")
    return name


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stream_to_temp(url: str, dest: Path, progress: bool) -> tuple[Path, str]:
    """Copies url into a new temp file beside dest; returns (temp path, md5). Removes it on error."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "at-data/1"})
            try:
                response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
            except urllib.error.HTTPError as e:
                raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
            except urllib.error.URLError as e:
                raise DownloadError(f"could not open {url}: {e.reason}") from e
            except OSError as e:  # a timeout while connecting
                raise DownloadError(f"could not open {url}: {e}") from e
            with response:
                length_header = response.headers.get("Content-Length")
                expected = int(length_header) if length_header and length_header.isdigit() else None
                with tqdm(
                    total=expected,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=False,
                ) as bar:
                    while True:
                        try:
                            chunk = response.read(CHUNK_BYTES)
                        except OSError as e:  # socket timeouts and resets land here
                            raise DownloadError(
                                f"reading {url} failed after {received} bytes: {e}"
                            ) from e
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            # http.client returns a short body silently when the server closes early.
            if expected is not None and received != expected:
                raise DownloadError(
                    f"download of {url} is incomplete: got {received} of {expected} bytes"
                )
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _local_path(url: str) -> Path | None:
    """The file a file:// URL names (None for other schemes)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    return Path(urllib.request.url2pathname(parts.path))


def fetch_and_hash(
    url: str | os.PathLike, md5: str | None, dest: str | os.PathLike, *, progress: bool = True
) -> str:
    """Makes ``dest`` a verified copy of ``url`` and returns its md5.

    ``md5=None`` means "no published hash": the file is downloaded (or, when ``dest`` already
    exists, trusted as it is) and its md5 is returned so that the caller records it and passes
    it next time.
    """
    md5 = _check_md5(md5)
    dest = Path(dest)
    url_text = _as_url(url)
    if dest.is_file():
        actual = file_md5(dest)
        if md5 is None or actual == md5:
            return actual
        log.warning("%s has md5 %s, expected %s: fetching it again from %s", dest, actual, md5, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = _local_path(url_text)
    if local is not None and md5 is not None:
        # a local copy is checked where it lies, before a byte is written: a wrong (or huge)
        # file costs one read, not a copy of itself in the staging folder
        if not local.is_file():
            raise DownloadError(f"could not open {os.fspath(url)}: no such file")
        actual = file_md5(local)
        if actual != md5:
            raise ChecksumError(
                f"checksum mismatch for {os.fspath(url)} ({local.stat().st_size} bytes): expected md5 "
                f"{md5}, got {actual}; nothing was copied (if this is a legitimate different copy, "
                f"pass its md5 explicitly)")
    tmp, actual = _stream_to_temp(url_text, dest, progress)
    if md5 is not None and actual != md5:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {dest.name} from {os.fspath(url)}: expected md5 {md5}, "
            f"got {actual}; the file was not kept (if this is a legitimate different copy, "
            f"pass its md5 explicitly)"
        )
    os.chmod(tmp, 0o666 & ~atomic._umask())  # mkstemp's 0600 would hide the data from a group
    os.replace(tmp, dest)
    return actual


# ---------------------------------------------------------------------------------------------
# Extraction


def _unsafe(archive: Path, member: str, why: str) -> ArchiveError:
    return ArchiveError(f"refusing to extract {archive}: member {member!r} {why}; nothing was extracted")


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """Validated path components of a member name (relative, no '..')."""
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        raise _unsafe(archive, name, "has an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise _unsafe(archive, name, "has a '..' component")
    return parts


_MAX_LINK_HOPS = 40


def _resolve(parts: Sequence[str], links: Mapping[tuple[str, ...], tuple[str, ...]], hops: int = 0):
    """Resolves a relative path inside the archive the way the file system will, following the
    archive's own symlinks; returns its components, or None when it leaves the archive root.

    A purely lexical check is not enough: with ``q -> .``, the target ``q/q/..`` looks like it
    stays inside but really names the parent of the root.
    """
    stack: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        target = links.get(tuple(stack))
        if target is not None:
            if hops >= _MAX_LINK_HOPS:
                raise RecursionError("symlink loop")
            resolved = _resolve((*stack[:-1], *target), links, hops + 1)
            if resolved is None:
                return None
            stack = list(resolved)
    return tuple(stack)


def _check_tar_members(archive: Path, members: Sequence[tarfile.TarInfo]) -> None:
    links: dict[tuple[str, ...], tuple[str, ...]] = {}
    for m in members:
        parts = _member_parts(archive, m.name)
        try:
            if m.isreg() or m.isdir():
                # Writing through a symlinked folder (or onto a symlink) must stay inside too.
                if parts and _resolve(parts, links) is None:
                    raise _unsafe(archive, m.name, "would be written through a symlink pointing outside")
            elif m.issym():
                target = PurePosixPath(m.linkname)
                if target.is_absolute() or _resolve((*parts[:-1], *target.parts), links) is None:
                    raise _unsafe(archive, m.name, f"is a symlink pointing outside the archive ({m.linkname!r})")
                links[tuple(parts)] = target.parts
            elif m.islnk():
                target = PurePosixPath(m.linkname)
                if target.is_absolute() or _resolve(target.parts, links) is None:
                    raise _unsafe(archive, m.name, f"is a hard link pointing outside the archive ({m.linkname!r})")
            else:
                raise _unsafe(archive, m.name, "is a device file, fifo or other special file")
        except RecursionError:
            raise _unsafe(archive, m.name, "is part of a symlink loop") from None


def _is_zip(archive: Path) -> bool:
    with open(archive, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _is_compressed(archive: Path) -> bool:
    with open(archive, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def _list_tar(archive: Path, tar: tarfile.TarFile) -> list[str]:
    members = tar.getmembers()
    _check_tar_members(archive, members)
    if not _is_compressed(archive):
        # An uncompressed tar cut inside a member's data still lists fine; catch it up front.
        size = archive.stat().st_size
        for m in members:
            if m.isreg() and m.offset_data + m.size > size:
                raise ArchiveError(
                    f"archive {archive} is truncated: member {m.name!r} needs "
                    f"{m.offset_data + m.size} bytes, the file has {size}"
                )
    return [m.name for m in members]


def _list_zip(archive: Path, zf: zipfile.ZipFile) -> list[str]:
    names = []
    for info in zf.infolist():
        _member_parts(archive, info.filename)
        # Unix zips keep st_mode in the high 16 bits; many writers leave the file type bits 0.
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _unsafe(archive, info.filename, "is a symlink (not supported in zip archives)")
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _unsafe(archive, info.filename, "is a device file, fifo or other special file")
        names.append(info.filename)
    return names


def _corrupt(archive: Path, e: BaseException) -> ArchiveError:
    return ArchiveError(f"archive {archive} is corrupt or truncated ({type(e).__name__}: {e})")


def _is_data_error(e: BaseException) -> bool:
    """Whether an exception raised while reading an archive means bad archive bytes.

    Decompressors report bad data as OSError without an errno (gzip, bz2); a real I/O failure
    such as a full disk has one and is re-raised as it is.
    """
    if isinstance(e, (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError)):
        return True
    return isinstance(e, OSError) and e.errno is None


def _open_and_list(archive: Path) -> tuple[tarfile.TarFile | zipfile.ZipFile, list[str]]:
    """Opens the archive and checks every member; nothing is written."""
    try:
        container = zipfile.ZipFile(archive) if _is_zip(archive) else tarfile.open(archive, "r:*")
    except tarfile.ReadError as e:
        raise ArchiveError(f"{archive} is not a tar or zip archive, or it is corrupt ({e})") from e
    except BaseException as e:
        if _is_data_error(e):
            raise _corrupt(archive, e) from e
        raise
    try:
        if isinstance(container, zipfile.ZipFile):
            return container, _list_zip(archive, container)
        return container, _list_tar(archive, container)
    except BaseException as e:
        container.close()
        if _is_data_error(e):
            raise _corrupt(archive, e) from e
        raise


def _read_to_end(stream) -> None:
    """Reads what is left of a tar's (decompressed) stream.

    Extraction stops after the last member's data; a gzip or xz stream checks its CRC only at
    its very end, so without this a corrupt archive whose damage does not upset the
    decompressor itself would unpack garbled files without an error.
    """
    while stream.read(CHUNK_BYTES):
        pass


def extract(archive: str | os.PathLike, dest_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Unpacks a tar (plain, gz, bz2, xz) or zip archive into ``dest_dir``; returns ``dest_dir``.

    All members are checked before anything is written: absolute paths, '..' components,
    links pointing outside the archive and special files are refused. The archive is unpacked
    into a hidden temp folder inside ``dest_dir`` and each top-level entry is then renamed into
    place, so a corrupt or truncated archive leaves nothing behind. A top-level entry that
    already exists is an error unless ``overwrite``, which replaces it.
    """
    archive = Path(archive)
    dest_dir = Path(dest_dir)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    container, names = _open_and_list(archive)
    with container:
        top_level = sorted({PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts})
        if not top_level:
            raise ArchiveError(f"archive {archive} is empty")
        if not overwrite:
            clash = [n for n in top_level if os.path.lexists(dest_dir / n)]
            if clash:
                raise FileExistsError(
                    f"extracting {archive} into {dest_dir} would replace {clash}; remove them first"
                )
        created = not dest_dir.exists()
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
        moved = False
        try:
            try:
                if isinstance(container, zipfile.ZipFile):
                    container.extractall(tmp)
                elif hasattr(tarfile, "data_filter"):
                    # A second line of defence: the stdlib filter re-checks links against the
                    # real file system (chains of symlinks) while it writes.
                    container.extractall(tmp, filter="data")
                else:  # pragma: no cover - Python without PEP 706
                    container.extractall(tmp)
                if isinstance(container, tarfile.TarFile):
                    _read_to_end(container.fileobj)
            except BaseException as e:
                if isinstance(e, getattr(tarfile, "FilterError", ())):
                    raise ArchiveError(f"refusing to extract {archive}: {e}; nothing was extracted") from e
                if _is_data_error(e):
                    raise _corrupt(archive, e) from e
                raise
            for name in sorted(os.listdir(tmp)):
                target = dest_dir / name
                if os.path.lexists(target):
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
                os.replace(tmp / name, target)
                moved = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if created and not moved:
                shutil.rmtree(dest_dir, ignore_errors=True)
    return dest_dir


# ---------------------------------------------------------------------------------------------
# The record of where a prepared data set came from


def read_source_record(root: str | os.PathLike) -> dict:
    """The contents of ``root/source.json``, or {} when there is none."""
    path = Path(root) / SOURCE_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to prepare the data again") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(record).__name__}")
    return record


def write_source_record(root: str | os.PathLike, record: Mapping) -> Path:
    """Writes ``root/source.json`` atomically (temp file, then rename)."""
    path = Path(root) / SOURCE_RECORD
    return atomic.write_text(path, json.dumps(dict(record), indent=2, sort_keys=True) + "\n")


# A re-download's first check answers within this: a host that is down or unreachable is seen
# before any tool deletes the data it would replace.
PROBE_TIMEOUT_S = 5.0


def check_reachable(url: str | os.PathLike, md5: str | None) -> None:
    """Raises DownloadError or ChecksumError (one line) when ``url`` cannot be fetched now: a
    local file that is missing or has another md5, a host that does not answer its first byte
    within PROBE_TIMEOUT_S. Cheap: a local file is read once, a remote one asked for one byte."""
    full = _as_url(url)
    local = _local_path(full)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"{os.fspath(url)} does not exist")
        if md5 is not None and file_md5(local) != _check_md5(md5):
            raise ChecksumError(f"{os.fspath(url)} has md5 {file_md5(local)}, not the {md5} asked for")
        return
    request = urllib.request.Request(full, headers={"User-Agent": "at-data/1", "Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as e:
        raise DownloadError(f"could not download {full}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"could not open {full}: {e.reason}") from None
    except OSError as e:   # a timeout
        raise DownloadError(f"could not open {full}: {e}") from None


def check_redownload(root: str | os.PathLike, source: Mapping, override_variable: str) -> None:
    """Before a tool that deletes a data folder ahead of its download job (Snakemake removes a
    job's outputs before it starts) re-downloads it from another source: refuse in one line,
    keeping the data, when that source cannot be fetched now."""
    record = read_source_record(root)
    if not record or not Path(root).is_dir():
        return
    if (record.get("url"), record.get("md5")) == (os.fspath(source["url"]), _check_md5(source.get("md5"))):
        return
    try:
        check_reachable(source["url"], source.get("md5"))
    except (DownloadError, ChecksumError, ValueError) as e:
        raise DownloadError(f"{root} holds the data of {record.get('url')}; a download from {source['url']} "
                            f"cannot start ({e}), so the data is left as it is: fix or unset "
                            f"{override_variable} to keep using it") from None


def remember_source(root: str | os.PathLike, configured: Mapping) -> None:
    """Records in ``root/source.json`` which source params.yaml named when the data was fetched
    (``configured``: its url and md5), so that with no override set the data fetched through one
    stays the data in use (at.params.data_source) until params.yaml names another source."""
    record = read_source_record(root)
    if record and record.get("configured") != dict(configured):
        write_source_record(root, {**record, "configured": dict(configured)})


@dataclass(frozen=True)
class Remote:
    """One file to fetch: where from, and its md5 (None: record it on first download)."""

    url: str
    md5: str | None = None


def _make_parents(folder: Path) -> list[Path]:
    """Creates the missing parents of ``folder``; returns those created, innermost first."""
    created = []
    parent = folder.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir(exist_ok=True)
    return created


@contextlib.contextmanager
def _staging(root: Path):
    """A new empty folder beside ``root`` (same file system, so it can be renamed onto it).

    On an error the folder and any parent folder made for it are removed again: a failed
    first download leaves no empty data root behind.
    """
    created = _make_parents(root)
    stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".staging", dir=root.parent))
    os.chmod(stage, 0o777 & ~atomic._umask())  # it becomes the data folder: not mkdtemp's 0700
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: a parallel download may have used it
        raise


def _swap_in(stage: Path, root: Path) -> None:
    """Puts the verified ``stage`` folder where ``root`` is; the old ``root`` is removed after."""
    if not os.path.lexists(root):
        os.rename(stage, root)
        return
    # Two renames, not one: a folder cannot be renamed onto a non-empty folder. Between them the
    # old tree still exists under the hidden name, and is put back if the second rename fails.
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
    os.rmdir(old)
    os.rename(root, old)
    try:
        os.rename(stage, root)
    except BaseException:
        os.rename(old, root)
        raise
    # the new data is in place: a copy of the old one that cannot be deleted is not a failure
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
        log.warning("could not remove the replaced data folder %s: delete it by hand", old)


def _offer_existing(existing: Path, dest: Path) -> None:
    """Puts the file of the current data folder at ``dest`` (a hard link when the file system
    allows it), so that fetching it into the new tree is only a checksum when it is unchanged."""
    if not existing.is_file():
        return
    try:
        os.link(existing, dest)
    except OSError:
        shutil.copy2(existing, dest)


def prepare_archive(
    root: str | os.PathLike,
    dataset: str,
    archive: Remote,
    *,
    contains: Sequence[str],
    files: Mapping[str, Remote] | None = None,
    verify: Callable[[Path], object] | None = None,
    progress: bool = True,
) -> dict:
    """Fetches and unpacks ``archive`` (plus loose ``files``) into ``root``; returns the record.

    ``root/source.json`` records the data set, the archive's name, URL and md5, and each loose
    file's URL and md5. A call whose request matches the record, with every path of
    ``contains`` and every loose file present, does nothing. A file with ``md5=None`` is checked
    against the md5 recorded on its first download, if there is one.

    The new tree is built in a hidden folder beside ``root`` and checked completely there:
    every archive member read to its end (so a bad gzip CRC is seen), every path of
    ``contains`` present, and ``verify(folder)`` (the data set's real loader) passing. Only
    then does it replace ``root``, whose archive, tree and record stay untouched until that
    moment; after any failure nothing of the attempt is left on disk. ``root`` is the data
    set's own folder: it is replaced as a whole, anything else kept in it goes too.
    """
    root = Path(root)
    if root.is_symlink():
        root = root.resolve()  # replace the data where it lives, not the link to it
    files = dict(files or {})
    name = archive_name(archive.url)
    record = read_source_record(root)
    recorded_files = record.get("files", {}) if record.get("dataset") == dataset else {}

    def expected_md5(remote: Remote, recorded: dict | None) -> str | None:
        if remote.md5 is not None:
            return _check_md5(remote.md5)
        return recorded.get("md5") if recorded else None

    archive_recorded = record if record.get("dataset") == dataset and record.get("archive") == name else None
    archive_md5 = expected_md5(archive, archive_recorded)
    file_md5s = {n: expected_md5(r, recorded_files.get(n)) for n, r in files.items()}

    if (
        archive_recorded is not None
        and archive_md5 is not None
        and archive_recorded.get("md5") == archive_md5
        and all(n in recorded_files and recorded_files[n].get("md5") == m for n, m in file_md5s.items())
        and all((root / n).is_file() for n in files)
        and all((root / p).exists() for p in contains)
    ):
        return record

    def fetch_one(remote: Remote, md5: str | None, stage: Path, file_name: str) -> str:
        _offer_existing(root / file_name, stage / file_name)
        try:
            return fetch_and_hash(remote.url, md5, stage / file_name, progress=progress)
        except ChecksumError as e:
            if remote.md5 is None and md5 is not None:
                raise ChecksumError(
                    f"{e}. No md5 is published for this file: {md5} is the one recorded in "
                    f"{root / SOURCE_RECORD} on its first download. If the file changed upstream "
                    f"on purpose, delete that record to accept the new one."
                ) from None
            raise

    with _staging(root) as stage:
        new_files = {}
        for n, remote in files.items():
            new_files[n] = {"url": os.fspath(remote.url), "md5": fetch_one(remote, file_md5s[n], stage, n)}
        got_archive = fetch_one(archive, archive_md5, stage, name)
        try:
            extract(stage / name, stage)
        except ArchiveError as e:
            # the staged copy is gone when the user reads this: name the file they gave
            raise ArchiveError(str(e).replace(str(stage / name), f"{name} (from {os.fspath(archive.url)})")) from None
        missing = [p for p in contains if not (stage / p).exists()]
        if missing:
            raise ArchiveError(f"archive {name} (from {archive.url}) does not contain {missing}")
        if verify is not None:
            verify(stage)
        new_record = {"dataset": dataset, "url": os.fspath(archive.url), "md5": got_archive, "archive": name}
        if new_files:
            new_record["files"] = new_files
        write_source_record(stage, new_record)
        _swap_in(stage, root)
    return new_record
