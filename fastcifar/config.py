"""One TrainConfig: every flag, the recipes, validation, and the resolution of `auto` in one place.

The CLI fills a TrainConfig and hands it over; `resolve()` turns the `auto`s into what this device runs; both
are written whole into the run directory. Importing this module does not import torch (`fastcifar --help` stays
instant); resolve() does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastcifar import FastCifarError
from fastcifar.optim import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    import torch

DATASETS = ("cifar10", "cifar100", "synthetic")
LOADERS = ("auto", "dali", "torch", "torchvision")
AUTO_ON_OFF = ("auto", "on", "off")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cuda", "cpu")
WANDB_MODES = ("auto", "online", "offline", "off")
TTA_MODES = ("off", "flip")
CUDA_EVAL_BATCH = 1000  # a large eval batch on CUDA: 10 padded-free batches for the 10,000 test images
# The largest sensible --epochs: 100,000 CIFAR-10 epochs are 5 billion images, months of GPU time (recipes use
# 10-200). Nothing in a run grows with its length; the bound turns a typo (an extra zero or three) into one line.
MAX_EPOCHS = 100_000
MAX_SEED = 2**63 - 2  # numpy and torch take seeds from 0; the test subset is drawn with seed + 1


@dataclass
class TrainConfig:
    recipe: str = "worksheet"
    # The report's recipe: Adam 1e-3, batch 128, 25 epochs, cosine, crop+flip.
    epochs: int = 25
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 1000 on CUDA, the training batch size on the CPU
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # weight decay on BatchNorm weights and biases too (default: conv/linear only)
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    scheduler: str = "cosine"  # annealed to 0 over the whole run, stepped every optimizer step
    warmup_epochs: float = 0.0  # linear warm-up before the decay
    label_smoothing: float = 0.0
    zero_init_residual: bool = False  # each residual block's last BatchNorm starts at 0 (the block starts as identity)
    ema: float = 0.0  # decay of an exponential moving average of the weights evaluated instead; 0 = off
    tta: str = "off"  # test-time augmentation: flip = average the logits of each image and its mirror image
    augment: str = "crop,flip"
    target_acc: float | None = None  # stop once the headline test accuracy reaches this
    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = True
    train_subset: int | None = None
    test_subset: int | None = None
    val_split: int = 0  # training images held out (seeded, class-balanced) to choose the best epoch; 0 = the test set
    synthetic_size: int = 512
    loader: str = "auto"
    num_workers: int = 2  # torchvision loader only
    # performance
    device: str = "auto"
    compile: str = "auto"
    channels_last: str = "auto"
    amp: str = "auto"
    cuda_graphs: str = "auto"
    # distributed (torchrun)
    sync_bn: bool = False  # BatchNorm statistics over the global batch (all ranks), not each rank's shard
    dist_timeout: float = 600.0  # seconds a process waits for the others in a collective before it fails
    # monitoring
    monitor: bool = True
    grad_every: int | None = None  # None: about 4 samples per epoch
    grad_epochs: list[int] | None = None  # None: 0, 5, 10, 15, 20 and the last epoch
    grad_low: float = 1e-7  # a layer whose gradient norm falls below this is flagged "vanishing"
    grad_high: float = 1e3  # ... or rises above this, "exploding"
    # bookkeeping
    seed: int = 0
    run_dir: str | None = None
    save_every: int | None = None  # None (auto): every epoch on the CPU; on CUDA so that saving is <= 5% of the run
    init_from: str | None = None  # a checkpoint whose model weights a new run starts from
    wandb: str = "auto"
    wandb_project: str = "fastcifar"
    peak_tflops: float | None = None
    progress: str = "auto"  # auto: a live bar on a terminal, plain lines otherwise
    log_interval: float = 30.0  # off a terminal: a progress line inside an epoch every this many seconds
    report: bool = True  # draw the PNGs at the end of training
    limit_steps: int | None = None  # a quick check: only the first N training steps and N eval batches per epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# A recipe is a set of defaults; flags given on the command line override it. README "Recipes" gives each choice
# its source. The fast recipe's 94 % in 15 epochs is a target still to be measured on a GPU (gpu_sweep.sh).
RECIPES: dict[str, dict] = {
    "worksheet": {},
    "fast": {"epochs": 15, "batch_size": 512, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "scheduler": "linear", "warmup_epochs": 2.0, "label_smoothing": 0.1,
             "zero_init_residual": True, "tta": "flip", "augment": "crop,flip,cutout=8"},
}

PATH_FIELDS = ("data_dir", "run_dir", "init_from")

# Flags that may change when a run is resumed; everything else comes from the run's config.json.
# --epochs extends (or shortens) the schedule: see run.py and the README.
RESUMABLE = {"progress", "log_interval", "wandb", "wandb_project", "report", "num_workers", "data_dir", "download",
             "epochs", "save_every", "target_acc", "peak_tflops", "dist_timeout"}


def differing_flags(saved: dict, cfg: TrainConfig) -> list[str]:
    """The flags, as typed, whose value in `cfg` differs from a run's saved config and may not change."""
    return sorted("--" + k.replace("_", "-") for k, v in cfg.to_dict().items()
                  if k not in RESUMABLE and saved.get(k, getattr(TrainConfig, k, None)) != v)


def default_grad_epochs(epochs: int) -> list[int]:
    """--grad-epochs' default: the report's Figure 2 epochs (0, 5, 10, 15, 20) that fit, plus the last."""
    return sorted({e for e in (0, 5, 10, 15, 20) if e < epochs} | {epochs - 1})


def expand_path(path: str | None) -> str | None:
    """~ and $VARIABLES, as a shell would: `--data-dir=~/x` must not become a folder named '~'."""
    return os.path.expandvars(os.path.expanduser(path)) if path else path


def read_config_file(path: str) -> tuple[dict, str | None]:
    """`--config FILE`: a YAML or JSON mapping of flags (dashes or underscores), or a run's own config.json, whose
    "config" is taken and whose run_dir is dropped (the repeat gets a folder of its own). Returns the values, typed
    as the flags are, and a note saying what was dropped (or None)."""
    import json

    import yaml

    try:
        text = open(path, encoding="utf-8").read()
        try:
            data = json.loads(text)  # a run's config.json: JSON's 1e-07 is a number, PyYAML's a string
        except ValueError:
            data = yaml.safe_load(text)
    except OSError as exc:
        raise FastCifarError(f"cannot read --config {path} ({exc.strerror or exc}).") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise FastCifarError(f"--config {path} is neither valid YAML nor JSON ({str(exc).splitlines()[0]}).") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise FastCifarError(f"--config {path} must be a mapping of flag: value, got a {type(data).__name__}.")
    note = None
    if isinstance(data.get("config"), dict) and "resolved" in data:  # a run directory's config.json
        data = dict(data["config"])
        if data.pop("run_dir", None):
            note = f"note: --config {path} is a run's config: the new run gets its own --run-dir"
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        raise FastCifarError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; the settings are the "
                             f"flags of `fastcifar train --help` (see `fastcifar train --print-config`).")
    return {k: _typed(path, k, v, str(fields[k].type)) for k, v in values.items()}, note


def _typed(path: str, key: str, value, annotation: str):
    """A file's value as the flag's type. PyYAML reads `1e-3` as a string (YAML 1.1): numbers in text are accepted."""
    if value is None:
        if "None" in annotation:
            return None
    elif annotation.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif annotation.startswith("list[int]"):
        items = value.split(",") if isinstance(value, str) else value
        try:
            if isinstance(items, list):
                return [int(x) for x in items if str(x).strip()]
        except (TypeError, ValueError):
            pass
    elif annotation.startswith(("int", "float")):
        kind = int if annotation.startswith("int") else float
        if not isinstance(value, bool):
            try:
                number = kind(value)
                if kind is float or number == float(value):
                    return number
            except (TypeError, ValueError):
                pass
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise FastCifarError(f"--config {path}: {key} must be {_TYPE_WORDS.get(annotation.split(' ')[0], annotation)}"
                         f"{' or null' if 'None' in annotation else ''}, got {value!r}")


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
               "list[int]": "a list of whole numbers"}


def config_yaml(cfg: TrainConfig) -> str:
    """The whole configuration as a YAML file that `--config` reads back to the same run."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def recipe_warmup(recipe: str, epochs: int) -> float:
    """A recipe's warm-up is a share of its run: the fast recipe's 2 of 15 epochs become 0.27 of --epochs 2."""
    r = RECIPES[recipe]
    warmup = r.get("warmup_epochs", TrainConfig.warmup_epochs)
    return warmup * epochs / r.get("epochs", TrainConfig.epochs) if warmup else warmup


def build_config(recipe: str = "worksheet", **overrides) -> TrainConfig:
    if recipe not in RECIPES:
        raise FastCifarError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**RECIPES[recipe], **given}
    if "warmup_epochs" not in given:
        values["warmup_epochs"] = recipe_warmup(recipe, values.get("epochs", TrainConfig.epochs))
    values.update({k: expand_path(values[k]) for k in PATH_FIELDS if values.get(k)})
    cfg = TrainConfig(recipe=recipe, **values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    from fastcifar.data.augment import AugmentError, parse_augment

    def need(ok: bool, message: str):
        if not ok:
            raise FastCifarError(message)

    for f in dataclasses.fields(cfg):  # --lr inf, --weight-decay nan ...: never a number to train with
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        need(not isinstance(value, float) or math.isfinite(value), f"{flag} must be a finite number, got {value}")
    need(cfg.epochs >= 1, f"--epochs must be a positive whole number, got {cfg.epochs}")
    need(cfg.epochs <= MAX_EPOCHS, f"--epochs {cfg.epochs:,} is more than the largest sensible value, "
                                   f"{MAX_EPOCHS:,} (5 billion images, months of GPU time): pass at most {MAX_EPOCHS}")
    need(0 <= cfg.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED}, got {cfg.seed}")
    need(cfg.batch_size >= 1, f"--batch-size must be a positive whole number, got {cfg.batch_size}")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1,
         f"--eval-batch-size must be a positive whole number, got {cfg.eval_batch_size}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be zero or positive, got {cfg.weight_decay}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(0 <= cfg.warmup_epochs < cfg.epochs, f"--warmup-epochs ({cfg.warmup_epochs:g}) must be at least 0 and less "
                                              f"than --epochs ({cfg.epochs}): pass a shorter --warmup-epochs")
    need(0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.ema == 0 or 0 < cfg.ema < 1, f"--ema must be 0 (off) or a decay in (0, 1) like 0.999, got {cfg.ema}")
    need(cfg.target_acc is None or 0 < cfg.target_acc <= 1, f"--target-acc must be in (0, 1], got {cfg.target_acc}")
    need(cfg.train_subset is None or cfg.train_subset >= 1, f"--train-subset must be positive, got {cfg.train_subset}")
    need(cfg.test_subset is None or cfg.test_subset >= 1, f"--test-subset must be positive, got {cfg.test_subset}")
    need(cfg.val_split >= 0, f"--val-split must be zero or positive, got {cfg.val_split}")
    need(cfg.synthetic_size >= 10, f"--synthetic-size must be at least 10, got {cfg.synthetic_size}")
    need(cfg.num_workers >= 0, f"--num-workers must be zero or positive, got {cfg.num_workers}")
    need(cfg.save_every is None or cfg.save_every >= 1, f"--save-every must be positive, got {cfg.save_every}")
    need(cfg.grad_every is None or cfg.grad_every >= 1, f"--grad-every must be positive, got {cfg.grad_every}")
    need(cfg.grad_low >= 0 and cfg.grad_high > cfg.grad_low,
         f"--grad-low/--grad-high must satisfy 0 <= low < high, got {cfg.grad_low}, {cfg.grad_high}")
    need(cfg.dist_timeout > 0, f"--dist-timeout must be a positive number of seconds, got {cfg.dist_timeout}")
    need(cfg.log_interval >= 0, f"--log-interval must be zero (every step) or positive seconds, got {cfg.log_interval}")
    need(cfg.limit_steps is None or cfg.limit_steps >= 1, f"--limit-steps must be positive, got {cfg.limit_steps}")
    need(cfg.peak_tflops is None or cfg.peak_tflops > 0, f"--peak-tflops must be positive, got {cfg.peak_tflops}")
    for name, value, choices in [("optimizer", cfg.optimizer, OPTIMIZERS), ("scheduler", cfg.scheduler, SCHEDULES),
                                 ("dataset", cfg.dataset, DATASETS), ("loader", cfg.loader, LOADERS),
                                 ("compile", cfg.compile, AUTO_ON_OFF),
                                 ("channels-last", cfg.channels_last, AUTO_ON_OFF),
                                 ("amp", cfg.amp, AMP_CHOICES), ("device", cfg.device, DEVICES),
                                 ("cuda-graphs", cfg.cuda_graphs, AUTO_ON_OFF), ("tta", cfg.tta, TTA_MODES),
                                 ("wandb", cfg.wandb, WANDB_MODES), ("progress", cfg.progress, AUTO_ON_OFF)]:
        need(value in choices, f"--{name} must be one of {', '.join(choices)}, got {value!r}")
    try:
        parse_augment(cfg.augment)
    except AugmentError as exc:
        raise FastCifarError(str(exc)) from None


@dataclass
class Resolved:
    """What `auto` became on this machine."""

    device: torch.device
    compile: bool
    channels_last: bool
    amp_dtype: torch.dtype | None  # None: fp32 (TF32 math on CUDA)
    grad_scaler: bool  # fp16 needs loss scaling; bf16 does not
    loader: str
    cuda_graphs: bool
    eval_batch_size: int
    notices: list[str] = field(default_factory=list)

    @property
    def precision(self) -> str:
        return precision_name(self.amp_dtype, self.device.type)

    def to_dict(self) -> dict:
        return {"device": str(self.device), "compile": self.compile, "channels_last": self.channels_last,
                "amp": self.precision if self.amp_dtype else "off", "grad_scaler": self.grad_scaler,
                "loader": self.loader, "cuda_graphs": self.cuda_graphs, "eval_batch_size": self.eval_batch_size}


def precision_name(amp_dtype, device_type: str) -> str:
    """The one spelling of a training precision: bf16, fp16, tf32 (fp32 storage on CUDA, TF32 math) or fp32."""
    if amp_dtype is None:
        return "tf32" if device_type == "cuda" else "fp32"
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(amp_dtype), str(amp_dtype))


def resolve(cfg: TrainConfig, local_rank: int = 0, world_size: int = 1) -> Resolved:
    """CUDA: compile, channels_last, bf16 (fp16 where bf16 is missing) and CUDA graphs on. CPU: channels_last on
    (measured ~20% faster here), compile off (~60 s to compile, no gain) and AMP off (bf16 autocast ~20x slower)."""
    import torch

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
    grad_scaler = amp_dtype is torch.float16
    graphs = use_cuda and (cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and compile_on))
    if cfg.cuda_graphs == "on" and not use_cuda:
        raise FastCifarError("--cuda-graphs on needs CUDA; use --cuda-graphs auto or off on the CPU.")
    for reason, applies in (("fp16 loss scaling decides on the host each step", grad_scaler),
                            ("DDP is not captured by fastcifar", world_size > 1)):
        if graphs and applies:
            graphs = False
            if cfg.cuda_graphs == "on":
                notices.append(f"note: CUDA graphs off: {reason}")
    recipe = RECIPES.get(cfg.recipe, {})
    if recipe.get("warmup_epochs") and cfg.epochs != recipe.get("epochs") and \
            cfg.warmup_epochs == recipe_warmup(cfg.recipe, cfg.epochs):
        notices.append(f"note: the {cfg.recipe} recipe warms up for {recipe['warmup_epochs']:g} of its "
                       f"{recipe['epochs']} epochs; for --epochs {cfg.epochs} that is {cfg.warmup_epochs:.3g} "
                       f"(--warmup-epochs sets it)")
    loader, notice = resolve_loader(cfg.loader, device)
    if notice and cfg.loader == "auto":
        notices.append(notice)
    eval_batch = cfg.eval_batch_size or (CUDA_EVAL_BATCH if use_cuda else cfg.batch_size)
    return Resolved(device, compile_on, channels_last, amp_dtype, grad_scaler, loader, graphs, eval_batch, notices)
