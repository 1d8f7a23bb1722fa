"""at.data.datasets: a data set is one record, read by download, sources.load, the grid and the
provenance line; CIFAR-100 end to end; the `beyond` table; ImageNet from the user's folder."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cifar_archives import make_cifar100, md5
from http_server import serve
from PIL import Image

from at import grid, provenance
from at.__main__ import main
from at.data import datasets, folders, sources
from at.data.datasets import training_data
from at.spec import RunSpec
from at.params import ParamsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


# ---------------------------------------------------------------------------------------------
# The table


def test_every_params_data_set_has_a_record_and_checks(params):
    assert set(params["data"]) <= set(datasets.DATASETS)
    for name, source in params["data"].items():
        datasets.check_source(name, source)
        assert source["num_classes"] == datasets.get(name).num_classes


def test_unknown_data_set_and_wrong_class_count_are_one_clear_error(params):
    with pytest.raises(ParamsError, match="unknown data set 'mnist'; known: cifar10, cifar100"):
        datasets.get("mnist")
    with pytest.raises(ParamsError, match="data.cifar100.num_classes: CIFAR-100 has 100 classes, got 20"):
        datasets.check_source("cifar100", {**params["data"]["cifar100"], "num_classes": 20})


@pytest.mark.parametrize("dataset,augment", [("cifar10", "imagenet"), ("cifar100", "imagenet"),
                                             ("cub", "crop_flip"), ("imagenet", "flip")])
def test_unsupported_augment_names_both(dataset, augment):
    with pytest.raises(ParamsError) as info:
        datasets.check_augment(dataset, augment)
    assert f"data set {dataset!r} does not support augment {augment!r}" in str(info.value)


def test_grid_validation_refuses_an_unsupported_augment_per_cell(params):
    bad = copy.deepcopy(params)
    bad["protocols"]["cifar_flip"]["augment"] = "imagenet"  # Table 3's CIFAR-10 protocol
    with pytest.raises(ParamsError, match=r"tables.table3 cell .*'cifar10' does not support augment 'imagenet'"):
        grid.validate(bad)
    bad = copy.deepcopy(params)
    bad["profiles"]["smoke"]["protocol"]["augment"] = "imagenet"  # a profile override counts too
    with pytest.raises(ParamsError, match="profiles.smoke, run cifar.*does not support augment 'imagenet'"):
        grid.validate(bad)
    grid.validate(params)  # the shipped params pass


def test_run_ids_take_the_usual_protocol_from_the_records(params):
    ids = {r.id for r in grid.runs(params, "paper")}
    assert "cifar10/wrn-16-1/baseline/seed0" in ids  # cifar is CIFAR-10's usual protocol
    assert "cifar10-cifar_flip/nin-thin-nobn/baseline/seed0" in ids
    assert "cub/resnet18-pretrained/baseline/seed0" in ids


# ---------------------------------------------------------------------------------------------
# CIFAR-100, from download to batches


def _cifar100_spec(root: Path, augment: str, **protocol) -> dict:
    return {"id": "c100", "dataset": "cifar100", "data_dir": str(root), "student": "wrn-10-1",
            "method_name": "baseline", "method": {"terms": [{"type": "ce"}]}, "seed": 0, "out_dir": "unused",
            "protocol": {"epochs": 1, "batch_size": 16, "lr": 0.1, "lr_gamma": 0.2, "augment": augment,
                         "train_subset": None, "test_subset": None, **protocol}}


def _normalised(images_hwc: np.ndarray) -> np.ndarray:
    """(x / 255 - mean) / std in float64 from the HWC images, written out per channel."""
    mean = np.array(datasets.CIFAR100_MEAN)[None, :, None, None]
    std = np.array(datasets.CIFAR100_STD)[None, :, None, None]
    return (images_hwc.transpose(0, 3, 1, 2).astype(np.float64) / 255 - mean) / std


def test_cifar100_downloads_and_loads_fine_labels(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    truth = make_cifar100(site / "cifar-100-python.tar.gz", seed=11)
    root = tmp_path / "data" / "cifar100"
    with serve(site) as server:
        monkeypatch.setenv("AT_CIFAR100_URL", server.url("cifar-100-python.tar.gz"))
        monkeypatch.setenv("AT_CIFAR100_MD5", md5(site / "cifar-100-python.tar.gz"))
        assert main(["--params", str(REPO / "params.yaml"), "download", "cifar100", "--root", str(root)]) == 0
    assert sorted(os.listdir(root)) == ["cifar-100-python", "cifar-100-python.tar.gz", "source.json"]

    data = training_data(RunSpec.resolve(_cifar100_spec(root, "none")), torch.device("cpu"))
    assert (data.n_train, data.n_test, data.input_shape) == (40, 20, (3, 32, 32))
    assert data.md5 == md5(site / "cifar-100-python.tar.gz")
    images, fine, coarse = truth["train"]
    assert fine != coarse  # the fixture's two label sets differ, so the test tells them apart
    perm = torch.arange(39, -1, -1)  # reversed: the batches must follow the order given
    batches = list(data.train_batches(perm, 0, 16, torch.Generator().manual_seed(0)))
    x = torch.cat([b[0] for b in batches]).double().numpy()
    y = torch.cat([b[1] for b in batches]).tolist()
    assert y == fine[::-1]
    np.testing.assert_allclose(x, _normalised(images[::-1]), atol=1e-5)
    test_images, test_fine, _ = truth["test"]
    tx, ty = zip(*data.test_batches(8))
    assert torch.cat(ty).tolist() == test_fine
    np.testing.assert_allclose(torch.cat(tx).double().numpy(), _normalised(test_images), atol=1e-5)


def test_cifar100_crop_flip_draws_from_the_generator_only(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_cifar100(site / "c100.tar.gz", seed=12)
    from at.data import cifar

    cifar.prepare(tmp_path / "c100", str(site / "c100.tar.gz"), md5(site / "c100.tar.gz"), layout=cifar.CIFAR100)
    data = training_data(RunSpec.resolve(_cifar100_spec(tmp_path / "c100", "crop_flip")), torch.device("cpu"))
    perm = torch.arange(40)

    def epoch(seed):
        return torch.cat([x for x, _ in data.train_batches(perm, 0, 16, torch.Generator().manual_seed(seed))])

    assert torch.equal(epoch(3), epoch(3)) and not torch.equal(epoch(3), epoch(4))


def test_a_record_refuses_an_augment_at_load_time_too(tmp_path):
    with pytest.raises(ParamsError, match="'cifar100' does not support augment 'imagenet'"):
        training_data(RunSpec.resolve(_cifar100_spec(tmp_path, "imagenet")), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The beyond table


def test_beyond_is_not_run_by_the_shipped_profiles(params):
    for profile in params["profiles"]:
        assert "beyond" in grid.not_run(params, profile)
        assert all(r.dataset != "cifar100" for r in grid.runs(params, profile))


def test_beyond_runs_resolve_when_a_profile_selects_it(params):
    selecting = copy.deepcopy(params)
    selecting["profiles"]["beyond_only"] = {"tables": ["beyond"], "seeds": [0]}
    grid.validate(selecting)
    runs = {r.id: r for r in grid.runs(selecting, "beyond_only")}
    teacher = "cifar100/wrn-40-2/baseline/seed0"
    assert sorted(runs) == sorted([
        "cifar100/wrn-16-2/baseline/seed0", "cifar100/wrn-16-2_from_wrn-40-2/at-sum-p2/seed0",
        "cifar100/wrn-16-2_from_wrn-40-2/kd/seed0", teacher])
    assert runs["cifar100/wrn-16-2_from_wrn-40-2/kd/seed0"].teacher_run == teacher
    assert [(c.row, c.column) for c in runs[teacher].cells] == [("teacher", "error")]
    spec = grid.run_spec(selecting, "cifar100/wrn-16-2_from_wrn-40-2/at-sum-p2/seed0", "beyond_only")
    assert spec.num_classes == 100 and spec.data_dir == "data/cifar100"
    assert spec.protocol.augment == "crop_flip"
    assert spec.teacher_checkpoint == f"runs/beyond_only/{teacher}/checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# ImageNet from the user's folder


def _imagenet_folder(root: Path) -> Path:
    colours = {"n01440764": (200, 30, 30), "n01443537": (30, 30, 200)}
    for split, count in (("train", 3), ("val", 2)):
        for wnid, colour in colours.items():
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                width = 48 + 8 * k
                pixels = np.empty((40, width, 3), np.uint8)
                pixels[:] = colour
                pixels[:, :, 1] = np.linspace(0, 255, width, dtype=np.uint8)  # crops differ in green
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{k}.png")
    return root


@pytest.fixture
def imagenet_params(params, tmp_path):
    with_folder = copy.deepcopy(params)
    with_folder["data"]["imagenet"]["folder"] = str(_imagenet_folder(tmp_path / "my imagenet"))
    with_folder["profiles"]["imagenet_only"] = {"tables": ["imagenet"]}
    return with_folder


def test_imagenet_runs_read_the_users_folder(imagenet_params, tmp_path):
    grid.validate(imagenet_params)
    assert not grid.needs_download(imagenet_params, "imagenet") and grid.needs_download(imagenet_params, "cifar10")
    folder = str(tmp_path / "my imagenet")
    assert grid.data_dir("imagenet", imagenet_params) == folder
    assert grid.data_dir("cifar10", imagenet_params) == "data/cifar10"
    spec = grid.run_spec(imagenet_params, "imagenet/resnet18_from_resnet34-pretrained/at-sum-p2/seed0",
                         "imagenet_only")
    assert spec.data_dir == folder
    assert folder in grid.report_inputs(imagenet_params, "imagenet_only")
    data = sources.FolderData(spec, datasets.get("imagenet"), torch.device("cpu"), workers=0)
    assert (data.n_train, data.n_test, data.md5) == (6, 4, sources.USER_FOLDER)
    x, y = next(iter(data.test_batches(4)))
    assert tuple(x.shape) == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1]
    # red images of class 0, blue of class 1: the normalised red channel tells them apart
    assert (x[:2, 0] > x[:2, 2]).all() and (x[2:, 0] < x[2:, 2]).all()
    assert provenance.data_description("imagenet", "user-folder", imagenet_params) == f"ImageNet from the folder {folder}"


def test_imagenet_without_a_folder_has_no_data_dir(params):
    with pytest.raises(ParamsError, match="data.imagenet.folder"):
        grid.data_dir("imagenet", params)


def test_folder_data_honours_augment_none(imagenet_params):
    spec = grid.run_spec(imagenet_params, "imagenet/resnet18/baseline/seed0", "imagenet_only")
    imagenet = datasets.get("imagenet")
    data = sources.FolderData(spec.replace(protocol={**spec.protocol.to_dict(), "augment": "none"}), imagenet,
                              torch.device("cpu"), workers=0)
    # no random draw: a training image is its test-time view (resize 256, center crop 224)
    path = Path(imagenet_params["data"]["imagenet"]["folder"]) / "train/n01440764/n01440764_2.png"
    with Image.open(path) as image:
        test_view = folders.image_transform(train=False)(image.convert("RGB"))
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(data.train_set[2][0], test_view)
    augmented = sources.FolderData(spec.replace(protocol={**spec.protocol.to_dict(), "augment": "imagenet"}),
                                   imagenet, torch.device("cpu"), workers=0)
    views = set()
    for seed in range(4):
        torch.manual_seed(seed)
        views.add(augmented.train_set[2][0].sum().item())
    assert len(views) > 1


def test_download_of_a_user_folder_data_set_is_refused_in_one_line(capsys):
    assert main(["--params", str(REPO / "params.yaml"), "download", "imagenet"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.imagenet.folder" in err and "cifar100" in err
