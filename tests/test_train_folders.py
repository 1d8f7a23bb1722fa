"""The training loop on an image-folder data set (Table 4's path), from a generated CUB layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from at.data import download, folders
from at.train import Options
from at.train import train as train_run

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
IMAGES = [(1, 1, 1), (2, 1, 1), (3, 1, 0), (4, 2, 1), (5, 2, 1), (6, 2, 0)]  # (id, class, is_train)


def _cub_archive(path: Path) -> Path:
    def jpeg(color):
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), color).save(buf, format="JPEG")
        return buf.getvalue()

    base = "CUB_200_2011"
    files = {
        f"{base}/classes.txt": "".join(f"{i} {n}\n" for i, n in enumerate(CLASSES, 1)).encode(),
        f"{base}/images.txt": "".join(f"{i} {CLASSES[c - 1]}/{i}.jpg\n" for i, c, _ in IMAGES).encode(),
        f"{base}/image_class_labels.txt": "".join(f"{i} {c}\n" for i, c, _ in IMAGES).encode(),
        f"{base}/train_test_split.txt": "".join(f"{i} {t}\n" for i, _, t in IMAGES).encode(),
    }
    for i, c, _ in IMAGES:
        files[f"{base}/images/{CLASSES[c - 1]}/{i}.jpg"] = jpeg((120 * c, 10 * i, 0))
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_resnet_student_trains_on_image_folders_with_a_resnet_teacher(tmp_path, mlflow_store):
    archive = _cub_archive(tmp_path / "CUB_200_2011.tgz")
    root = tmp_path / "data" / "cub"
    folders.prepare_cub(root, str(archive), download.file_md5(archive))
    protocol = {"epochs": 1, "batch_size": 2, "lr": 0.01, "lr_drops": [], "lr_gamma": 0.1, "momentum": 0.9,
                "nesterov": False, "weight_decay": 1e-4, "reset_momentum_at_drops": False,
                "augment": "imagenet", "train_subset": None, "test_subset": None}

    def spec(name, model, method, teacher=None, teacher_checkpoint=None):
        terms = {"baseline": [{"type": "ce"}],
                 "at": [{"type": "ce"}, {"type": "at", "mapping": "sum", "p": 2, "form": "code", "beta": 1000}]}
        return {"id": name, "dataset": "cub", "data_dir": str(root), "student": model, "weights": None,
                "teacher": teacher, "teacher_weights": None, "teacher_checkpoint": teacher_checkpoint,
                "method_name": method, "method": {"terms": terms[method]}, "seed": 0,
                "out_dir": str(tmp_path / "runs" / name), "num_classes": 2, "protocol": protocol,
                "profile": "test"}

    def train(s):   # in this process: the loop is the command's (tests/test_cohort.py runs the command)
        train_run(s, Options(device="cpu", progress=False, threads=1))
        return json.loads((tmp_path / "runs" / s["id"] / "metrics.json").read_text())

    teacher = train(spec("teacher", "resnet34", "baseline"))
    student = train(spec("student", "resnet18", "at", "resnet34", str(tmp_path / "runs/teacher/checkpoint.pt")))
    assert teacher["train_size"] == 4 and teacher["test_size"] == 2
    assert student["final_epoch"] == 1 and 0 <= student["final_test_error"] <= 100
    assert student["teacher_params"] == teacher["student_params"]
    history = (tmp_path / "runs/student/history.csv").read_text()
    assert "loss_at" in history.splitlines()[0]
