"""The model zoo, a registry of architectures: every model's ``forward(x)`` returns ``(logits, taps)``.

Built-in names (``build(name, num_classes=10, weights=None, bn_weight_init="uniform")``):

- ``wrn-D-K``: pre-activation Wide ResNet, D = 6n + 4 (n >= 1), integer K >= 1, e.g.
  ``wrn-16-1``, ``wrn-40-2`` (``at.models.wrn``); taps: the 3 group outputs.
- ``nin-thin``, ``nin-wide`` (with BN), ``nin-thin-nobn``, ``nin-wide-nobn`` (without):
  Network in Network for CIFAR (``at.models.nin``); taps: the 3 block outputs.
- ``resnet18``, ``resnet34``: torchvision's ImageNet ResNets (``at.models.resnet``);
  ``weights="imagenet"`` loads torchvision's IMAGENET1K_V1 weights; taps: layer1..layer4.

A new architecture is one :class:`Architecture` record given to :func:`register_model` (from
the user's own module, named in params.yaml's ``plugins``); the schema, the grid and the
command line take the names from here. Names are canonical (no leading zeros, lower case) so
that a model has exactly one spelling in run ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from typing import TYPE_CHECKING

from at.models.catalog import BN_WEIGHT_INITS, RESNET_WEIGHTS, RESNETS, parse_wrn
from at.registry import Registry

if TYPE_CHECKING:
    from torch import nn

# The builders import their module (and torch) when they build: the grid side reads this
# registry's names without torch (at.lazy says why).



@dataclass(frozen=True)
class Architecture:
    """One architecture, or a family of them named by a pattern (``wrn-D-K``).

    ``build(name, num_classes, weights, bn_weight_init)`` returns the model, initialised from
    torch's global RNG. ``weights``: the values of a spec's ``weights`` it accepts (None: random
    init). A family gives ``parse(name)``, which returns without error exactly for its names
    (raising a ValueError that says what is wrong with a malformed one), and ``prefix``, the
    start that every one of its names shares; a single model is named by ``name`` alone.
    ``forms`` says how its names are written, for error messages."""

    name: str
    build: Callable[..., nn.Module]
    weights: tuple[str | None, ...] = (None,)
    forms: str = ""
    prefix: str | None = None
    parse: Callable[[str], object] | None = None

    def describe(self) -> str:
        return self.forms or repr(self.name)


def _check_entry(name: str, entry: Architecture) -> None:
    if not isinstance(entry, Architecture):
        raise TypeError(f"a model registry entry must be an at.models.Architecture, got {type(entry).__name__}")
    if entry.name != name:
        raise ValueError(f"model {name!r}: its record is named {entry.name!r}")
    if (entry.prefix is None) != (entry.parse is None):
        raise ValueError(f"model family {name!r}: give both prefix and parse, or neither")


MODELS: Registry[Architecture] = Registry("model", _check_entry)


def register_model(entry: Architecture) -> Architecture:
    """Add an architecture (or a family) under ``entry.name``; returns it."""
    return MODELS.register(entry.name, entry)


def allowed_forms() -> str:
    """Every registered name or name form, for error messages."""
    return ", ".join(entry.describe() for entry in MODELS.values())


def _unknown(name: object, why: str = "") -> ValueError:
    reason = f" ({why})" if why else ""
    return ValueError(f"unknown model name {name!r}{reason}; allowed: {allowed_forms()}")


def architecture(name: object) -> Architecture:
    """The record that builds ``name``, or a ValueError saying what is wrong with the name."""
    if not isinstance(name, str):
        raise _unknown(name, "a model name is a string")
    entry = MODELS.get(name)
    if entry is not None and entry.parse is None:
        return entry
    for family in MODELS.values():
        if family.prefix is not None and name.startswith(family.prefix):
            try:
                family.parse(name)
            except ValueError as e:
                raise _unknown(name, str(e)) from None
            return family
    raise _unknown(name)


def is_known(name: object) -> bool:
    """Whether ``build(name)`` accepts this name (never raises)."""
    try:
        architecture(name)
    except ValueError:
        return False
    return True


def check(name: object, weights: str | None = None) -> Architecture:
    """Refuse an unknown name, or weights that the architecture does not have (ValueError)."""
    entry = architecture(name)
    if weights not in entry.weights:
        if entry.weights == (None,):
            pretrained = [e.name for e in MODELS.values() if any(w is not None for w in e.weights)]
            raise ValueError(f"model {name!r} has no pretrained weights (got weights={weights!r}); pretrained "
                             f"weights exist only for {', '.join(pretrained)}; use weights=None for {name!r}")
        raise ValueError(f"weights for {name!r} must be one of {entry.weights}, got {weights!r}")
    return entry


def build(name: str, num_classes: int = 10, weights: str | None = None,
          bn_weight_init: str = "uniform") -> nn.Module:
    """The model called ``name``, freshly initialised from torch's global RNG.

    ``weights`` is ``None`` (random init) or one the architecture lists (``"imagenet"`` for
    the ResNets). ``bn_weight_init`` (``"uniform"``: U(0, 1) as the authors' code, or
    ``"ones"``) sets the BatchNorm weights of WRNs, the models of the authors' CIFAR code; NIN
    and ResNet keep their own init. Bad names, class counts or weights raise ``ValueError``
    before anything is built.
    """
    entry = check(name, weights)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return entry.build(name, num_classes, weights, bn_weight_init)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The built-in architectures

def _build_wrn(name, num_classes, weights, bn_weight_init):
    from at.models.wrn import WideResNet

    depth, width = parse_wrn(name)
    return WideResNet(depth, width, num_classes, bn_weight_init=bn_weight_init)


def _build_nin(layout: str, batch_norm: bool):
    def build(name, num_classes, weights, bn_weight_init):
        from at.models.nin import NIN

        return NIN(layout, num_classes, batch_norm=batch_norm)
    return build


def _build_resnet(name, num_classes, weights, bn_weight_init):
    from at.models.resnet import build_resnet

    return build_resnet(name, num_classes, weights)


register_model(Architecture(
    "wrn", _build_wrn, prefix="wrn-", parse=parse_wrn,
    forms="'wrn-D-K' (D = 6n+4 with n >= 1: 10, 16, 22, 28, 34, 40, ...; K an integer >= 1; "
          "e.g. 'wrn-16-1', 'wrn-40-2')"))

for _name, (_layout, _batch_norm) in {"nin-thin": ("thin", True), "nin-wide": ("wide", True),
                                      "nin-thin-nobn": ("thin", False), "nin-wide-nobn": ("wide", False)}.items():
    register_model(Architecture(_name, _build_nin(_layout, _batch_norm)))

for _name in RESNETS:
    register_model(Architecture(_name, _build_resnet, weights=RESNET_WEIGHTS))


__all__ = ["BN_WEIGHT_INITS", "MODELS", "RESNETS", "RESNET_WEIGHTS", "Architecture", "allowed_forms", "architecture", "build", "check", "is_known",
           "parameter_count", "register_model"]
