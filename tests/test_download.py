"""at.data.download: verified downloads (loopback HTTP, file:// and plain paths) and safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from http_server import serve

from at.data import download
from at.data.download import ArchiveError, ChecksumError, DownloadError, extract, fetch_and_hash

PAYLOAD = os.urandom(300_000) + b"end"
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
WRONG_MD5 = "0" * 32


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(PAYLOAD)
    with serve(folder) as server:
        yield server


@pytest.fixture
def dest_dir(tmp_path):
    d = tmp_path / "dest"
    d.mkdir()
    return d


def test_fetch_over_http_with_good_md5(served, dest_dir):
    dest = dest_dir / "blob.bin"
    assert fetch_and_hash(served.url("blob.bin"), PAYLOAD_MD5, dest) == PAYLOAD_MD5
    assert dest.read_bytes() == PAYLOAD
    assert dest.read_bytes() == PAYLOAD
    assert sorted(os.listdir(dest_dir)) == ["blob.bin"]  # no temp file left


def test_fetch_wrong_md5_names_both_hashes_and_leaves_nothing(served, dest_dir):
    url = served.url("blob.bin")
    with pytest.raises(ChecksumError) as info:
        fetch_and_hash(url, WRONG_MD5, dest_dir / "blob.bin")
    message = str(info.value)
    assert WRONG_MD5 in message and PAYLOAD_MD5 in message and "blob.bin" in message and url in message
    assert isinstance(info.value, ValueError)
    assert os.listdir(dest_dir) == []


def test_fetch_skips_when_dest_already_verified(served, dest_dir):
    dest = dest_dir / "blob.bin"
    fetch_and_hash(served.url("blob.bin"), PAYLOAD_MD5, dest)
    served.requested.clear()
    fetch_and_hash(served.url("blob.bin"), PAYLOAD_MD5, dest)
    assert served.requested == []


def test_fetch_replaces_a_corrupt_existing_file(served, dest_dir):
    dest = dest_dir / "blob.bin"
    dest.write_bytes(b"stale")
    fetch_and_hash(served.url("blob.bin"), PAYLOAD_MD5, dest)
    assert dest.read_bytes() == PAYLOAD
    assert served.requested == ["/blob.bin"]


def test_fetch_without_md5_returns_the_hash_to_record(served, dest_dir):
    assert fetch_and_hash(served.url("blob.bin"), None, dest_dir / "blob.bin") == PAYLOAD_MD5
    assert (dest_dir / "blob.bin").read_bytes() == PAYLOAD


def test_http_error_names_url_and_leaves_nothing(served, dest_dir):
    url = served.url("missing.bin")
    with pytest.raises(DownloadError, match="404") as info:
        fetch_and_hash(url, PAYLOAD_MD5, dest_dir / "missing.bin")
    assert url in str(info.value)
    assert os.listdir(dest_dir) == []


def test_truncated_http_body_is_an_error_and_leaves_nothing(served, dest_dir):
    url = served.url("truncated/blob.bin")
    with pytest.raises(DownloadError, match="incomplete") as info:
        fetch_and_hash(url, None, dest_dir / "blob.bin")
    assert url in str(info.value)
    assert os.listdir(dest_dir) == []


@pytest.mark.parametrize("form", ["file_url", "plain_path", "relative_path"])
def test_local_sources_take_the_same_verified_path(tmp_path, dest_dir, monkeypatch, form):
    source = tmp_path / "local copy.bin"  # a space, to exercise URL quoting
    source.write_bytes(PAYLOAD)
    if form == "file_url":
        url = source.as_uri()
    elif form == "plain_path":
        url = str(source)
    else:
        monkeypatch.chdir(tmp_path)
        url = "local copy.bin"
    streamed = []
    original = download._stream_to_temp
    monkeypatch.setattr(
        download, "_stream_to_temp", lambda u, d, p: streamed.append(u) or original(u, d, p)
    )

    assert fetch_and_hash(url, PAYLOAD_MD5, dest_dir / "copy.bin") == PAYLOAD_MD5
    assert (dest_dir / "copy.bin").read_bytes() == PAYLOAD
    with pytest.raises(ChecksumError) as info:
        fetch_and_hash(url, WRONG_MD5, dest_dir / "other.bin")
    assert PAYLOAD_MD5 in str(info.value) and WRONG_MD5 in str(info.value)
    assert sorted(os.listdir(dest_dir)) == ["copy.bin"]
    # the wrong copy was refused where it lies, before any byte was copied, naming the user's file
    assert len(streamed) == 1 and streamed[0].startswith("file://")
    assert url in str(info.value) and "nothing was copied" in str(info.value)


def test_missing_local_source_is_a_clear_error(tmp_path, dest_dir):
    with pytest.raises(DownloadError, match="nowhere.bin"):
        fetch_and_hash(tmp_path / "nowhere.bin", PAYLOAD_MD5, dest_dir / "x.bin")
    assert os.listdir(dest_dir) == []


@pytest.mark.parametrize("md5", ["abc", "z" * 32, 123])
def test_malformed_md5_is_refused(dest_dir, md5):
    with pytest.raises(ValueError, match="md5"):
        fetch_and_hash("http://127.0.0.1:9/x", md5, dest_dir / "x")


def test_unsupported_scheme_is_refused(dest_dir):
    with pytest.raises(ValueError, match="ftp://"):
        fetch_and_hash("ftp://example.org/x.tar", PAYLOAD_MD5, dest_dir / "x.tar")


# ---------------------------------------------------------------------------------------------
# extract


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


GOOD_MEMBERS = [("top/a.txt", b"alpha"), ("top/sub/b.bin", bytes(range(256)) * 10), ("other.txt", b"x")]


@pytest.mark.parametrize("mode,suffix", [("w:gz", "tar.gz"), ("w", "tar"), ("w:bz2", "tar.bz2")])
def test_extract_tar(tmp_path, mode, suffix):
    archive = _tar(tmp_path / f"good.{suffix}", GOOD_MEMBERS, mode)
    out = tmp_path / "out"
    assert extract(archive, out) == out
    assert _tree(out) == {name: data for name, data in GOOD_MEMBERS}
    assert sorted(os.listdir(out)) == ["other.txt", "top"]  # no temp folder left


def test_extract_zip(tmp_path):
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in GOOD_MEMBERS:
            zf.writestr(name, data)
    out = tmp_path / "out"
    extract(archive, out)
    assert _tree(out) == {name: data for name, data in GOOD_MEMBERS}


def test_extract_keeps_links_that_stay_inside(tmp_path):
    members = [("top/a.txt", b"alpha"), _link("top/l", "a.txt"), _link("top/d/up", "../a.txt")]
    archive = _tar(tmp_path / "links.tar", members, "w")
    out = tmp_path / "out"
    extract(archive, out)
    assert (out / "top/l").read_bytes() == b"alpha" and (out / "top/d/up").read_bytes() == b"alpha"


def _assert_refused(tmp_path: Path, archive: Path, member: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    with pytest.raises(ArchiveError) as info:
        extract(archive, out)
    assert repr(member) in str(info.value) and str(archive) in str(info.value)
    assert not out.exists()  # not even the destination folder was made
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "bad",
    [
        ("../evil.txt", b"x"),
        ("top/../../evil.txt", b"x"),
        ("/tmp/evil-absolute.txt", b"x"),
        ("top/ok/../evil.txt", b"x"),  # strict: no '..' at all
    ],
)
def test_extract_refuses_escaping_paths(tmp_path, bad):
    archive = _tar(tmp_path / "bad.tar.gz", [("top/a.txt", b"alpha"), bad])
    _assert_refused(tmp_path, archive, bad[0])
    assert not Path("/tmp/evil-absolute.txt").exists()


@pytest.mark.parametrize(
    "link",
    [
        _link("top/abs", "/etc/passwd"),
        _link("top/up", "../../outside"),
        _link("top/hard", "../outside", tarfile.LNKTYPE),
        _link("top/hard-abs", "/etc/passwd", tarfile.LNKTYPE),
    ],
)
def test_extract_refuses_links_pointing_outside(tmp_path, link):
    archive = _tar(tmp_path / "bad.tar", [("top/a.txt", b"alpha"), link], "w")
    _assert_refused(tmp_path, archive, link.name)


def test_extract_refuses_symlink_chains_that_escape(tmp_path):
    # Lexically 'q/q/..' stays inside, but with q -> '.' it names the parent of the root.
    archive = _tar(tmp_path / "chain.tar", [_link("q", "."), _link("p", "q/q/.."), ("p/evil.txt", b"x")], "w")
    _assert_refused(tmp_path, archive, "p")


def test_extract_refuses_writing_through_an_escaping_symlinked_folder(tmp_path):
    archive = _tar(tmp_path / "through.tar", [_link("q", "."), ("q/q/ok.txt", b"fine")], "w")
    extract(archive, tmp_path / "ok")  # inside: allowed
    assert (tmp_path / "ok/ok.txt").read_bytes() == b"fine"


def test_extract_refuses_device_files(tmp_path):
    device = tarfile.TarInfo("top/null")
    device.type = tarfile.CHRTYPE
    device.devmajor, device.devminor = 1, 3
    archive = _tar(tmp_path / "dev.tar", [("top/a.txt", b"alpha"), device], "w")
    _assert_refused(tmp_path, archive, "top/null")


def test_extract_refuses_escaping_zip_member(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/a.txt", b"alpha")
        zf.writestr("../evil.txt", b"x")
    _assert_refused(tmp_path, archive, "../evil.txt")


@pytest.mark.parametrize("mode,suffix", [("w:gz", "tar.gz"), ("w", "tar")])
def test_truncated_archive_is_a_clear_error_and_leaves_nothing(tmp_path, mode, suffix):
    members = [("top/a.bin", os.urandom(50_000)), ("top/b.bin", os.urandom(50_000))]
    archive = _tar(tmp_path / f"whole.{suffix}", members, mode)
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(archive.read_bytes()[: int(archive.stat().st_size * 0.7)])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match="truncated") as info:
        extract(cut, out)
    assert str(cut) in str(info.value)
    assert os.listdir(out) == []


def test_truncated_zip_is_a_clear_error(tmp_path):
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/a.bin", os.urandom(50_000))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(archive.read_bytes()[:30_000])
    with pytest.raises(ArchiveError, match="cut.zip"):
        extract(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(ArchiveError, match="junk.tar.gz"):
        extract(junk, tmp_path / "out")


def test_existing_entries_need_overwrite(tmp_path):
    archive = _tar(tmp_path / "good.tar.gz", GOOD_MEMBERS)
    out = tmp_path / "out"
    (out / "top").mkdir(parents=True)
    (out / "top/old.txt").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="top"):
        extract(archive, out)
    assert _tree(out) == {"top/old.txt": b"old"}
    extract(archive, out, overwrite=True)
    assert _tree(out) == {name: data for name, data in GOOD_MEMBERS}


# ---------------------------------------------------------------------------------------------
# A failed re-download never destroys a good data folder (python -m at download, end to end)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cifar_site(tmp_path, monkeypatch):
    """A loopback server with a good CIFAR-10 archive, a data root prepared from it by the CLI,
    and a function that re-runs the CLI against another served archive (given its md5)."""
    from cifar_archives import make_cifar10, md5

    from at.__main__ import main

    site = tmp_path / "site"
    site.mkdir()
    make_cifar10(site / "cifar-10-python.tar.gz", seed=1)
    data = tmp_path / "data"
    root = data / "cifar10"

    def cli_download(name: str, archive_md5: str) -> int:
        monkeypatch.setenv("AT_CIFAR10_URL", server.url(name))
        monkeypatch.setenv("AT_CIFAR10_MD5", archive_md5)
        return main(["--params", str(REPO / "params.yaml"), "download", "cifar10", "--root", str(root)])

    with serve(site) as server:
        assert cli_download("cifar-10-python.tar.gz", md5(site / "cifar-10-python.tar.gz")) == 0
        yield site, data, root, cli_download


def _assert_intact(data: Path, root: Path, before: dict) -> None:
    from cifar_archives import tree_digest

    from at.data import cifar

    assert tree_digest(root) == before
    assert os.listdir(data) == ["cifar10"]  # no temp folder, partial archive or old copy beside it
    cifar.load(root / "cifar-10-batches-py")  # and it still loads


def test_redownload_of_a_corrupt_gzip_with_matching_md5_keeps_the_good_folder(cifar_site, capsys):
    from cifar_archives import cifar10_files, md5, tree_digest, write_tar

    site, data, root, cli_download = cifar_site
    before = tree_digest(root)
    # Random pixels do not compress: deflate stores them verbatim, so a flipped byte in the
    # middle decompresses without a zlib error and only the gzip CRC at the very end shows it.
    good = write_tar(site / "good.tar.gz", cifar10_files(seed=2)[0]).read_bytes()
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0xFF
    (site / "cifar-10-python.tar.gz").write_bytes(bytes(corrupt))
    assert cli_download("cifar-10-python.tar.gz", md5(site / "cifar-10-python.tar.gz")) != 0
    assert "corrupt" in capsys.readouterr().err
    _assert_intact(data, root, before)


def test_redownload_of_an_archive_missing_the_batches_keeps_the_good_folder(cifar_site, capsys):
    from cifar_archives import cifar10_files, md5, tree_digest, write_tar

    site, data, root, cli_download = cifar_site
    before = tree_digest(root)
    files, _ = cifar10_files(seed=3)
    write_tar(site / "cifar-10-python.tar.gz", {n: d for n, d in files.items() if n.endswith("batches.meta")})
    assert cli_download("cifar-10-python.tar.gz", md5(site / "cifar-10-python.tar.gz")) != 0
    assert "data_batch_1" in capsys.readouterr().err
    _assert_intact(data, root, before)


@pytest.mark.parametrize("how", ["short_http_body", "truncated_file"])
def test_redownload_of_a_truncated_archive_keeps_the_good_folder(cifar_site, capsys, how):
    from cifar_archives import cifar10_files, md5, tree_digest, write_tar

    site, data, root, cli_download = cifar_site
    before = tree_digest(root)
    whole = write_tar(site / "other.tar.gz", cifar10_files(seed=4)[0])
    if how == "short_http_body":  # the server announces the whole length and sends half
        name, archive_md5 = "truncated/other.tar.gz", md5(whole)
    else:  # a file cut short on the server, published with its (cut) md5
        (site / "cut.tar.gz").write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
        name, archive_md5 = "cut.tar.gz", md5(site / "cut.tar.gz")
    assert cli_download(name, archive_md5) != 0
    err = capsys.readouterr().err
    assert "truncated" in err or "incomplete" in err
    _assert_intact(data, root, before)


def test_successful_redownload_replaces_the_folder(cifar_site):
    from cifar_archives import CIFAR10_TEST, make_cifar10, md5, tree_digest

    from at.data import cifar

    site, data, root, cli_download = cifar_site
    before = tree_digest(root)
    truth = make_cifar10(site / "new.tar.gz", seed=5)
    assert cli_download("new.tar.gz", md5(site / "new.tar.gz")) == 0
    assert tree_digest(root) != before
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "new.tar.gz", "source.json"]
    assert cifar.load(root / "cifar-10-batches-py").test_y.tolist() == truth[CIFAR10_TEST][1]
    assert download.read_source_record(root)["md5"] == md5(site / "new.tar.gz")
    assert os.listdir(data) == ["cifar10"]


@pytest.mark.parametrize("problem", ["corrupt", "not_found"])
def test_failed_first_download_leaves_no_data_root(tmp_path, monkeypatch, problem):
    from cifar_archives import cifar10_files, md5, write_tar

    from at.__main__ import main

    site = tmp_path / "site"
    site.mkdir()
    good = write_tar(site / "good.tar.gz", cifar10_files(seed=6)[0]).read_bytes()
    (site / "bad.tar.gz").write_bytes(good[: len(good) // 2])
    data = tmp_path / "data"  # does not exist yet: the download must not leave it behind
    with serve(site) as server:
        name = "bad.tar.gz" if problem == "corrupt" else "nowhere.tar.gz"
        monkeypatch.setenv("AT_CIFAR10_URL", server.url(name))
        monkeypatch.setenv("AT_CIFAR10_MD5", md5(site / "bad.tar.gz"))
        assert main(["--params", str(REPO / "params.yaml"), "download", "cifar10",
                     "--root", str(data / "cifar10")]) != 0
    assert sorted(os.listdir(tmp_path)) == ["site"]


def test_redownload_of_an_archive_the_loader_refuses_keeps_the_good_folder(cifar_site, capsys):
    from cifar_archives import cifar10_files, md5, tree_digest, write_tar

    site, data, root, cli_download = cifar_site
    before = tree_digest(root)
    files, _ = cifar10_files(seed=7)
    # every expected file is there, but one batch holds 3000-byte rows instead of 3072
    files["cifar-10-batches-py/data_batch_3"] = pickle.dumps(
        {"labels": [1, 2], "data": np.zeros((2, 3000), np.uint8)}, protocol=2)
    write_tar(site / "cifar-10-python.tar.gz", files)
    assert cli_download("cifar-10-python.tar.gz", md5(site / "cifar-10-python.tar.gz")) != 0
    assert "data_batch_3" in capsys.readouterr().err
    _assert_intact(data, root, before)


# ---------------------------------------------------------------------------------------------
# Download mistakes on the command line: one line naming the problem, no traceback


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("problem", ["http_404", "missing_path", "closed_port", "md5_mismatch"])
def test_cli_download_mistake_is_one_line(tmp_path, problem, monkeypatch):
    from cifar_archives import make_cifar10
    from in_process import run_cli

    site = tmp_path / "site"
    site.mkdir()
    make_cifar10(site / "cifar-10-python.tar.gz", seed=8)
    env = {"AT_CIFAR10_MD5": WRONG_MD5}
    with serve(site) as server:
        env["AT_CIFAR10_URL"] = {
            "http_404": server.url("nowhere.tar.gz"),
            "missing_path": str(tmp_path / "no such folder" / "cifar.tar.gz"),
            "closed_port": f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz",
            "md5_mismatch": server.url("cifar-10-python.tar.gz"),
        }[problem]
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        done = run_cli(["--params", str(REPO / "params.yaml"), "download", "cifar10",
                        "--root", str(tmp_path / "data" / "cifar10")], cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    expected = {"http_404": ["404", "nowhere.tar.gz"], "missing_path": ["no such folder"],
                "closed_port": ["could not open", env["AT_CIFAR10_URL"]],
                "md5_mismatch": [WRONG_MD5, env["AT_CIFAR10_URL"]]}[problem]
    for text in expected:
        assert text in lines[0] or text.replace(" ", "%20") in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["site"]


def test_prepared_folder_has_umask_permissions_not_mkdtemps(cifar_site):
    _, _, root, _ = cifar_site
    umask = os.umask(0)
    os.umask(umask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_redownload_that_cannot_start_is_refused_and_an_unset_override_keeps_the_data(tmp_path, monkeypatch):
    """at.data.download.check_redownload (the Snakefile's guard) and at.params.data_source: the
    data an override brought stays the source once the variables are unset; another source is
    probed first (missing file, wrong md5, refused connection), each refusal one line."""
    from cifar_archives import make_cifar10, md5

    from at import params as params_io
    from at.data import cifar
    from at.data.download import DownloadError, check_redownload, remember_source

    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10(archive, seed=1)
    archive_md5 = md5(archive)
    root = tmp_path / "data" / "cifar10"
    cifar.prepare(root, str(archive), archive_md5, progress=False)
    params = {"data": {"cifar10": {"url": "https://example.invalid/cifar-10-python.tar.gz",
                                   "md5": "c58f30108f718f92721af3b95e74349a", "num_classes": 10}}}
    remember_source(root, params_io.configured_source(params, "cifar10"))
    for name in ("AT_CIFAR10_URL", "AT_CIFAR10_MD5"):
        monkeypatch.delenv(name, raising=False)
    kept = params_io.data_source(params, "cifar10", root)
    assert (kept["url"], kept["md5"]) == (str(archive), archive_md5)
    check_redownload(root, kept, "AT_CIFAR10_URL")   # the same source: nothing to check
    # params.yaml names another source: the memory no longer applies
    other = {"data": {"cifar10": dict(params["data"]["cifar10"], md5="0" * 32)}}
    assert params_io.data_source(other, "cifar10", root)["md5"] == "0" * 32
    for url, md5, said in [(str(tmp_path / "typo.tar.gz"), archive_md5, "does not exist"),
                           (str(archive), "f" * 32, f"has md5 {archive_md5}"),
                           ("http://127.0.0.1:9/cifar-10-python.tar.gz", None, "could not open")]:
        with pytest.raises(DownloadError, match=said) as refused:
            check_redownload(root, {"url": url, "md5": md5}, "AT_CIFAR10_URL")
        assert "\n" not in str(refused.value) and "the data is left as it is" in str(refused.value)
