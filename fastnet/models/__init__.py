"""Model registry.

``build_model(name, num_classes, image_size)`` returns a freshly initialised ``nn.Module``
whose forward takes ``(N, C, H, W)`` float images and returns ``(N, num_classes)`` logits.

Models:
  * ``resnet50``: torchvision ResNet-50 (v1.5: stride 2 in the 3×3 conv), with the last BN of
    each residual block initialised to zero (Goyal et al. 2017, §5.1, ``zero_init_residual``).
  * ``alexnet``: torchvision AlexNet.
  * ``alexnet_bn``: AlexNet with BatchNorm after every conv and hidden fc layer (You et al. 2017).
  * ``resnet8`` / ``resnet20`` / ``resnet56``: CIFAR ResNets of He et al. 2016, §4.2 (6n+2 layers, option-A shortcuts).
  * ``resnet18_cifar``: torchvision ResNet-18 with the usual CIFAR stem (3×3 stride-1 first conv,
    no max-pool), 11.2M parameters.
  * ``small_cnn``: a four-conv CNN for small images (the embedded digits dataset);
    ``small_cnn_dropout``: the same with dropout 0.5 before the classifier.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision

from fastnet.models.alexnet_bn import alexnet_bn
from fastnet.models.cifar_resnet import resnet8, resnet20, resnet56
from fastnet.models.small_cnn import small_cnn


def _resnet50(num_classes: int, image_size: int) -> nn.Module:
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)


def _resnet18_cifar(num_classes: int, image_size: int) -> nn.Module:
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes, zero_init_residual=True)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
    m.maxpool = nn.Identity()
    return m


def _alexnet(num_classes: int, image_size: int) -> nn.Module:
    return torchvision.models.alexnet(weights=None, num_classes=num_classes)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet50": _resnet50,
    "alexnet": _alexnet,
    "alexnet_bn": lambda num_classes, image_size: alexnet_bn(num_classes),
    "resnet18_cifar": _resnet18_cifar,
    "resnet8": lambda num_classes, image_size: resnet8(num_classes),
    "resnet20": lambda num_classes, image_size: resnet20(num_classes),
    "resnet56": lambda num_classes, image_size: resnet56(num_classes),
    "small_cnn": lambda num_classes, image_size: small_cnn(num_classes),
    "small_cnn_dropout": lambda num_classes, image_size: small_cnn(num_classes, dropout=0.5),
}


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build a registered model. Raises ValueError listing the valid names for an unknown one."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}") from None
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes} (must be >= 2)")
    return factory(num_classes, image_size)
