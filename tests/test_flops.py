"""The FLOPs counter: hand-checked toys, agreement with fvcore and FlopCounterMode, the CLI path."""

import argparse
import contextlib
import io
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from fastcifar import FastCifarError, flops
from fastcifar.cli import add_flops_arguments
from fastcifar.model import CIFAR_RESNET18_PARAMS, BasicBlock

CIFAR_MACS = 555_422_720  # conv+linear MACs per image of the CIFAR ResNet-18 at 32x32
IMAGENET_224_MACS = 1_814_073_344  # torchvision's published 1.81 GFLOPS (fused multiply-adds) for resnet18


def by_name(model, x):
    return {layer.name: layer for layer in flops.hand_count(model, x)}


def parse(*argv):
    parser = argparse.ArgumentParser(prog="fastcifar flops")
    add_flops_arguments(parser)
    return parser.parse_args(list(argv))


def run_cli(capsys, *argv):
    rc = flops.run_flops(parse(*argv))
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def cifar():
    """One default `fastcifar flops --verify` run (the costly part), shared: exit code, stdout, and its report."""
    reports, real = [], flops.analyse
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(flops, "analyse", lambda **kw: reports.append(real(**kw)) or reports[-1])
        rc = flops.run_flops(parse("--verify"))
    return SimpleNamespace(rc=rc, out=out.getvalue(), report=reports[0])


# --- hand-checkable toys --------------------------------------------------------------------------------------

def test_strided_dilated_grouped_conv_with_bias():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2, bias=True)
    x = torch.randn(2, 4, 9, 9)
    # output side: floor((9 + 2*1 - 2*(3-1) - 1) / 2) + 1 = 4; each output sums 4/2 channels * 3*3 taps = 18 MACs
    # (the bias seeds the accumulator: 18 multiplies + 18 adds = 18 MACs)
    expected = 2 * 6 * 4 * 4 * 18
    layer = by_name(nn.Sequential(conv), x)["0"]
    assert (layer.kind, layer.out_shape, layer.params) == ("conv", (2, 6, 4, 4), 6 * 2 * 9 + 6)
    assert layer.hand == expected == 3456
    own, *_ = flops.fvcore_count(nn.Sequential(conv), x)
    assert own["0"] == expected


def test_linear_on_2d_and_3d_input():
    lin = nn.Sequential(nn.Linear(7, 5))
    assert by_name(lin, torch.randn(3, 7))["0"].hand == 3 * 5 * 7
    assert by_name(lin, torch.randn(2, 3, 7))["0"].hand == 2 * 3 * 5 * 7


def test_bn_pool_and_residual_columns():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.MaxPool2d(3, stride=2, padding=1), nn.AdaptiveAvgPool2d(3)).eval()
    got = by_name(model, torch.randn(1, 2, 10, 10))
    assert got["0"].hand == 2 * 10 * 10  # 1 MAC per element
    assert got["1"].hand == 2 * 5 * 5 * 9  # 5x5 outputs, 3x3 window each
    # adaptive 5 -> 3 windows are [0,2), [1,4), [3,5): 2 + 3 + 2 = 7 per axis
    assert got["2"].hand == 2 * 7 * 7
    assert {got[k].kind for k in got} == {"bn", "pool"}

    block = nn.Sequential(BasicBlock(4, 4)).eval()
    got = by_name(block, torch.randn(1, 4, 6, 6))
    assert got["0"].kind == "add" and got["0"].hand == 4 * 6 * 6 and got["0"].params == 0
    assert got["0.conv1"].hand == 4 * 6 * 6 * 4 * 9


def test_fvcore_warnings_are_captured_not_dumped(capsys, caplog):
    block = nn.Sequential(BasicBlock(4, 4)).eval()
    with caplog.at_level(logging.WARNING):
        own, by_op, unsupported, n_records = flops.fvcore_count(block, torch.randn(1, 4, 6, 6))
    assert unsupported == {"aten::add_": 1} and n_records == 1  # fvcore logged it; we kept it
    assert not [r for r in caplog.records if r.name.startswith("fvcore")]
    captured = capsys.readouterr()
    assert "Unsupported operator" not in captured.out + captured.err
    assert own["0"] == 0 and own["0.conv1"] == 4 * 6 * 6 * 4 * 9


# --- the real model ------------------------------------------------------------------------------------------

def test_cifar_resnet18_agrees_with_fvcore_layer_by_layer(cifar):
    cifar = cifar.report
    conv_linear = [l for l in cifar.layers if l.kind in ("conv", "linear")]
    assert len(conv_linear) == 21  # 20 convs (incl. 3 downsample) + fc
    for layer in conv_linear:
        assert layer.hand == layer.fvcore, layer.name
    assert cifar.params == CIFAR_RESNET18_PARAMS
    assert cifar.conv_linear_macs == CIFAR_MACS
    assert cifar.mismatches == []


def test_cifar_total_equals_flopcountermode_forward_over_two(cifar):
    cifar = cifar.report
    assert 2 * cifar.conv_linear_macs == cifar.forward_flops
    # backward measured, not assumed: weight + input gradients, except no input gradient for the first conv
    assert 2 * cifar.forward_flops < cifar.forward_backward_flops < 3 * cifar.forward_flops


def test_imagenet_stem_224_matches_torchvision():
    r = flops.analyse(stem="imagenet", num_classes=1000, input_size=224)
    assert r.conv_linear_macs == IMAGENET_224_MACS
    assert r.mismatches == []  # fvcore per layer and FlopCounterMode forward / 2 agree here too
    assert r.unsupported == {"aten::add_": 8, "aten::max_pool2d": 1}


def test_trainer_helpers_are_cached(cifar):
    cifar = cifar.report
    flops._torch_flops_per_image.cache_clear()
    assert flops.training_flops_per_image() == cifar.forward_backward_flops
    assert flops.forward_flops_per_image() == cifar.forward_flops
    assert flops._torch_flops_per_image.cache_info().hits == 1
    with pytest.raises(FastCifarError, match="--input-size"):
        flops.training_flops_per_image(input_size=4)


# --- CLI path ------------------------------------------------------------------------------------------------

def test_json_integers_per_image_and_batch(capsys):
    rc, out = run_cli(capsys, "--json", "--batch-size", "2")
    data = json.loads(out)
    assert rc == 0 and data["verified"] is True and data["mismatches"] == []
    keys = ("params", "conv_linear_macs", "fvcore_total", "forward_flops", "forward_backward_flops")
    for key in keys:
        assert type(data[key]) is int, key
        assert data["per_batch"][key] == data[key] * (1 if key == "params" else 2)
    assert data["params"] == CIFAR_RESNET18_PARAMS and data["conv_linear_macs"] == CIFAR_MACS
    assert data["forward_flops"] == 2 * CIFAR_MACS
    assert data["training_flops_per_epoch"] == 50_000 * data["forward_backward_flops"]
    fc = next(l for l in data["layers"] if l["name"] == "fc")
    assert fc == {"name": "fc", "type": "Linear", "kind": "linear", "out_shape": [10], "params": 5130,
                  "hand": 5120, "fvcore": 5120, "difference": 0}
    assert all(type(l[k]) is int for l in data["layers"] for k in ("params", "hand", "fvcore", "difference"))
    assert sum(l["hand"] for l in data["layers"] if l["kind"] in ("conv", "linear")) == data["conv_linear_macs"]


def test_verify_passes_on_real_model(cifar):
    assert cifar.rc == 0
    assert "verify: OK" in cifar.out and "MISMATCH" not in cifar.out
    assert "fvcore skipped unsupported operators: aten::add_ x8" in cifar.out
    assert "Unsupported operator" not in cifar.out
    assert cifar.out.count("note: ") == 3  # one line per convention: batch-norm, pooling, residual adds
    assert f"{CIFAR_MACS:,}" in cifar.out and "per batch of 1" in cifar.out


def test_planted_disagreement_fails_verify_and_names_layer(capsys, monkeypatch):
    real = flops.conv_macs

    def off_by_one(conv, x, y):  # only layer4.0.downsample.0 is a 1x1 conv with 512 outputs
        return real(conv, x, y) + (conv.out_channels == 512 and conv.kernel_size == (1, 1))

    monkeypatch.setattr(flops, "conv_macs", off_by_one)
    rc, out = run_cli(capsys, "--verify", "--input-size", "8")  # small input: the same layers, a fraction of the cost
    assert rc == 1
    failures = out.split("verify: FAILED")[1]
    assert "layer4.0.downsample.0 (Conv2d)" in failures
    assert "layer4.0.conv1" not in failures
    assert "FlopCounterMode" in failures  # the total no longer matches either
    assert "MISMATCH" in out


@pytest.mark.parametrize("argv, flag", [(["--input-size", "4"], "--input-size"),
                                        (["--num-classes", "0"], "--num-classes"),
                                        (["--batch-size", "0"], "--batch-size")])
def test_bad_values_raise_fastcifar_error(capsys, argv, flag):
    with pytest.raises(FastCifarError, match=f"argument {flag}: invalid value"):
        run_cli(capsys, *argv)


# --- peak table ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA L4", "fp16", 121.0),
    ("NVIDIA L40S", "fp16", 362.05),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("Tesla V100-PCIE-16GB", "fp16", 112.0),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla T4", "bf16", None),
    ("Tesla T4", "fp32", 8.1),
    ("NVIDIA RTX A1000", "bf16", None),  # not an A10
    ("Some Future GPU", "bf16", None),
])
def test_peak_tflops(name, dtype, expected):
    assert flops.peak_tflops(name, dtype) == expected


def test_peak_tflops_rejects_unknown_dtype():
    with pytest.raises(ValueError):
        flops.peak_tflops("NVIDIA H100 PCIe", "int8")


def test_the_command_line_subcommand(capsys):
    from fastcifar.cli import main

    assert main(["flops", "--json", "--input-size", "8", "--verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == CIFAR_RESNET18_PARAMS and isinstance(report["conv_linear_macs"], int)
    assert main(["flops", "--input-size", "4"]) == 1
    assert "--input-size" in capsys.readouterr().err
