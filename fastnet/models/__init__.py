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

Any other name: a torchvision classification model (``torchvision.models.list_models``, e.g.
``resnet18``, ``vit_b_16``, ``convnext_tiny``; random weights, ``num_classes`` and, for the models
that take one, ``image_size`` passed through), or a timm model with ``timm:`` before its name
(``timm:resnet18``, ``timm:vit_tiny_patch16_224``; the optional ``timm`` extra). An unknown name is
a ValueError listing the closest known names (:func:`check_model_name`).
"""

from __future__ import annotations

import difflib
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


TIMM_PREFIX = "timm:"


def torchvision_models() -> list[str]:
    """torchvision's classification models (not detection, segmentation, video or quantized ones)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        raise RuntimeError("timm models need the timm package: pip install 'fastnet[timm]' (or pip install timm)") \
            from None
    return timm


def check_model_name(name: str) -> None:
    """Raise ValueError for a name that is neither fastnet's, torchvision's nor (``timm:``) timm's,
    listing the closest known names; RuntimeError for ``timm:`` without timm installed."""
    if name in MODELS:
        return
    if name.startswith(TIMM_PREFIX):
        known = _timm().list_models()
        if name[len(TIMM_PREFIX):] in known:
            return
        close = difflib.get_close_matches(name[len(TIMM_PREFIX):], known, n=5, cutoff=0.6)
        raise ValueError(f"Unknown timm model {name[len(TIMM_PREFIX):]!r}" +
                         (f"; close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else
                          " (timm.list_models() lists them)"))
    known = sorted(MODELS) + torchvision_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    raise ValueError(f"Unknown model {name!r}" + (f"; close matches: {', '.join(close)}" if close else "") +
                     f". Valid: fastnet's ({', '.join(sorted(MODELS))}), any torchvision classification model "
                     f"(torchvision.models.list_models()), or timm:NAME")


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build a model by name (module docstring): fastnet's registry, then torchvision's classification
    models, then ``timm:NAME``; random initial weights. Raises ValueError for an unknown name (the
    closest known ones listed) or ``num_classes < 2``; RuntimeError for ``timm:`` without timm."""
    check_model_name(name)
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes} (must be >= 2)")
    if name in MODELS:
        return MODELS[name](num_classes, image_size)
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        model_name = name[len(TIMM_PREFIX):]
        try:  # transformers fix their patch grid by img_size; timm's CNNs take any size and refuse the argument
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=image_size)
        except TypeError:
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None, "num_classes": num_classes}
    if image_size and name.startswith("vit_"):
        kwargs["image_size"] = image_size  # the patch grid; CNNs pool globally and take any size
    elif image_size and name.startswith("maxvit"):
        kwargs["input_size"] = (image_size, image_size)
    return builder(**kwargs)
