"""Generated CIFAR archives in the official python-pickle layouts, for the data tests.

CIFAR-10 (``cifar-10-batches-py/``: ``batches.meta``, ``data_batch_1..5``, ``test_batch``, key
``labels``) and CIFAR-100 (``cifar-100-python/``: ``meta``, ``train``, ``test``, keys
``fine_labels`` and ``coarse_labels``), written out here from the layout description of the
official archives rather than through the loader under test. Each maker returns what it wrote
(HWC images and labels per file) so that a test can compare the loader's tensors with it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FINE = [f"fine_{i}" for i in range(100)]
CIFAR100_COARSE = [f"coarse_{i}" for i in range(20)]


def rows_from_hwc(images: np.ndarray) -> np.ndarray:
    """The official row layout, written out: 1024 R values, then 1024 G, then 1024 B, each a
    row-major 32x32 plane."""
    rows = np.empty((len(images), 3072), np.uint8)
    for i, image in enumerate(images):
        for channel in range(3):
            rows[i, channel * 1024 : (channel + 1) * 1024] = image[:, :, channel].reshape(-1)
    return rows


def batch_bytes(images_hwc: np.ndarray, labels: list[int], label: str, filenames: bool = True, **extra) -> bytes:
    batch = {"batch_label": label, "labels": labels, "data": rows_from_hwc(images_hwc)}
    if filenames:
        batch["filenames"] = [f"img_{label}_{i}.png" for i in range(len(labels))]
    batch.update(extra)
    return pickle.dumps(batch, protocol=2)


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cifar10_files(seed: int, per_batch: int = 12) -> tuple[dict[str, bytes], dict]:
    """The members of a CIFAR-10 archive of random images, and the truth {file: (images, labels)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    files = {f"{CIFAR10_FOLDER}/batches.meta": pickle.dumps(meta, protocol=2)}
    for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        truth[name] = (images, labels)
        files[f"{CIFAR10_FOLDER}/{name}"] = batch_bytes(images, labels, name)
    return files, truth


def make_cifar10(path: Path, seed: int, per_batch: int = 12) -> dict:
    """A CIFAR-10 tar.gz of random images at ``path``; returns the truth."""
    files, truth = cifar10_files(seed, per_batch)
    write_tar(path, files)
    return truth


def make_cifar100(path: Path, seed: int, n_train: int = 40, n_test: int = 20) -> dict:
    """A CIFAR-100 tar.gz of random images; returns {"train"|"test": (images, fine, coarse)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    meta = {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE}
    files = {f"{CIFAR100_FOLDER}/meta": pickle.dumps(meta, protocol=2)}
    for name, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        fine[:2] = [0, 99]  # both ends of the label range
        coarse = [int(v) for v in rng.integers(0, 20, n)]
        truth[name] = (images, fine, coarse)
        batch = {"batch_label": f"{name} batch", "fine_labels": fine, "coarse_labels": coarse,
                 "filenames": [f"{name}_{i}.png" for i in range(n)], "data": rows_from_hwc(images)}
        files[f"{CIFAR100_FOLDER}/{name}"] = pickle.dumps(batch, protocol=2)
    write_tar(path, files)
    return truth


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (files by content hash, folders and links by kind), so that a
    test can assert a folder is byte-for-byte what it was."""
    entries = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            entries[rel] = "link -> " + str(p.readlink())
        elif p.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return entries
