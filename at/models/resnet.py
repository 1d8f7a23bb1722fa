"""torchvision's ImageNet ResNet-18/34, returning the four group outputs as attention taps.

The network itself is torchvision's (``torchvision.models.resnet18`` / ``resnet34``, with
torchvision's own initialisation); ``TappedResNet`` adopts its submodules under their own
names, so its ``state_dict`` keys are exactly torchvision's, and only re-states the forward
pass to keep the outputs of ``layer1`` .. ``layer4``.

``weights="imagenet"`` loads torchvision's ``IMAGENET1K_V1`` weights (the original
ImageNet-1k training, what the paper's era used) through torchvision's weights API (a
download to the torch hub cache on first use, hash checked by torchvision); when
``num_classes != 1000`` the classifier ``fc`` is then replaced by a fresh
``nn.Linear(512, num_classes)`` with PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from at.models.catalog import RESNET_WEIGHTS as WEIGHTS, RESNETS

# torchvision is imported only when a ResNet is built: importing it costs seconds in every CIFAR
# job that never needs it.

_CHILDREN = (
    "conv1",
    "bn1",
    "relu",
    "maxpool",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "avgpool",
    "fc",
)


class TappedResNet(nn.Module):
    """``forward(x) -> (logits, [layer1, layer2, layer3, layer4])`` of a torchvision ResNet."""

    def __init__(self, net: nn.Module):
        super().__init__()
        children = dict(net.named_children())
        if tuple(children) != _CHILDREN:
            raise ValueError(
                f"expected a torchvision ResNet with children {_CHILDREN}, got {tuple(children)}"
            )
        for name, module in children.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(x)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        l4 = self.layer4(l3)
        logits = self.fc(torch.flatten(self.avgpool(l4), 1))
        return logits, [l1, l2, l3, l4]


def build_resnet(name: str, num_classes: int = 10, weights: str | None = None) -> TappedResNet:
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; allowed: {sorted(RESNETS)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights for {name!r} must be one of {WEIGHTS}, got {weights!r}")
    import torchvision

    builder_name, enum_name = RESNETS[name]
    builder = getattr(torchvision.models, builder_name)
    imagenet = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    if weights is None:
        net = builder(weights=None, num_classes=num_classes)
    else:
        # torchvision insists on its 1000 ImageNet classes when loading weights.
        net = builder(weights=imagenet)
        if num_classes != net.fc.out_features:
            net.fc = nn.Linear(net.fc.in_features, num_classes)
    return TappedResNet(net)
