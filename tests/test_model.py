import pytest
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


def _torchvision_resnet18_cifar(num_classes, stem, zero_init_residual):
    """The definition fastcifar used before it wrote the network out: torchvision's resnet18, stem replaced."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if stem == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


@pytest.mark.parametrize("num_classes, stem, zero_init_residual", [(10, "cifar", False), (10, "cifar", True),
                                                                    (100, "cifar", False), (1000, "imagenet", False)])
def test_the_written_out_network_is_torchvisions_bit_for_bit(num_classes, stem, zero_init_residual):
    """Same seed, same weights and buffers under the same names, the same random numbers left for what follows,
    the same outputs in training and evaluation mode: old checkpoints load, and runs repeat exactly."""
    built = {}
    for name, make in (("ours", resnet18_cifar), ("torchvision", _torchvision_resnet18_cifar)):
        torch.manual_seed(7)
        model = make(num_classes, stem, zero_init_residual)
        built[name] = (model, torch.get_rng_state())
    (ours, rng_ours), (theirs, rng_theirs) = built["ours"], built["torchvision"]
    assert torch.equal(rng_ours, rng_theirs)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = 64 if stem == "imagenet" else 32
    x = torch.randn(4, 3, size, size)
    for mode in (True, False):
        assert torch.equal(ours.train(mode)(x), theirs.train(mode)(x)), mode
    assert torch.equal(ours.bn1.running_mean, theirs.bn1.running_mean)  # the training pass updated both alike


def test_unknown_stem_is_an_error():
    with pytest.raises(ValueError, match="unknown stem"):
        resnet18_cifar(stem="tiny")


def test_eval_loads_neither_torchvision_nor_dynamo(tmp_path):
    """Importing torchvision pulls in torch._dynamo: about 1.4 s of a command's start on a CPU, which `fastcifar eval`
    never needs. Behaviour, not time: the modules are not loaded."""
    import subprocess
    import sys

    from support import tiny_config
    from fastcifar.train import fit

    fit(tiny_config(tmp_path / "r", epochs=1, monitor=False))
    code = (f"import sys; from fastcifar.cli import main; main(['eval', {str(tmp_path / 'r' / 'best.pt')!r}]); "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
