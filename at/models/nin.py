"""Network in Network (Lin et al. 2013) for CIFAR, wide and thin, with or without BN.

Layout (the CIFAR-10 model of the NIN paper, also szagoruyko/cifar.torch's ``nin.lua``):

    block 1: conv 5x5 (pad 2) -> a1, conv 1x1 -> b1, conv 1x1 -> c1
             max pool 3x3 stride 2, ceil mode (32x32 -> 16x16), dropout
    block 2: conv 5x5 (pad 2) -> a2, conv 1x1 -> b2, conv 1x1 -> c2
             average pool 3x3 stride 2, ceil mode (16x16 -> 8x8), dropout
    block 3: conv 3x3 (pad 1) -> a3, conv 1x1 -> b3, conv 1x1 -> num_classes
             global average pooling -> logits (no linear layer)

Every conv is followed by (BN and) ReLU, the last one included, as in the original model
(its class scores are the average of a ReLU output). Pools use padding 0 and ceil mode, as
in the Caffe original: 32 -> 16 -> 8; the average pool's partial last window averages only
its in-bounds pixels, as Caffe's did.

Widths (a, b, c per block):

    nin-wide: (192, 160, 96), (192, 192, 192), (192, 192, num_classes)   the original
    nin-thin: (96, 80, 48), (96, 96, 96), (96, 96, num_classes)          every width halved

Trainable parameters for 10 classes (conv weights + BN weights and biases, or conv biases):

    nin-wide       968,404 = 965,568 + 2 * 1,418
    nin-wide-nobn  966,986 = 965,568 + 1,418
    nin-thin       246,900 = 245,472 + 2 * 714
    nin-thin-nobn  246,186 = 245,472 + 714

The paper calls them 1M and 0.2M; halving every width is the simplest thin variant and,
like WRN-16-1 (0.175M) in the same table, rounds to the paper's 0.2M.

With BN the convs have no bias (BN's shift replaces it) and BN uses eps 1e-3 as in
cifar.torch's NIN; without BN (``-nobn``) the convs have a bias.

Dropout 0.5 after each of the two inner pools, ON by default, as in the original NIN and in
cifar.torch's NIN; the attention-transfer paper does not say. Dropout draws from torch's
global RNG, so it is deterministic under a fixed seed. ``NIN(..., dropout=0.0)`` turns it
off.

Attention taps: the output of each block after its last ReLU, before pooling and dropout
(32x32, 16x16, 8x8 for a 32x32 input). For block 3 that is the num_classes-channel class
score map: the paper transfers attention "on the output of each block", and the attention
map of class-score maps (where the evidence for the classes lies) is meaningful; teacher and
student both end in num_classes channels there.

Initialisation: conv weights ~ N(0, 2 / fan_in) (He et al. 2015), conv biases 0, BN weight 1,
bias 0. The original (and cifar.torch's NIN) used N(0, 0.05^2); without BN that starves the
thin network: on a N(0, 1) batch, nin-thin-nobn's block outputs have RMS 0.03, 0.009,
0.0007 and its logits about 3e-4, whereas He init keeps all of them of order 1, which the
no-BN variants need to train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (first conv kernel, first conv width, 1x1 width, 1x1 width or None = num_classes)
NIN_WIDE = ((5, 192, 160, 96), (5, 192, 192, 192), (3, 192, 192, None))
NIN_THIN = ((5, 96, 80, 48), (5, 96, 96, 96), (3, 96, 96, None))
NIN_LAYOUTS = {"wide": NIN_WIDE, "thin": NIN_THIN}

BN_EPS = 1e-3
DEFAULT_DROPOUT = 0.5


def _conv_unit(
    in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=not batch_norm,
        )
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels, eps=BN_EPS))
    # In place is safe: the tensor it overwrites is a fresh conv/BN output that neither
    # backward pass needs (conv and BN backward use their inputs).
    layers.append(nn.ReLU(inplace=True))
    return layers


class NIN(nn.Module):
    """``forward(x) -> (logits, [block1, block2, block3])``."""

    def __init__(
        self,
        layout: str,
        num_classes: int = 10,
        batch_norm: bool = True,
        dropout: float = DEFAULT_DROPOUT,
    ):
        super().__init__()
        if layout not in NIN_LAYOUTS:
            raise ValueError(f"NIN layout must be one of {sorted(NIN_LAYOUTS)}, got {layout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"NIN dropout must be in [0, 1), got {dropout!r}")
        self.layout = layout
        self.batch_norm = batch_norm
        in_channels = 3
        blocks = []
        for kernel, a, b, c in NIN_LAYOUTS[layout]:
            c = num_classes if c is None else c
            blocks.append(
                nn.Sequential(
                    *_conv_unit(in_channels, a, kernel, batch_norm),
                    *_conv_unit(a, b, 1, batch_norm),
                    *_conv_unit(b, c, 1, batch_norm),
                )
            )
            in_channels = c
        self.block1, self.block2, self.block3 = blocks
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.drop1 = nn.Dropout(dropout)
        self.pool2 = nn.AvgPool2d(3, stride=2, ceil_mode=True)
        self.drop2 = nn.Dropout(dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b1 = self.block1(x)
        b2 = self.block2(self.drop1(self.pool1(b1)))
        b3 = self.block3(self.drop2(self.pool2(b2)))
        logits = F.adaptive_avg_pool2d(b3, 1).flatten(1)
        return logits, [b1, b2, b3]
