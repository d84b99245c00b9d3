"""What every loader backend shares: the epoch's plan drawn from (seed, epoch), sharding, eval batching, and the
interfaces a train loader and an eval loader present to the trainer.

The plan is the whole of an epoch's randomness: the permutation, each image's crop offset and flip, and its
cutout box. It is drawn once on the host from one numpy Generator seeded by `epoch_seed(seed, epoch)`, and every
backend (torch ops, DALI, torchvision/PIL) applies the same plan, so for one seed they give the same batches, a
resumed run sees exactly the batches an uninterrupted one would, and DDP ranks take disjoint shards of it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from fastcifar.data.augment import SIZE, AugmentSpec

IGNORE_LABEL = -100  # cross_entropy's ignore_index: the padding of the last eval batch never counts


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def eval_shard(images: np.ndarray, labels, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's part of the test set: every world_size-th image from `rank` (the shards may differ by one image;
    evaluation is summed over ranks only at the end, so that is fine)."""
    return (np.ascontiguousarray(np.asarray(images, dtype=np.uint8)[rank::world_size]),
            np.asarray(labels, dtype=np.int64)[rank::world_size])


def to_nchw_tensor(images_nhwc: np.ndarray, device) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 as stored -> (N, 3, 32, 32) contiguous uint8 on `device`."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)


@dataclass
class EpochPlan:
    """One rank's epoch, in step order. Arrays are contiguous (DALI rejects strided inputs)."""

    order: np.ndarray  # (n,) int64 image indices
    offset_y: np.ndarray  # (n,) int64 crop offsets in 0..2*pad (pad 0: always 0)
    offset_x: np.ndarray
    flip: np.ndarray  # (n,) int32, 1 = mirrored
    boxes: np.ndarray | None  # (n, 4) int64 cutout boxes y0, x0, y1, x1 in output pixels (clipped), or None


def draw_epoch_plan(n: int, spec: AugmentSpec, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> EpochPlan:
    """Draw the whole epoch for all ranks, then keep this rank's shard: every rank sees the same permutation.

    The draws are made in a fixed order whatever the spec (permutation, offsets, flips, cutout centres), so
    turning cutout on does not change the crops and flips a seed gives.
    """
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    order = rng.permutation(n)
    offsets = rng.integers(0, 2 * spec.pad + 1, size=(2, n))
    flip = rng.integers(0, 2, size=n, dtype=np.int32)
    centres = rng.integers(0, SIZE, size=(2, n))
    if not spec.flip:
        flip = np.zeros_like(flip)
    boxes = None
    if spec.cutout:
        # DeVries & Taylor's cutout: a square centred anywhere in the image, clipped at the border
        y0 = np.clip(centres[0] - spec.cutout // 2, 0, SIZE)
        x0 = np.clip(centres[1] - spec.cutout // 2, 0, SIZE)
        y1 = np.clip(centres[0] - spec.cutout // 2 + spec.cutout, 0, SIZE)
        x1 = np.clip(centres[1] - spec.cutout // 2 + spec.cutout, 0, SIZE)
        boxes = np.stack([y0, x0, y1, x1], axis=1)
    shard = slice(rank, None, world_size)
    return EpochPlan(*(np.ascontiguousarray(a[shard]) if a is not None else None
                       for a in (order, offsets[0], offsets[1], flip, boxes)))


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """In-order batches; the last one padded to full size with zero images labelled IGNORE_LABEL, so the
    evaluation step always sees one shape (one compiled graph)."""
    for start in range(0, len(labels), batch_size):
        batch_images, batch_labels = images[start:start + batch_size], labels[start:start + batch_size]
        short = batch_size - len(batch_labels)
        if short:
            batch_images = torch.cat([batch_images, batch_images.new_zeros((short, *batch_images.shape[1:]))])
            batch_labels = torch.cat([batch_labels, batch_labels.new_full((short,), IGNORE_LABEL)])
        yield batch_images, batch_labels


class TrainLoader(Protocol):
    """Yields (images, labels) per step: images (B, 3, 32, 32) normalised, in the training dtype, channels_last
    when asked, on the device; labels int64 on the device. Only full batches (static shapes)."""

    name: str
    batch_size: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class EvalLoader(Protocol):
    """Yields the test set in order, normalised only; the last batch padded with IGNORE_LABEL."""

    batch_size: int
    num_images: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class PlannedTrainLoader:
    """What every train loader does the same way: length, epoch selection, the epoch's plan. Subclasses turn
    the plan into batches in `_batches`."""

    name = "?"

    def __init__(self, num_images: int, batch_size: int, spec: AugmentSpec, seed: int, rank: int, world_size: int):
        self.num_images, self.batch_size, self.spec = num_images, batch_size, spec
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def __len__(self) -> int:
        # The smallest shard's count on every rank: DDP ranks must take the same number of steps.
        return (self.num_images // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return draw_epoch_plan(self.num_images, self.spec, self.seed, epoch, self.rank, self.world_size)

    def __iter__(self):
        return self._batches(self.epoch_plan(self.epoch))

    def _batches(self, plan: EpochPlan):
        raise NotImplementedError


class LimitedTrainLoader:
    """--limit-steps N: the first N steps of each epoch's plan (a quick check of everything, not a result)."""

    def __init__(self, loader: TrainLoader, steps: int):
        self.loader, self.steps = loader, steps
        self.name, self.batch_size = loader.name, loader.batch_size

    def __len__(self) -> int:
        return min(len(self.loader), self.steps)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    @property
    def seed(self) -> int:  # reset_session sets the next seed's data order on the loader it holds
        return self.loader.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.loader.seed = value

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


class LimitedEvalLoader:
    """--limit-steps N: the first N evaluation batches; they are full unless they are all there is."""

    def __init__(self, loader: EvalLoader, batches: int):
        self.loader, self.batches = loader, min(len(loader), batches)
        self.batch_size = loader.batch_size
        self.num_images = loader.num_images if self.batches == len(loader) else self.batches * loader.batch_size

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.batches)
