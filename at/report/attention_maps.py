"""The attention-map figure: teacher and AT student of Table 1. The maps are inferred from their
checkpoints once, when the run's record is written (:func:`record`), and drawn from that record,
so that a clone without checkpoints renders the same figure."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from at.report import labels
from at.report.figures import new_figure, set_footer, set_title

# The Table 1 pair and method whose checkpoints feed the attention-map figure (as in the paper).
ATTENTION_PAIR = "wrn-16-1_from_wrn-16-2"
ATTENTION_METHOD = "at"
ATTENTION_IMAGES = 4
# the maps in the AT run's record (at.records), from which the figure is drawn
ATTENTION_FILE = "attention.json"


def compute_maps(teacher, student, inputs, attention_fn: Callable | None = None,
                 names: tuple[str, str] = ("teacher", "student")) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tapped layer, the (teacher, student) attention maps of ``inputs``, each (N, h, w) float64.

    teacher, student: models returning (logits, taps), in eval mode on the device of `inputs`
    (normalised float tensor, N first). attention_fn(activation) -> (N, h*w) per tap; default
    at.attention.attention_map(act, "sum", 2) (imported here, so that tests can pass their own).
    """
    import torch

    if attention_fn is None:
        from at.attention import attention_map

        def attention_fn(act):
            return attention_map(act, "sum", 2)

    with torch.no_grad():
        _, t_taps = teacher(inputs)
        _, s_taps = student(inputs)
    if len(t_taps) != len(s_taps):
        raise ValueError(
            f"{names[0]} has {len(t_taps)} taps and {names[1]} {len(s_taps)}: cannot pair them"
        )
    maps = []
    for j, (t_act, s_act) in enumerate(zip(t_taps, s_taps)):
        if t_act.shape[-2:] != s_act.shape[-2:]:
            raise ValueError(
                f"tap {j}: spatial sizes differ ({tuple(t_act.shape[-2:])} vs "
                f"{tuple(s_act.shape[-2:])})"
            )
        h, w = s_act.shape[-2:]
        pair = []
        for act in (t_act, s_act):
            q = attention_fn(act.float())
            pair.append(q.reshape(q.shape[0], h, w).detach().cpu().double().numpy())
        maps.append(tuple(pair))
    return maps


def attention_figure(images, maps, title: str, names: tuple[str, str] = ("teacher", "student"),
                     footer: str | None = None):
    """Attention maps of teacher and student at each tapped layer, one row per image.

    images: uint8 (N, 3, H, W) array, shown as is; maps: per tap (teacher, student) arrays of
    shape (N, h, w) (:func:`compute_maps`, or a run record's attention.json)."""
    pictures = np.asarray(images)
    if pictures.dtype != np.uint8 or pictures.ndim != 4 or pictures.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {pictures.dtype} {pictures.shape}")
    n = pictures.shape[0]
    cols = 1 + 2 * len(maps)
    fig = new_figure(1.5 * cols, 1.6 * n + 0.9)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(pictures[i].transpose(1, 2, 0), interpolation="nearest")
        for j, pair in enumerate(maps):
            for k, (who, m) in enumerate(zip(names, pair)):
                ax = axes[i, 1 + 2 * j + k]
                ax.imshow(np.asarray(m[i], dtype=np.float64), cmap="jet", interpolation="bilinear")
                if i == 0:
                    ax.set_title(f"{who}\ngroup {j + 1}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    set_title(fig, title, fontsize=9)
    if footer:
        set_footer(fig, footer)
    return fig


def _find_cifar_folder(candidate: Path) -> Path | None:
    # data_dir may be the prepare() root or the cifar-10-batches-py folder itself.
    for folder in (candidate, candidate / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file():
            return folder
    return None


def record(out_dir: Path, cifar_dir: str | None = None) -> dict | None:
    """The attention maps of an AT run and its teacher as its record keeps them (attention.json,
    at.records): the first test images and, per tap, both maps, each scaled to its own maximum
    and rounded to 3 decimals (the figure's colour scale is per map, and shows no more). None
    where the run's or its teacher's checkpoint, or the CIFAR-10 test batch, is not there."""
    from at.checkpoint import load_model

    student, spec = load_model(Path(out_dir) / "checkpoint.pt")
    teacher_path = spec.teacher_checkpoint
    if not teacher_path or not Path(teacher_path).is_file():
        return None
    teacher, _ = load_model(Path(teacher_path))
    data_dir = cifar_dir or spec.data_dir
    folder = _find_cifar_folder(Path(data_dir)) if data_dir else None
    if folder is None:
        return None

    import torch

    from at.data import augment, cifar

    data = cifar.load(folder)
    images = torch.as_tensor(data.test_x[:ATTENTION_IMAGES])
    inputs = augment.normalize(images, augment.CIFAR_MEAN, augment.CIFAR_STD)
    maps = compute_maps(teacher.to("cpu").float().eval(), student.to("cpu").float().eval(), inputs)

    def scaled(m: np.ndarray) -> list:
        top = m.reshape(m.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
        return np.round(m / np.where(top > 0, top, 1.0), 3).tolist()

    return {"run": spec.id, "seed": spec.seed, "student": spec.student, "teacher": spec.teacher,
            "mapping": "F_sum^2", "images": images.numpy().tolist(),
            "maps": [{"teacher": scaled(t), "student": scaled(s)} for t, s in maps]}


def attention_from_runs(summaries, context) -> tuple[object | None, str]:
    """(figure, note) or (None, why it was skipped), from the AT student's record (attention.json)."""
    cell = next(
        (c for c in summaries.get("table1", []) if c.row == ATTENTION_PAIR and c.column == ATTENTION_METHOD),
        None,
    )
    if cell is None or cell.status == "not run":
        return None, "the AT run of WRN-16-1 from WRN-16-2 is not run in this profile"
    candidates = [r for r in cell.runs if not r.missing and (r.out_dir / ATTENTION_FILE).is_file()]
    if not candidates:
        return None, (f"no finished AT run of WRN-16-1 from WRN-16-2 has an {ATTENTION_FILE} in its "
                      "record (written from its checkpoints when the run is exported)")
    run = candidates[0]  # lowest seed: runs are sorted by seed
    import json

    saved = json.loads((run.out_dir / ATTENTION_FILE).read_text())
    images = np.asarray(saved["images"], dtype=np.uint8)
    maps = [(np.asarray(m["teacher"]), np.asarray(m["student"])) for m in saved["maps"]]
    # one run's maps: the title names its seed and run, never the profile's seed count
    title = labels.mathtext(
        f"Attention maps ({saved['mapping']}) of {saved['teacher']} (teacher) and {saved['student']} "
        f"(AT student), first {len(images)} test images\nseed {run.seed}: run {run.id} and its teacher")
    fig = attention_figure(images, maps, title, names=("teacher", "student"), footer=context.footer)
    return fig, f"Seed {run.seed} only: from `{run.id}` and its teacher."
