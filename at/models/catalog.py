"""The built-in architectures' names and options, without torch (at.lazy): what the schema and
the grid read of at.models, and what the modules that build them share with it."""

from __future__ import annotations

import re
from enum import StrEnum

from at.choices import names


class BnWeightInit(StrEnum):
    """WRN BatchNorm weights at init (at.models.wrn): U(0, 1) as the authors' code, or ones."""

    UNIFORM = "uniform"
    ONES = "ones"


class Weights(StrEnum):
    """Pretrained weights a model may start from (a cell's ``weights``); None: from scratch."""

    IMAGENET = "imagenet"


BN_WEIGHT_INITS = names(BnWeightInit)
# what a cell's weights and teacher_weights may be
PRETRAINED_WEIGHTS = (None, *names(Weights))
# name -> (torchvision builder, ImageNet weights enum class) (at.models.resnet)
RESNETS = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet34": ("resnet34", "ResNet34_Weights"),
}
RESNET_WEIGHTS = PRETRAINED_WEIGHTS

_WRN = re.compile(r"wrn-([0-9]+)-([0-9]+)")


def parse_wrn(name: str) -> tuple[int, int]:
    """(depth, width) of a canonical ``wrn-D-K`` name, or a ValueError saying what is wrong."""
    match = _WRN.fullmatch(name)
    if match is None:
        raise ValueError("not of the form wrn-D-K")
    depth_text, width_text = match.groups()
    if depth_text != str(int(depth_text)) or width_text != str(int(width_text)):
        raise ValueError("write D and K without leading zeros")
    depth, width = int(depth_text), int(width_text)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth D={depth} is not 6n+4 with n >= 1")
    if width < 1:
        raise ValueError(f"width K={width} is not >= 1")
    return depth, width
