"""Pre-activation Wide Residual Networks (Zagoruyko & Komodakis 2016) for CIFAR.

WRN-D-K, D = 6n + 4 (n >= 1), K >= 1:

- stem: conv3x3, 3 -> 16 channels (16, not 16K, as in the authors' code);
- three groups of n basic blocks with 16K, 32K, 64K channels and strides 1, 2, 2;
- block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, added to a shortcut that is the identity
  when the block keeps its channel count and stride, else a 1x1 conv (with the block's
  stride) applied to the *pre-activated* input (the output of the first BN-ReLU);
- head: BN-ReLU, global average pooling (8x8 for a 32x32 input; global so that larger
  inputs also work), linear.

No dropout; convolutions have no bias (every conv is followed by a BN, directly or after the
residual addition).

Attention taps: the three group outputs, after each group's last residual addition and
before the head's BN-ReLU (32x32, 16x16, 8x8 for a 32x32 input), as in the authors' code.

Initialisation, following the authors' attention-transfer code (utils.py, ``conv_params`` and
``linear_params`` call ``torch.nn.init.kaiming_normal_`` with its defaults): conv and linear
weights ~ N(0, 2 / fan_in) (He et al. 2015, fan_in mode, ReLU gain); linear bias 0; BN bias
0. BN weight: drawn from U(0, 1) by default (``bn_weight_init="uniform"``), as the authors'
code does (``torch.rand``); ``bn_weight_init="ones"`` is the usual PyTorch choice. params.yaml
chooses it per protocol (key ``bn_weight_init``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from at.models.catalog import BN_WEIGHT_INITS


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=False,
    )


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a shortcut (identity or 1x1 conv)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_channels)
        self.conv0 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv1 = _conv(out_channels, out_channels, 3, 1)
        if in_channels != out_channels or stride != 1:
            self.shortcut: nn.Conv2d | None = _conv(in_channels, out_channels, 1, stride)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU on a fresh BN output is safe: BN's backward needs its input, not
        # its output, and x itself is never modified (it may be the previous group's tap).
        pre = F.relu(self.bn0(x), inplace=True)
        residual = self.conv1(F.relu(self.bn1(self.conv0(pre)), inplace=True))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return residual + skip


class WideResNet(nn.Module):
    """WRN-depth-width; ``forward(x) -> (logits, [group0, group1, group2])``."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int = 10,
        bn_weight_init: str = "uniform",
    ):
        super().__init__()
        blocks_per_group = wrn_blocks_per_group(depth)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"WRN width K must be an integer >= 1, got {width!r}")
        if bn_weight_init not in BN_WEIGHT_INITS:
            raise ValueError(
                f"bn_weight_init must be one of {BN_WEIGHT_INITS}, got {bn_weight_init!r}"
            )
        self.depth = depth
        self.width = width
        widths = (16 * width, 32 * width, 64 * width)

        self.conv = _conv(3, 16, 3, 1)
        in_channels = 16
        groups = []
        for out_channels, stride in zip(widths, (1, 2, 2)):
            blocks = [PreActBlock(in_channels, out_channels, stride)]
            blocks += [
                PreActBlock(out_channels, out_channels, 1) for _ in range(blocks_per_group - 1)
            ]
            groups.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.group0, self.group1, self.group2 = groups
        self.bn = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        self._init_weights(bn_weight_init)

    def _init_weights(self, bn_weight_init: str) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                if bn_weight_init == "ones":
                    nn.init.ones_(module.weight)
                else:
                    nn.init.uniform_(module.weight, 0.0, 1.0)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stem = self.conv(x)
        g0 = self.group0(stem)
        g1 = self.group1(g0)
        g2 = self.group2(g1)
        out = F.relu(self.bn(g2))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out), [g0, g1, g2]


def wrn_blocks_per_group(depth: int) -> int:
    """n = (depth - 4) / 6; a ValueError unless depth = 6n + 4 with n >= 1."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"WRN depth D must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth!r}"
        )
    return (depth - 4) // 6
