"""The DALI loaders: one crop/flip/normalise/cutout graph, run on the GPU ("gpu") or in DALI's CPU-only mode ("cpu").

Data flow (train, one step):

  uint8 train set, zero-padded to (32+2p)^2 HWC, resident on the torch device (moved there once)
    -> torch gathers the step's B images on the device, on torch's current stream: padded[index]   (B, H, W, 3)
    -> feed_input(cuda_stream=torch's stream): DALI copies the batch into its own buffer ON THAT STREAM
    -> fn.crop_mirror_normalize(crop 32x32 at crop_pos = k/2p, mirror, mean/std, dtype, layout)  one fused kernel
    -> fn.erase (cutout, when configured): the plan's boxes filled with 0, the normalised mean colour
    -> schedule_run(); later outputs(torch's stream) + DLPack: the output is bound to torch's stream and handed
       over without a copy.

Input ordering, and why a copy: DALI's external_source documents that with no_copy=True the user must keep GPU
memory valid and ordered, and DALI's kernels run on DALI's own stream: nothing orders them after torch's gather,
so on a busy GPU the crop could read the buffer before the gather wrote it (or after the caching allocator
recycled it) and images would silently disagree with their labels. With no_copy=False and cuda_stream set,
DALI's copy is enqueued on torch's stream itself, after the gather, and DALI orders its own work after that
copy; once the copy is queued the torch buffer may be freed, since torch's allocator only reuses it for work
queued later on the same stream. The copy is 128 x 40 x 40 x 3 = 0.6 MB per step at batch 128: noise next to
the step's ~0.4 TFLOP. (The alternative, a CUDA event recorded on torch's stream for DALI to wait on, has no
public DALI API for the wait.) The output side is ordered by outputs(stream): DALI makes torch's stream wait
for the iteration's work at that call, and torch.from_dlpack consumes the outputs on it.

Why pad first: DALI places a crop window at crop_pos * (W - crop_W). On the (32+2p)-square padded copy,
crop_pos = k/2p gives exactly the integer offsets 0..2p of torchvision's RandomCrop(32, padding=p) (checked for
p = 1..8), and since the zeros are padded in pixel space before normalisation, a padded pixel comes out as
(0 - mean)/std, as in torchvision.

Overlap: the train loader schedules one batch ahead. When batch N is handed over, its outputs were just taken
(outputs(stream): torch's stream waits for DALI's work on N from here on, i.e. after step N-1) and batch N+1 is
already gathered, fed and scheduled (schedule_run, no output taken). So the host's per-step DALI work happens
while the GPU still runs earlier steps, and DALI's kernels for N+1 run on DALI's stream alongside step N: torch's
stream is made to wait for them only when N+1 is handed over, after step N was queued. (Taking N+1's outputs
before step N is queued, as run() does, would put that wait in front of step N: no overlap on the GPU.) An
iteration scheduled but never taken (an epoch abandoned mid-way) is taken and dropped before the next one is
scheduled, so it never reaches the next epoch. The batches and their order are unchanged.

Start-up probe: each loader pushes one batch through feed -> schedule -> outputs -> DLPack -> sync when it is
made, so a DALI that builds but cannot run here (a driver too old for the wheel, an allocation failure) fails at
once, where the trainer can fall back to the torch loader (--loader auto) or stop with one message (--loader
dali), and never in the middle of the first epoch.

Randomness: the epoch plan (plan.py) is drawn on the host from (seed, epoch) and fed as per-sample argument
inputs (DALI wants argument inputs in CPU memory even for a GPU operator, and they are a few numbers per image),
so the DALI and torch loaders produce the same batches. DALI's own fn.random ops are not used: their state
belongs to the built pipeline, so they could not be a function of (seed, epoch) without rebuilding it every
epoch, and their draws would differ between backends.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from fastcifar.data.augment import CIFAR_MEAN, CIFAR_STD, DEFAULT_AUGMENT, SIZE, AugmentSpec
from fastcifar.data.plan import EpochPlan, PlannedTrainLoader, eval_batches, eval_shard

# crop_mirror_normalize supports FLOAT, FLOAT16, INT8 and UINT8 outputs (DALI 2.4 has no BFLOAT16 type at all):
# for bfloat16 DALI outputs float32 and torch casts it (one extra elementwise kernel on the device).
_DALI_OUTPUT_DTYPE = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}


@pipeline_def
def cifar_pipeline(device: str, *, crop: bool, flip: bool, cutout: bool, dtype, layout: str, mean=CIFAR_MEAN,
                   std=CIFAR_STD):
    """The whole graph; `device` ("gpu" or "cpu") is the only thing that differs between the two backends.

    crop: a 32x32 window of the padded input at fed crop positions (otherwise the input is 32x32); flip: fed
    mirror flags; cutout: fed boxes erased after normalisation. All off: normalisation only (the test set).
    mean/std are in pixel units: (x - 255*mean) / (255*std) == (x/255 - mean)/std.
    """
    images = fn.external_source(name="images", device=device, layout="HWC", dtype=types.UINT8, ndim=3)

    def fed(name, dtype, ndim=0):
        return fn.external_source(name=name, device="cpu", dtype=dtype, ndim=ndim)

    crop_args = {}
    if crop:
        crop_args = dict(crop=(SIZE, SIZE), crop_pos_x=fed("crop_pos_x", types.FLOAT),
                         crop_pos_y=fed("crop_pos_y", types.FLOAT))
    if flip:
        crop_args["mirror"] = fed("mirror", types.INT32)
    out = fn.crop_mirror_normalize(images, device=device, dtype=dtype, output_layout=layout,
                                   mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                   **crop_args)
    if cutout:
        out = fn.erase(out, device=device, anchor=fed("cutout_anchor", types.FLOAT, 1),
                       shape=fed("cutout_shape", types.FLOAT, 1), axis_names="HW", fill_value=0.0)
    return out


class _DaliRunner:
    """One built pipeline plus the conversions at its two ends (torch uint8 batch in, torch float batch out)."""

    def __init__(self, device, batch_size: int, dtype: torch.dtype, channels_last: bool, spec: AugmentSpec | None,
                 mean=CIFAR_MEAN, std=CIFAR_STD):
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
            "gpu" if self.on_gpu else "cpu", crop=bool(spec and spec.pad), flip=bool(spec and spec.flip),
            cutout=bool(spec and spec.cutout), dtype=_DALI_OUTPUT_DTYPE[dtype], mean=mean, std=std,
            layout=layout, batch_size=batch_size, num_threads=max(1, min(4, os.cpu_count() or 1)),
            device_id=device_id, prefetch_queue_depth=1, seed=0, exec_dynamic=True)
        self.pipe.build()
        self.pending = False  # an iteration scheduled and not yet collected

    def __call__(self, images_hwc_uint8: torch.Tensor, **args: np.ndarray) -> torch.Tensor:
        """Run one batch now (evaluation, the start-up probe)."""
        self.submit(images_hwc_uint8, **args)
        return self.collect()

    def submit(self, images_hwc_uint8: torch.Tensor, **args: np.ndarray) -> None:
        """Feed one batch and schedule its iteration; collect() hands it over. DALI copies `images_hwc_uint8` (see
        the module docstring), so it may be freed after. An iteration still pending is taken and dropped first."""
        if self.pending:  # an abandoned epoch's batch: taken from DALI and dropped, never converted
            self.pipe.outputs()
            self.pending = False
        if self.on_gpu:
            stream = torch.cuda.current_stream(self.device)
            self.pipe.feed_input("images", images_hwc_uint8, cuda_stream=stream)  # copied on torch's stream
        else:
            # A CPU torch tensor goes in as a numpy view: for torch tensors DALI 2.4's feed_input looks up
            # torch.cuda.current_stream() even for CPU data, which fails without a GPU.
            self.pipe.feed_input("images", images_hwc_uint8.numpy())
        for name, value in args.items():
            self.pipe.feed_input(name, value)
        self.pipe.schedule_run()
        self.pending = True

    def collect(self) -> torch.Tensor:
        """The scheduled batch, bound to torch's current stream (on the CPU: host-synchronous)."""
        self.pending = False
        (out,) = self.pipe.outputs(torch.cuda.current_stream(self.device) if self.on_gpu else None)
        batch = self._to_torch(out)
        if self.channels_last:
            batch = batch.permute(0, 3, 1, 2)  # (B, H, W, C) contiguous == NCHW in channels_last memory
        if batch.dtype != self.dtype:
            batch = batch.to(self.dtype)  # bfloat16 only; .to keeps the channels_last strides
        return batch

    def probe(self, images_hwc_uint8: torch.Tensor, spec: AugmentSpec | None) -> None:
        """One batch through feed -> schedule -> outputs -> DLPack, waited for: raises whatever stops DALI from
        running here. The cutout box is 1 x 1, as real boxes are at least (an empty erase region is untested
        on the GPU)."""
        n = len(images_hwc_uint8)
        args = {}
        if spec and spec.pad:
            args["crop_pos_x"] = args["crop_pos_y"] = np.zeros(n, dtype=np.float32)
        if spec and spec.flip:
            args["mirror"] = np.zeros(n, dtype=np.int32)
        if spec and spec.cutout:
            args["cutout_anchor"] = np.zeros((n, 2), dtype=np.float32)
            args["cutout_shape"] = np.ones((n, 2), dtype=np.float32)
        batch = self(images_hwc_uint8, **args)
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        if batch.shape != (n, 3, SIZE, SIZE):
            raise RuntimeError(f"DALI start-up check: a batch came out as {tuple(batch.shape)}")

    def _to_torch(self, out) -> torch.Tensor:
        # Every sample has the same shape, so the TensorList is a dense tensor and as_tensor() is a view of it
        # (DALI's own PyTorch iterator does the same). Zero-copy: with the dynamic executor DALI's output buffers
        # are not recycled by later iterations, and the DLPack capsule hands ownership of the buffer to the torch
        # tensor. On CUDA, torch.from_dlpack passes torch's current stream to __dlpack__.
        if self.on_gpu:
            with torch.cuda.device(self.device):
                return torch.from_dlpack(out.as_tensor())
        return torch.from_dlpack(out.as_tensor())


class DaliTrainLoader(PlannedTrainLoader):
    """`--loader dali`: uint8 set padded and moved to the device once; DALI crops/flips/normalises/casts/erases."""

    name = "dali"

    def __init__(self, images, labels, *, batch_size, device, dtype=torch.float32, channels_last=False, seed=0,
                 rank=0, world_size=1, augment: AugmentSpec = DEFAULT_AUGMENT, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(len(labels), batch_size, augment, seed, rank, world_size)
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(f"DALI loader expects (N, {SIZE}, {SIZE}, 3) uint8 images, got {images.shape}")
        self.runner = _DaliRunner(device, batch_size, dtype, channels_last, augment, mean, std)
        self.device = self.runner.device
        p = augment.pad
        raw = torch.from_numpy(images).to(self.device)  # the one host-to-device transfer of the set
        self.padded = torch.zeros((len(images), SIZE + 2 * p, SIZE + 2 * p, 3), dtype=torch.uint8, device=self.device)
        self.padded[:, p:p + SIZE, p:p + SIZE] = raw
        del raw
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.dtype, self.channels_last = dtype, channels_last
        self.runner.probe(self.padded[torch.arange(batch_size, device=self.device) % len(images)], augment)

    def _batches(self, plan: EpochPlan):
        order_dev = torch.from_numpy(plan.order).to(self.device)
        args = {}
        if self.spec.pad:  # crop_pos k/2p: k/2p * 2p == k for the crop offsets 0..2p
            args["crop_pos_y"] = (plan.offset_y / (2 * self.spec.pad)).astype(np.float32)
            args["crop_pos_x"] = (plan.offset_x / (2 * self.spec.pad)).astype(np.float32)
        if self.spec.flip:
            args["mirror"] = plan.flip
        if plan.boxes is not None:
            args["cutout_anchor"] = np.ascontiguousarray(plan.boxes[:, :2], dtype=np.float32)
            args["cutout_shape"] = np.ascontiguousarray(plan.boxes[:, 2:] - plan.boxes[:, :2], dtype=np.float32)
        b = self.batch_size

        def submit(step: int) -> torch.Tensor:
            w = slice(step * b, (step + 1) * b)
            index = order_dev[w]
            self.runner.submit(self.padded[index], **{name: value[w] for name, value in args.items()})
            return self.labels[index]

        labels = submit(0) if len(self) else None
        for step in range(len(self)):
            images = self.runner.collect()  # torch's stream waits for it from here: after step - 1 was queued
            following = submit(step + 1) if step + 1 < len(self) else None  # overlaps the step about to run
            yield images, labels
            labels = following


class DaliEvalLoader:
    """The test set normalised by the same DALI graph (no crop, no flip), in order; last batch padded with -100."""

    name = "dali"

    def __init__(self, images, labels, batch_size, device, dtype=torch.float32, channels_last=False, rank=0,
                 world_size=1, mean=CIFAR_MEAN, std=CIFAR_STD):
        images, labels = eval_shard(images, labels, rank, world_size)
        self.runner = _DaliRunner(device, batch_size, dtype, channels_last, None, mean, std)
        self.device = self.runner.device
        self.num_images = len(labels)
        self.images = torch.from_numpy(images).to(self.device)  # (N, 32, 32, 3) uint8, moved once
        self.labels = torch.from_numpy(labels).to(self.device)
        self.batch_size, self.dtype, self.channels_last = batch_size, dtype, channels_last
        self.runner.probe(next(eval_batches(self.images, self.labels, self.batch_size))[0], None)

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        for images, labels in eval_batches(self.images, self.labels, self.batch_size):
            yield self.runner(images), labels

