"""Batched CIFAR augmentation on uint8 tensors, on whatever device the batch lives on.

Reflect-pad, random crop back to the input size and random horizontal flip, with an
independent draw per image, done as one gather instead of a per-image PIL pipeline. All
randomness comes from an explicit torch.Generator, whose state a checkpoint saves, so a run
is reproducible and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from at import lazy

torch = lazy.module("torch")   # at.lazy: the grid reads AUGMENTATIONS without torch

__all__ = [
    "AUGMENTATIONS",
    "Augment",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropFlip",
    "apply_crop_flip",
    "draw_crop_flip",
    "normalize",
    "random_crop_flip",
]

class Augment(StrEnum):
    """The values of a protocol's `augment` key: the one list (the schema, the command line and
    each data set's record read it). Which of them a data set implements is in its record."""

    CROP_FLIP = "crop_flip"
    FLIP = "flip"
    NONE = "none"
    IMAGENET = "imagenet"


# what each augmentation does (docs/interfaces.md)
AUGMENTATIONS = {
    Augment.CROP_FLIP: "reflect-pad 4, random crop back to the input size, random horizontal flip (CIFAR)",
    Augment.FLIP: "random horizontal flip only (CIFAR, Table 3)",
    Augment.NONE: "train images as test images (no random draw)",
    Augment.IMAGENET: "train: RandomResizedCrop 224 + flip; test: resize 256, center crop 224 (image folders)",
}
assert list(AUGMENTATIONS) == list(Augment), "every augmentation says what it does"
# The augmentations each kind of loader implements: CIFAR's tensors (at.data.sources), image
# folders (at.data.folders)
CIFAR_AUGMENTS = (Augment.CROP_FLIP, Augment.FLIP, Augment.NONE)
FOLDER_AUGMENTS = (Augment.IMAGENET, Augment.NONE)

# Per-channel mean and std of the CIFAR-10 training images (the authors' code), on the 0..1 scale.
CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
# torchvision's ImageNet statistics: the image-folder data sets and the models fine-tuned from
# ImageNet weights use them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropFlip:
    """One draw for a batch: ``offsets`` (B, 2) top/left corner of the crop in the padded
    image, each in 0..2*pad; ``flips`` (B,) bool, True where the image is mirrored."""

    offsets: torch.Tensor
    flips: torch.Tensor


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a uint8 batch of shape (B, C, H, W), got {what}")


def _check_pad(pad: int, height: int, width: int) -> None:
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if pad >= min(height, width):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {height}x{width} images")


def draw_crop_flip(
    batch_size: int, generator: torch.Generator, pad: int = 4, crop: bool = True, flip: bool = True
) -> CropFlip:
    """Draws crop offsets (if ``crop``), then flip decisions (if ``flip``), on the generator's
    device. Without ``crop`` every offset is ``pad`` (no shift); without ``flip`` none flips."""
    device = generator.device
    if crop:
        offsets = torch.randint(0, 2 * pad + 1, (batch_size, 2), generator=generator, device=device)
    else:
        offsets = torch.full((batch_size, 2), pad, dtype=torch.long, device=device)
    if flip:
        flips = torch.randint(0, 2, (batch_size,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool, device=device)
    return CropFlip(offsets, flips)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Maps coordinates in -size+1..2*size-2 to the source pixel of a reflect padding
    (the edge pixel itself is not repeated, as in numpy.pad(mode="reflect"))."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def apply_crop_flip(x: torch.Tensor, params: CropFlip, pad: int = 4) -> torch.Tensor:
    """Applies a drawn crop/flip to a uint8 batch; the result has x's shape and memory format."""
    _check_batch(x)
    batch, channels, height, width = x.shape
    _check_pad(pad, height, width)
    if params.offsets.shape != (batch, 2) or params.flips.shape != (batch,):
        raise ValueError(
            f"crop/flip parameters for {params.offsets.shape[0]} images, batch has {batch}"
        )
    device = x.device
    offsets = params.offsets.to(device, non_blocking=True)
    flips = params.flips.to(device, non_blocking=True)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    # Output pixel (r, c) of image b comes from padded pixel (r + dy, c' + dx), where c' is c
    # or its mirror, i.e. from source pixel reflect(r + dy - pad), reflect(c' + dx - pad).
    src_rows = _reflect(rows[None, :] + offsets[:, :1] - pad, height)  # (B, H)
    cols = torch.where(flips[:, None], (width - 1 - cols)[None, :], cols[None, :])  # (B, W)
    src_cols = _reflect(cols + offsets[:, 1:] - pad, width)  # (B, W)
    spatial = (src_rows[:, :, None] * width + src_cols[:, None, :]).reshape(batch, height * width)

    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        # Gather whole pixels (all channels at once) from the NHWC storage, which is a view.
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        index = spatial[:, :, None].expand(batch, height * width, channels)
        out = pixels.gather(1, index).view(batch, height, width, channels).permute(0, 3, 1, 2)
        return out
    planes = x.contiguous().view(batch, channels, height * width)
    index = spatial[:, None, :].expand(batch, channels, height * width)
    return planes.gather(2, index).view(batch, channels, height, width)


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, crop: bool = True, flip: bool = True
) -> torch.Tensor:
    """Reflect-pads by ``pad``, crops back to HxW at an independent random offset per image and
    mirrors each image with probability 1/2; uint8 (B, C, H, W) in, same shape out."""
    _check_batch(x)
    _check_pad(pad, x.shape[2], x.shape[3])
    return apply_crop_flip(x, draw_crop_flip(x.shape[0], generator, pad, crop, flip), pad)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD
) -> torch.Tensor:
    """uint8 images -> float32 ``(x/255 - mean) / std`` per channel, memory format kept."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() < 3:
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected uint8 images (..., C, H, W), got {what}")
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    shape = (channels, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return x.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)
