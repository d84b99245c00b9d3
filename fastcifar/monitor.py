"""Per-layer gradient flow and weight-update statistics, and the health flags built on them.

A sample is a handful of fused foreach ops over all parameters and a scatter into per-layer slots, written into
buffers allocated once on the device: no host sync and no new allocation, so the same ops run inside a captured
CUDA graph (the monitored variant of the training step). The host reads a sample with one copy (`read_sample`).
Samples are taken outside the (compiled) model, after backward (and after GradScaler.unscale_ under fp16), so
torch.compile sees no graph break.

Rows written (JSON lines in the run directory, one row per layer per sample; see README "Run directory"):
  grad_flow.jsonl  {epoch, step, layer, index, kind, numel, mean_abs, max_abs, norm, rms}  gradients at a sampled step
  updates.jsonl    {scope: "step"|"epoch", epoch, step, layer, index, kind, ratio, lr}     ||dW|| / ||W|| per layer
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastcifar.config import default_grad_epochs

__all__ = ["LayerMonitor", "default_grad_epochs", "layer_kind", "parameterised_layers"]

LAYER_KINDS = ((nn.modules.conv._ConvNd, "conv"), (nn.modules.batchnorm._NormBase, "norm"), (nn.Linear, "linear"))


def layer_kind(module: nn.Module) -> str:
    return next((kind for cls, kind in LAYER_KINDS if isinstance(module, cls)), "other")


def parameterised_layers(model: nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """(module name, its own parameters) for every module that owns parameters, in registration order,
    which for this ResNet (model.py) is forward order (stem, layer1..4, fc)."""
    layers = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            layers.append((name or "(root)", params))
    return layers


class LayerMonitor:
    def __init__(self, model: nn.Module, *, steps_per_epoch: int, epochs: int, grad_every: int | None = None,
                 grad_epochs: list[int] | None = None, grad_low: float = 1e-7, grad_high: float = 1e3):
        layers = parameterised_layers(model)
        modules = dict(model.named_modules())
        self.layer_names = [name for name, _ in layers]
        self.layer_kinds = [layer_kind(modules.get(name, model)) for name in self.layer_names]
        self.params = [p for _, params in layers for p in params]
        device = self.params[0].device
        self.layer_of_param = torch.tensor([i for i, (_, ps) in enumerate(layers) for _ in ps], device=device)
        self.layer_numel = [sum(p.numel() for p in ps) for _, ps in layers]
        self.numel = torch.tensor(self.layer_numel, device=device, dtype=torch.float64)
        # Default: about four samples per epoch, the first at the epoch's first step.
        self.grad_every = grad_every or max(1, steps_per_epoch // 4)
        self.grad_epochs = set(grad_epochs if grad_epochs is not None else default_grad_epochs(epochs))
        self.steps_per_epoch = steps_per_epoch
        self.grad_low, self.grad_high = grad_low, grad_high
        # Written on the device by a sample, read by the host once: rows mean_abs, max_abs, norm, update ratio.
        self.sample = torch.zeros(4, len(layers), device=device, dtype=torch.float64)
        self._before = [torch.empty_like(p) for p in self.params]  # weights before the sampled step
        self._epoch_start = [torch.empty_like(p) for p in self.params]

    # --- schedule -------------------------------------------------------------------------------------
    def should_sample(self, epoch: int, step_in_epoch: int) -> bool:
        """Every grad_every steps; in the report's epochs, at least four evenly spaced steps regardless."""
        if step_in_epoch % self.grad_every == 0:
            return True
        if epoch in self.grad_epochs:
            quarter = max(1, self.steps_per_epoch // 4)
            return step_in_epoch % quarter == 0
        return False

    # --- per-layer reductions (device only) ----------------------------------------------------------
    def _per_layer_sum(self, per_param: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.layer_names), device=per_param.device, dtype=torch.float64)
        return out.index_add_(0, self.layer_of_param, per_param.double())

    def _per_layer_max(self, per_param: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.layer_names), device=per_param.device, dtype=torch.float64)
        return out.scatter_reduce_(0, self.layer_of_param, per_param.double(), reduce="amax")

    def _layer_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        l2 = torch.stack(torch._foreach_norm(tensors, 2))
        return self._per_layer_sum(l2.double() ** 2).sqrt()

    def record_grads(self) -> None:
        """mean |g|, max |g| and ||g||_2 per layer into the sample buffer (device ops only)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        l1 = torch.stack(torch._foreach_norm(grads, 1))
        l2 = torch.stack(torch._foreach_norm(grads, 2))
        linf = torch.stack(torch._foreach_norm(grads, float("inf")))
        self.sample[0].copy_(self._per_layer_sum(l1) / self.numel)
        self.sample[1].copy_(self._per_layer_max(linf))
        self.sample[2].copy_(self._per_layer_sum(l2.double() ** 2).sqrt())

    def snapshot_weights(self) -> None:
        """Before the sampled optimizer step (device ops only)."""
        torch._foreach_copy_(self._before, [p.detach() for p in self.params])

    def record_update(self) -> None:
        """||W_after - W_before|| / ||W_before|| per layer into the sample buffer (device ops only)."""
        self.sample[3].copy_(self._update_ratio(self._before))

    def read_sample(self) -> dict[str, list[float]]:
        """The sample buffer on the host: the sample's one sync."""
        mean_abs, max_abs, norm, ratio = self.sample.cpu().tolist()
        return {"mean_abs": mean_abs, "max_abs": max_abs, "norm": norm, "ratio": ratio}

    def _update_ratio(self, before: list[torch.Tensor]) -> torch.Tensor:
        delta = torch._foreach_sub([p.detach() for p in self.params], before)
        return self._layer_norms(delta) / self._layer_norms(before).clamp_min(1e-30)

    # --- host conveniences around the device ops (eager code and tests) --------------------------------
    def grad_stats(self) -> dict[str, list[float]]:
        self.record_grads()
        stats = self.read_sample()
        return {k: stats[k] for k in ("mean_abs", "max_abs", "norm")}

    def before_optimizer_step(self) -> None:
        self.snapshot_weights()

    def after_optimizer_step(self) -> list[float]:
        self.record_update()
        return self.read_sample()["ratio"]

    def start_epoch(self) -> None:
        torch._foreach_copy_(self._epoch_start, [p.detach() for p in self.params])

    def end_epoch(self) -> list[float]:
        return self._update_ratio(self._epoch_start).cpu().tolist()

    # --- health -----------------------------------------------------------------------------------------
    def flag_layers(self, norms: list[float], zero_by_design: bool = False) -> dict[str, list[str]]:
        """zero_by_design: exactly-zero norms are expected (the first step of a zero_init_residual model, whose
        residual branches get no gradient until their last BatchNorm leaves 0), so they are not "vanishing"."""
        flags = {"vanishing": [], "exploding": [], "nonfinite": []}
        for name, value in zip(self.layer_names, norms):
            if not math.isfinite(value):
                flags["nonfinite"].append(name)
            elif value == 0.0 and zero_by_design:
                continue
            elif value < self.grad_low:
                flags["vanishing"].append(name)
            elif value > self.grad_high:
                flags["exploding"].append(name)
        return flags

    def rows(self, kind: str, values: dict[str, list[float]], **keys) -> list[dict]:
        """Tidy rows: one per layer, `keys` (epoch, step, scope) repeated on each. Gradient rows add the RMS
        gradient, norm / sqrt(numel): comparable across layers of very different sizes."""
        names = list(values)
        rows = []
        for i, layer in enumerate(self.layer_names):
            row = {**keys, "layer": layer, "index": i, "kind": self.layer_kinds[i], **{n: values[n][i] for n in names}}
            if kind == "grad":
                row["numel"] = self.layer_numel[i]
                row["rms"] = values["norm"][i] / math.sqrt(self.layer_numel[i])
            rows.append(row)
        return rows
