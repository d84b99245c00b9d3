import torch

from fastcifar.model import CIFAR_RESNET18_PARAMS, count_parameters, resnet18_cifar


def test_cifar_resnet18_shape_and_parameter_count():
    model = resnet18_cifar()
    assert count_parameters(model) == CIFAR_RESNET18_PARAMS == 11_173_962
    stem = model.conv1
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.fc.out_features == 10
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_imagenet_stem_is_torchvisions_resnet18():
    model = resnet18_cifar(num_classes=1000, stem="imagenet")
    assert count_parameters(model) == 11_689_512  # torchvision's published resnet18 size
