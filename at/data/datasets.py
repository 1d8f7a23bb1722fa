"""Every data set the pipeline knows, each one record: how to fetch and verify it, how to load
it, its normalisation, its classes, the augmentations it implements and its usual protocol.

`python -m at download`, :func:`at.data.sources.load`, the grid (run ids, validation, data
folders) and the provenance line all read this table, so adding a data set is one record here
(plus a loader module when its file format is new) and its source in params.yaml's ``data``.

The image-folder records import at.data.folders when called: the grid imports this table, and
must not pull in torchvision and PIL to compute run ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from at.data import cifar
from at.data.augment import CIFAR_MEAN as CIFAR10_MEAN
from at.data.augment import CIFAR_STD as CIFAR10_STD
from at.params import ParamsError

__all__ = ["DATASETS", "Dataset", "check_augment", "check_source", "get", "usual_protocol"]

# The values of a protocol's `augment` key, as the loaders implement them:
#   crop_flip  reflect-pad 4, random crop back to the input size, random horizontal flip (CIFAR)
#   flip       random horizontal flip only (CIFAR, Table 3)
#   imagenet   train: RandomResizedCrop 224 + flip; test: resize 256, center crop 224 (folders)
#   none       train images as test images (no random draw)
CIFAR_AUGMENTS = ("crop_flip", "flip", "none")
FOLDER_AUGMENTS = ("imagenet", "none")

# Per-channel statistics on the 0..1 scale. CIFAR-10: the authors' code (at.data.augment).
# CIFAR-100: the values of Tian et al.'s CRD code (RepDistiller, dataset/cifar100.py), whose
# Table 1 the `beyond` table reproduces. ImageNet: torchvision's, also used for the models
# fine-tuned from ImageNet weights.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    """One data set.

    ``prepare(root, source, progress)`` fetches, verifies and unpacks it into ``root`` from
    ``source`` (its params.yaml entry, environment overrides applied) and returns the folder
    it made; None means the data set is a folder the user supplies (``data.<name>.folder``).
    ``load(folder)`` reads the prepared (or supplied) folder: a :class:`at.data.cifar.Cifar` of
    uint8 tensors for ``kind == "tensor"``, an :class:`at.data.folders.ImageSplits` for
    ``kind == "folder"``. ``known_sources`` names archives by md5 for the provenance line.
    """

    name: str
    title: str
    kind: str
    protocol: str
    augments: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    load: Callable[[Path], object]
    prepare: Callable[[Path, Mapping, bool], Path] | None
    num_classes: int | None = None
    known_sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def user_folder(self) -> bool:
        return self.prepare is None


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


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset(
        name="cifar10", title="CIFAR-10", kind="tensor", protocol="cifar", augments=CIFAR_AUGMENTS,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10,
        prepare=_prepare_cifar(cifar.CIFAR10), load=_load_cifar(cifar.CIFAR10),
        known_sources={
            "c58f30108f718f92721af3b95e74349a": "CIFAR-10 (official, 50000 train / 10000 test images)",
            "1c190744c9595cc62078be24b4b038fb": "CIFAR-10 mini subset (real images: the first 1017 of each "
                                                "batch, 5085 train / 1017 test)",
        }),
    Dataset(
        name="cifar100", title="CIFAR-100", kind="tensor", protocol="cifar", augments=CIFAR_AUGMENTS,
        mean=CIFAR100_MEAN, std=CIFAR100_STD, num_classes=100,
        prepare=_prepare_cifar(cifar.CIFAR100), load=_load_cifar(cifar.CIFAR100),
        known_sources={"eb9058c3a382ffc7106e4002c42a8d85":
                       "CIFAR-100 (official, 50000 train / 10000 test images, 100 fine labels)"}),
    Dataset(
        name="cub", title="CUB-200-2011", kind="folder", protocol="finetune", augments=FOLDER_AUGMENTS,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=200, prepare=_prepare_cub, load=_load_cub,
        known_sources={"97eceeb196236b17998738112f37df78":
                       "CUB-200-2011 (official, 5994 train / 5794 test images)"}),
    Dataset(
        name="scenes", title="MIT Indoor-67", kind="folder", protocol="finetune", augments=FOLDER_AUGMENTS,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=67, prepare=_prepare_indoor, load=_load_indoor),
    Dataset(
        # a folder the user supplies (data.imagenet.folder): no download, no archive md5
        name="imagenet", title="ImageNet", kind="folder", protocol="imagenet", augments=FOLDER_AUGMENTS,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, prepare=None, load=_load_imagenet),
]}


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
                          f"(a new one needs a record in at/data/datasets.py)")
    dataset = DATASETS[name]
    if not isinstance(source, dict) or not isinstance(source.get("num_classes"), int) or source["num_classes"] <= 0:
        raise ParamsError(f"{key}.num_classes: must be a positive integer")
    if dataset.num_classes is not None and source["num_classes"] != dataset.num_classes:
        raise ParamsError(f"{key}.num_classes: {dataset.title} has {dataset.num_classes} classes, "
                          f"got {source['num_classes']}")
    if dataset.user_folder:
        folder = source.get("folder")
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise ParamsError(f"{key}.folder: must be a path or null, got {folder!r}")
    elif not isinstance(source.get("url"), str) or not source["url"]:
        raise ParamsError(f"{key}.url: must be the URL or path of the archive")
