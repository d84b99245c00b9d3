"""Per-layer gradient flow and weight-update statistics, and the health flags built on them.

A sample costs a handful of fused foreach ops over all parameters, a scatter into per-layer slots and one
device->host copy: never a Python loop with a sync per parameter. Samples are taken outside the (compiled)
model, after backward (and after GradScaler.unscale_ under fp16), so torch.compile sees no graph break.

Rows written (JSON lines in the run directory, one row per layer per sample; see README "Run directory"):
  grad_flow.jsonl  {epoch, step, layer, index, mean_abs, max_abs, norm}     gradients at a sampled step
  updates.jsonl    {scope: "step"|"epoch", epoch, step, layer, index, ratio}  ||dW|| / ||W|| per layer
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def parameterised_layers(model: nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """(module name, its own parameters) for every module that owns parameters, in registration order,
    which for torchvision's ResNet is forward order (stem, layer1..4, fc)."""
    layers = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            layers.append((name or "(root)", params))
    return layers


def default_grad_epochs(epochs: int) -> list[int]:
    """The report's Figure 2 epochs (0, 5, 10, 15, 20) that fit, plus the last."""
    return sorted({e for e in (0, 5, 10, 15, 20) if e < epochs} | {epochs - 1})


class LayerMonitor:
    def __init__(self, model: nn.Module, *, steps_per_epoch: int, epochs: int, grad_every: int | None = None,
                 grad_epochs: list[int] | None = None, grad_low: float = 1e-7, grad_high: float = 1e3):
        layers = parameterised_layers(model)
        self.layer_names = [name for name, _ in layers]
        self.params = [p for _, params in layers for p in params]
        device = self.params[0].device
        self.layer_of_param = torch.tensor([i for i, (_, ps) in enumerate(layers) for _ in ps], device=device)
        self.numel = torch.zeros(len(layers), device=device, dtype=torch.float64).index_add_(
            0, self.layer_of_param, torch.tensor([float(p.numel()) for p in self.params], device=device,
                                                 dtype=torch.float64))
        # Default: about four samples per epoch, the first at the epoch's first step.
        self.grad_every = grad_every or max(1, steps_per_epoch // 4)
        self.grad_epochs = set(grad_epochs if grad_epochs is not None else default_grad_epochs(epochs))
        self.steps_per_epoch = steps_per_epoch
        self.grad_low, self.grad_high = grad_low, grad_high
        self._before_step: list[torch.Tensor] | None = None
        self._epoch_start: list[torch.Tensor] | None = None

    # --- schedule -------------------------------------------------------------------------------------
    def should_sample(self, epoch: int, step_in_epoch: int) -> bool:
        """Every grad_every steps; in the report's epochs, at least four evenly spaced steps regardless."""
        if step_in_epoch % self.grad_every == 0:
            return True
        if epoch in self.grad_epochs:
            quarter = max(1, self.steps_per_epoch // 4)
            return step_in_epoch % quarter == 0
        return False

    # --- per-layer reductions ------------------------------------------------------------------------
    def _per_layer_sum(self, per_param: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.layer_names), device=per_param.device, dtype=torch.float64)
        return out.index_add_(0, self.layer_of_param, per_param.double())

    def _per_layer_max(self, per_param: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.layer_names), device=per_param.device, dtype=torch.float64)
        return out.scatter_reduce_(0, self.layer_of_param, per_param.double(), reduce="amax")

    def _layer_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        l2 = torch.stack(torch._foreach_norm(tensors, 2))
        return self._per_layer_sum(l2.double() ** 2).sqrt()

    def grad_stats(self) -> dict[str, list[float]]:
        """mean |g|, max |g| and ||g||_2 per layer, moved to the host in one copy."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        l1 = torch.stack(torch._foreach_norm(grads, 1))
        l2 = torch.stack(torch._foreach_norm(grads, 2))
        linf = torch.stack(torch._foreach_norm(grads, float("inf")))
        stats = torch.stack([self._per_layer_sum(l1) / self.numel, self._per_layer_max(linf),
                             self._per_layer_sum(l2.double() ** 2).sqrt()]).cpu()
        mean_abs, max_abs, norm = stats.tolist()
        return {"mean_abs": mean_abs, "max_abs": max_abs, "norm": norm}

    # --- weight updates --------------------------------------------------------------------------------
    def snapshot(self) -> list[torch.Tensor]:
        return torch._foreach_mul([p.detach() for p in self.params], 1.0)  # one fused copy

    def _update_ratio(self, before: list[torch.Tensor]) -> list[float]:
        now = [p.detach() for p in self.params]
        delta = torch._foreach_sub(now, before)
        ratio = self._layer_norms(delta) / self._layer_norms(before).clamp_min(1e-30)
        return ratio.cpu().tolist()

    def before_optimizer_step(self) -> None:
        self._before_step = self.snapshot()

    def after_optimizer_step(self) -> list[float]:
        ratio = self._update_ratio(self._before_step)
        self._before_step = None
        return ratio

    def start_epoch(self) -> None:
        self._epoch_start = self.snapshot()

    def end_epoch(self) -> list[float]:
        ratio = self._update_ratio(self._epoch_start)
        self._epoch_start = None
        return ratio

    # --- health -----------------------------------------------------------------------------------------
    def flag_layers(self, norms: list[float]) -> dict[str, list[str]]:
        flags = {"vanishing": [], "exploding": [], "nonfinite": []}
        for name, value in zip(self.layer_names, norms):
            if not math.isfinite(value):
                flags["nonfinite"].append(name)
            elif value < self.grad_low:
                flags["vanishing"].append(name)
            elif value > self.grad_high:
                flags["exploding"].append(name)
        return flags

    def rows(self, kind: str, values: dict[str, list[float]], **keys) -> list[dict]:
        """Tidy rows: one per layer, `keys` (epoch, step, scope) repeated on each."""
        names = list(values)
        return [{**keys, "layer": layer, "index": i, **{n: values[n][i] for n in names}}
                for i, layer in enumerate(self.layer_names)]
