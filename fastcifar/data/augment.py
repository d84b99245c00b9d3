"""The report's augmentation in torch ops on device tensors: the reference the other loaders must match.

RandomCrop(32, padding=4) pads with zeros in pixel space, so the crop is taken from a 40x40 zero-padded
uint8 copy kept on the device; normalisation happens after the crop, so a padded pixel becomes -mean/std.
"""

from __future__ import annotations

import torch

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
PAD = 4
SIZE = 32


def pad_images(images_nchw_uint8: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """(N, C, 32, 32) uint8 -> (N, C, 32+2p, 32+2p) uint8 with zero borders."""
    return torch.nn.functional.pad(images_nchw_uint8, (pad, pad, pad, pad), value=0)


class Normalizer:
    """uint8 -> float: (x/255 - mean)/std folded into one multiply-add per element."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD, device="cpu"):
        mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std

    def __call__(self, x_uint8: torch.Tensor, dtype=torch.float32, channels_last=False) -> torch.Tensor:
        x = torch.addcmul(self.shift, x_uint8.float(), self.scale)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return x.to(dtype=dtype, memory_format=memory_format)


def random_crop_flip(padded: torch.Tensor, index: torch.Tensor, generator: torch.Generator,
                     size: int = SIZE) -> torch.Tensor:
    """Crop a size x size window at a uniform offset from each padded image, mirrored with p=0.5.

    One advanced-indexing gather reads exactly the output pixels: no per-image Python loop, no copy of the
    full padded batch.
    """
    n, device = index.numel(), padded.device
    span = padded.shape[-1] - size + 1  # 9 legal offsets per axis for pad 4
    off_y = torch.randint(0, span, (n,), device=device, generator=generator)
    off_x = torch.randint(0, span, (n,), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    ar = torch.arange(size, device=device)
    rows = off_y[:, None] + ar                                   # (n, size)
    cols = off_x[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # mirrored columns when flipped
    channels = torch.arange(padded.shape[1], device=device)
    return padded[index[:, None, None, None], channels[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
