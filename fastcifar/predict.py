"""`fastcifar predict CHECKPOINT IMAGE...`: the top classes of each image under a run's weights.

An image of any size and mode is made into what the model was trained on, as the checkpoint records it (its
"input" entry; CIFAR-10's constants for checkpoints written before it existed): RGB, the shorter side resized to
32 pixels with PIL's antialiased bicubic filter and the centre 32 x 32 cut out (the aspect ratio is kept), pixels
/ 255 in [0, 1], then (x - mean) / std per channel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastcifar import FastCifarError
from fastcifar.checkpoint import check_compatible, input_spec, load_checkpoint
from fastcifar.model import resnet18_cifar


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1]: RGB, shorter side resized to `size`, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise FastCifarError(f"no image at {path}.") from None
    except PermissionError:
        raise FastCifarError(f"cannot read image {path} (permission denied).") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise FastCifarError(f"{path} is not an image PIL can read (PNG, JPEG, ...): {exc}") from None
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def normalise(images: torch.Tensor, spec: dict) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> what the model takes: (x - mean) / std per channel."""
    mean = torch.tensor(spec["mean"], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def predict(checkpoint, images, *, top: int = 3) -> list[dict]:
    """For each image path: its `top` classes with their softmax probabilities, most likely first."""
    if top < 1:
        raise FastCifarError(f"--top must be a positive whole number, got {top}")
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise FastCifarError(f"{checkpoint} is a folder: give a checkpoint, e.g. {checkpoint / 'best.pt'}.")
    state = load_checkpoint(checkpoint)
    classes = list(state.get("classes") or [])
    spec = state.get("input") or input_spec()
    ema = state.get("ema")  # best.pt: the EMA weights themselves; last.pt: {"model": ..., "count": ...}
    weights = (ema.get("model", ema) if ema else None) or state["model"]
    num_classes = weights["fc.weight"].shape[0] if "fc.weight" in weights else len(classes)
    classes = classes if len(classes) == num_classes else [f"class {i}" for i in range(num_classes)]
    model = resnet18_cifar(num_classes=num_classes)
    check_compatible(model.state_dict(), weights, checkpoint)
    model.load_state_dict(weights)
    model.eval()
    batch = torch.stack([load_image(Path(p), spec["size"]) for p in images])
    with torch.no_grad():
        probs = model(normalise(batch, spec)).softmax(1)
    values, indices = probs.topk(min(top, num_classes), dim=1)
    return [{"image": str(path), "top": [{"class": classes[i], "index": i, "probability": p}
                                         for p, i in zip(v.tolist(), ix.tolist())]}
            for path, v, ix in zip(images, values, indices)]
