"""ResNet-18 adapted to 32x32 CIFAR images: torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool.

Imports nothing from fastcifar, so the FLOPs counter and the trainer share one definition.
"""

import torch.nn as nn
from torchvision.models import resnet18

# The report's model: 11,173,962 parameters with the CIFAR stem and 10 classes (asserted in tests).
CIFAR_RESNET18_PARAMS = 11_173_962


def resnet18_cifar(num_classes: int = 10, stem: str = "cifar", zero_init_residual: bool = False) -> nn.Module:
    """stem="cifar": 3x3 stride-1 padding-1 conv, no max-pool (the report's); stem="imagenet": torchvision's own.

    zero_init_residual: the last BatchNorm of each residual block starts at 0, so every block starts as the
    identity (Goyal et al. 2017, "zero gamma"): the same architecture, initialised to tolerate a large LR early.
    """
    model = resnet18(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}: expected 'cifar' or 'imagenet'")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
