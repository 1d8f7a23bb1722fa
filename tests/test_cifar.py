"""at.data.cifar: prepare (fetch, verify, unpack, record) and load, on generated and real data."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from cifar_archives import CIFAR10_CLASSES as CLASSES
from cifar_archives import batch_bytes as _batch_bytes
from cifar_archives import make_cifar10 as _make_tarball
from cifar_archives import md5 as _md5
from http_server import serve

from at.data import cifar
from at.data.download import ChecksumError

PER_BATCH = 12  # cifar_archives' default


@pytest.fixture
def served_tarballs(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    truths = {
        "cifar-10-python.tar.gz": _make_tarball(folder / "cifar-10-python.tar.gz", seed=1),
        "other-cifar.tar.gz": _make_tarball(folder / "other-cifar.tar.gz", seed=2),
    }
    with serve(folder) as server:
        yield server, truths


def _check_round_trip(data: cifar.Cifar, truth: dict) -> None:
    train_images = np.concatenate([truth[n][0] for n in cifar.TRAIN_BATCHES])
    train_labels = sum((truth[n][1] for n in cifar.TRAIN_BATCHES), [])
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert tuple(data.train_x.shape) == (5 * PER_BATCH, 3, 32, 32)
    # (N, C, H, W) from the loader against (N, H, W, C) images the rows were built from.
    assert np.array_equal(data.train_x.numpy().transpose(0, 2, 3, 1), train_images)
    assert data.train_y.tolist() == train_labels
    test_images, test_labels = truth[cifar.TEST_BATCH]
    assert np.array_equal(data.test_x.numpy().transpose(0, 2, 3, 1), test_images)
    assert data.test_y.tolist() == test_labels
    assert data.classes == CLASSES


def test_prepare_and_load_round_trip_over_http(served_tarballs, tmp_path):
    server, truths = served_tarballs
    served = server.folder / "cifar-10-python.tar.gz"
    root = tmp_path / "data"
    url = server.url("cifar-10-python.tar.gz")
    folder = cifar.prepare(root, url, _md5(served))
    assert folder == root / "cifar-10-batches-py"
    _check_round_trip(cifar.load(folder), truths["cifar-10-python.tar.gz"])
    record = json.loads((root / "source.json").read_text())
    assert record["url"] == url and record["md5"] == _md5(served) and record["archive"] == "cifar-10-python.tar.gz"
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz", "source.json"]

    # The same data again: no request, nothing touched.
    server.requested.clear()
    stamp = (folder / "data_batch_1").stat().st_mtime_ns
    (root / "cifar-10-python.tar.gz").unlink()  # not even the archive is needed any more
    assert cifar.prepare(root, url, _md5(served)) == folder
    assert server.requested == []
    assert (folder / "data_batch_1").stat().st_mtime_ns == stamp


def test_prepare_switches_to_another_source(served_tarballs, tmp_path):
    server, truths = served_tarballs
    root = tmp_path / "data"
    cifar.prepare(root, server.url("cifar-10-python.tar.gz"), _md5(server.folder / "cifar-10-python.tar.gz"))
    other_md5 = _md5(server.folder / "other-cifar.tar.gz")
    folder = cifar.prepare(root, server.url("other-cifar.tar.gz"), other_md5)
    _check_round_trip(cifar.load(folder), truths["other-cifar.tar.gz"])
    assert json.loads((root / "source.json").read_text())["md5"] == other_md5


def test_prepare_with_wrong_md5_leaves_nothing(served_tarballs, tmp_path):
    server, _ = served_tarballs
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=cifar.DEFAULT_MD5):
        cifar.prepare(root, server.url("cifar-10-python.tar.gz"))
    assert os.listdir(tmp_path) == ["served"]  # not even an empty data folder


def test_prepare_refuses_an_archive_without_the_batches(tmp_path):
    archive = tmp_path / "wrong.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("something/else.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="cifar-10-batches-py/batches.meta"):
        cifar.prepare(tmp_path / "data", str(archive), _md5(archive))
    assert not (tmp_path / "data/source.json").exists()


def test_real_mini_tarball_through_a_local_path(cifar_mini_dir):
    # conftest's fixture prepares it from AT_SHARED_DIR's tarball, and fails when that is missing
    folder = cifar_mini_dir / "cifar-10-batches-py"
    data = cifar.load(folder)
    assert tuple(data.train_x.shape) == (5085, 3, 32, 32) and tuple(data.train_y.shape) == (5085,)
    assert tuple(data.test_x.shape) == (1017, 3, 32, 32) and tuple(data.test_y.shape) == (1017,)
    assert data.classes == CLASSES
    assert data.train_x[0, :, 0, 0].tolist() == [59, 62, 63]  # the well-known x_train[0, 0, 0]
    assert data.train_y[:5].tolist() == [6, 9, 9, 4, 1]  # frog, truck, truck, deer, automobile
    assert data.test_y[:5].tolist() == [3, 8, 8, 0, 6]  # cat, ship, ship, airplane, frog
    # Class histograms from cifar10-mini.md.
    def histogram(labels):
        return np.bincount(labels.numpy(), minlength=10).tolist()

    assert histogram(data.train_y[:1017]) == [103, 113, 102, 94, 103, 86, 109, 102, 101, 104]
    assert histogram(data.train_y[1017:2034]) == [105, 101, 83, 99, 110, 96, 98, 118, 118, 89]
    assert histogram(data.train_y) == [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
    assert histogram(data.test_y) == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]
    # the md5 of ../shared/data/cifar10-mini-python.tar.gz (shared/data/cifar10-mini.md)
    assert json.loads((cifar_mini_dir / "source.json").read_text())["md5"] == "1c190744c9595cc62078be24b4b038fb"


# ---------------------------------------------------------------------------------------------
# Malformed batches


@pytest.fixture
def batch_folder(tmp_path):
    """A valid folder of tiny batches without filenames (the mini layout), to corrupt one file of."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}, protocol=2))
    for name in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH):
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        (folder / name).write_bytes(_batch_bytes(images, [0, 5, 9], name, filenames=False))
    return folder


def test_batches_without_filenames_load(batch_folder):
    data = cifar.load(batch_folder)
    assert data.train_y.tolist() == [0, 5, 9] * 5 and data.test_y.tolist() == [0, 5, 9]


@pytest.mark.parametrize(
    "batch,message",
    [
        ({"labels": [1, 2], "data": np.zeros((2, 3000), np.uint8)}, "shape"),
        ({"labels": [1, 2, 3], "data": np.zeros((2, 3072), np.uint8)}, "one per data row"),
        ({"labels": [1, 10], "data": np.zeros((2, 3072), np.uint8)}, "0..9"),
        ({"labels": [1, -1], "data": np.zeros((2, 3072), np.uint8)}, "0..9"),
        ({"labels": [1, 2], "data": np.zeros((2, 3072), np.float32)}, "uint8"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "labels"),
    ],
)
def test_malformed_batch_is_named(batch_folder, batch, message):
    (batch_folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(cifar.CifarFormatError, match=message) as info:
        cifar.load(batch_folder)
    assert "data_batch_3" in str(info.value)


def test_missing_batch_is_named(batch_folder):
    (batch_folder / "test_batch").unlink()
    with pytest.raises(cifar.CifarFormatError, match="test_batch"):
        cifar.load(batch_folder)


def test_pickle_with_code_is_refused(batch_folder, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    (batch_folder / "data_batch_2").write_bytes(pickle.dumps({"labels": [], "data": Evil()}, protocol=2))
    with pytest.raises(cifar.CifarFormatError, match="data_batch_2.*refusing to load posix.mkdir"):
        cifar.load(batch_folder)
    assert not (tmp_path / "pwned").exists()


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cifar.load(tmp_path / "nowhere")
