"""Data layer: the data-set registry (datasets), download and verify (download), CIFAR as uint8
tensors (cifar), image-folder data sets (folders), the training data a run reads (sources), its
seeded stream of batches (stream) and batched on-device augmentation (augment).

Import the submodules directly (``from at.data import cifar``); nothing is imported here so
that ``import at.data`` stays cheap (folders pulls in torchvision and PIL).
"""
