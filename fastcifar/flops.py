"""FLOPs of fastcifar's ResNet-18, counted three ways and cross-checked.

Convention: 1 MAC = one multiply + one add = 2 FLOPs.

1. A hand counter (forward hooks, no library counter) gives, per layer, the MACs of every convolution
   and linear layer and, each in its own column, batch-norm, pooling and residual-add operations.
2. fvcore's FlopCountAnalysis on the same eager model and input, in eval mode. fvcore counts one fused
   multiply-add as one flop (so its conv/linear numbers are MACs), ignores ReLU, skips aten::add_
   (unsupported) and counts eval-mode batch-norm as 2 flops per element.
3. torch.utils.flop_counter.FlopCounterMode (2 FLOPs per MAC, conv/matmul only), forward and
   forward+backward of a cross-entropy loss, measured rather than assumed to be 3x forward.

Only conv+linear must agree exactly; the other columns differ by convention and are explained, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import re
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcifar import FastCifarError
from fastcifar.model import BasicBlock, count_parameters, resnet18_cifar

EPOCH_IMAGES = 50_000  # CIFAR-10 training set
MIN_INPUT_SIZE = 8  # smallest size both stems survive (layer4 reaches 1x1)

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_KINDS = (((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"), (nn.Linear, "linear"),  # no transposed convs in this model
          ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "bn"), (_POOLS, "pool"), (BasicBlock, "add"))

# One line each for the columns where the three counters legitimately differ.
CONVENTIONS = {
    "bn": "batch-norm: hand = 1 MAC/element (eval BN folds to y = a*x + b); fvcore (eval mode) = 2 flops/element "
          "(normalise + affine); FlopCounterMode ignores it.",
    "pool": "pooling: hand = 1 op per window element read (adds or compares); fvcore counts adaptive_avg_pool2d as "
            "1 flop/input element and skips max_pool2d (unsupported); FlopCounterMode ignores it.",
    "add": "residual adds: hand = 1 add per BasicBlock output element (hook on the block's output); "
           "fvcore skips aten::add_ (unsupported); FlopCounterMode ignores it. ReLU is counted by none of the three.",
}


@dataclass
class Layer:
    name: str
    type: str
    kind: str  # conv | linear | bn | pool | add
    out_shape: tuple[int, ...]  # including the batch dimension
    params: int
    hand: int  # per batch
    fvcore: int = 0  # per batch; fvcore's count for this module alone (its children subtracted)


# Each counter gets (module, input, output) for the whole batch.
def conv_macs(conv: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Each output element is one dot product of (in_channels/groups) * prod(kernel) taps.

    Stride, padding and dilation only change how many outputs there are (recomputed here from the formula and
    checked against the real output); groups divide the taps. A bias initialises the accumulator, so the bias
    add is the K-th add of a K-tap output: still K MACs, as fvcore and torchvision count it.
    """
    if isinstance(conv.padding, str):  # 'same'/'valid': trust the output shape
        spatial = tuple(y.shape[2:])
    else:
        spatial = tuple((x.shape[2 + d] + 2 * conv.padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1)
                        // conv.stride[d] + 1 for d in range(len(conv.kernel_size)))
        if spatial != tuple(y.shape[2:]):
            raise AssertionError(f"conv output {tuple(y.shape)} disagrees with the formula {spatial}")
    outputs = x.shape[0] * conv.out_channels * math.prod(spatial)
    return outputs * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)


def linear_macs(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> int:
    return y.numel() * linear.in_features  # bias folded into the accumulator, as for conv


def elementwise_ops(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    # Eval batch-norm folds to y = a*x + b: 1 MAC per element. Residual block (out += identity): 1 add per element.
    return y.numel()


def _adaptive_window_sum(n_in: int, n_out: int) -> int:
    # PyTorch's adaptive windows: [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)); they overlap when n_out doesn't divide.
    return sum(-(-(i + 1) * n_in // n_out) - (i * n_in // n_out) for i in range(n_out))


def pool_ops(pool: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    nd = y.dim() - 2
    if "Adaptive" in type(pool).__name__:
        per_channel = math.prod(_adaptive_window_sum(x.shape[2 + d], y.shape[2 + d]) for d in range(nd))
        return y.shape[0] * y.shape[1] * per_channel
    k = pool.kernel_size
    window = math.prod(k) if isinstance(k, (tuple, list)) else k ** nd
    return y.numel() * window


def _kind(m: nn.Module) -> str | None:
    return next((kind for types, kind in _KINDS if isinstance(m, types)), None)


def _counter(kind: str):
    # Looked up at call time, so a monkeypatched counter (a planted disagreement in the tests) is the one used.
    return {"conv": conv_macs, "linear": linear_macs, "bn": elementwise_ops, "pool": pool_ops,
            "add": elementwise_ops}[kind]


@contextlib.contextmanager
def _one_thread():  # counting needs shapes, not speed; 2 OpenMP threads on a busy 2-core box: 6 s vs 0.5 s
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@_one_thread()
def hand_count(model: nn.Module, x: torch.Tensor) -> list[Layer]:
    """Run one forward pass with hooks; returns layers in the order their outputs were produced."""
    layers: dict[str, Layer] = {}
    handles = []  # removed even if forward raises
    for name, module in model.named_modules():
        if (kind := _kind(module)) is None:
            continue

        def hook(mod, inputs, output, name=name, kind=kind):
            count = _counter(kind)(mod, inputs[0], output)
            if name in layers:  # a module called twice accumulates
                layers[name].hand += count
            else:
                params = 0 if kind == "add" else count_parameters(mod)  # a block's params belong to its children
                layers[name] = Layer(name, type(mod).__name__, kind, tuple(output.shape), params, count)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return list(layers.values())


@contextlib.contextmanager
def _quiet_fvcore():
    """Capture the 'fvcore' logger (unsupported-operator warnings) and silence torch.jit deprecation warnings."""
    logger, cap, records = logging.getLogger("fvcore"), logging.Handler(logging.WARNING), []
    cap.emit = records.append
    propagate = logger.propagate
    logger.addHandler(cap)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            yield records
    finally:
        logger.removeHandler(cap)
        logger.propagate = propagate


@_one_thread()
def fvcore_count(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], Counter, Counter, int]:
    """(own count per module name, count per operator, unsupported operators, fvcore log records captured)."""
    with _quiet_fvcore() as records:
        from fvcore.nn import FlopCountAnalysis  # importing it triggers torch.jit.script deprecation warnings

        fa = FlopCountAnalysis(model.eval(), x).tracer_warnings("none").uncalled_modules_warnings(False)
        by_module, by_op, unsupported = fa.by_module(), fa.by_operator(), fa.unsupported_ops()
    own = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own[name] = by_module.get(name, 0) - sum(by_module.get(prefix + c, 0) for c, _ in module.named_children())
    return own, Counter(by_op), Counter(unsupported), len(records)


@_one_thread()
def torch_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FlopCounterMode (forward, forward+backward) FLOPs for the batch x.

    Eval mode: conv/matmul FLOPs are identical in train mode, and eval avoids batch-norm's 'more than one
    value per channel' error at batch 1 when layer4 is 1x1. Backward is of a cross-entropy loss (not itself
    counted: not conv/matmul); the input needs no gradient, so the first conv has no input-gradient pass
    (hence slightly under 3x forward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    target = torch.zeros(x.shape[0], dtype=torch.long)
    with FlopCounterMode(display=False) as fc:  # one pass: the running total after forward is the forward count
        loss = F.cross_entropy(model(x), target)
        forward = fc.get_total_flops()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward, fc.get_total_flops()


@dataclass
class Report:
    stem: str
    input_size: int
    num_classes: int
    batch_size: int
    params: int
    layers: list[Layer]
    fvcore_by_op: Counter  # per batch, like every count below
    unsupported: Counter
    fvcore_log_records: int
    forward_flops: int  # FlopCounterMode
    forward_backward_flops: int
    mismatches: list[str] = field(default_factory=list)

    def hand_total(self, *kinds: str) -> int:
        return sum(layer.hand for layer in self.layers if layer.kind in kinds)

    conv_linear_macs = property(lambda self: self.hand_total("conv", "linear"))
    fvcore_total = property(lambda self: sum(self.fvcore_by_op.values()))


def _validate(stem: str, num_classes: int, input_size: int, batch_size: int) -> None:
    if stem not in ("cifar", "imagenet"):
        raise FastCifarError(f"argument --stem: invalid choice: {stem!r} (choose from 'cifar', 'imagenet')")
    for flag, value, low in (("--input-size", input_size, MIN_INPUT_SIZE), ("--num-classes", num_classes, 1),
                             ("--batch-size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise FastCifarError(f"argument {flag}: invalid value {value!r}: must be an integer >= {low}")


def _input(batch_size: int, input_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))


def analyse(stem: str = "cifar", num_classes: int = 10, input_size: int = 32, batch_size: int = 1) -> Report:
    """Count a fresh eager CPU model all three ways and cross-check conv+linear."""
    _validate(stem, num_classes, input_size, batch_size)
    model = resnet18_cifar(num_classes=num_classes, stem=stem).eval()
    x = _input(batch_size, input_size)
    layers = hand_count(model, x)
    own, by_op, unsupported, n_records = fvcore_count(model, x)
    for layer in layers:
        layer.fvcore = own.get(layer.name, 0)
    fwd, fwd_bwd = torch_flops(model, x)
    report = Report(stem, input_size, num_classes, batch_size, count_parameters(model), layers, by_op,
                    unsupported, n_records, fwd, fwd_bwd)
    report.mismatches = verify(report)
    return report


def verify(report: Report) -> list[str]:
    """Disagreements that are failures: per conv/linear layer, and the conv+linear totals (per batch)."""
    bad = [f"{l.name} ({l.type}): hand {l.hand:,} MACs != fvcore {l.fvcore:,}"
           for l in report.layers if l.kind in ("conv", "linear") and l.hand != l.fvcore]
    macs = report.conv_linear_macs
    fv = report.fvcore_by_op.get("conv", 0) + report.fvcore_by_op.get("linear", 0)
    if macs != fv:  # catches functional convs/matmuls no hook saw
        bad.append(f"total conv+linear: hand {macs:,} MACs != fvcore conv+linear {fv:,}")
    if 2 * macs != report.forward_flops:
        bad.append(f"total conv+linear: hand {macs:,} MACs x 2 = {2 * macs:,} != FlopCounterMode forward "
                   f"{report.forward_flops:,} FLOPs")
    return bad


@functools.lru_cache(maxsize=None)
def _torch_flops_per_image(stem: str, num_classes: int, input_size: int) -> tuple[int, int]:
    _validate(stem, num_classes, input_size, 1)
    return torch_flops(resnet18_cifar(num_classes=num_classes, stem=stem), _input(1, input_size))


def forward_flops_per_image(stem: str = "cifar", num_classes: int = 10, input_size: int = 32) -> int:
    """FlopCounterMode forward FLOPs of one image on a fresh CPU model (cached)."""
    return _torch_flops_per_image(stem, num_classes, input_size)[0]


def training_flops_per_image(stem: str = "cifar", num_classes: int = 10, input_size: int = 32) -> int:
    """FlopCounterMode forward+backward FLOPs of one image on a fresh CPU model (cached)."""
    return _torch_flops_per_image(stem, num_classes, input_size)[1]


# Dense (no structured sparsity) peaks in TFLOP/s from the vendor datasheets; bf16/fp16 with fp32 accumulate,
# tf32 on tensor cores, fp32 on CUDA cores. None: the GPU has no such tensor-core path.
# Order matters: more specific names first (H100 PCIe before H100).
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM: "NVIDIA H100 80GB HBM3"
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM and PCIe alike
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    # NVIDIA publishes no A10G datasheet; AWS's GA102 part is assumed equal to the A10 (approximate).
    "A10G": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},  # Ada whitepaper, fp32 accumulate
    "V100S": {"bf16": None, "fp16": 130.0, "tf32": None, "fp32": 16.4},
    "V100 PCIe": {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0},
    "V100": {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7},  # SXM2
    "T4": {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1},
}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def device_name(device, world_size: int = 1) -> str:
    """The one name of a training device: the GPU's own name, or the CPU's; "x N" under DDP."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''})"
    return f"{name} x {world_size}" if world_size > 1 else name


def throughput(images_per_s: float, flops_per_image: int, device_type: str, peak_tflops: float | None,
               world_size: int = 1) -> dict:
    """Achieved training FLOP/s from a (global) image rate, and on CUDA the MFU: the peak is per GPU, so the
    achieved rate is divided by the number of processes."""
    achieved = images_per_s * flops_per_image
    if device_type != "cuda":
        return {"achieved_gflops": achieved / 1e9}
    return {"achieved_tflops": achieved / 1e12,
            "mfu": achieved / world_size / (peak_tflops * 1e12) if peak_tflops else None}


def _norm(s: str) -> str:
    return re.sub(r"[-_\s]+", " ", s.upper()).strip()


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s for torch.cuda.get_device_name() and dtype, or None when unknown.

    A key matches as a whole token run ("L4" does not match "L40S", "A10" not "A100"); '-', '_' and spaces are
    equivalent ("Tesla V100-PCIE-16GB" matches "V100 PCIe").
    """
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"unknown dtype {dtype!r}: expected bf16, fp16, tf32 or fp32")
    name = _norm(device_name)
    for key, peaks in PEAK_TFLOPS.items():
        if re.search(rf"(?<![A-Z0-9]){re.escape(_norm(key))}(?![A-Z0-9])", name):
            return peaks[dtype]
    return None


def _unsupported_line(r: Report) -> str:
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(r.unsupported.items())) or "none"
    return f"fvcore skipped unsupported operators: {ops} ({r.fvcore_log_records} fvcore log warning(s) captured)"


def _per_image(r: Report) -> dict[str, int]:
    b = r.batch_size
    return {"params": r.params, "conv_linear_macs": r.conv_linear_macs // b, "fvcore_total": r.fvcore_total // b,
            "bn_ops": r.hand_total("bn") // b, "pool_ops": r.hand_total("pool") // b,
            "add_ops": r.hand_total("add") // b, "forward_flops": r.forward_flops // b,
            "forward_backward_flops": r.forward_backward_flops // b}


def to_json(r: Report) -> dict:
    b, per_image = r.batch_size, _per_image(r)
    return {
        "stem": r.stem, "input_size": r.input_size, "num_classes": r.num_classes, "batch_size": b,
        **per_image,
        "training_flops_per_epoch": per_image["forward_backward_flops"] * EPOCH_IMAGES,
        "per_batch": {k: (v if k == "params" else v * b) for k, v in per_image.items()},
        "layers": [{"name": l.name, "type": l.type, "kind": l.kind, "out_shape": list(l.out_shape[1:]),
                    "params": l.params, "hand": l.hand // b, "fvcore": l.fvcore // b,
                    "difference": (l.fvcore - l.hand) // b} for l in r.layers],
        "unsupported_ops": dict(r.unsupported),
        "verified": not r.mismatches, "mismatches": r.mismatches,
    }


def format_table(r: Report) -> str:
    b = r.batch_size
    unit = {"conv": "MACs", "linear": "MACs", "bn": "BN", "pool": "pool", "add": "add"}  # what the hand count counts
    head = f"{'layer':<21} {'type':<17} {'output':<10} {'params':>10} {'hand count':>13} {'of':<5} {'fvcore':>13} " \
           f"{'difference':>11}"
    lines = [*textwrap.wrap(f"ResNet-18, {r.stem} stem, {r.num_classes} classes, {r.input_size}x{r.input_size} "
                            f"input, batch {b}; counts per image; 1 MAC = 1 multiply + 1 add = 2 FLOPs; fvcore in "
                            f"eval mode", 120), head, "-" * len(head)]
    for l in r.layers:  # noqa: E741
        flag = "  MISMATCH" if l.kind in ("conv", "linear") and l.hand != l.fvcore else ""
        shape = "x".join(map(str, l.out_shape[1:]))
        lines.append(f"{l.name:<21} {l.type:<17} {shape:<10} {l.params:>10,} {l.hand // b:>13,} {unit[l.kind]:<5} "
                     f"{l.fvcore // b:>13,} {(l.fvcore - l.hand) // b:>+11,}{flag}")
    lines.append("-" * len(head))
    for kind in ("bn", "pool", "add"):
        if any(l.kind == kind for l in r.layers):
            lines += textwrap.wrap("note: " + CONVENTIONS[kind], 120, subsequent_indent="    ")
    lines += textwrap.wrap(_unsupported_line(r), 120, subsequent_indent="    ")
    p = _per_image(r)
    rows = [("parameters", r.params, r.params),
            ("conv+linear MACs (hand)", p["conv_linear_macs"], r.conv_linear_macs),
            ("  = forward FLOPs (x2)", 2 * p["conv_linear_macs"], 2 * r.conv_linear_macs),
            ("batch-norm ops (hand)", p["bn_ops"], r.hand_total("bn")),
            ("pooling ops (hand)", p["pool_ops"], r.hand_total("pool")),
            ("residual adds (hand)", p["add_ops"], r.hand_total("add")),
            ("fvcore total", p["fvcore_total"], r.fvcore_total),
            ("FlopCounterMode forward FLOPs", p["forward_flops"], r.forward_flops),
            ("FlopCounterMode fwd+bwd FLOPs", p["forward_backward_flops"], r.forward_backward_flops)]
    lines.append(f"\n{'totals':<32} {'per image':>18} {f'per batch of {b}':>20}")
    lines += [f"{name:<32} {a:>18,} {c:>20,}" for name, a, c in rows]
    ratio = r.forward_backward_flops / r.forward_flops if r.forward_flops else float("nan")
    epoch = p["forward_backward_flops"] * EPOCH_IMAGES
    lines.append(f"training FLOPs = {ratio:.3f} x forward (measured); per epoch of {EPOCH_IMAGES:,} images: "
                 f"{epoch:,} ({epoch / 1e12:,.1f} TFLOP)")
    return "\n".join(lines)


def run_flops(args: argparse.Namespace) -> int:
    """`fastcifar flops`: the exit code (1 only for a --verify failure); FastCifarError for bad values."""
    r = analyse(stem=args.stem, num_classes=args.num_classes, input_size=args.input_size, batch_size=args.batch_size)
    print(json.dumps(to_json(r)) if args.json else format_table(r))
    if args.verify and not args.json:  # with --json the verdict is the "verified"/"mismatches" keys
        print(f"\nverify: FAILED, {len(r.mismatches)} disagreement(s):\n" + "\n".join(f"  {m}" for m in r.mismatches)
              if r.mismatches else "\nverify: OK: hand counter == fvcore on every conv/linear layer, and hand "
              "conv+linear MACs ==\n    FlopCounterMode forward FLOPs / 2")
    return 1 if args.verify and r.mismatches else 0
