"""--sync-bn: BatchNorm statistics over the global batch of all DDP ranks, not each rank's shard.

On CUDA this is torch's SyncBatchNorm. torch's runs on GPUs only (its statistics kernels have no CPU version, and
DDP refuses it on the CPU), so on the CPU (gloo) the same computation is done here with plain tensor ops: each
rank's per-channel mean and M2 gathered and combined (Chan et al.'s parallel variance, no E[x^2]-E[x]^2
cancellation), and in backward the two per-channel gradient sums all-reduced. The weight and bias gradients stay
per rank; DDP averages them like every other gradient, which is what makes 2 ranks x 64 images train as
1 process x 128 (to 1e-14 in float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer synchronised across ranks; the state_dict keys are unchanged, so checkpoints load
    into a plain model (fastcifar eval, --init-from, a run without --sync-bn)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = CPUSyncBatchNorm  # same parameters and buffers, another forward
    return model


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training forward uses the statistics of all ranks. Not a subclass of torch's
    SyncBatchNorm, which DDP refuses on the CPU."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        running = self.track_running_stats and self.running_mean is not None
        return _SyncBatchNormCPU.apply(input, self.weight, self.bias, self.running_mean if running else None,
                                       self.running_var if running else None, self.eps, momentum or 0.0)


class _SyncBatchNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.size(1)
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        local = torch.cat([mean, var * count, torch.tensor([float(count)], dtype=x.dtype)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        stats = torch.stack(gathered)
        channels = x.size(1)
        means, m2s, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, -1:]
        total = counts.sum()
        mean = (means * counts).sum(0) / total
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / total
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (total / (total - 1)), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd)
        ctx.total = total
        out = x_hat if weight is None else x_hat * weight.view(shape)
        return out if bias is None else out + bias.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, invstd = ctx.saved_tensors
        dims = [0, *range(2, grad_out.dim())]
        shape = [1, grad_out.size(1)] + [1] * (grad_out.dim() - 2)
        sum_dy, sum_dy_xhat = grad_out.sum(dims), (grad_out * x_hat).sum(dims)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums)  # the global batch's sums: the input gradient is the 128-image one
        mean_dy, mean_dy_xhat = (sums / ctx.total).chunk(2)
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad_out - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) * scale.view(shape)
        return grad_x, grad_weight, grad_bias, None, None, None, None
