import pytest
import torch
import torch.nn as nn

from fastnet.models import MODELS, build_model


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_cifar_resnet_parameter_counts_match_he_et_al():
    assert round(_count(build_model("resnet20", 10, 32)) / 1e6, 2) == 0.27
    assert round(_count(build_model("resnet56", 10, 32)) / 1e6, 2) == 0.85


def test_resnet50_is_v15_with_zero_init_residual():
    m = build_model("resnet50", 1000, 224)
    assert _count(m) == 25_557_032
    block = m.layer2[0]
    assert block.conv2.stride == (2, 2) and block.conv1.stride == (1, 1)  # v1.5: stride in the 3x3
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for layer in (m.layer1, m.layer4) for b in layer)


def test_alexnet_bn_has_bn_after_every_conv_and_hidden_fc():
    m = build_model("alexnet_bn", 1000, 224)
    feats = list(m.features)
    for i, layer in enumerate(feats):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(feats[i + 1], nn.BatchNorm2d) and isinstance(feats[i + 2], nn.ReLU)
            assert layer.bias is None
    cls = list(m.classifier)
    assert sum(isinstance(x, nn.BatchNorm1d) for x in cls) == 2
    assert not any(isinstance(x, nn.Dropout) for x in cls)


def test_resnet18_cifar_stem():
    m = build_model("resnet18_cifar", 10, 32)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert round(_count(m) / 1e6, 1) == 11.2


@pytest.mark.parametrize("name,size", [("resnet18_cifar", 32), ("resnet20", 32), ("resnet56", 32), ("small_cnn", 16), ("alexnet_bn", 64),
                                       ("alexnet", 64), ("resnet50", 64)])
def test_forward_shapes(name, size):
    m = build_model(name, 7, size).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="fastnet's \\(" + ", ".join(sorted(MODELS))):
        build_model("vgg17", 10, 32)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", 1, 32)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_b_16", "timm:resnet18",
                                  "timm:vit_tiny_patch16_224"])
def test_torchvision_and_timm_models_by_name_with_classes_and_image_size(name):
    """Any torchvision classification model, and timm's with timm: (the timm extra), with num_classes
    and image_size passed through (a ViT's patch grid follows image_size)."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    model = build_model(name, 7, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name,match", [("resnet19", "close matches: resnet18"),
                                        ("timm:resnet1888", "close matches: timm:resnet18"),
                                        ("zzz", "any torchvision classification model")])
def test_unknown_model_names_list_close_matches(name, match):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, 32)
