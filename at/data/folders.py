"""Image-folder data sets of the paper's Table 4 and ImageNet: CUB-200-2011, MIT Indoor-67, ImageNet.

Each loader returns an :class:`ImageSplits` (train and test lists of ``(image path, label)``
plus class names, in a fixed order); :class:`ImageDataset` decodes the images with PIL and
applies the usual ImageNet-style transforms.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from at.data.augment import FOLDER_AUGMENTS, IMAGENET_MEAN, IMAGENET_STD, Augment
from at.data.download import Remote, prepare_archive

__all__ = [
    "CUB_MD5",
    "CUB_URL",
    "DataLayoutError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INDOOR_TEST_LIST_URL",
    "INDOOR_TRAIN_LIST_URL",
    "INDOOR_URL",
    "ImageDataset",
    "ImageSplits",
    "image_transform",
    "load_cub",
    "load_imagenet",
    "load_indoor",
    "prepare_cub",
    "prepare_indoor",
]

CUB_URL = "https://data.caltech.edu/records/65de6-vzc10/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_FOLDER = "CUB_200_2011"
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")

INDOOR_URL = "http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar"
INDOOR_TRAIN_LIST_URL = "http://web.mit.edu/torralba/www/TrainImages.txt"
INDOOR_TEST_LIST_URL = "http://web.mit.edu/torralba/www/TestImages.txt"
INDOOR_IMAGES = "Images"
INDOOR_TRAIN_LIST = "TrainImages.txt"
INDOOR_TEST_LIST = "TestImages.txt"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataLayoutError(ValueError):
    """A data set folder lacks a file or folder, or a list file is malformed."""


@dataclass(frozen=True)
class ImageSplits:
    """Train and test images as ``(path, label)`` with labels in 0..len(classes)-1.

    Paths are strings rather than Path objects: ImageNet has 1.3M of them, and plain strings
    keep the lists small."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]


# ---------------------------------------------------------------------------------------------
# CUB-200-2011


def prepare_cub(root: str | os.PathLike, url: str = CUB_URL, md5: str = CUB_MD5, *, progress: bool = True) -> Path:
    """Fetches and unpacks CUB_200_2011.tgz into ``root``; returns ``root/CUB_200_2011``."""
    if md5 is None:
        raise ValueError("CUB-200-2011 needs an md5 (CUB_MD5 for the official archive)")
    root = Path(root)
    prepare_archive(root, "cub200", Remote(url, md5), contains=[f"{CUB_FOLDER}/{n}" for n in CUB_FILES],
                    verify=lambda folder: load_cub(folder / CUB_FOLDER), progress=progress)
    return root / CUB_FOLDER


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataLayoutError(f"missing {what}: {path}")
    return path


def _read_table(path: Path, what: str) -> dict[int, str]:
    """Reads '<integer id> <value>' lines (the CUB metadata format) into {id: value}."""
    _require_file(path, what)
    table: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=1)
            if len(fields) != 2 or not fields[0].isdigit():
                raise DataLayoutError(f"{path}, line {number}: expected '<id> <value>', got {line.strip()!r}")
            key = int(fields[0])
            if key in table:
                raise DataLayoutError(f"{path}, line {number}: id {key} appears twice")
            table[key] = fields[1].strip()
    return table


def load_cub(folder: str | os.PathLike) -> ImageSplits:
    """The official CUB-200-2011 split (train_test_split.txt: 1 = train, 0 = test), in image id order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataLayoutError(f"CUB-200-2011 folder {folder} does not exist (run prepare_cub first)")
    classes_path = folder / "classes.txt"
    images = _read_table(folder / "images.txt", "CUB image list")
    labels = _read_table(folder / "image_class_labels.txt", "CUB label file")
    split = _read_table(folder / "train_test_split.txt", "CUB split file")
    class_table = _read_table(classes_path, "CUB class list")

    if sorted(class_table) != list(range(1, len(class_table) + 1)):
        raise DataLayoutError(f"{classes_path}: class ids must be 1..{len(class_table)}")
    for path, table in ((folder / "image_class_labels.txt", labels), (folder / "train_test_split.txt", split)):
        if table.keys() != images.keys():
            missing = sorted(images.keys() - table.keys())[:5]
            extra = sorted(table.keys() - images.keys())[:5]
            raise DataLayoutError(
                f"{path} and images.txt list different image ids (missing here: {missing}, extra here: {extra})"
            )
    train, test = [], []
    for image_id in sorted(images):
        label_text, split_text = labels[image_id], split[image_id]
        if not label_text.isdigit() or int(label_text) not in class_table:
            raise DataLayoutError(
                f"{folder / 'image_class_labels.txt'}: image {image_id} has class {label_text!r}, "
                f"allowed 1..{len(class_table)}"
            )
        if split_text not in ("0", "1"):
            raise DataLayoutError(
                f"{folder / 'train_test_split.txt'}: image {image_id} has {split_text!r}, allowed 1 (train) or 0 (test)"
            )
        path = folder / "images" / images[image_id]
        if not path.is_file():
            raise DataLayoutError(f"image {path} (id {image_id} in {folder / 'images.txt'}) is missing")
        (train if split_text == "1" else test).append((str(path), int(label_text) - 1))
    classes = [class_table[i] for i in range(1, len(class_table) + 1)]
    return ImageSplits(train, test, classes)


# ---------------------------------------------------------------------------------------------
# MIT Indoor-67


def prepare_indoor(
    root: str | os.PathLike,
    url: str = INDOOR_URL,
    md5: str | None = None,
    train_list_url: str = INDOOR_TRAIN_LIST_URL,
    test_list_url: str = INDOOR_TEST_LIST_URL,
    train_list_md5: str | None = None,
    test_list_md5: str | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Fetches the Indoor-67 images and the official split lists into ``root``; returns ``root``.

    No md5 is published for these files: a ``None`` md5 is taken from ``root/source.json``
    when an earlier download recorded one (and the file is verified against it), and is
    recorded there on the first download.
    """
    root = Path(root)
    prepare_archive(
        root,
        "indoor67",
        Remote(url, md5),
        contains=[INDOOR_IMAGES],
        files={
            INDOOR_TRAIN_LIST: Remote(train_list_url, train_list_md5),
            INDOOR_TEST_LIST: Remote(test_list_url, test_list_md5),
        },
        verify=load_indoor,
        progress=progress,
    )
    return root


def _read_indoor_list(path: Path, images: Path, class_index: dict[str, int]) -> list[tuple[str, int]]:
    _require_file(path, "Indoor-67 split list")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            relative = line.strip().replace("\\", "/")
            if not relative:
                continue
            parts = relative.split("/")
            if len(parts) != 2 or ".." in parts or not all(parts):
                raise DataLayoutError(f"{path}, line {number}: expected '<class>/<image file>', got {relative!r}")
            if parts[0] not in class_index:
                raise DataLayoutError(
                    f"{path}, line {number}: class {parts[0]!r} has no folder in {images}"
                )
            image = images / relative
            if not image.is_file():
                raise DataLayoutError(f"image {image} (line {number} of {path}) is missing")
            items.append((str(image), class_index[parts[0]]))
    return items


def load_indoor(folder: str | os.PathLike) -> ImageSplits:
    """The official Indoor-67 split (TrainImages.txt / TestImages.txt); classes are the sorted
    folder names under Images/."""
    folder = Path(folder)
    images = folder / INDOOR_IMAGES
    if not images.is_dir():
        raise DataLayoutError(f"missing Indoor-67 image folder: {images} (run prepare_indoor first)")
    classes = sorted(entry.name for entry in os.scandir(images) if entry.is_dir())
    if not classes:
        raise DataLayoutError(f"{images} holds no class folders")
    class_index = {name: i for i, name in enumerate(classes)}
    train = _read_indoor_list(folder / INDOOR_TRAIN_LIST, images, class_index)
    test = _read_indoor_list(folder / INDOOR_TEST_LIST, images, class_index)
    overlap = {p for p, _ in train} & {p for p, _ in test}
    if overlap:
        raise DataLayoutError(
            f"{folder / INDOOR_TRAIN_LIST} and {folder / INDOOR_TEST_LIST} share {len(overlap)} images, "
            f"e.g. {sorted(overlap)[0]}"
        )
    return ImageSplits(train, test, classes)


# ---------------------------------------------------------------------------------------------
# ImageNet


def _class_folder_images(folder: Path, class_index: dict[str, int]) -> list[tuple[str, int]]:
    items = []
    for name, label in class_index.items():
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files = sorted(
            entry.name
            for entry in os.scandir(class_dir)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        items.extend((os.path.join(class_dir, f), label) for f in files)
    return items


def load_imagenet(folder: str | os.PathLike) -> ImageSplits:
    """ImageNet from a user-supplied folder with ``train/<class>/*`` and ``val/<class>/*``.

    Classes are the sorted folder names of train/ (the torchvision ImageFolder order); val/
    must use the same names.
    """
    folder = Path(folder)
    train_dir, val_dir = folder / "train", folder / "val"
    for path in (folder, train_dir, val_dir):
        if not path.is_dir():
            raise DataLayoutError(
                f"missing ImageNet folder {path}: expected {folder}/train/<class>/*.JPEG and "
                f"{folder}/val/<class>/*.JPEG"
            )
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not classes:
        raise DataLayoutError(f"{train_dir} holds no class folders")
    val_classes = {entry.name for entry in os.scandir(val_dir) if entry.is_dir()}
    if not val_classes:
        raise DataLayoutError(
            f"{val_dir} holds no class folders: sort the validation images into one folder per "
            f"class (as in train/) first"
        )
    unknown = sorted(val_classes - set(classes))
    if unknown:
        raise DataLayoutError(f"{val_dir} has class folders that train/ lacks: {unknown[:5]}")
    class_index = {name: i for i, name in enumerate(classes)}
    train = _class_folder_images(train_dir, class_index)
    test = _class_folder_images(val_dir, class_index)
    for path, items in ((train_dir, train), (val_dir, test)):
        if not items:
            raise DataLayoutError(f"{path} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return ImageSplits(train, test, classes)


# ---------------------------------------------------------------------------------------------
# Decoding and augmentation


def image_transform(train: bool, size: int = 224, resize: int = 256, augment: str = Augment.IMAGENET.value,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """ImageNet-style preprocessing, scaled to 0..1 and normalised with ``mean``/``std``.

    Test images, and training images with ``augment="none"``: Resize(resize) + CenterCrop(size).
    Training images with ``augment="imagenet"``: RandomResizedCrop(size) + horizontal flip.
    """
    if augment not in FOLDER_AUGMENTS:
        raise ValueError(f"image folders support augment {' or '.join(map(repr, FOLDER_AUGMENTS))}, got {augment!r}")
    if train and augment == Augment.IMAGENET:
        geometry = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        geometry = [transforms.Resize(resize), transforms.CenterCrop(size)]
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(mean, std)])


class ImageDataset(torch.utils.data.Dataset):
    """Decodes ``(path, label)`` items with PIL (as RGB) and applies ``transform``.

    Paths and labels are kept in numpy arrays rather than a Python list, so that DataLoader
    workers do not copy the list page by page as reference counts change.
    """

    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable | None = None):
        self._paths = np.array([os.fsencode(p) for p, _ in items], dtype=np.bytes_)
        self._labels = np.array([label for _, label in items], dtype=np.int64)
        self.transform = transform

    @classmethod
    def for_split(cls, items: Sequence[tuple[str, int]], train: bool, size: int = 224,
                  augment: str = Augment.IMAGENET.value, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ImageDataset:
        return cls(items, image_transform(train, size=size, augment=augment, mean=mean, std=std))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int):
        path = os.fsdecode(self._paths[index])
        with Image.open(path) as image:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._labels[index])


class SeededImages(torch.utils.data.Dataset):
    """An image data set read by ``(index, seed)``: the image's random augmentation draws from
    ``seed`` alone (torch's global generator of the worker, forked so the caller's is kept)."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.images[index]
