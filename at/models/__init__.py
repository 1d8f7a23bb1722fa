"""The model zoo: every model's ``forward(x)`` returns ``(logits, taps)``.

Names (``build(name, num_classes=10, weights=None, bn_weight_init="uniform")``):

- ``wrn-D-K``: pre-activation Wide ResNet, D = 6n + 4 (n >= 1), integer K >= 1, e.g.
  ``wrn-16-1``, ``wrn-40-2`` (``at.models.wrn``); taps: the 3 group outputs.
- ``nin-thin``, ``nin-wide`` (with BN), ``nin-thin-nobn``, ``nin-wide-nobn`` (without):
  Network in Network for CIFAR (``at.models.nin``); taps: the 3 block outputs.
- ``resnet18``, ``resnet34``: torchvision's ImageNet ResNets (``at.models.resnet``);
  ``weights="imagenet"`` loads torchvision's IMAGENET1K_V1 weights; taps: layer1..layer4.

Names are canonical (no leading zeros, lower case) so that a model has exactly one spelling
in run ids.
"""

from __future__ import annotations

import re

from torch import nn

from at.models.nin import NIN
from at.models.resnet import RESNETS, WEIGHTS, build_resnet
from at.models.wrn import WideResNet

NIN_NAMES = {
    "nin-thin": ("thin", True),
    "nin-wide": ("wide", True),
    "nin-thin-nobn": ("thin", False),
    "nin-wide-nobn": ("wide", False),
}

ALLOWED_FORMS = (
    "'wrn-D-K' (D = 6n+4 with n >= 1: 10, 16, 22, 28, 34, 40, ...; K an integer >= 1; "
    "e.g. 'wrn-16-1', 'wrn-40-2'), "
    + ", ".join(repr(n) for n in NIN_NAMES)
    + ", "
    + ", ".join(repr(n) for n in RESNETS)
)

_WRN = re.compile(r"wrn-([0-9]+)-([0-9]+)")


def _unknown(name: object, why: str = "") -> ValueError:
    reason = f" ({why})" if why else ""
    return ValueError(f"unknown model name {name!r}{reason}; allowed forms: {ALLOWED_FORMS}")


def _parse_wrn(name: str) -> tuple[int, int]:
    """(depth, width) of a canonical ``wrn-D-K`` name, or a ValueError saying what is wrong."""
    match = _WRN.fullmatch(name)
    if match is None:
        raise _unknown(name)
    depth_text, width_text = match.groups()
    if depth_text != str(int(depth_text)) or width_text != str(int(width_text)):
        raise _unknown(name, "write D and K without leading zeros")
    depth, width = int(depth_text), int(width_text)
    if depth < 10 or (depth - 4) % 6:
        raise _unknown(name, f"depth D={depth} is not 6n+4 with n >= 1")
    if width < 1:
        raise _unknown(name, f"width K={width} is not >= 1")
    return depth, width


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise _unknown(name, "a model name is a string")
    if name in NIN_NAMES or name in RESNETS:
        return
    _parse_wrn(name)


def is_known(name: object) -> bool:
    """Whether ``build(name)`` accepts this name (never raises)."""
    try:
        _check_name(name)
    except ValueError:
        return False
    return True


def build(name: str, num_classes: int = 10, weights: str | None = None,
          bn_weight_init: str = "uniform") -> nn.Module:
    """The model called ``name``, freshly initialised from torch's global RNG.

    ``weights`` is ``None`` (random init) or, for ``resnet18``/``resnet34`` only,
    ``"imagenet"``. ``bn_weight_init`` (``"uniform"``: U(0, 1) as the authors' code, or
    ``"ones"``) sets the BatchNorm weights of WRNs, the models of the authors' CIFAR code; NIN
    and ResNet keep their own init. Bad names, class counts or weights raise ``ValueError``
    before anything is built.
    """
    _check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if name in RESNETS:
        if weights not in WEIGHTS:
            raise ValueError(
                f"weights for {name!r} must be one of {WEIGHTS}, got {weights!r}"
            )
        return build_resnet(name, num_classes, weights)
    if weights is not None:
        raise ValueError(
            f"model {name!r} has no pretrained weights (got weights={weights!r}); "
            f"weights='imagenet' is allowed only for {', '.join(RESNETS)}, "
            f"use weights=None for {name!r}"
        )
    if name in NIN_NAMES:
        layout, batch_norm = NIN_NAMES[name]
        return NIN(layout, num_classes, batch_norm=batch_norm)
    depth, width = _parse_wrn(name)
    return WideResNet(depth, width, num_classes, bn_weight_init=bn_weight_init)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ALLOWED_FORMS", "build", "is_known", "parameter_count"]
