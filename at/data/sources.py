"""Training data as the loop sees it: batches of normalised images for a given sample order.

Two loaders behind one interface; a data set's record (:mod:`at.data.datasets`) names its own
(``loader``), and :func:`at.data.datasets.training_data` builds it as ``loader(spec, record, device)``:

- :class:`TensorData` (CIFAR-10, CIFAR-100), held whole as uint8 tensors
  on the training device and augmented there batch by batch (no per-image Python work). Every
  random draw comes from the run's generator, so a resumed run repeats an uninterrupted one
  exactly.
- :class:`FolderData` (CUB-200-2011, MIT Indoor-67, ImageNet), decoded
  with PIL in DataLoader workers. Each image's augmentation draws from its own seed (the
  epoch's seed, from the run's generator, plus its position in the epoch), so the batches do
  not depend on the number of workers and a run resumed mid-epoch continues exactly.

``train_batches(perm, start_step, batch_size, generator, part=None)`` yields the batches of one
epoch in the order ``perm``, from ``start_step`` on (with ``part = (rank, processes)``: that
rank's slice of each batch, at.distributed.bounds, augmented as in the whole batch); ``test_batches(batch_size)`` the test set in order.
The protocol's ``augment`` is one the data set supports (at.spec checks it).
"""

from __future__ import annotations

import os
from pathlib import Path

from at import lazy
from at.data import augment, download
from at.data.augment import Augment

torch = lazy.module("torch")   # at.lazy: the grid reads the data sets' records without torch

USER_FOLDER = "user-folder"  # the md5 of a data set supplied as a folder (nothing to hash)


def source_md5(folder: Path, dataset) -> str:
    """The md5 of the archive a prepared data folder came from (its source.json)."""
    if dataset.user_folder:
        return USER_FOLDER
    record = download.read_source_record(folder)
    if not record:
        raise FileNotFoundError(
            f"data folder {folder} has no source.json: prepare it first with `python -m at download {dataset.name}`")
    return record.get("md5") or "unknown"


def subset_size(spec, key: str, available: int) -> int:
    """How many images of a split a run uses: the protocol's ``train_subset``/``test_subset``, or
    all. A subset larger than the split is an error rather than silently the whole split: the
    run's spec (and every table citing it) would claim a size it never had."""
    wanted = getattr(spec.protocol, key)
    if wanted is None:
        return available
    if wanted > available:
        raise ValueError(f"run {spec.id}: protocol.{key} is {wanted}, but the {spec.dataset} data in "
                         f"{spec.data_dir} has only {available} {key.split('_')[0]} images: lower it "
                         f"(or set it to null for all {available})")
    return wanted


def check_batch_size(spec, available: int) -> None:
    """Refuse a batch larger than the training images, as :func:`subset_size` refuses a subset
    larger than its split: each step would be one batch of all ``available`` images while the
    run's spec (and every table citing it) records the larger size."""
    wanted = spec.protocol.batch_size
    if wanted > available:
        source = ("protocol.train_subset" if spec.protocol.train_subset is not None
                  else f"all of the {spec.dataset} data in {spec.data_dir}")
        raise ValueError(f"run {spec.id}: protocol.batch_size is {wanted}, but the run has only {available} "
                         f"training images ({source}): lower it to at most {available}")


class TensorData:
    """A data set held as uint8 tensors on the training device, batched and augmented there."""

    # CIFAR-10's statistics unless the data set's record says otherwise (a subclass that fills
    # the tensors itself, like the benchmark's synthetic data, keeps these)
    mean, std = augment.CIFAR_MEAN, augment.CIFAR_STD

    def __init__(self, spec, dataset, device: torch.device):
        folder = Path(spec.data_dir)
        mode = spec.protocol.augment
        self.md5 = source_md5(folder, dataset)
        data = dataset.load(folder)
        n_train = subset_size(spec, "train_subset", len(data.train_y))
        n_test = subset_size(spec, "test_subset", len(data.test_y))
        # The first images of each split: the same subset for every run and seed, so runs compare.
        self.train_x = data.train_x[:n_train].to(device)
        self.train_y = data.train_y[:n_train].to(device)
        self.test_x = data.test_x[:n_test].to(device)
        self.test_y = data.test_y[:n_test].to(device)
        self.mean, self.std = dataset.mean, dataset.std
        self.crop, self.flip = mode == Augment.CROP_FLIP, mode in (Augment.CROP_FLIP, Augment.FLIP)

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def train_batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.train_x[idx]
        if self.crop or self.flip:
            x = augment.random_crop_flip(x, generator, pad=4, crop=self.crop, flip=self.flip)
        return augment.normalize(x, self.mean, self.std), self.train_y[idx]

    def train_slice(self, idx: torch.Tensor, generator: torch.Generator, lo: int, hi: int):
        """Images ``lo:hi`` of the batch ``idx``, augmented exactly as in the whole batch: the
        crops and flips of the whole batch are drawn (the generator advances as for the whole
        batch), and only the slice's images are gathered and augmented."""
        x = self.train_x[idx[lo:hi]]
        if self.crop or self.flip:
            drawn = augment.draw_crop_flip(len(idx), generator, pad=4, crop=self.crop, flip=self.flip)
            x = augment.apply_crop_flip(x, augment.CropFlip(drawn.offsets[lo:hi], drawn.flips[lo:hi]), pad=4)
        return augment.normalize(x, self.mean, self.std), self.train_y[idx[lo:hi]]

    def train_batches(self, perm: torch.Tensor, start_step: int, batch_size: int, generator: torch.Generator,
                      part: tuple[int, int] | None = None):
        from at.distributed import bounds   # imports torch: here, not where the grid reads this module

        for start in range(start_step * batch_size, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            if part is None:
                yield self.train_batch(idx, generator)
            else:
                yield self.train_slice(idx, generator, *bounds(len(idx), *part))

    def test_batches(self, batch_size: int):
        for i in range(0, self.n_test, batch_size):
            x = augment.normalize(self.test_x[i:i + batch_size], self.mean, self.std)
            yield x, self.test_y[i:i + batch_size]


IMAGE_SIZE = 224


class FolderData:
    """Image-folder data sets, decoded and augmented by DataLoader workers."""

    def __init__(self, spec, dataset, device: torch.device, workers: int | None = None):
        folder = Path(spec.data_dir)
        mode = spec.protocol.augment
        self.md5 = source_md5(folder, dataset)
        from at.data import folders  # torchvision and PIL: only for image-folder runs

        splits = dataset.load(folder)
        train = splits.train[:subset_size(spec, "train_subset", len(splits.train))]
        test = splits.test[:subset_size(spec, "test_subset", len(splits.test))]
        self.train_set = folders.ImageDataset.for_split(train, train=True, size=IMAGE_SIZE, augment=mode,
                                                        mean=dataset.mean, std=dataset.std)
        self.test_set = folders.ImageDataset.for_split(test, train=False, size=IMAGE_SIZE, augment=mode,
                                                       mean=dataset.mean, std=dataset.std)
        self.device = device
        self.workers = workers if workers is not None else min(8, len(os.sched_getaffinity(0)))

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    @property
    def n_test(self) -> int:
        return len(self.test_set)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    def _loader(self, dataset, order, batch_size: int, seed: int | None):
        loader_generator = torch.Generator()
        loader_generator.manual_seed(seed or 0)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=order, num_workers=self.workers,
            generator=loader_generator, pin_memory=self.device.type == "cuda",
            persistent_workers=False)

    def train_batches(self, perm: torch.Tensor, start_step: int, batch_size: int, generator: torch.Generator,
                      part: tuple[int, int] | None = None):
        """The epoch's batches (of one rank: ``part`` = (rank, processes)). Image ``i`` of the
        epoch is augmented from its own seed, the epoch's seed plus ``i``, whichever worker (and
        whichever rank) decodes it: so a rank's slice is the one-process batch's slice, no rank
        decodes an image it does not train on, and the number of workers changes nothing."""
        # The epoch's seed comes from a copy of the generator, which itself does not advance: a
        # state saved mid-epoch (the generator after the epoch's order) gives the same seed again
        # on resume, so an image-folder run resumes exactly too.
        from at.data import folders
        from at.distributed import bounds

        copy = torch.Generator(device=generator.device)
        copy.set_state(generator.get_state())
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=copy, device=generator.device))
        order = perm.cpu().tolist()
        batches = []
        for start in range(start_step * batch_size, len(order), batch_size):
            n = min(batch_size, len(order) - start)
            lo, hi = (0, n) if part is None else bounds(n, *part)
            batches.append([(order[start + i], epoch_seed + start + i) for i in range(lo, hi)])
        loader = torch.utils.data.DataLoader(
            folders.SeededImages(self.train_set), batch_sampler=batches, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def test_batches(self, batch_size: int):
        for x, y in self._loader(self.test_set, list(range(self.n_test)), batch_size, None):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
