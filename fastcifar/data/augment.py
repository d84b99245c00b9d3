"""Augmentation as configuration (`--augment crop,flip,cutout=8`), and its reference implementation in torch ops
on device tensors: the torch loader uses it, and the DALI and torchvision loaders must match it.

RandomCrop(32, padding=p) pads with zeros in pixel space, so crops are taken from a (32+2p)-square zero-padded
uint8 copy kept on the device; normalisation happens after the crop, so a padded pixel becomes -mean/std.
Cutout (DeVries & Taylor 2017) zeroes a square after normalisation, i.e. fills it with the mean colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcifar.data.cifar import CIFAR10_MEAN as CIFAR_MEAN  # the default normalisation
from fastcifar.data.cifar import CIFAR10_STD as CIFAR_STD

SIZE = 32
PAD = 4  # the report's RandomCrop(32, padding=4)
MAX_PAD = 16


class AugmentError(ValueError):
    """A malformed --augment value; the message says what is accepted."""


@dataclass(frozen=True)
class AugmentSpec:
    pad: int = PAD  # crop: RandomCrop(32, padding=pad); 0 = no crop
    flip: bool = True  # horizontal flip with p = 0.5
    cutout: int = 0  # side of the cutout square; 0 = none


DEFAULT_AUGMENT = AugmentSpec()  # the report's crop + flip
AUGMENT_HELP = ("comma-separated: crop (RandomCrop 32, padding 4), crop=P (padding P), flip (horizontal, p=0.5), "
                "cutout=N (an N x N square of mean colour), or none")


def parse_augment(text: str) -> AugmentSpec:
    pad, flip, cutout = 0, False, 0
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        name, _, value = item.partition("=")
        try:
            number = int(value) if value else None
        except ValueError:
            raise AugmentError(f"--augment {text!r}: {item!r} needs a whole number after '='") from None
        if name == "crop" and (number is None or 0 <= number <= MAX_PAD):
            pad = PAD if number is None else number
        elif name == "flip" and number is None:
            flip = True
        elif name == "cutout" and number is not None and 1 <= number <= SIZE:
            cutout = number
        elif name == "none" and number is None and len(items) == 1:
            pass
        else:
            raise AugmentError(f"--augment {text!r}: cannot read {item!r} ({AUGMENT_HELP}; crop padding 0..{MAX_PAD}, "
                               f"cutout 1..{SIZE})")
    return AugmentSpec(pad, flip, cutout)


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

    def __call__(self, x_uint8: torch.Tensor, dtype=torch.float32, channels_last=False,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` (n, 1, H, W) bool zeroes the pixels where it is False (cutout). It is applied before the layout
        change: in channels_last the channel-broadcast mask would be the innermost, stride-0 dimension, which
        the CPU kernels do not vectorise (3-4x slower there)."""
        x = torch.addcmul(self.shift, x_uint8.float(), self.scale)
        if keep is not None:
            x.mul_(keep)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return x.to(dtype=dtype, memory_format=memory_format)


def crop_flip(padded: torch.Tensor, index: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor,
              flip: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Crop a size x size window at the given offsets from each padded image, mirrored where flip is set.

    One advanced-indexing gather reads exactly the output pixels: no per-image Python loop, no copy of the
    full padded batch.
    """
    device = padded.device
    ar = torch.arange(size, device=device)
    rows = offset_y[:, None] + ar  # (n, size)
    cols = offset_x[:, None] + torch.where(flip.bool()[:, None], size - 1 - ar, ar)  # mirrored columns when flipped
    channels = torch.arange(padded.shape[1], device=device)
    return padded[index[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None],
                  cols[:, None, None, :]]


def cutout_keep(boxes: torch.Tensor, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) boxes y0, x0, y1, x1 -> rows, cols: (n, size) bool, True outside the box's rows / columns.

    Made once per epoch for all its boxes; a batch's mask is then one broadcast `cutout_mask(rows, cols)`
    (a pixel is kept when its row or its column lies outside the box), instead of ten small ops per batch.
    """
    ar = torch.arange(size, device=boxes.device)
    rows = (ar < boxes[:, 0:1]) | (ar >= boxes[:, 2:3])
    cols = (ar < boxes[:, 1:2]) | (ar >= boxes[:, 3:4])
    return rows, cols


def cutout_mask(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(n, size) rows and cols from cutout_keep -> (n, 1, size, size) mask: 0 inside the box, 1 elsewhere."""
    return rows[:, None, :, None] | cols[:, None, None, :]
