"""A small CNN for small images (e.g. the embedded 8×8 handwritten digits upscaled to 32×32).

conv3×3(32)-BN-ReLU, conv3×3(32)-BN-ReLU, maxpool, conv3×3(64)-BN-ReLU, conv3×3(64)-BN-ReLU,
global average pool, (dropout,) linear. Works for any input size >= 4×4 and any channel count of 1
or 3. ``small_cnn_dropout`` in the registry adds dropout 0.5 before the classifier (a model whose
training draws random numbers every step: what exact resume must reproduce per rank).
"""

from __future__ import annotations

import torch.nn as nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        *_block(in_channels, 32), *_block(32, 32), nn.MaxPool2d(2),
        *_block(32, 64), *_block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), *([nn.Dropout(dropout)] if dropout else []), nn.Linear(64, num_classes),
    )
