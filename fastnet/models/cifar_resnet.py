"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", §4.2).

6n+2 weighted layers: a 3×3 conv with 16 filters, then three stages of n basic blocks with
16, 32 and 64 filters on 32×32, 16×16 and 8×8 maps, global average pooling and a linear layer.
Shortcuts are option A (identity; when the shape changes, stride-2 subsampling and zero-padded
channels), so the parameter counts are the paper's: 0.27M for ResNet-20, 0.85M for ResNet-56.
The blocks are torchvision's ``BasicBlock``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock


class _PadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] with ``extra`` zero channels split around it."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"Invalid CIFAR ResNet depth: {depth} (must be 6n+2, e.g. 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_ch = [], 16
        for i, ch in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = _PadShortcut(ch - in_ch) if stride != 1 else None
                blocks.append(BasicBlock(in_ch, ch, stride=stride, downsample=down))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")
        for m in self.modules():  # zero-init the last BN of each block (Goyal et al. §5.1)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet8(num_classes: int = 10) -> CifarResNet:
    """ResNet-8 (n = 1, 78k parameters): the model of Shallue et al. 2019's CIFAR-10 workload."""
    return CifarResNet(8, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)
