"""ResNet-18 adapted to 32x32 CIFAR images: torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool.

The network is written out here, module for module as torchvision's `resnet18` builds it (the same names, the same
order, the same initialisation drawing the same random numbers), rather than imported: importing torchvision costs
a command about 1.4 s on a CPU (its package import pulls in torch._dynamo, which `fastcifar eval` and `predict`
never otherwise load; a training run loads dynamo with its optimizer, and saves torchvision's own ~0.3 s).
tests/test_model.py checks that, for a seed, the weights, buffers, names and outputs equal torchvision's bit for
bit, so checkpoints and results are interchangeable.

Imports nothing from fastcifar, so the FLOPs counter and the trainer share one definition.
"""

import torch
import torch.nn as nn

# The report's model: 11,173,962 parameters with the CIFAR stem and 10 classes (asserted in tests).
CIFAR_RESNET18_PARAMS = 11_173_962


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (torchvision.models.resnet.BasicBlock)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ResNet with BasicBlock x [2, 2, 2, 2]: the ImageNet stem (7x7 stride-2 conv, max-pool)."""

    def __init__(self, num_classes: int = 1000, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, stem: str = "cifar", zero_init_residual: bool = False) -> nn.Module:
    """stem="cifar": 3x3 stride-1 padding-1 conv, no max-pool (the report's); stem="imagenet": torchvision's own.

    The CIFAR stem replaces the built 7x7 conv, as `model.conv1 = nn.Conv2d(...)` on torchvision's resnet18 does:
    that conv keeps PyTorch's default initialisation, and the random numbers drawn match that construction.

    zero_init_residual: the last BatchNorm of each residual block starts at 0, so every block starts as the
    identity (Goyal et al. 2017, "zero gamma"): the same architecture, initialised to tolerate a large LR early.
    """
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem {stem!r}: expected 'cifar' or 'imagenet'")
    model = ResNet18(num_classes=num_classes, zero_init_residual=zero_init_residual)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
