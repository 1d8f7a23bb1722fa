"""Every data set the pipeline knows, a registry of records, each one :class:`Dataset`: how to
fetch and verify it, how to load it, its normalisation, its classes, the augmentations it
implements, the keys of its params.yaml source and its usual protocol.

`python -m at download`, the trainer (:func:`training_data`), the grid (run ids, validation,
data folders), the schema and the provenance line all read this registry, so adding a data set
is one record given to :func:`register_dataset` (from the user's own module, named in
params.yaml's top-level ``plugins``) and its source in params.yaml's ``data``.

The image-folder records import at.data.folders when called: the grid imports this table, and
must not pull in torchvision and PIL to compute run ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from at.data import cifar
from at.data.augment import AUGMENTATIONS, CIFAR_AUGMENTS, CIFAR_MEAN, FOLDER_AUGMENTS, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from at.data.sources import FolderData, TensorData
from at.errors import ParamsError, shown
from at.registry import Registry

__all__ = ["DATASETS", "Dataset", "check_augment", "check_source", "get", "register_dataset",
           "training_data", "usual_protocol"]


# Per-channel statistics on the 0..1 scale. CIFAR-10: the authors' code (at.data.augment).
# CIFAR-100: the values of Tian et al.'s CRD code (RepDistiller, dataset/cifar100.py), whose
# Table 1 the `beyond` table reproduces. ImageNet: torchvision's, also used for the models
# fine-tuned from ImageNet weights.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass(frozen=True)
class Dataset:
    """One data set.

    ``prepare(root, source, progress)`` fetches, verifies and unpacks it into ``root`` from
    ``source`` (its params.yaml entry, environment overrides applied) and returns the folder
    it made; None means the data set is a folder the user supplies (``data.<name>.folder``).
    ``load(folder)`` reads the prepared (or supplied) folder for ``loader``: a
    :class:`at.data.cifar.Cifar` of uint8 tensors for :class:`at.data.sources.TensorData`, an
    :class:`at.data.folders.ImageSplits` for :class:`at.data.sources.FolderData` (or anything
    a loader of the user's own reads). ``source_keys``: the keys its params.yaml entry may have
    besides ``num_classes`` (``required_keys`` of them must be there). ``known_sources`` names
    archives by md5 for the provenance line.
    """

    name: str
    title: str
    protocol: str
    augments: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    load: Callable[[Path], object]
    prepare: Callable[[Path, Mapping, bool], Path] | None
    loader: Callable = TensorData
    num_classes: int | None = None
    source_keys: tuple[str, ...] = ("url", "md5")
    required_keys: tuple[str, ...] = ("url",)
    known_sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def user_folder(self) -> bool:
        return self.prepare is None


def _check_record(name: str, record: Dataset) -> None:
    if not isinstance(record, Dataset):
        raise TypeError(f"a data set registry entry must be an at.data.datasets.Dataset, got {type(record).__name__}")
    if record.name != name:
        raise ValueError(f"data set {name!r}: its record is named {record.name!r}")
    unknown = [a for a in record.augments if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"data set {name!r}: unknown augmentation(s) {unknown}; allowed: {', '.join(AUGMENTATIONS)}")
    missing = [k for k in record.required_keys if k not in record.source_keys]
    if missing:
        raise ValueError(f"data set {name!r}: required source key(s) {missing} are not among its source_keys")


DATASETS: Registry[Dataset] = Registry("data set", _check_record)


def register_dataset(record: Dataset) -> Dataset:
    """Add a data set under ``record.name``; returns it."""
    return DATASETS.register(record.name, record)


# ---------------------------------------------------------------------------------------------
# The records


def _prepare_cifar(layout: cifar.Layout):
    def prepare(root: Path, source: Mapping, progress: bool) -> Path:
        return cifar.prepare(root, source["url"], source.get("md5"), layout=layout, progress=progress)

    return prepare


def _load_cifar(layout: cifar.Layout):
    def load(folder: Path) -> cifar.Cifar:
        return cifar.load(Path(folder) / layout.folder, layout)

    return load


def _prepare_cub(root: Path, source: Mapping, progress: bool) -> Path:
    from at.data import folders

    return folders.prepare_cub(root, source["url"], source.get("md5"), progress=progress)


def _load_cub(folder: Path):
    from at.data import folders

    return folders.load_cub(Path(folder) / folders.CUB_FOLDER)


def _prepare_indoor(root: Path, source: Mapping, progress: bool) -> Path:
    from at.data import folders

    return folders.prepare_indoor(root, source["url"], source.get("md5"), train_list_url=source["train_list"],
                                  test_list_url=source["test_list"], progress=progress)


def _load_indoor(folder: Path):
    from at.data import folders

    return folders.load_indoor(folder)


def _load_imagenet(folder: Path):
    from at.data import folders

    return folders.load_imagenet(folder)


for _record in [
    Dataset(
        name="cifar10", title="CIFAR-10", protocol="cifar", augments=CIFAR_AUGMENTS,
        mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10,
        prepare=_prepare_cifar(cifar.CIFAR10), load=_load_cifar(cifar.CIFAR10),
        known_sources={
            "c58f30108f718f92721af3b95e74349a": "CIFAR-10 (official, 50000 train / 10000 test images)",
            "1c190744c9595cc62078be24b4b038fb": "CIFAR-10 mini subset (real images: the first 1017 of each "
                                                "batch, 5085 train / 1017 test)",
        }),
    Dataset(
        name="cifar100", title="CIFAR-100", protocol="cifar", augments=CIFAR_AUGMENTS,
        mean=CIFAR100_MEAN, std=CIFAR100_STD, num_classes=100,
        prepare=_prepare_cifar(cifar.CIFAR100), load=_load_cifar(cifar.CIFAR100),
        known_sources={"eb9058c3a382ffc7106e4002c42a8d85":
                       "CIFAR-100 (official, 50000 train / 10000 test images, 100 fine labels)"}),
    Dataset(
        name="cub", title="CUB-200-2011", protocol="finetune", augments=FOLDER_AUGMENTS,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=200, prepare=_prepare_cub, load=_load_cub,
        loader=FolderData,
        known_sources={"97eceeb196236b17998738112f37df78":
                       "CUB-200-2011 (official, 5994 train / 5794 test images)"}),
    Dataset(
        name="scenes", title="MIT Indoor-67", protocol="finetune", augments=FOLDER_AUGMENTS,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=67, prepare=_prepare_indoor, load=_load_indoor,
        loader=FolderData, source_keys=("url", "md5", "train_list", "test_list"),
        required_keys=("url", "train_list", "test_list")),
    Dataset(
        # a folder the user supplies (data.imagenet.folder): no download, no archive md5
        name="imagenet", title="ImageNet", protocol="imagenet", augments=FOLDER_AUGMENTS,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, prepare=None, load=_load_imagenet,
        loader=FolderData, source_keys=("folder",), required_keys=()),
]:
    register_dataset(_record)


# ---------------------------------------------------------------------------------------------
# Lookups and checks


def get(name: str) -> Dataset:
    if name not in DATASETS:
        raise ParamsError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def usual_protocol(name: str) -> str | None:
    """The protocol under which a run id names the data set alone (None: unknown data set)."""
    return DATASETS[name].protocol if name in DATASETS else None


def check_augment(name: str, augment: str) -> None:
    """Refuses an augmentation the data set does not implement (one line naming both)."""
    dataset = get(name)
    if augment not in dataset.augments:
        raise ParamsError(f"data set {name!r} does not support augment {augment!r}; "
                          f"it supports: {', '.join(dataset.augments)}")


def check_source(name: str, source) -> None:
    """Checks a params.yaml ``data`` entry against the data set's record."""
    key = f"data.{name}"
    if name not in DATASETS:
        raise ParamsError(f"{key}: unknown data set; known: {', '.join(sorted(DATASETS))} "
                          f"(a new one is a record given to at.data.datasets.register_dataset, in a module "
                          f"that params.yaml's `plugins` names)")
    dataset = DATASETS[name]
    if not isinstance(source, dict):
        raise ParamsError(f"{key}: must be a mapping")
    allowed = ("num_classes", *dataset.source_keys)
    unknown = sorted(set(source) - set(allowed))
    if unknown:
        raise ParamsError(f"{key}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    if isinstance(source.get("num_classes"), bool) or not isinstance(source.get("num_classes"), int) \
            or source["num_classes"] <= 0:
        raise ParamsError(f"{key}.num_classes: must be a positive integer")
    if dataset.num_classes is not None and source["num_classes"] != dataset.num_classes:
        raise ParamsError(f"{key}.num_classes: {dataset.title} has {dataset.num_classes} classes, "
                          f"got {source['num_classes']}")
    if dataset.user_folder:
        folder = source.get("folder")
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise ParamsError(f"{key}.folder: must be a path or null, got {shown(folder)}")
    for required in dataset.required_keys:
        if source.get(required) in (None, ""):
            what = {"url": "the URL or path of the archive", "train_list": "a URL or path",
                    "test_list": "a URL or path"}.get(required, f"given ({dataset.title} needs it)")
            raise ParamsError(f"{key}.{required}: must be {what}")


def training_data(spec, device):
    """The training and test data of a run spec, as its data set's loader holds them."""
    dataset = get(spec.dataset)
    return dataset.loader(spec, dataset, device)
