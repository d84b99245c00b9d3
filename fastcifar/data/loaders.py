"""make_train_loader / make_eval_loader: one interface (plan.TrainLoader, plan.EvalLoader) over the dali, torch and
torchvision backends, and the choice of backend.

Every backend applies the same epoch plan (plan.py), so for one seed they yield the same batches; they differ in
where the work runs: torch ops on the device (`torch`), one DALI graph on the GPU or DALI's CPU-only mode
(`dali`), PIL in DataLoader worker processes with pinned host memory (`torchvision`, the report's way, kept as the
baseline). Evaluation is in order and normalised only; its last batch is padded with IGNORE_LABEL.
"""

from __future__ import annotations

import numpy as np
import torch

from fastcifar import FastCifarError
from fastcifar.data.augment import (CIFAR_MEAN, CIFAR_STD, DEFAULT_AUGMENT, SIZE, AugmentSpec, Normalizer, crop_flip,
                                    cutout_keep, cutout_mask, pad_images)
from fastcifar.data.plan import IGNORE_LABEL, EpochPlan, PlannedTrainLoader, eval_batches, eval_shard, to_nchw_tensor

__all__ = ["IGNORE_LABEL", "LOADER_KINDS", "TorchEvalLoader", "TorchTrainLoader", "TorchvisionTrainLoader",
           "make_eval_loader", "make_train_loader", "resolve_loader", "to_nchw_tensor"]

LOADER_KINDS = ("dali", "torch", "torchvision")  # config.LOADERS adds "auto"


class TorchTrainLoader(PlannedTrainLoader):
    """GPU-resident: the uint8 set is padded once and kept on the device; crop, flip, normalisation and cutout
    are a gather, a multiply-add, one broadcast mask and a multiply there. The plan moves to the device once per epoch."""

    name = "torch"

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, seed=0,
                 rank=0, world_size=1, augment: AugmentSpec = DEFAULT_AUGMENT, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(len(labels), batch_size, augment, seed, rank, world_size)
        self.device = torch.device(device)
        self.padded = pad_images(to_nchw_tensor(images, self.device), augment.pad)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.dtype, self.channels_last = dtype, channels_last
        self.normalize = Normalizer(mean, std, self.device)

    def _batches(self, plan: EpochPlan):
        order, offset_y, offset_x, flip, boxes = (torch.from_numpy(a).to(self.device) if a is not None else None
                                                  for a in (plan.order, plan.offset_y, plan.offset_x, plan.flip,
                                                            plan.boxes))
        keep_rows, keep_cols = cutout_keep(boxes) if boxes is not None else (None, None)
        b = self.batch_size
        for step in range(len(self)):
            w = slice(step * b, (step + 1) * b)
            keep = cutout_mask(keep_rows[w], keep_cols[w]) if boxes is not None else None
            images = self.normalize(crop_flip(self.padded, order[w], offset_y[w], offset_x[w], flip[w]),
                                    self.dtype, self.channels_last, keep=keep)
            yield images, self.labels[order[w]]


class _PlannedPILDataset(torch.utils.data.Dataset):
    """Items are rows of the epoch plan, (index, offset_y, offset_x, flip, y0, x0, y1, x1): the worker applies
    them with torchvision's functional transforms, so no randomness lives in the workers."""

    def __init__(self, images, labels, spec: AugmentSpec, mean=CIFAR_MEAN, std=CIFAR_STD):
        self.images, self.labels, self.spec = images, labels, spec
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        import torchvision.transforms.functional as TF
        from PIL import Image

        index, offset_y, offset_x, flip, y0, x0, y1, x1 = item
        image = Image.fromarray(self.images[index])
        if self.spec.pad:
            image = TF.crop(TF.pad(image, self.spec.pad, fill=0), offset_y, offset_x, SIZE, SIZE)
        if flip:
            image = TF.hflip(image)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        if y1 > y0 and x1 > x0:
            tensor = TF.erase(tensor, y0, x0, y1 - y0, x1 - x0, 0.0)
        return tensor, int(self.labels[index])


class TorchvisionTrainLoader(PlannedTrainLoader):
    """The report's way, kept as the baseline: PIL transforms in DataLoader workers, pinned host memory."""

    name = "torchvision"

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, seed=0,
                 rank=0, world_size=1, augment: AugmentSpec = DEFAULT_AUGMENT, num_workers=2, mean=CIFAR_MEAN,
                 std=CIFAR_STD):
        super().__init__(len(labels), batch_size, augment, seed, rank, world_size)
        self.dataset = _PlannedPILDataset(images, labels, augment, mean, std)
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.num_workers = num_workers

    def _batches(self, plan: EpochPlan):
        boxes = plan.boxes if plan.boxes is not None else np.zeros((len(plan.order), 4), dtype=np.int64)
        items = np.column_stack([plan.order, plan.offset_y, plan.offset_x, plan.flip, boxes])
        items = items[:len(self) * self.batch_size].tolist()  # every DDP rank takes len(self) steps
        # The workers draw nothing, but DataLoader seeds them from a generator: give it one, so the caller's
        # global RNG is left untouched.
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=items, drop_last=True,
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(self.seed))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True).to(dtype=self.dtype, memory_format=memory_format)
            yield images, labels.to(self.device, non_blocking=True)


class TorchEvalLoader:
    """The test set on the device, normalised only, in order; the last batch padded with IGNORE_LABEL."""

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, rank=0,
                 world_size=1, mean=CIFAR_MEAN, std=CIFAR_STD):
        self.device = torch.device(device)
        images, labels = eval_shard(images, labels, rank, world_size)
        self.num_images = len(labels)
        self.images = to_nchw_tensor(images, self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.batch_size, self.dtype, self.channels_last = batch_size, dtype, channels_last
        self.normalize = Normalizer(mean, std, self.device)

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        for images, labels in eval_batches(self.images, self.labels, self.batch_size):
            yield self.normalize(images, self.dtype, self.channels_last), labels


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
        if device.type != "cuda":
            return "torch", "loader: torch (torch ops on the CPU): DALI's GPU pipeline needs a CUDA device"
        return "torch", "loader: torch (GPU-resident torch ops), not DALI: nvidia-dali is not installed"
    if kind == "dali" and not dali_available():
        raise FastCifarError("--loader dali needs NVIDIA DALI, which is not installed: "
                             "pip install nvidia-dali-cuda130 (Linux), or use --loader torch.")
    if kind not in LOADER_KINDS:
        raise FastCifarError(f"unknown loader {kind!r}: choose from auto, {', '.join(LOADER_KINDS)}")
    return kind, None


def make_train_loader(kind, images, labels, batch_size, device, dtype=torch.float32, channels_last=False,
                      seed=0, rank=0, world_size=1, num_workers=2, augment: AugmentSpec = DEFAULT_AUGMENT,
                      mean=CIFAR_MEAN, std=CIFAR_STD):
    """`mean`/`std`: the dataset's per-channel normalisation (CIFAR-10's by default)."""
    common = dict(batch_size=batch_size, device=device, dtype=dtype, channels_last=channels_last, seed=seed,
                  rank=rank, world_size=world_size, augment=augment, mean=mean, std=std)
    if kind == "dali":
        from fastcifar.data.dali import DaliTrainLoader

        return DaliTrainLoader(images, labels, **common)
    if kind == "torchvision":
        return TorchvisionTrainLoader(images, labels, num_workers=num_workers, **common)
    if kind == "torch":
        return TorchTrainLoader(images, labels, **common)
    raise FastCifarError(f"unknown loader {kind!r}: choose from {', '.join(LOADER_KINDS)}")


def make_eval_loader(kind, images, labels, batch_size, device, dtype=torch.float32, channels_last=False,
                     rank=0, world_size=1, mean=CIFAR_MEAN, std=CIFAR_STD):
    if kind == "dali":
        from fastcifar.data.dali import DaliEvalLoader

        return DaliEvalLoader(images, labels, batch_size, device, dtype, channels_last, rank, world_size, mean, std)
    return TorchEvalLoader(images, labels, batch_size, device, dtype, channels_last, rank, world_size, mean, std)
