"""The three train loaders (torch, torchvision, dali) and the two eval loaders, checked against the torch reference.

Everything runs on the CPU (DALI in its CPU-only mode) on small random uint8 sets. Each image gets a unique label
(its index), so every output can be traced back to its source image and matched against the 9 x 9 x 2 legal
RandomCrop(32, padding=4) + horizontal-flip variants of that image, normalised by the reference Normalizer.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fastcifar import FastCifarError
from fastcifar.data import loaders
from fastcifar.data.augment import CIFAR_MEAN, CIFAR_STD, PAD, SIZE, Normalizer, pad_images
from fastcifar.data.loaders import IGNORE_LABEL, make_eval_loader, make_train_loader, resolve_loader, to_nchw_tensor

KINDS = ["torch", "torchvision", "dali"]
SPAN = 2 * PAD + 1  # 9 legal offsets per axis
PATCH = 4  # side of the centre patch used to find the candidate variant
CELLS = SPAN * SPAN * 2  # offset_y x offset_x x flip

# 0.999 quantiles of the chi-square distribution (scipy is not a dependency). Computed once with mpmath:
# findroot(gammainc(df/2, 0, x/2, regularized=True) - 0.999) -> df=1: 10.8276, df=80: 124.8392, df=161: 222.1914.
CHI2_999 = {1: 10.8276, 80: 124.8392, 2 * SPAN * SPAN - 1: 222.1914}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The checks are many small tensor ops: one intra-op thread is several times faster than two on a small,
    shared CPU (oversubscription). Restored afterwards so other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _require(kind: str) -> None:
    if kind == "dali":
        pytest.importorskip("nvidia.dali")


def random_set(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8), np.arange(n, dtype=np.int64)


def train_loader(kind, images, labels, batch_size=64, *, num_workers=0, **kwargs):
    _require(kind)
    return make_train_loader(kind, images, labels, batch_size, "cpu", num_workers=num_workers, **kwargs)


def reference_padded(images: np.ndarray) -> torch.Tensor:
    """(N, 3, 40, 40) float32: the torch reference's normalisation of the zero-padded set (pad = -mean/std)."""
    return Normalizer(CIFAR_MEAN, CIFAR_STD)(pad_images(to_nchw_tensor(images, "cpu")))


def rel_tolerance(dtype: torch.dtype) -> float:
    """One unit in the last place, relative, for the reduced-precision outputs; fp32 gets an absolute 1e-5 only."""
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


def identify(out: torch.Tensor, sources: torch.Tensor, dtype: torch.dtype = torch.float32, chunk: int = 128):
    """Match each output image to the legal crop/flip variant of its own source it equals.

    out: (B, 3, 32, 32) loader output (any dtype / memory format); sources: (B, 3, 40, 40) reference_padded rows.
    Asserts the match is within 1e-5 (+ one ulp of `dtype`) elementwise and unambiguous.
    Returns (off_y, off_x, flip) int64 tensors of shape (B,).
    """
    out = out.float().contiguous()
    found = []
    lo, hi = SIZE // 2 - PATCH // 2, SIZE // 2 + PATCH // 2  # a centre patch never reaches the zero border
    for start in range(0, len(out), chunk):
        o, src = out[start:start + chunk], sources[start:start + chunk]
        # The candidate: the variant whose centre patch (channel 0) matches; cheap. The full image is then checked
        # elementwise against that variant, so a wrong pick can only fail the test, never pass it.
        patches = src[:, 0, lo:hi + 2 * PAD, lo:hi + 2 * PAD].unfold(1, PATCH, 1).unfold(2, PATCH, 1)  # b,9,9,p,p
        centre = o[:, 0, lo:hi, lo:hi]
        mirrored = o[:, 0, lo:hi, SIZE - hi:SIZE - lo].flip(-1)  # the centre patch of o.flip(-1)
        errors = torch.stack([(patches - centre[:, None, None]).abs().amax(dim=(3, 4)),
                              (patches - mirrored[:, None, None]).abs().amax(dim=(3, 4))], dim=-1)
        best = errors.reshape(len(o), -1).topk(2, largest=False)
        cell = best.indices[:, 0]
        off_y, off_x, flip = cell // (2 * SPAN), (cell // 2) % SPAN, cell % 2
        # Unambiguous: the runner-up is far off (patches of a random image at different places differ by ~1).
        assert (best.values[:, 1] > 0.1).all()
        windows = src.unfold(2, SIZE, 1).unfold(3, SIZE, 1)  # (b, 3, 9, 9, 32, 32) view
        ref = windows[torch.arange(len(o)), :, off_y, off_x]  # (b, 3, 32, 32): the identified crop
        ref = torch.where(flip.bool()[:, None, None, None], ref.flip(-1), ref)
        err = (o - ref).abs()
        bound = 1e-5 + rel_tolerance(dtype) * ref.abs()
        assert (err <= bound).all(), f"max error {err.max().item():.3g} beyond the {dtype} rounding"
        found.append(torch.stack([off_y, off_x, flip]))
    return tuple(torch.cat(found, dim=1))


def histogram(off_y, off_x, flip) -> np.ndarray:
    counts = np.zeros((SPAN, SPAN, 2), dtype=np.int64)
    np.add.at(counts, (off_y.numpy(), off_x.numpy(), flip.numpy()), 1)
    return counts


def chi2_uniform(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def chi2_homogeneity(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square statistic over the same cells (df = cells - 1)."""
    table = np.stack([a.ravel(), b.ravel()]).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


# --------------------------------------------------------------------------------------------------------------
# Every output is a legal, correctly normalised crop/flip of its own image; shape, dtype and layout are as asked.

@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_are_legal_crops_of_their_own_image(kind, dtype, channels_last):
    images, labels = random_set(128, seed=1)
    reference = reference_padded(images)
    loader = train_loader(kind, images, labels, 32, dtype=dtype, channels_last=channels_last, seed=5)
    loader.set_epoch(3)
    seen = []
    for batch, batch_labels in loader:
        assert batch.shape == (32, 3, SIZE, SIZE) and batch.dtype == dtype and batch.device.type == "cpu"
        assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert batch_labels.dtype == torch.int64 and batch_labels.shape == (32,)
        # labels = source index: the image must be a variant of *that* source (labels stayed with their images)
        seen.append(torch.stack(identify(batch, reference[batch_labels], dtype)))
        seen[-1] = torch.cat([batch_labels[None], seen[-1]])
    assert len(seen) == len(loader) == 4
    if kind == "dali":
        # The DALI loader's fed draws come out exactly: crop_pos k/8 on the 40x40 copy is offset k, mirror is a flip.
        plan = loader.epoch_plan(3)
        got = torch.cat(seen, dim=1).numpy()
        np.testing.assert_array_equal(got, np.stack([plan.order, plan.offset_y, plan.offset_x, plan.flip])[:, :128])


# --------------------------------------------------------------------------------------------------------------
# Distribution: all 81 offsets and both flips, uniform (chi-square), and the same as torchvision's transforms.

DRAW_IMAGES, DRAW_EPOCHS = 256, 16  # 4096 draws: ~25 per (offset_y, offset_x, flip) cell


class Moments:
    """Per-pixel mean and variance of the output images, accumulated in float64."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, torch.zeros(3, SIZE, SIZE, dtype=torch.float64), 0.0

    def add(self, batch):
        batch = batch.double()
        self.n, self.sum, self.sumsq = self.n + len(batch), self.sum + batch.sum(0), self.sumsq + (batch ** 2).sum(0)

    def result(self):
        mean = self.sum / self.n
        return mean, self.sumsq / self.n - mean ** 2


@functools.lru_cache(maxsize=None)
def loader_draws(kind: str):
    """(histogram, per-pixel mean, per-pixel variance of the output) over DRAW_EPOCHS epochs of a DRAW_IMAGES set."""
    images, labels = random_set(DRAW_IMAGES, seed=2)
    reference = reference_padded(images)
    torch.manual_seed(0)  # torchvision with num_workers=0 draws from the global RNG
    loader = train_loader(kind, images, labels, 128, seed=11)
    counts, moments = np.zeros((SPAN, SPAN, 2), dtype=np.int64), Moments()
    for epoch in range(DRAW_EPOCHS):
        loader.set_epoch(epoch)
        for batch, batch_labels in loader:
            counts += histogram(*identify(batch, reference[batch_labels]))
            moments.add(batch)
    return counts, *moments.result()


@functools.lru_cache(maxsize=None)
def torchvision_transform_draws():
    """The same statistics straight from torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip."""
    import torchvision.transforms as T
    from PIL import Image

    images, _ = random_set(DRAW_IMAGES, seed=2)
    reference = reference_padded(images)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    pil = [Image.fromarray(image) for image in images]
    torch.manual_seed(1234)
    counts, moments = np.zeros((SPAN, SPAN, 2), dtype=np.int64), Moments()
    for _ in range(DRAW_EPOCHS):
        batch = torch.stack([transform(p) for p in pil])
        counts += histogram(*identify(batch, reference))
        moments.add(batch)
    return counts, *moments.result()


@pytest.mark.parametrize("kind", KINDS)
def test_offsets_and_flips_are_uniform(kind):
    _require(kind)
    counts = loader_draws(kind)[0]
    assert counts.sum() == DRAW_IMAGES * DRAW_EPOCHS
    assert (counts > 0).all(), "some (offset_y, offset_x, flip) never occurred"
    assert chi2_uniform(counts) < CHI2_999[counts.size - 1]
    assert chi2_uniform(counts.sum(2)) < CHI2_999[SPAN * SPAN - 1]  # the 81 offsets
    assert chi2_uniform(counts.sum((0, 1))) < CHI2_999[1]  # the flip


def test_torchvision_transform_reference_is_uniform():
    counts = torchvision_transform_draws()[0]
    assert (counts > 0).all() and chi2_uniform(counts) < CHI2_999[counts.size - 1]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torchvision_statistically(kind):
    """Same offset/flip distribution as torchvision's own transforms (two-sample chi-square), and the same mean
    image over all draws: padding, flip direction and normalisation would all show up in the mean's border."""
    _require(kind)
    counts, mean, var = loader_draws(kind)
    ref_counts, ref_mean, ref_var = torchvision_transform_draws()
    assert chi2_homogeneity(counts, ref_counts) < CHI2_999[counts.size - 1]
    # Per-pixel two-sample z-scores of the mean image. Over 3072 pixels a |z| above 5.5 has probability below
    # 3072 * 3.8e-8 ~ 1e-4 (union bound). A wrong pad value would move the border means by ~1 (z ~ 30),
    # a wrong normalisation every pixel.
    z = (mean - ref_mean) / ((var + ref_var) / (DRAW_IMAGES * DRAW_EPOCHS)).sqrt()
    assert z.abs().max().item() < 5.5
    assert torch.allclose(var.sqrt(), ref_var.sqrt(), atol=0.1)  # same spread: the scale of the normalisation


@pytest.mark.parametrize("kind", KINDS)
def test_padded_pixels_are_minus_mean_over_std(kind):
    images = np.full((64, SIZE, SIZE, 3), 200, dtype=np.uint8)
    labels = np.arange(64)
    pad_value = -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)
    image_value = (200 / 255 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    torch.manual_seed(0)
    loader = train_loader(kind, images, labels, 64, seed=3)
    padded = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch, _ in loader:
            batch = batch.float()
            is_pad = (batch - pad_value.view(1, 3, 1, 1)).abs() <= 1e-5
            is_image = (batch - image_value.view(1, 3, 1, 1)).abs() <= 1e-5
            assert (is_pad | is_image).all()
            padded.append(is_pad.float().mean().item())
    # E[padded fraction] = 1 - (32 - E|offset - 4|)^2 / 32^2 with E|offset - 4| = 20/9
    assert np.mean(padded) == pytest.approx(1 - (SIZE - 20 / 9) ** 2 / SIZE ** 2, abs=0.02)


# --------------------------------------------------------------------------------------------------------------
# Epoch coverage, sharding, seeding.

@pytest.mark.parametrize("kind", KINDS)
def test_one_epoch_yields_each_index_once(kind):
    images, labels = random_set(256)
    loader = train_loader(kind, images, labels, 32, seed=7)
    seen = torch.cat([batch_labels for _, batch_labels in loader])
    assert len(loader) == 8 and sorted(seen.tolist()) == list(range(256))

    # drop-last: 200 images at batch 32 -> 6 full batches, 192 distinct indices, none twice
    images, labels = random_set(200)
    loader = train_loader(kind, images, labels, 32, seed=7)
    seen = torch.cat([batch_labels for _, batch_labels in loader]).tolist()
    assert len(loader) == 6 and len(seen) == len(set(seen)) == 6 * 32 and set(seen) <= set(range(200))


@pytest.mark.parametrize("kind", KINDS)
def test_shards_partition_the_epoch(kind):
    images, labels = random_set(256)
    shards = []
    for rank in range(2):
        loader = train_loader(kind, images, labels, 32, seed=7, rank=rank, world_size=2)
        loader.set_epoch(1)
        assert len(loader) == 4
        shards.append(set(torch.cat([batch_labels for _, batch_labels in loader]).tolist()))
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(256))


@pytest.mark.parametrize("kind", KINDS)
def test_uneven_shards_take_the_same_number_of_steps_on_every_rank(kind):
    """65 images on 2 ranks: shards of 33 and 32; at batch 11 both must take 2 steps, or DDP would hang."""
    images, labels = random_set(65)
    counts = []
    for rank in range(2):
        loader = train_loader(kind, images, labels, 11, seed=7, rank=rank, world_size=2)
        counts.append((len(loader), sum(1 for _ in loader)))
    assert counts == [(2, 2), (2, 2)]


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("kind", KINDS)
def test_seed_and_epoch_alone_determine_the_batches(kind):
    images, labels = random_set(96)
    workers = 2 if kind == "torchvision" else 0  # worker seeding; no-worker seeding is tested below
    first = train_loader(kind, images, labels, 32, seed=9, num_workers=workers)
    second = train_loader(kind, images, labels, 32, seed=9, num_workers=workers)
    _epoch(second, 0)  # a different history must not matter
    a, b = _epoch(first, 4), _epoch(second, 4)
    assert len(a) == len(b) == 3
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
    other_epoch = _epoch(first, 5)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, other_epoch)), "epochs 4 and 5 share their order"
    other_seed = _epoch(train_loader(kind, images, labels, 32, seed=10, num_workers=workers), 4)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, other_seed)), "seeds 9 and 10 share their order"


def test_torchvision_without_workers_is_reproducible():
    """Without workers the transforms run in-process on torch's global RNG: the loader seeds a forked copy."""
    images, labels = random_set(64)
    loader = train_loader("torchvision", images, labels, 32, seed=9, num_workers=0)
    torch.manual_seed(1)
    a = _epoch(loader, 2)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = _epoch(loader, 2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is left as it was


def test_dali_batches_stay_valid_after_later_steps():
    """The DALI outputs reach torch zero-copy through DLPack; later pipeline runs must not overwrite them."""
    _require("dali")
    images, labels = random_set(256)
    loader = train_loader("dali", images, labels, 32, seed=1)
    batches = list(loader)
    again = _epoch(train_loader("dali", images, labels, 32, seed=1), 0)
    for (images_a, labels_a), (images_b, labels_b) in zip(batches, again):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert len({batch.data_ptr() for batch, _ in batches}) == len(batches)


# --------------------------------------------------------------------------------------------------------------
# Eval loaders: normalised only, in order, last batch padded with IGNORE_LABEL.

@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True),
                                                 (torch.float16, False)])
@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_eval_batches_are_unaugmented_in_order_and_padded(kind, dtype, channels_last):
    _require(kind)
    images, labels = random_set(100, seed=4)
    expected = Normalizer(CIFAR_MEAN, CIFAR_STD)(to_nchw_tensor(images, "cpu"))
    for rank, world_size in [(0, 1), (1, 2)]:
        loader = make_eval_loader(kind, images, labels, 32, "cpu", dtype, channels_last, rank, world_size)
        batches = list(loader)
        n = len(range(rank, 100, world_size))
        assert len(loader) == len(batches) == -(-n // 32)
        for batch, batch_labels in batches:
            assert batch.shape == (32, 3, SIZE, SIZE) and batch.dtype == dtype
            assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        got_images = torch.cat([batch for batch, _ in batches]).float()
        got_labels = torch.cat([batch_labels for _, batch_labels in batches])
        want = expected[rank::world_size]
        assert torch.equal(got_labels[:n], torch.from_numpy(labels[rank::world_size]))
        assert (got_labels[n:] == IGNORE_LABEL).all() and len(got_labels) - n == len(batches) * 32 - n
        err = (got_images[:n] - want).abs()
        assert (err <= 1e-5 + rel_tolerance(dtype) * want.abs()).all()


# --------------------------------------------------------------------------------------------------------------

def test_resolve_loader_dali_without_dali_is_an_error(monkeypatch):
    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    with pytest.raises(FastCifarError, match="DALI"):
        resolve_loader("dali", torch.device("cpu"))
    kind, notice = resolve_loader("auto", torch.device("cuda"))
    assert kind == "torch" and "not installed" in notice


# --------------------------------------------------------------------------------------------------------------
# Augmentation as configuration: every loader applies the same epoch plan, cutout included.

def plan_reference(images: np.ndarray, plan, n: int, pad: int) -> torch.Tensor:
    """What the plan says the first n outputs are: the crop/flip of each padded source, then the cutout box.
    The reference is padded by PAD: a crop offset k at padding `pad` is offset k + PAD - pad there."""
    reference = reference_padded(images)
    windows = reference[plan.order[:n]].unfold(2, SIZE, 1).unfold(3, SIZE, 1)  # (n, 3, 9, 9, 32, 32)
    shift = PAD - pad
    out = windows[torch.arange(n), :, plan.offset_y[:n] + shift, plan.offset_x[:n] + shift]
    out = torch.where(torch.from_numpy(plan.flip[:n]).bool()[:, None, None, None], out.flip(-1), out)
    if plan.boxes is not None:
        for i, (y0, x0, y1, x1) in enumerate(plan.boxes[:n]):
            out[i, :, y0:y1, x0:x1] = 0.0
    return out


@pytest.mark.parametrize("spec", ["crop,flip", "crop,flip,cutout=8", "crop=2,cutout=12", "flip", "none"])
def test_every_loader_gives_the_same_batches_for_one_seed(spec):
    """torch, DALI and torchvision draw nothing themselves: they apply the (seed, epoch) plan. Same images, same
    order, same crops, flips and cutout boxes; the normalisation arithmetic may differ in the last bit."""
    from fastcifar.data.augment import parse_augment

    images, labels = random_set(96, seed=6)
    outputs = {}
    for kind in KINDS:
        if kind == "dali" and not loaders.dali_available():
            continue
        loader = train_loader(kind, images, labels, 32, seed=4, augment=parse_augment(spec), channels_last=True)
        outputs[kind] = _epoch(loader, 3)
    plan = train_loader("torch", images, labels, 32, seed=4, augment=parse_augment(spec)).epoch_plan(3)
    want = plan_reference(images, plan, 96, parse_augment(spec).pad)
    for kind, batches in outputs.items():
        got = torch.cat([b for b, _ in batches]).float()
        assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(plan.order[:96])), kind
        assert (got - want).abs().max().item() <= 1e-5, kind


def cutout_boxes(batch: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """The erased square of each output image, read from the image: a normalised pixel is exactly 0 only where
    cutout wrote it (x/255 == mean has no uint8 solution)."""
    boxes = []
    for image in batch.float():
        zero = (image == 0).all(0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        y0, y1, x0, x1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        assert zero[y0:y1, x0:x1].all() and zero.sum().item() == (y1 - y0) * (x1 - x0)  # one solid rectangle
        boxes.append((y0, x0, y1, x1))
    return boxes


@pytest.mark.parametrize("kind", KINDS)
def test_cutout_squares_are_legal_and_their_centres_uniform(kind):
    """Each cutout is an 8x8 square clipped at the border; centres uniform over the 32x32 image (chi-square on
    each axis, df 31: 0.999 quantile 61.10), and the crop under it is still a legal crop of the image's source."""
    from fastcifar.data.augment import parse_augment

    _require(kind)
    images, labels = random_set(256, seed=8)
    loader = train_loader(kind, images, labels, 128, seed=2, augment=parse_augment("crop,flip,cutout=8"))
    centres = np.zeros((2, SIZE), dtype=np.int64)
    for epoch in range(8):
        for batch, batch_labels in _epoch(loader, epoch):
            for (y0, x0, y1, x1) in cutout_boxes(batch):
                assert y1 - y0 <= 8 and x1 - x0 <= 8 and (y1 - y0 == 8 or y0 == 0 or y1 == SIZE)
                cy = y0 + 4 if y0 > 0 else y1 - 4
                cx = x0 + 4 if x0 > 0 else x1 - 4
                centres[0, cy] += 1
                centres[1, cx] += 1
    assert chi2_uniform(centres[0]) < 61.10 and chi2_uniform(centres[1]) < 61.10


def _kernels_per_epoch(spec: str, num_images: int) -> int:
    """How many tensor kernels (views not counted) one epoch of the torch loader launches, batch 32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastcifar.data.augment import parse_augment

    class Count(TorchDispatchMode):
        kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.kernels += not func.is_view
            return func(*args, **(kwargs or {}))

    images, labels = random_set(num_images, seed=3)
    loader = train_loader("torch", images, labels, 32, augment=parse_augment(spec), channels_last=True)
    with Count() as count:
        _epoch(loader, 0)
    return count.kernels


def test_torch_cutout_is_two_kernels_per_batch():
    """Cutout in the torch loader: the boxes become row/column masks once per epoch, and a batch then costs one
    broadcast (its mask) and one multiply, on any device; no per-image loop, no mask built from ten small ops."""
    per_epoch = {n: _kernels_per_epoch("crop,flip,cutout=8", n) - _kernels_per_epoch("crop,flip", n)
                 for n in (256, 512)}  # 8 and 16 batches
    assert (per_epoch[512] - per_epoch[256]) / 8 == 2
    assert per_epoch[256] - 8 * 2 <= 8  # the epoch's row/column masks


# --------------------------------------------------------------------------------------------------------------
# On a GPU kept busy: the DALI hand-off (input copied on torch's stream, output bound to it) and the torch loader
# must still give each label its own image. Skipped without CUDA; run by benchmarks/gpu_evidence.sh.

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_evidence.sh)")
@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_batches_stay_correct_on_a_busy_gpu(kind):
    from fastcifar.data.augment import parse_augment

    _require(kind)
    images, labels = random_set(1024, seed=9)
    loader = make_train_loader(kind, images, labels, 128, "cuda", torch.bfloat16, True, seed=3,
                               augment=parse_augment("crop,flip"))
    busy = torch.randn(4096, 4096, device="cuda")
    reference = reference_padded(images)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = iter(loader)
        while True:
            for _ in range(8):  # ~tens of ms of matmuls queued on torch's stream before every step
                busy = (busy @ busy).tanh_()
            try:
                batch, batch_labels = next(batches)
            except StopIteration:
                break
            batch, batch_labels = batch.cpu(), batch_labels.cpu()
            identify(batch, reference[batch_labels], torch.bfloat16)  # asserts each image is a legal variant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_evidence.sh)")
@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_fp32_batches_kept_on_a_busy_gpu_unsynchronised_stay_correct(kind):
    """The test above syncs after every batch (.cpu()), which hides an output-buffer race: a buffer that a later
    step overwrites (or the allocator hands out again) before the consumer read it. Here a whole epoch's fp32
    batches stay on the device, with matmuls queued between steps and nothing synchronised, and every batch is
    checked only after the epoch against what the epoch plan says each image is (cutout included)."""
    from fastcifar.data.augment import parse_augment

    _require(kind)
    images, labels = random_set(1024, seed=10)
    loader = make_train_loader(kind, images, labels, 128, "cuda", torch.float32, True, seed=5,
                               augment=parse_augment("crop,flip,cutout=8"))
    busy = torch.randn(4096, 4096, device="cuda")
    for epoch in range(2):
        loader.set_epoch(epoch)
        kept = []
        for batch, batch_labels in loader:
            for _ in range(4):  # work queued on torch's stream between the steps, as a training step would
                busy = (busy @ busy).tanh_()
            kept.append((batch, batch_labels))
        want = plan_reference(images, loader.epoch_plan(epoch), len(kept) * 128, PAD)
        got = torch.cat([b for b, _ in kept]).float().cpu()
        assert torch.equal(torch.cat([y for _, y in kept]).cpu(), torch.from_numpy(labels[loader.epoch_plan(
            epoch).order[:len(got)]]))
        assert (got - want).abs().max().item() <= 1e-5


def _start_where_dali_fails(asked: str, match: str) -> list[str] | None:
    """Build a session as on a CUDA machine where auto picks DALI, with DALI made to fail by the caller: --loader
    dali must be one error matching `match`; auto falls back to the torch loader, and its notices are returned."""
    from fastcifar import FastCifarError
    from fastcifar.config import build_config, resolve
    from fastcifar.data.cifar import load_dataset
    from fastcifar.distributed import DistInfo
    from fastcifar.train import build_session

    cfg = build_config(dataset="synthetic", synthetic_size=32, batch_size=8, wandb="off", loader=asked)
    res = resolve(cfg)
    res.loader = "dali"  # what auto resolves to on a CUDA machine where DALI imports
    notices = []
    ds = load_dataset("synthetic", synthetic_size=32)
    if asked == "dali":
        with pytest.raises(FastCifarError, match=match):
            build_session(cfg, DistInfo(), ds, res, notice=notices.append)
        return None
    s = build_session(cfg, DistInfo(), ds, res, notice=notices.append)
    assert res.loader == "torch" and type(s.train_loader).__name__ == "TorchTrainLoader"
    return notices


@pytest.mark.parametrize("asked", ["auto", "dali"])
def test_dali_that_imports_but_cannot_start_falls_back_under_auto_and_is_one_error_when_asked(asked, monkeypatch):
    """E.g. a DALI wheel built for a newer CUDA than the driver: `import nvidia.dali` works, building fails."""
    from fastcifar.data import dali

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(dali, "DaliTrainLoader", broken)
    notices = _start_where_dali_fails(asked, "--loader dali: DALI failed to start .*driver version")
    if asked == "auto":
        assert notices == ["loader: torch (GPU-resident torch ops), not DALI: DALI failed to start (RuntimeError: "
                           "CUDA driver version is insufficient for CUDA runtime version)"]


@pytest.mark.parametrize("asked", ["auto", "dali"])
def test_dali_that_builds_but_fails_on_its_first_run_falls_back_at_start_up(asked, monkeypatch):
    """The pipeline builds, then its first run fails (an allocation, the driver): the start-up probe finds it
    when the loaders are made, so auto falls back with one notice and --loader dali is one error, before any
    epoch starts."""
    _require("dali")
    from nvidia.dali.pipeline import Pipeline

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA allocation failed: out of memory")

    monkeypatch.setattr(Pipeline, "schedule_run", broken)
    notices = _start_where_dali_fails(asked, "--loader dali: DALI failed to start .*out of memory")
    if asked == "auto":
        assert len(notices) == 1 and "DALI failed to start (RuntimeError: CUDA allocation failed" in notices[0]


def test_dali_produces_one_batch_ahead_without_changing_the_batches(monkeypatch):
    """Overlap: when batch N is handed over, its outputs have just been taken and batch N+1 is already fed and
    scheduled (its outputs not yet taken: on CUDA that would make torch's stream wait for it before step N);
    the batches are the same as the torch loader's."""
    _require("dali")
    from fastcifar.data import dali

    images, labels = random_set(128, seed=3)
    loader = train_loader("dali", images, labels, 32, seed=2)
    expected = _epoch(train_loader("torch", images, labels, 32, seed=2), 1)
    calls = []
    for name in ("submit", "collect"):
        original = getattr(dali._DaliRunner, name)
        monkeypatch.setattr(dali._DaliRunner, name,
                            lambda self, *a, _f=original, _n=name, **k: calls.append(_n) or _f(self, *a, **k))
    loader.set_epoch(1)
    for step, (batch, batch_labels) in enumerate(loader):
        assert calls.count("submit") == min(step + 2, len(loader)) and calls.count("collect") == step + 1
        assert calls[-1] == ("submit" if step + 1 < len(loader) else "collect")  # N+1 scheduled, not taken
        assert torch.equal(batch_labels, expected[step][1])
        assert (batch - expected[step][0]).abs().max().item() <= 1e-5


def test_an_abandoned_dali_epoch_leaves_nothing_for_the_next_one():
    """An epoch stopped after two batches leaves its third scheduled in the pipeline; the next epoch must start
    with its own first batch, not that one."""
    _require("dali")
    images, labels = random_set(128, seed=4)
    loader = train_loader("dali", images, labels, 32, seed=5)
    expected = _epoch(train_loader("torch", images, labels, 32, seed=5), 1)
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches), next(batches)  # the generator is kept alive: nothing closes it
    got = _epoch(loader, 1)
    assert len(got) == len(expected)
    for (batch, batch_labels), (want, want_labels) in zip(got, expected):
        assert torch.equal(batch_labels, want_labels) and (batch - want).abs().max().item() <= 1e-5