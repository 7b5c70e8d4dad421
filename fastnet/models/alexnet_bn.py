"""AlexNet-BN: AlexNet with Batch Normalization after each convolution and hidden fully
connected layer, replacing local response normalisation (You et al. 2017, "Scaling SGD Batch
Size to 32K", §4; Jia et al. 2018 train it at batch 64K). Built from torchvision's AlexNet layout
(64-192-384-256-256 conv filters, 4096-4096 fc) with the BN layers inserted and no dropout.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision


def alexnet_bn(num_classes: int = 1000) -> nn.Module:
    base = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    features: list[nn.Module] = []
    for layer in base.features:  # conv, BN, ReLU: the ReLU already follows each conv
        features.append(layer)
        if isinstance(layer, nn.Conv2d):
            layer.bias = None  # redundant in front of BN
            features.append(nn.BatchNorm2d(layer.out_channels))
    classifier: list[nn.Module] = []
    for layer in base.classifier:
        if isinstance(layer, nn.Dropout):
            continue
        classifier.append(layer)
        if isinstance(layer, nn.Linear) and layer.out_features != num_classes:
            layer.bias = None
            classifier.append(nn.BatchNorm1d(layer.out_features))
    base.features = nn.Sequential(*features)
    base.classifier = nn.Sequential(*classifier)
    return base
