"""One TrainConfig: every flag, the recipes, and the resolution of `auto` in one place.

The CLI fills a TrainConfig and hands it over; `resolve()` turns the `auto`s into what this device runs;
both are written whole into the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fastcifar import FastCifarError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
DATASETS = ("cifar10", "synthetic")
LOADERS = ("auto", "dali", "torch", "torchvision")
AUTO_ON_OFF = ("auto", "on", "off")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cuda", "cpu")
WANDB_MODES = ("auto", "online", "offline", "off")


@dataclass
class TrainConfig:
    recipe: str = "worksheet"
    # The report's recipe (DEVELOPERS.md): Adam 1e-3, batch 128, 25 epochs, cosine, crop+flip.
    epochs: int = 25
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: same as batch_size
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine annealing to 0 over the whole run, stepped every optimizer step
    label_smoothing: float = 0.0
    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = True
    train_subset: int | None = None
    test_subset: int | None = None
    synthetic_size: int = 512
    loader: str = "auto"
    num_workers: int = 2  # torchvision loader only
    # performance
    device: str = "auto"
    compile: str = "auto"
    channels_last: str = "auto"
    amp: str = "auto"
    # monitoring
    monitor: bool = True
    grad_every: int | None = None  # None: about 4 samples per epoch
    grad_epochs: list[int] | None = None  # None: 0, 5, 10, 15, 20 and the last epoch
    grad_low: float = 1e-7  # a layer whose gradient norm falls below this is flagged "vanishing"
    grad_high: float = 1e3  # ... or rises above this, "exploding"
    # bookkeeping
    seed: int = 0
    run_dir: str | None = None
    wandb: str = "auto"
    wandb_project: str = "fastcifar"
    peak_tflops: float | None = None
    progress: str = "auto"  # auto: a live bar on a terminal, plain lines otherwise
    report: bool = True  # draw the PNGs at the end of training

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# A recipe is a set of defaults; flags given on the command line override it.
RECIPES: dict[str, dict] = {
    "worksheet": {},
    # Throughput configuration: 4x the batch with the learning rate scaled by sqrt(4).
    "fast": {"batch_size": 512, "eval_batch_size": 1000, "lr": 2e-3, "optimizer": "adamw",
             "weight_decay": 5e-4, "label_smoothing": 0.1},
}


def build_config(recipe: str = "worksheet", **overrides) -> TrainConfig:
    if recipe not in RECIPES:
        raise FastCifarError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = TrainConfig(recipe=recipe, **values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise FastCifarError(message)

    need(cfg.epochs >= 1, f"--epochs must be a positive whole number, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be a positive whole number, got {cfg.batch_size}")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1,
         f"--eval-batch-size must be a positive whole number, got {cfg.eval_batch_size}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be zero or positive, got {cfg.weight_decay}")
    need(0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.train_subset is None or cfg.train_subset >= 1, f"--train-subset must be positive, got {cfg.train_subset}")
    need(cfg.test_subset is None or cfg.test_subset >= 1, f"--test-subset must be positive, got {cfg.test_subset}")
    need(cfg.synthetic_size >= 10, f"--synthetic-size must be at least 10, got {cfg.synthetic_size}")
    need(cfg.num_workers >= 0, f"--num-workers must be zero or positive, got {cfg.num_workers}")
    need(cfg.grad_every is None or cfg.grad_every >= 1, f"--grad-every must be positive, got {cfg.grad_every}")
    need(cfg.grad_low >= 0 and cfg.grad_high > cfg.grad_low,
         f"--grad-low/--grad-high must satisfy 0 <= low < high, got {cfg.grad_low}, {cfg.grad_high}")
    need(cfg.peak_tflops is None or cfg.peak_tflops > 0, f"--peak-tflops must be positive, got {cfg.peak_tflops}")
    for name, value, choices in [("optimizer", cfg.optimizer, OPTIMIZERS), ("scheduler", cfg.scheduler, SCHEDULERS),
                                 ("dataset", cfg.dataset, DATASETS), ("loader", cfg.loader, LOADERS),
                                 ("compile", cfg.compile, AUTO_ON_OFF), ("channels-last", cfg.channels_last, AUTO_ON_OFF),
                                 ("amp", cfg.amp, AMP_CHOICES), ("device", cfg.device, DEVICES),
                                 ("wandb", cfg.wandb, WANDB_MODES), ("progress", cfg.progress, AUTO_ON_OFF)]:
        need(value in choices, f"--{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class Resolved:
    """What `auto` became on this machine."""

    device: torch.device
    compile: bool
    channels_last: bool
    amp_dtype: torch.dtype | None  # None: fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 does not
    loader: str
    notices: list[str] = field(default_factory=list)

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[self.amp_dtype]
        return (f"device={self.device} compile={'on' if self.compile else 'off'} "
                f"channels_last={'on' if self.channels_last else 'off'} amp={amp} loader={self.loader}")

    def to_dict(self) -> dict:
        return {"device": str(self.device), "compile": self.compile, "channels_last": self.channels_last,
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                "grad_scaler": self.grad_scaler, "loader": self.loader}


def resolve(cfg: TrainConfig, local_rank: int = 0) -> Resolved:
    """CUDA: compile, channels_last and bf16 (fp16 where bf16 is missing) on. CPU: channels_last on (measured
    ~20% faster here), compile off (~60 s to compile, no gain) and AMP off (bf16 autocast ~20x slower)."""
    from fastcifar.data.loaders import resolve_loader

    notices = []
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FastCifarError("--device cuda was asked for, but torch sees no CUDA device "
                             "(check the driver and that torch is a CUDA build), or use --device cpu.")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and use_cuda)
    channels_last = cfg.channels_last != "off"
    if cfg.amp == "auto":
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_cuda else None
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg.amp]
    if amp_dtype is not None and not use_cuda:
        notices.append(f"note: --amp {cfg.amp} on the CPU is much slower than fp32 here (measured ~20x for bf16)")
    if amp_dtype is torch.float16 and not use_cuda:
        raise FastCifarError("--amp fp16 needs CUDA (fp16 autocast on the CPU is not supported); use bf16 or off.")
    loader, notice = resolve_loader(cfg.loader, device)
    if notice and cfg.loader == "auto":
        notices.append(notice)
    return Resolved(device, compile_on, channels_last, amp_dtype, amp_dtype is torch.float16, loader, notices)
