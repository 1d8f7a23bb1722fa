"""at.data.folders: CUB-200-2011, MIT Indoor-67 and ImageNet folders, on tiny generated copies."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from http_server import serve
from PIL import Image

from at.data import folders
from at.data.download import ChecksumError
from at.data.folders import DataLayoutError, ImageDataset
from cifar_archives import write_tar


def _image_bytes(color, size=(10, 8), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (image id, class id, is_train); ids deliberately not in file order.
CUB_IMAGES = [(3, 1, 1), (1, 1, 0), (2, 1, 1), (4, 2, 0), (5, 2, 1), (6, 3, 1), (7, 3, 0)]


def _cub_files() -> dict[str, bytes]:
    base = "CUB_200_2011"
    files = {"attributes.txt": b"1 has_bill_shape::curved\n"}  # a top-level extra, as in the real archive
    files[f"{base}/classes.txt"] = "".join(f"{i} {n}\n" for i, n in enumerate(CUB_CLASSES, 1)).encode()
    files[f"{base}/images.txt"] = "".join(f"{i} {CUB_CLASSES[c - 1]}/img_{i}.jpg\n" for i, c, _ in CUB_IMAGES).encode()
    files[f"{base}/image_class_labels.txt"] = "".join(f"{i} {c}\n" for i, c, _ in CUB_IMAGES).encode()
    files[f"{base}/train_test_split.txt"] = "".join(f"{i} {t}\n" for i, _, t in CUB_IMAGES).encode()
    for i, c, _ in CUB_IMAGES:
        files[f"{base}/images/{CUB_CLASSES[c - 1]}/img_{i}.jpg"] = _image_bytes((20 * i, 0, 0))
    return files


@pytest.fixture
def cub(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    archive = write_tar(served / "CUB_200_2011.tgz", _cub_files(), "w:gz")
    with serve(served) as server:
        root = tmp_path / "cub"
        folder = folders.prepare_cub(root, server.url("CUB_200_2011.tgz"), _md5(archive))
        yield server, root, folder, _md5(archive)


def test_cub_official_split(cub):
    server, root, folder, md5 = cub
    assert folder == root / "CUB_200_2011"
    splits = folders.load_cub(folder)
    assert splits.classes == CUB_CLASSES
    expected_train = [(i, c - 1) for i, c, t in sorted(CUB_IMAGES) if t == 1]
    expected_test = [(i, c - 1) for i, c, t in sorted(CUB_IMAGES) if t == 0]
    assert [(int(Path(p).stem.split("_")[1]), y) for p, y in splits.train] == expected_train
    assert [(int(Path(p).stem.split("_")[1]), y) for p, y in splits.test] == expected_test
    assert all(Path(p).is_file() for p, _ in splits.train + splits.test)
    record = json.loads((root / "source.json").read_text())
    assert record["md5"] == md5 and record["archive"] == "CUB_200_2011.tgz"

    server.requested.clear()
    assert folders.prepare_cub(root, server.url("CUB_200_2011.tgz"), md5) == folder
    assert server.requested == []


@pytest.mark.parametrize("name", ["train_test_split.txt", "images.txt", "image_class_labels.txt", "classes.txt"])
def test_cub_missing_metadata_file_is_named(cub, name):
    _, _, folder, _ = cub
    (folder / name).unlink()
    with pytest.raises(DataLayoutError, match=name):
        folders.load_cub(folder)


def test_cub_inconsistent_metadata(cub):
    _, _, folder, _ = cub
    split = folder / "train_test_split.txt"
    split.write_text(split.read_text().replace("5 1", "5 2"))
    with pytest.raises(DataLayoutError, match="train_test_split.txt.*image 5"):
        folders.load_cub(folder)
    split.write_text("".join(f"{i} {t}\n" for i, _, t in CUB_IMAGES[:-1]))
    with pytest.raises(DataLayoutError, match="different image ids"):
        folders.load_cub(folder)


def test_cub_missing_image_is_named(cub):
    _, _, folder, _ = cub
    (folder / "images" / CUB_CLASSES[2] / "img_6.jpg").unlink()
    with pytest.raises(DataLayoutError, match="img_6.jpg"):
        folders.load_cub(folder)


def test_cub_wrong_md5(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_tar(served / "CUB_200_2011.tgz", _cub_files(), "w:gz")
    with serve(served) as server:
        with pytest.raises(ChecksumError, match=folders.CUB_MD5):
            folders.prepare_cub(tmp_path / "cub", server.url("CUB_200_2011.tgz"))
    assert os.listdir(tmp_path) == ["served"]  # not even an empty data folder


# ---------------------------------------------------------------------------------------------
# MIT Indoor-67

INDOOR_CLASSES = ["airport_inside", "bakery", "kitchen"]


def _indoor_files(served: Path, variant: int = 0) -> None:
    files = {}
    train_lines, test_lines = [], []
    for c, name in enumerate(INDOOR_CLASSES):
        for k in range(3):
            rel = f"{name}/pic_{k}.jpg"
            files[f"Images/{rel}"] = _image_bytes((c * 80, k * 60, variant))
            (train_lines if k < 2 else test_lines).append(rel)
    write_tar(served / "indoorCVPR_09.tar", files, "w")
    # Windows line endings and a trailing blank line, as plain text lists often have.
    (served / "TrainImages.txt").write_bytes(("\r\n".join(train_lines) + "\r\n\r\n").encode())
    (served / "TestImages.txt").write_bytes("\n".join(test_lines).encode())


@pytest.fixture
def indoor_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    _indoor_files(served)
    with serve(served) as server:
        yield server


def _prepare_indoor(server, root):
    return folders.prepare_indoor(
        root,
        server.url("indoorCVPR_09.tar"),
        train_list_url=server.url("TrainImages.txt"),
        test_list_url=server.url("TestImages.txt"),
    )


def test_indoor_split_and_recorded_hashes(indoor_server, tmp_path):
    root = tmp_path / "indoor"
    assert _prepare_indoor(indoor_server, root) == root
    splits = folders.load_indoor(root)
    assert splits.classes == INDOOR_CLASSES
    assert len(splits.train) == 6 and len(splits.test) == 3
    for items, ks in ((splits.train, (0, 1)), (splits.test, (2,))):
        assert [(Path(p).parent.name, Path(p).name, y) for p, y in items] == [
            (name, f"pic_{k}.jpg", c) for c, name in enumerate(INDOOR_CLASSES) for k in ks
        ]
    record = json.loads((root / "source.json").read_text())
    served = indoor_server.folder
    assert record["md5"] == _md5(served / "indoorCVPR_09.tar")
    assert record["files"]["TrainImages.txt"]["md5"] == _md5(served / "TrainImages.txt")
    assert record["files"]["TestImages.txt"]["md5"] == _md5(served / "TestImages.txt")

    indoor_server.requested.clear()
    _prepare_indoor(indoor_server, root)
    assert indoor_server.requested == []


def test_indoor_verifies_against_the_recorded_hash(indoor_server, tmp_path):
    root = tmp_path / "indoor"
    _prepare_indoor(indoor_server, root)
    recorded = json.loads((root / "source.json").read_text())["md5"]
    # Upstream changes, and the local copy is gone: the new download must not be trusted.
    _indoor_files(indoor_server.folder, variant=1)
    (root / "indoorCVPR_09.tar").unlink()
    shutil.rmtree(root / "Images")
    with pytest.raises(ChecksumError) as info:
        _prepare_indoor(indoor_server, root)
    assert recorded in str(info.value) and _md5(indoor_server.folder / "indoorCVPR_09.tar") in str(info.value)
    assert "source.json" in str(info.value)
    assert json.loads((root / "source.json").read_text())["md5"] == recorded
    assert sorted(os.listdir(root)) == ["TestImages.txt", "TrainImages.txt", "source.json"]


@pytest.mark.parametrize("name", ["TrainImages.txt", "TestImages.txt"])
def test_indoor_missing_split_list_is_named(indoor_server, tmp_path, name):
    root = tmp_path / "indoor"
    _prepare_indoor(indoor_server, root)
    (root / name).unlink()
    with pytest.raises(DataLayoutError, match=name):
        folders.load_indoor(root)


@pytest.mark.parametrize(
    "line,message",
    [("garage/pic_0.jpg", "class 'garage'"), ("bakery/missing.jpg", "missing.jpg"), ("bakery", "<class>/<image file>")],
)
def test_indoor_bad_list_entry_is_named(indoor_server, tmp_path, line, message):
    root = tmp_path / "indoor"
    _prepare_indoor(indoor_server, root)
    with open(root / "TestImages.txt", "a") as f:
        f.write("\n" + line + "\n")
    with pytest.raises(DataLayoutError, match=message) as info:
        folders.load_indoor(root)
    assert "TestImages.txt" in str(info.value)


def test_indoor_overlapping_lists(indoor_server, tmp_path):
    root = tmp_path / "indoor"
    _prepare_indoor(indoor_server, root)
    with open(root / "TestImages.txt", "a") as f:
        f.write("\nkitchen/pic_0.jpg\n")
    with pytest.raises(DataLayoutError, match="share 1 images"):
        folders.load_indoor(root)


# ---------------------------------------------------------------------------------------------
# ImageNet


def _imagenet(root: Path) -> None:
    layout = {"train": {"n01440764": 3, "n01443537": 2}, "val": {"n01440764": 1, "n01443537": 2}}
    for split, classes in layout.items():
        for c, (wnid, count) in enumerate(classes.items()):
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                (root / split / wnid / f"{wnid}_{k}.JPEG").write_bytes(_image_bytes((c, k, 0)))
            (root / split / wnid / "notes.txt").write_text("not an image")


def test_imagenet_folders(tmp_path):
    _imagenet(tmp_path / "imagenet")
    splits = folders.load_imagenet(tmp_path / "imagenet")
    assert splits.classes == ["n01440764", "n01443537"]
    assert [(Path(p).name, y) for p, y in splits.train] == [
        ("n01440764_0.JPEG", 0), ("n01440764_1.JPEG", 0), ("n01440764_2.JPEG", 0),
        ("n01443537_0.JPEG", 1), ("n01443537_1.JPEG", 1),
    ]
    assert [(Path(p).name, y) for p, y in splits.test] == [
        ("n01440764_0.JPEG", 0), ("n01443537_0.JPEG", 1), ("n01443537_1.JPEG", 1),
    ]


def test_imagenet_missing_folder_is_named(tmp_path):
    with pytest.raises(DataLayoutError, match="nowhere"):
        folders.load_imagenet(tmp_path / "nowhere")
    _imagenet(tmp_path / "imagenet")
    shutil.rmtree(tmp_path / "imagenet" / "val")
    with pytest.raises(DataLayoutError, match=r"imagenet/val"):
        folders.load_imagenet(tmp_path / "imagenet")


def test_imagenet_flat_or_foreign_val(tmp_path):
    root = tmp_path / "imagenet"
    _imagenet(root)
    (root / "val" / "n99999999").mkdir()
    with pytest.raises(DataLayoutError, match="n99999999"):
        folders.load_imagenet(root)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(_image_bytes((0, 0, 0)))
    with pytest.raises(DataLayoutError, match="one folder per class"):
        folders.load_imagenet(root)


# ---------------------------------------------------------------------------------------------
# Decoding and transforms


@pytest.mark.parametrize("train", [False, True])
def test_image_dataset_decodes_and_normalises(tmp_path, train):
    color = (200, 100, 50)
    path = tmp_path / "flat.png"
    path.write_bytes(_image_bytes(color, size=(300, 260), fmt="PNG"))  # PNG: exact pixel values
    gray = tmp_path / "gray.png"
    Image.new("L", (240, 250), 90).save(gray)
    dataset = ImageDataset.for_split([(str(path), 4), (str(gray), 1)], train=train)
    assert len(dataset) == 2
    image, label = dataset[0]
    assert label == 4 and image.dtype == torch.float32 and tuple(image.shape) == (3, 224, 224)
    # A flat image stays flat through any crop, resize or flip: only the normalisation shows.
    expected = [(c / 255 - m) / s for c, m, s in zip(color, folders.IMAGENET_MEAN, folders.IMAGENET_STD)]
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(image.std(dim=(1, 2)).numpy(), 0, atol=1e-4)
    image, label = dataset[1]
    assert label == 1 and tuple(image.shape) == (3, 224, 224)  # grayscale comes back as RGB


def test_test_transform_is_resize_then_center_crop(tmp_path):
    # A 512x256 image with a left half 0 and right half 255: Resize(256) keeps it, the centre
    # crop of 224 takes columns 144..367, so the edge sits at column 256 - 144 = 112.
    array = np.zeros((256, 512, 3), np.uint8)
    array[:, 256:] = 255
    path = tmp_path / "halves.png"
    Image.fromarray(array).save(path)
    image, _ = ImageDataset.for_split([(str(path), 0)], train=False)[0]
    raw = image[0] * folders.IMAGENET_STD[0] + folders.IMAGENET_MEAN[0]
    assert torch.allclose(raw[:, :112], torch.zeros(1), atol=1e-5)
    assert torch.allclose(raw[:, 112:], torch.ones(1), atol=1e-5)
