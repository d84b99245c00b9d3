"""The DALI loaders: the same crop/flip/normalise graph on the GPU ("gpu") or, in DALI's CPU-only mode, on the CPU.

Data flow (train, one step):

  uint8 train set, zero-padded to 40x40 HWC, resident on the torch device (moved there once)
    -> torch gathers the step's B images on the device: padded[index]             (B, 40, 40, 3) uint8
    -> fn.external_source(no_copy=True): DALI reads that torch buffer in place
    -> fn.crop_mirror_normalize(crop 32x32 at crop_pos = k/8, mirror, mean/std, dtype, layout)  one fused kernel
    -> the output TensorList goes to torch through DLPack (torch.from_dlpack): zero-copy, the torch tensor
       keeps DALI's buffer alive, and on CUDA the pipeline's outputs are ordered on torch's current stream,
       so no host synchronisation and no device-to-device copy happen between DALI and the training step.

Why pad first: DALI places a crop window at crop_pos * (W - crop_W), so a 32-crop of a 32-image never moves.
On the 40x40 zero-padded copy, crop_pos in {0, 1/8, ..., 1} gives exactly the 9 integer offsets 0..8 per axis
of torchvision's RandomCrop(32, padding=4) (k/8 * 8 == k exactly in float32, so rounding never moves it), and
because the zeros are padded in pixel space before normalisation, a padded pixel comes out as (0 - mean)/std,
as in torchvision.

Randomness: the epoch's permutation, crop offsets and flips are drawn on the host from one
numpy Generator seeded with epoch_seed(seed, epoch), and fed to crop_mirror_normalize as per-sample argument
inputs (DALI wants argument inputs in CPU memory even for a GPU operator, and they are 3 numbers per image).
We do not use DALI's own fn.random ops because their state belongs to the built pipeline: making them a
function of (seed, epoch) alone would mean rebuilding the pipeline every epoch, and their draws would differ
between the CPU and the GPU backends. Fed draws give identical batches for the same (seed, epoch) on any
device and any resume point, and the same graph on both backends. DALI still performs the crop, the flip,
the normalisation, the cast and the layout change.

Feeding: prefetch_queue_depth=1 and feed_input + run() per step. On CUDA run(cuda_stream) returns as soon as
the work is queued (the outputs are bound to torch's stream, not host-synchronous), so the GPU queue never
drains between steps; a deeper DALI prefetch queue would only add buffers.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from fastcifar.data.augment import CIFAR_MEAN, CIFAR_STD, PAD, SIZE
from fastcifar.data.loaders import epoch_seed, eval_batches, shard_size

NUM_OFFSETS = 2 * PAD + 1  # 9 legal crop offsets per axis
# crop_mirror_normalize supports FLOAT, FLOAT16, INT8 and UINT8 outputs (DALI 2.4 has no BFLOAT16 type at all):
# for bfloat16 DALI outputs float32 and torch casts it (one extra elementwise kernel on the device).
_DALI_OUTPUT_DTYPE = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}


@pipeline_def
def cifar_pipeline(device: str, *, augment: bool, dtype, layout: str):
    """The whole graph; `device` ("gpu" or "cpu") is the only thing that differs between the two backends.

    augment=True: 32x32 crop of a 40x40 padded input at fed crop positions, fed mirror flags, normalisation.
    augment=False: normalisation only (32x32 input, the test set).
    mean/std are in pixel units: (x - 255*mean) / (255*std) == (x/255 - mean)/std.
    """
    images = fn.external_source(name="images", device=device, layout="HWC", dtype=types.UINT8, ndim=3,
                                no_copy=True)
    crop_args = {}
    if augment:
        crop_args = dict(
            crop=(SIZE, SIZE),
            crop_pos_x=fn.external_source(name="crop_pos_x", device="cpu", dtype=types.FLOAT, ndim=0),
            crop_pos_y=fn.external_source(name="crop_pos_y", device="cpu", dtype=types.FLOAT, ndim=0),
            mirror=fn.external_source(name="mirror", device="cpu", dtype=types.INT32, ndim=0),
        )
    return fn.crop_mirror_normalize(
        images, device=device, dtype=dtype, output_layout=layout,
        mean=[255.0 * m for m in CIFAR_MEAN], std=[255.0 * s for s in CIFAR_STD], **crop_args)


class _DaliRunner:
    """One built pipeline plus the conversions at its two ends (torch uint8 batch in, torch float batch out)."""

    def __init__(self, device, batch_size: int, dtype: torch.dtype, channels_last: bool, augment: bool):
        self.device = torch.device(device)
        self.dtype, self.channels_last = dtype, channels_last
        if dtype not in _DALI_OUTPUT_DTYPE:
            raise ValueError(f"DALI loader: unsupported dtype {dtype}")
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", device_id)
        else:
            # CPU-only mode: device_id=None. (In DALI 2.4, device_id=types.CPU_ONLY_DEVICE_ID on a machine
            # without a GPU fails at build: "You are trying to create a GPU DALI pipeline while CUDA is not
            # available ... set `device_id = None`"; with None an all-CPU graph never touches CUDA.)
            device_id = None
        # Layout: HWC output permuted to NCHW *is* channels_last memory, for free; CHW output is NCHW-contiguous.
        # Either way the layout change is fused into the crop kernel and torch never copies for it.
        layout = "HWC" if channels_last else "CHW"
        self.pipe = cifar_pipeline(
            "gpu" if self.on_gpu else "cpu", augment=augment, dtype=_DALI_OUTPUT_DTYPE[dtype], layout=layout,
            batch_size=batch_size, num_threads=max(1, min(4, os.cpu_count() or 1)), device_id=device_id,
            prefetch_queue_depth=1, seed=0, exec_dynamic=True)
        self.pipe.build()

    def __call__(self, images_hwc_uint8: torch.Tensor, **args: np.ndarray) -> torch.Tensor:
        """Run one batch. `images_hwc_uint8` must be contiguous and stay alive until the output is used
        (no_copy=True: DALI reads it in place); the callers keep it referenced until the next step."""
        if self.on_gpu:
            stream = torch.cuda.current_stream(self.device)
            # The batch was written on torch's current stream: DALI waits on that stream before reading.
            self.pipe.feed_input("images", images_hwc_uint8, cuda_stream=stream)
        else:
            stream = None
            # A CPU torch tensor goes in as a numpy view (zero-copy): for torch tensors DALI 2.4's feed_input
            # looks up torch.cuda.current_stream() even for CPU data, which fails without a GPU.
            self.pipe.feed_input("images", images_hwc_uint8.numpy())
        for name, value in args.items():
            self.pipe.feed_input(name, value)
        (out,) = self.pipe.run(stream) if stream is not None else self.pipe.run()
        batch = self._to_torch(out)
        if self.channels_last:
            batch = batch.permute(0, 3, 1, 2)  # (B, H, W, C) contiguous == NCHW in channels_last memory
        if batch.dtype != self.dtype:
            batch = batch.to(self.dtype)  # bfloat16 only; .to keeps the channels_last strides
        return batch

    def _to_torch(self, out) -> torch.Tensor:
        # Every sample has the same shape, so the TensorList is a dense tensor and as_tensor() is a view of it
        # (DALI's own PyTorch iterator does the same). Zero-copy: with the default (dynamic) executor DALI's
        # output buffers are not recycled by later iterations, and the DLPack capsule hands ownership of the
        # buffer to the torch tensor. On CUDA, torch.from_dlpack passes torch's current stream to __dlpack__.
        if self.on_gpu:
            with torch.cuda.device(self.device):
                return torch.from_dlpack(out.as_tensor())
        return torch.from_dlpack(out.as_tensor())


class DaliTrainLoader:
    """`--loader dali`: uint8 set padded and moved to the device once; DALI crops/flips/normalises/casts."""

    name = "dali"

    def __init__(self, images, labels, *, batch_size, device, dtype=torch.float32, channels_last=False, seed=0,
                 rank=0, world_size=1):
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(f"DALI loader expects (N, {SIZE}, {SIZE}, 3) uint8 images, got {images.shape}")
        self.runner = _DaliRunner(device, batch_size, dtype, channels_last, augment=True)
        self.device = self.runner.device
        n = len(images)
        raw = torch.from_numpy(images).to(self.device)  # the one host-to-device transfer of the set
        self.padded = torch.zeros((n, SIZE + 2 * PAD, SIZE + 2 * PAD, 3), dtype=torch.uint8, device=self.device)
        self.padded[:, PAD:PAD + SIZE, PAD:PAD + SIZE] = raw
        del raw
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.batch_size, self.dtype, self.channels_last = batch_size, dtype, channels_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def __len__(self) -> int:
        return shard_size(len(self.labels), self.rank, self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_plan(self, epoch: int):
        """(order, crop offsets y, x in 0..8, mirror flags) of this rank for `epoch`, from epoch_seed alone."""
        rng = np.random.default_rng(epoch_seed(self.seed, epoch))
        n = len(self.labels)
        order = rng.permutation(n)
        offsets = rng.integers(0, NUM_OFFSETS, size=(2, n))
        mirror = rng.integers(0, 2, size=n, dtype=np.int32)
        shard = slice(self.rank, None, self.world_size)
        # contiguous copies: DALI rejects strided numpy inputs ("Strided data not supported")
        return tuple(np.ascontiguousarray(a[shard]) for a in (order, offsets[0], offsets[1], mirror))

    def __iter__(self):
        order, off_y, off_x, mirror = self.epoch_plan(self.epoch)
        order_dev = torch.from_numpy(order).to(self.device)
        # crop_pos k/8 with k in 0..8: exact in float32, and k/8 * (40 - 32) == k.
        pos_y = (off_y / (NUM_OFFSETS - 1)).astype(np.float32)
        pos_x = (off_x / (NUM_OFFSETS - 1)).astype(np.float32)
        b = self.batch_size
        for step in range(len(self)):
            window = slice(step * b, (step + 1) * b)
            index = order_dev[window]
            batch_uint8 = self.padded[index]  # gathered on the device, contiguous; DALI reads it in place
            images = self.runner(batch_uint8, crop_pos_x=pos_x[window], crop_pos_y=pos_y[window],
                                 mirror=mirror[window])
            yield images, self.labels[index]


class DaliEvalLoader:
    """The test set normalised by the same DALI graph (no crop, no flip), in order; last batch padded with -100."""

    name = "dali"

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, rank=0,
                 world_size=1):
        images = np.ascontiguousarray(np.asarray(images, dtype=np.uint8)[rank::world_size])
        labels = np.asarray(labels, dtype=np.int64)[rank::world_size]
        self.runner = _DaliRunner(device, batch_size, dtype, channels_last, augment=False)
        self.device = self.runner.device
        self.num_images = len(labels)
        self.images = torch.from_numpy(images).to(self.device)  # (N, 32, 32, 3) uint8, moved once
        self.labels = torch.from_numpy(labels).to(self.device)
        self.batch_size, self.dtype, self.channels_last = batch_size, dtype, channels_last

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        # contiguous slices (the padded last batch is a fresh tensor): fed to DALI without a copy
        for images, labels in eval_batches(self.images, self.labels, self.batch_size):
            yield self.runner(images), labels
