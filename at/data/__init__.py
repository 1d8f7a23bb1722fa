"""Data layer: download and verify (download), CIFAR-10 as uint8 tensors (cifar), batched
on-device augmentation (augment), and image-folder data sets (folders).

Import the submodules directly (``from at.data import cifar``); nothing is imported here so
that ``import at.data`` stays cheap (folders pulls in torchvision and PIL).
"""
