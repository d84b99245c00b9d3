"""make_train_loader / make_eval_loader: one interface over the dali, torch and torchvision loaders.

A train loader yields (images, labels) per step: images float (B, 3, 32, 32) in the training dtype, normalised,
channels_last when asked, on the device; labels int64 on the device. Only full batches are yielded (static
shapes for torch.compile). `set_epoch(e)` picks the epoch's permutation and augmentation draws from
(seed, e) alone, so a resumed run sees exactly the batches an uninterrupted one would.

An eval loader yields the test set in order, normalised only; its last batch is padded to full size with
label -100 (cross_entropy's ignore_index), so evaluation never recompiles and padding never counts.
"""

from __future__ import annotations

import numpy as np
import torch

from fastcifar import FastCifarError
from fastcifar.data.augment import CIFAR_MEAN, CIFAR_STD, Normalizer, pad_images, random_crop_flip

IGNORE_LABEL = -100
LOADER_KINDS = ("dali", "torch", "torchvision")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def to_nchw_tensor(images_nhwc: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)


def shard_size(n: int, rank: int, world_size: int) -> int:
    return len(range(rank, n, world_size))


class TorchTrainLoader:
    """GPU-resident: the uint8 set is padded once and kept on the device; crop/flip/normalise are torch ops."""

    name = "torch"

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, seed=0,
                 rank=0, world_size=1):
        self.device = torch.device(device)
        self.padded = pad_images(to_nchw_tensor(images, self.device))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.batch_size, self.dtype, self.channels_last = batch_size, dtype, channels_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.normalize = Normalizer(CIFAR_MEAN, CIFAR_STD, self.device)
        self.generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        return shard_size(len(self.labels), self.rank, self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.labels), device=self.device, generator=self.generator)
        order = order[self.rank::self.world_size]
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            crops = random_crop_flip(self.padded, index, self.generator)
            yield self.normalize(crops, self.dtype, self.channels_last), self.labels[index]


class _TorchvisionDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class TorchvisionTrainLoader:
    """The report's way, kept as the baseline: PIL transforms in DataLoader workers, pinned host memory."""

    name = "torchvision"

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, seed=0,
                 rank=0, world_size=1, num_workers=2):
        self.dataset = _TorchvisionDataset(images, labels)
        self.device, self.batch_size, self.dtype, self.channels_last = torch.device(device), batch_size, dtype, channels_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.num_workers = num_workers

    def __len__(self) -> int:
        return shard_size(len(self.dataset), self.rank, self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=generator)[self.rank::self.world_size].tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, drop_last=True,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda", generator=generator)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # Workers seed their transforms from `generator`; without workers the transforms draw from torch's
        # global RNG, so seed a forked copy of it for the epoch and leave the caller's state untouched.
        with torch.random.fork_rng(devices=[], enabled=self.num_workers == 0):
            if self.num_workers == 0:
                torch.manual_seed(epoch_seed(self.seed, self.epoch))
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True).to(dtype=self.dtype, memory_format=memory_format)
                yield images, labels.to(self.device, non_blocking=True)


class EvalLoader:
    """The test set on the device, normalised only, in order; the last batch padded with IGNORE_LABEL."""

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, rank=0,
                 world_size=1):
        self.device = torch.device(device)
        images, labels = images[rank::world_size], np.asarray(labels, dtype=np.int64)[rank::world_size]
        self.num_images = len(labels)
        self.images = to_nchw_tensor(images, self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.batch_size, self.dtype, self.channels_last = batch_size, dtype, channels_last
        self.normalize = Normalizer(CIFAR_MEAN, CIFAR_STD, self.device)

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        for images, labels in eval_batches(self.images, self.labels, self.batch_size):
            yield self.normalize(images, self.dtype, self.channels_last), labels


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """In-order uint8 batches; the last one padded to full size with zero images labelled IGNORE_LABEL."""
    for start in range(0, len(labels), batch_size):
        batch_images, batch_labels = images[start:start + batch_size], labels[start:start + batch_size]
        short = batch_size - len(batch_labels)
        if short:
            batch_images = torch.cat([batch_images, batch_images.new_zeros((short, *batch_images.shape[1:]))])
            batch_labels = torch.cat([batch_labels, batch_labels.new_full((short,), IGNORE_LABEL)])
        yield batch_images, batch_labels


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def resolve_loader(kind: str, device: torch.device) -> tuple[str, str | None]:
    """'auto' -> dali where DALI imports and CUDA is present, else torch. Returns (kind, notice or None)."""
    if kind == "auto":
        if device.type == "cuda" and dali_available():
            return "dali", None
        why = "no CUDA device" if device.type != "cuda" else "nvidia-dali is not installed"
        return "torch", f"loader: torch (GPU-resident torch ops), not DALI: {why}"
    if kind == "dali" and not dali_available():
        raise FastCifarError("--loader dali needs NVIDIA DALI, which is not installed: "
                             "pip install nvidia-dali-cuda130 (Linux), or use --loader torch.")
    if kind not in LOADER_KINDS:
        raise FastCifarError(f"unknown loader {kind!r}: choose from auto, {', '.join(LOADER_KINDS)}")
    return kind, None


def make_train_loader(kind, images, labels, batch_size, device, dtype=torch.float32, channels_last=False,
                      seed=0, rank=0, world_size=1, num_workers=2):
    common = dict(batch_size=batch_size, device=device, dtype=dtype, channels_last=channels_last, seed=seed,
                  rank=rank, world_size=world_size)
    if kind == "dali":
        from fastcifar.data.dali import DaliTrainLoader

        return DaliTrainLoader(images, labels, **common)
    if kind == "torchvision":
        return TorchvisionTrainLoader(images, labels, num_workers=num_workers, **common)
    if kind == "torch":
        return TorchTrainLoader(images, labels, **common)
    raise FastCifarError(f"unknown loader {kind!r}: choose from {', '.join(LOADER_KINDS)}")


def make_eval_loader(kind, images, labels, batch_size, device, dtype=torch.float32, channels_last=False,
                     rank=0, world_size=1):
    if kind == "dali":
        from fastcifar.data.dali import DaliEvalLoader

        return DaliEvalLoader(images, labels, batch_size, device, dtype, channels_last, rank, world_size)
    return EvalLoader(images, labels, batch_size, device, dtype, channels_last, rank, world_size)
