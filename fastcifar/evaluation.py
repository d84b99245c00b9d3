"""`fastcifar eval CHECKPOINT`: a checkpoint's weights on the test set it was trained for, with the trainer's own
evaluation (train.evaluate_model): accuracy and loss, with flip TTA on request."""

from __future__ import annotations

from pathlib import Path

import torch

from fastcifar import FastCifarError
from fastcifar import distributed as dist
from fastcifar.checkpoint import check_compatible, load_checkpoint
from fastcifar.config import TrainConfig, build_config, resolve
from fastcifar.data.cifar import load_dataset
from fastcifar.data.loaders import make_eval_loader
from fastcifar.model import resnet18_cifar
from fastcifar.train import evaluate_model


def evaluate_checkpoint(path, *, tta: str = "off", data_dir=None, download: bool = True, test_subset=None,
                        device: str = "auto", batch_size: int | None = None) -> dict:
    """`fastcifar eval`: a checkpoint's weights (its EMA weights when it has them) on the test set it was trained
    for (CIFAR-10, CIFAR-100, or the same synthetic set)."""
    if batch_size is not None and batch_size < 1:
        raise FastCifarError(f"--batch-size must be a positive whole number, got {batch_size}")
    state = load_checkpoint(Path(path))
    saved = {k: v for k, v in (state.get("config") or {}).items() if k in TrainConfig.__dataclass_fields__}
    cfg = build_config(saved.pop("recipe", "worksheet"), **{
        **saved, "data_dir": data_dir or saved.get("data_dir"), "download": download, "test_subset": test_subset,
        # how it was trained (precision, loader, layout) is this machine's choice now, not the checkpoint's
        "device": device, "eval_batch_size": batch_size, "tta": tta, "compile": "off", "cuda_graphs": "off",
        "amp": "auto", "loader": "auto", "channels_last": "auto",
        "wandb": "off", "init_from": None, "run_dir": None})
    res = resolve(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, None, cfg.test_subset, cfg.synthetic_size, cfg.seed)
    ema = state.get("ema")  # last.pt: {"model": ..., "count": ...}; best.pt: the weights themselves
    weights = (ema.get("model", ema) if ema else None) or state["model"]
    model = resnet18_cifar(num_classes=len(ds.classes))
    check_compatible(model.state_dict(), weights, Path(path))
    model.load_state_dict(weights)
    model.to(res.device, memory_format=torch.channels_last if res.channels_last else torch.contiguous_format)
    loader = make_eval_loader(res.loader, ds.test_images, ds.test_labels, min(res.eval_batch_size, len(ds.test_labels)),
                              res.device, res.amp_dtype or torch.float32, res.channels_last, mean=ds.mean, std=ds.std)
    result = evaluate_model(model, loader, res, tta, dist.DistInfo())
    result.pop("compile_s")
    epoch = state["epoch"] if state.get("kind") == "best weights" else state.get("epoch", 0) - 1
    return {"checkpoint": str(path), "weights": "EMA weights" if state.get("ema") else "weights", "epoch": epoch,
            "dataset": ds.description, "test_images": len(ds.test_labels), **result}
