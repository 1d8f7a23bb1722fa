"""CIFAR-10 and CIFAR-100 in the official python-pickle layouts: fetch, verify, unpack, load as
uint8 tensors.

The two archives differ only in names (a :class:`Layout`): CIFAR-10 has five training batches
and a test batch with ``labels``; CIFAR-100 has one ``train`` and one ``test`` file with
``fine_labels`` (100 classes, used here) and ``coarse_labels`` (20 superclasses). The loader
reads both the official archives (with ``filenames``) and the mini copy of
``shared/data/cifar10-mini-python.tar.gz`` (1017 images per batch, no ``filenames``), through
the same code.
"""

from __future__ import annotations

import codecs
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from at import lazy
from at.data.download import Remote, prepare_archive

torch = lazy.module("torch")   # at.lazy: the grid reads the data sets' records without torch

__all__ = [
    "BATCH_FOLDER",
    "CIFAR10",
    "CIFAR100",
    "Cifar",
    "CifarFormatError",
    "DEFAULT_MD5",
    "DEFAULT_URL",
    "Layout",
    "TEST_BATCH",
    "TRAIN_BATCHES",
    "load",
    "prepare",
]


@dataclass(frozen=True)
class Layout:
    """The file and key names of one CIFAR archive."""

    name: str                    # the data set's name (params.yaml, source.json)
    title: str                   # for messages
    folder: str                  # the archive's top-level folder
    train: tuple[str, ...]       # training batch files, in order
    test: str                    # the test batch file
    meta: str                    # the file holding the class names
    class_names: str             # key of the class names in ``meta``
    labels: str                  # key of the labels in each batch
    num_classes: int


CIFAR10 = Layout("cifar10", "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                 "test_batch", "batches.meta", "label_names", "labels", 10)
CIFAR100 = Layout("cifar100", "CIFAR-100", "cifar-100-python", ("train",), "test", "meta",
                  "fine_label_names", "fine_labels", 100)

DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
BATCH_FOLDER = CIFAR10.folder
TRAIN_BATCHES = CIFAR10.train
TEST_BATCH = CIFAR10.test
META = CIFAR10.meta
IMAGE_SHAPE = (3, 32, 32)
ROW_BYTES = 3 * 32 * 32


class CifarFormatError(ValueError):
    """A batch file does not have the layout of the CIFAR python version."""


@dataclass(frozen=True)
class Cifar:
    """The whole data set in memory: images uint8 (N, 3, 32, 32) RGB, labels int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    def __repr__(self) -> str:
        return (
            f"Cifar(train_x={tuple(self.train_x.shape)}, test_x={tuple(self.test_x.shape)}, "
            f"classes={self.classes})"
        )


def prepare(root: str | os.PathLike, url: str = DEFAULT_URL, md5: str = DEFAULT_MD5, *,
            layout: Layout = CIFAR10, progress: bool = True) -> Path:
    """Fetches and unpacks the archive into ``root``; returns ``root/<layout.folder>``.

    ``url`` may be a local path or file:// URL (a local copy), with that copy's md5.
    ``root/source.json`` records url, md5 and the archive's name; a second call for the same
    data does nothing. The new folder must load before it replaces an existing one.
    """
    if md5 is None:
        raise ValueError(f"{layout.title} needs an md5 (the official archive's is in params.yaml)")
    root = Path(root)
    required = [f"{layout.folder}/{name}" for name in (layout.meta, *layout.train, layout.test)]
    prepare_archive(root, layout.name, Remote(url, md5), contains=required,
                    verify=lambda folder: load(folder / layout.folder, layout), progress=progress)
    return root / layout.folder


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a batch file cannot run arbitrary code."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only lists and numpy arrays"
            ) from None


def _unpickle(path: Path, layout: Layout) -> dict:
    if not path.is_file():
        raise CifarFormatError(f"missing {layout.title} file {path}")
    try:
        with open(path, "rb") as f:
            # latin1 maps the Python 2 str keys and the raw array bytes one to one.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CifarFormatError(f"{path} is not a readable {layout.title} pickle ({e})") from e
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path} must hold a dict, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, layout)
    for key in ("data", layout.labels):
        if key not in batch:
            raise CifarFormatError(f"{path} has no {key!r} entry (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarFormatError(f"{path}: 'data' must be a uint8 array of shape (N, {ROW_BYTES}), got {desc}")
    labels = np.asarray(batch[layout.labels])
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise CifarFormatError(
            f"{path}: {layout.labels!r} must be {len(data)} integers (one per data row), got {labels.dtype} "
            f"of shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise CifarFormatError(
            f"{path}: labels must lie in 0..{layout.num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    if "filenames" in batch and len(batch["filenames"]) != len(data):
        raise CifarFormatError(f"{path}: {len(batch['filenames'])} filenames for {len(data)} images")
    return data, labels.astype(np.int64)


def _read_split(folder: Path, names: tuple[str, ...], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(folder / name, layout) for name in names]
    data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([y for _, y in parts])
    # Each row is 1024 R, 1024 G, 1024 B values of a row-major 32x32 image: a plain reshape.
    images = np.ascontiguousarray(data).reshape(len(data), *IMAGE_SHAPE)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load(folder: str | os.PathLike, layout: Layout = CIFAR10) -> Cifar:
    """Reads a ``cifar-10-batches-py`` (or, with ``CIFAR100``, ``cifar-100-python``) folder into memory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{layout.title} folder {folder} does not exist (run prepare first)")
    meta = _unpickle(folder / layout.meta, layout)
    classes = meta.get(layout.class_names)
    if (not isinstance(classes, list) or len(classes) != layout.num_classes
            or not all(isinstance(c, str) for c in classes)):
        raise CifarFormatError(
            f"{folder / layout.meta}: {layout.class_names!r} must be {layout.num_classes} names, got {classes!r}")
    train_x, train_y = _read_split(folder, layout.train, layout)
    test_x, test_y = _read_split(folder, (layout.test,), layout)
    return Cifar(train_x, train_y, test_x, test_y, list(classes))
