"""fit(): the epoch loop, the train step and evaluation, with compile / AMP / channels_last set up once.

The hot path (one step, ~20,000 per worksheet run) does no host sync: per-step loss and correct counts go into
preallocated device tensors, read once per epoch and at the monitor's sample steps. Everything that is written,
logged or plotted happens between epochs, on rank 0.
"""

from __future__ import annotations

import math
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcifar import FastCifarError, __version__
from fastcifar import distributed as dist
from fastcifar.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from fastcifar.config import Resolved, TrainConfig, resolve
from fastcifar.console import epoch_line, make_progress, summary_table
from fastcifar.data.cifar import Dataset, load_cifar10, make_synthetic, take_subsets
from fastcifar.data.loaders import IGNORE_LABEL, make_eval_loader, make_train_loader
from fastcifar.model import resnet18_cifar
from fastcifar.monitor import LayerMonitor
from fastcifar.tracking import RunDir, WandbTracker, default_run_dir

SYNTHETIC_DATA_SEED = 1234  # the synthetic set is the same whatever --seed, so runs compare


class TrainingDiverged(FastCifarError):
    """A NaN/Inf loss or gradient: the run stops, the last good checkpoint stays."""


def load_dataset(cfg: TrainConfig) -> Dataset:
    if cfg.dataset == "synthetic":
        ds = make_synthetic(cfg.synthetic_size, max(cfg.synthetic_size // 2, 10), seed=SYNTHETIC_DATA_SEED)
    else:
        ds = load_cifar10(cfg.data_dir, download=cfg.download)
    return take_subsets(ds, cfg.train_subset, cfg.test_subset, cfg.seed)


class CosineFactor:
    """LR factor for cosine annealing from 1 to 0 over `total_steps` optimizer steps (stepped per step)."""

    def __init__(self, total_steps: int):
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters on CUDA
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay, **fused)


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    factor = CosineFactor(total_steps) if cfg.scheduler == "cosine" else (lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Session:
    """Everything one run holds; built once by fit()."""

    cfg: TrainConfig
    res: Resolved
    info: dist.DistInfo
    model: torch.nn.Module  # the eager module: state_dicts, monitoring, FLOPs
    step_model: torch.nn.Module  # what the step calls: DDP and/or torch.compile around `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: object
    eval_loader: object
    monitor: LayerMonitor | None
    run: RunDir | None  # None on ranks other than 0
    tracker: WandbTracker | None

    def autocast(self):
        return torch.autocast(self.res.device.type, dtype=self.res.amp_dtype or torch.float32,
                              enabled=self.res.amp_dtype is not None)

    def sync(self):
        if self.res.device.type == "cuda":
            torch.cuda.synchronize(self.res.device)


def _check_finite(s: Session, losses: torch.Tensor, upto: int, epoch: int) -> None:
    """One sync: raise if any of the first `upto` step losses of this epoch is NaN/Inf, naming the step."""
    bad = (~torch.isfinite(losses[:upto])).nonzero()
    if len(bad):
        step = int(bad[0])
        raise TrainingDiverged(
            f"non-finite training loss at epoch {epoch} step {step} (global step "
            f"{epoch * len(s.train_loader) + step}): training stopped. The last good checkpoint is kept"
            + (f" in {s.run.file('last.pt')}" if s.run else "")
            + " (lower --lr, or try --amp off, then --resume from it or start again).")


def _monitor_sample(s: Session, epoch: int, step: int, global_step: int, losses: torch.Tensor) -> dict:
    stats = s.monitor.grad_stats()  # the host copy here is the sample's one sync
    _check_finite(s, losses, step + 1, epoch)
    flags = s.monitor.flag_layers(stats["norm"])
    if flags["nonfinite"] and not s.res.grad_scaler:  # under fp16 the scaler skips inf steps by design
        raise TrainingDiverged(f"non-finite gradient at epoch {epoch} step {step} (global step {global_step}) in "
                               f"{', '.join(flags['nonfinite'][:5])}: training stopped; the last good checkpoint "
                               f"is kept. Lower --lr or use --amp off.")
    if s.run:
        for row in s.monitor.rows("grad", stats, epoch=epoch, step=global_step):
            s.run.append_jsonl("grad_flow.jsonl", row)
    if s.tracker:
        logged = {"step": global_step}
        for i, name in enumerate(s.monitor.layer_names):  # index prefix keeps W&B's charts in forward order
            logged[f"grad_mean/{i:02d}.{name}"] = stats["mean_abs"][i]
            logged[f"grad_norm/{i:02d}.{name}"] = stats["norm"][i]
            logged[f"grad_max/{i:02d}.{name}"] = stats["max_abs"][i]
        s.tracker.log(logged)
    return flags


def train_one_epoch(s: Session, epoch: int, progress) -> dict:
    model, loader, cfg = s.step_model, s.train_loader, s.cfg
    s.model.train()
    loader.set_epoch(epoch)
    steps = len(loader)
    device = s.res.device
    losses = torch.zeros(steps, device=device)
    corrects = torch.zeros(steps, device=device, dtype=torch.int64)
    flags = {"vanishing": set(), "exploding": set()}
    if s.monitor:
        s.monitor.start_epoch()

    for step, (images, labels) in enumerate(loader):
        global_step = epoch * steps + step
        sample = s.monitor is not None and s.monitor.should_sample(epoch, step)
        with s.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        losses[step] = loss.detach()
        corrects[step] = (logits.detach().argmax(1) == labels).sum()
        if sample:
            if s.res.grad_scaler:
                s.scaler.unscale_(s.optimizer)  # statistics of the true gradients, not the scaled ones
            for kind, layers in _monitor_sample(s, epoch, step, global_step, losses).items():
                if kind in flags:
                    flags[kind].update(layers)
            s.monitor.before_optimizer_step()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        if sample:
            ratio = s.monitor.after_optimizer_step()
            if s.run:
                for row in s.monitor.rows("update", {"ratio": ratio}, scope="step", epoch=epoch, step=global_step):
                    s.run.append_jsonl("updates.jsonl", row)
            if s.tracker:
                s.tracker.log({"step": global_step, **{f"update_step/{i:02d}.{n}": r for i, (n, r)
                                                       in enumerate(zip(s.monitor.layer_names, ratio))}})
        if progress is not None:
            progress.update(len(labels))

    _check_finite(s, losses, steps, epoch)
    totals = torch.stack([losses.sum() * loader.batch_size, corrects.sum().to(losses.dtype)])
    totals = dist.all_reduce_sum(totals, s.info).tolist()
    seen = steps * loader.batch_size * s.info.world_size
    result = {"train_loss": totals[0] / seen, "train_acc": totals[1] / seen, "train_images": seen,
              "flags": {k: sorted(v, key=s.monitor.layer_names.index) if v else [] for k, v in flags.items()}}
    if s.monitor:
        result["update_ratio_epoch"] = s.monitor.end_epoch()
    return result


@torch.no_grad()
def evaluate(s: Session) -> dict:
    s.model.eval()
    device = s.res.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in s.eval_loader:
        with s.autocast():
            logits = s.step_model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()  # padded rows have label -100: never correct
    count = torch.tensor(float(s.eval_loader.num_images), device=device)
    loss_sum, correct, count = dist.all_reduce_sum(torch.stack([loss_sum, correct.float(), count]), s.info).tolist()
    return {"test_loss": loss_sum / count, "test_acc": correct / count}


def _setup(cfg: TrainConfig, info: dist.DistInfo, run: RunDir | None, ds: Dataset, res: Resolved) -> Session:
    torch.manual_seed(cfg.seed)
    if res.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if res.channels_last else torch.contiguous_format
    model = resnet18_cifar(num_classes=len(ds.classes)).to(res.device, memory_format=memory_format)
    step_model = model
    if info.enabled:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[res.device.index] if res.device.type == "cuda" else None)
    if res.compile:
        step_model = torch.compile(step_model)
    data_dtype = res.amp_dtype or torch.float32  # the loader casts once; autocast then keeps it
    common = dict(device=res.device, dtype=data_dtype, channels_last=res.channels_last, rank=info.rank,
                  world_size=info.world_size)
    train_loader = make_train_loader(res.loader, ds.train_images, ds.train_labels, cfg.batch_size,
                                     seed=cfg.seed, num_workers=cfg.num_workers, **common)
    if len(train_loader) == 0:
        raise FastCifarError(f"the training set has {len(ds.train_labels)} images, fewer than one batch of "
                             f"{cfg.batch_size} per process: lower --batch-size or raise --train-subset.")
    eval_loader = make_eval_loader(res.loader, ds.test_images, ds.test_labels, cfg.eval_batch_size or cfg.batch_size,
                                   **common)
    optimizer = build_optimizer(cfg, model, res.device)
    scheduler = build_scheduler(cfg, optimizer, cfg.epochs * len(train_loader))
    scaler = torch.amp.GradScaler(res.device.type, enabled=res.grad_scaler)
    monitor = None
    if cfg.monitor:
        monitor = LayerMonitor(model, steps_per_epoch=len(train_loader), epochs=cfg.epochs, grad_every=cfg.grad_every,
                               grad_epochs=cfg.grad_epochs, grad_low=cfg.grad_low, grad_high=cfg.grad_high)
    return Session(cfg, res, info, model, step_model, optimizer, scheduler, scaler, train_loader, eval_loader,
                   monitor, run, None)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fit(cfg: TrainConfig, resume_dir: str | Path | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train per `cfg` (or continue the run in `resume_dir`); returns the summary. Rank 0 writes the run dir."""
    from fastcifar import flops as flops_mod

    info = dist.setup()
    s: Session | None = None
    try:
        res = resolve(cfg, info.local_rank)
        checkpoint = None
        if resume_dir is not None:
            checkpoint = load_checkpoint(Path(resume_dir) / "last.pt")
        run_path = Path(resume_dir) if resume_dir else Path(cfg.run_dir or default_run_dir(cfg.recipe))
        run_path = dist.broadcast_object(run_path, info)  # one timestamped folder for every rank
        ds = load_dataset(cfg)  # before the run directory: a data error leaves no empty run behind
        run = RunDir(run_path) if info.is_main else None
        s = _setup(cfg, info, run, ds, res)
        start_epoch, best_acc, best_epoch = 0, -1.0, -1
        if checkpoint is not None:
            s.model.load_state_dict(checkpoint["model"])
            s.optimizer.load_state_dict(checkpoint["optimizer"])
            s.scheduler.load_state_dict(checkpoint["scheduler"])
            s.scaler.load_state_dict(checkpoint["scaler"])
            set_rng_state(checkpoint["rng"])
            start_epoch, best_acc, best_epoch = checkpoint["epoch"], checkpoint["best_acc"], checkpoint.get("best_epoch", -1)
            if run:
                for name in ("metrics.jsonl", "grad_flow.jsonl", "updates.jsonl"):
                    run.truncate_jsonl(name, lambda r: r["epoch"] < start_epoch)
        if start_epoch >= cfg.epochs:
            raise FastCifarError(f"{run_path} already finished all {cfg.epochs} epochs: nothing to resume.")

        device_name = _device_name(res.device)
        train_flops = flops_mod.training_flops_per_image(num_classes=len(ds.classes))
        amp_name = {None: "fp32" if not res.device.type == "cuda" else "tf32", torch.bfloat16: "bf16",
                    torch.float16: "fp16"}[res.amp_dtype]
        peak = cfg.peak_tflops or (flops_mod.peak_tflops(device_name, amp_name) if res.device.type == "cuda" else None)
        active = " ".join(n for n, on in [("compile", res.compile), ("channels_last", res.channels_last),
                                          (amp_name, True), (res.loader, True),
                                          (f"ddp x{info.world_size}", info.enabled)] if on)
        resolved = {**res.to_dict(), "device_name": device_name, "world_size": info.world_size,
                    "global_batch_size": cfg.batch_size * info.world_size, "steps_per_epoch": len(s.train_loader),
                    "dropped_last_batch_images": len(ds.train_labels) // info.world_size - len(s.train_loader) * cfg.batch_size,
                    "dataset": ds.description, "train_images": len(ds.train_labels), "test_images": len(ds.test_labels),
                    "train_flops_per_image": train_flops, "peak_tflops": peak, "torch": torch.__version__,
                    "fastcifar": __version__, "scheduler_interval": "step"}

        if run:
            config_doc = {"config": cfg.to_dict(), "resolved": resolved}
            if checkpoint is None:
                run.write_json("config.json", config_doc)
            print(f"fastcifar {__version__} — run directory {run.path}")
            print(f"data: {ds.description}")
            for notice in res.notices:
                print(notice)
            wrap = dict(width=118, subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
            print(textwrap.fill("config: " + " ".join(f"{k}={v}" for k, v in cfg.to_dict().items()), **wrap))
            print(textwrap.fill("resolved: " + " ".join(f"{k}={v}" for k, v in resolved.items()), **wrap))
            if checkpoint is not None:
                print(f"resuming at epoch {start_epoch} ({start_epoch} of {cfg.epochs} done; best test acc so far "
                      f"{100 * best_acc:.2f}%)")
            previous = run.read_json("config.json") if checkpoint is not None else {}
            s.tracker = WandbTracker(cfg.wandb, cfg.wandb_project, run.path, config_doc, run.path.name,
                                     resume_id=previous.get("wandb_run_id"))
            if s.tracker.run_id and checkpoint is None:
                run.write_json("config.json", {**config_doc, "wandb_run_id": s.tracker.run_id})
            s.tracker.set_summary({"flops/train_per_image": train_flops,
                                   "flops/forward_per_image": flops_mod.forward_flops_per_image(num_classes=len(ds.classes))})
            sys.stdout.flush()

        end_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
        for epoch in range(start_epoch, end_epoch):
            s.sync()
            t0 = time.perf_counter()
            progress = make_progress(cfg, info, len(s.train_loader) * cfg.batch_size, epoch)
            lr = s.optimizer.param_groups[0]["lr"]
            try:
                train = train_one_epoch(s, epoch, progress)
            finally:
                if progress is not None:
                    progress.close()
            s.sync()
            t1 = time.perf_counter()
            test = evaluate(s)
            s.sync()
            t2 = time.perf_counter()
            ips = train["train_images"] / (t1 - t0)
            row = {"epoch": epoch, **{k: v for k, v in train.items() if k != "update_ratio_epoch"}, **test,
                   "lr": lr, "train_time_s": t1 - t0, "eval_time_s": t2 - t1, "epoch_time_s": t2 - t0,
                   "train_images_per_s": ips, "active": active}
            achieved = ips * train_flops
            if res.device.type == "cuda":
                row["achieved_tflops"] = achieved / 1e12
                row["mfu"] = achieved / (peak * 1e12) if peak else None
            else:
                row["achieved_gflops"] = achieved / 1e9
            if test["test_acc"] > best_acc:
                best_acc, best_epoch = test["test_acc"], epoch
            if run:
                if s.monitor:
                    for r in s.monitor.rows("update", {"ratio": train["update_ratio_epoch"]}, scope="epoch",
                                            epoch=epoch, step=(epoch + 1) * len(s.train_loader)):
                        run.append_jsonl("updates.jsonl", r)
                run.append_jsonl("metrics.jsonl", row)
                state = dict(model=s.model, optimizer=s.optimizer, scheduler=s.scheduler, scaler=s.scaler,
                             epoch=epoch + 1, best_acc=best_acc, config=cfg.to_dict(),
                             extra={"best_epoch": best_epoch})
                save_checkpoint(run.file("last.pt"), **state)
                if best_epoch == epoch:
                    copy_checkpoint(run.file("last.pt"), run.file("best.pt"))
                print(epoch_line(cfg, res, row), flush=True)
                logged = {"epoch": epoch, "train/loss": row["train_loss"], "train/acc": row["train_acc"],
                          "test/loss": row["test_loss"], "test/acc": row["test_acc"], "lr": lr,
                          "time/epoch_s": row["epoch_time_s"], "time/train_s": row["train_time_s"],
                          "perf/images_per_s": ips}
                if s.monitor:
                    logged.update({f"update_epoch/{i:02d}.{n}": v for i, (n, v) in
                                   enumerate(zip(s.monitor.layer_names, train["update_ratio_epoch"]))})
                s.tracker.log(logged)
            dist.barrier(info)

        if not run:
            return {}
        rows = run.read_jsonl("metrics.jsonl")
        finished = len(rows) == cfg.epochs
        last = rows[-1]
        summary = {"run_dir": str(run.path), "recipe": cfg.recipe, "dataset": ds.description,
                   "finished": finished, "epochs_done": len(rows), "epochs": cfg.epochs,
                   "final_train_acc": last["train_acc"], "final_test_acc": last["test_acc"],
                   "final_train_loss": last["train_loss"], "final_test_loss": last["test_loss"],
                   "best_test_acc": best_acc, "best_epoch": best_epoch,
                   "mean_epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows),
                   "mean_train_time_s": sum(r["train_time_s"] for r in rows) / len(rows),
                   "mean_train_images_per_s": sum(r["train_images_per_s"] for r in rows) / len(rows),
                   "device_name": device_name, "active": active, "train_flops_per_image": train_flops,
                   "flagged_layers": sorted({l for r in rows for v in r["flags"].values() for l in v})}
        if res.device.type == "cuda":
            summary["mean_achieved_tflops"] = summary["mean_train_images_per_s"] * train_flops / 1e12
            summary["mean_mfu"] = summary["mean_achieved_tflops"] / peak if peak else None
        else:
            summary["mean_achieved_gflops"] = summary["mean_train_images_per_s"] * train_flops / 1e9
        run.write_json("summary.json", summary)
        print()
        print(f"{'Results' if finished else 'Stopped early: results so far'} — {ds.description}")
        print(summary_table(summary))
        if not finished:
            print(f"continue with: fastcifar train --resume {run.path}")
        if cfg.report:
            from fastcifar.report import make_report

            plots = make_report(run.path)
            print(f"plots: {', '.join(str(p) for p in plots)}")
            s.tracker.log_images(plots)
        s.tracker.set_summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        s.tracker.finish()
        return summary
    except BaseException:
        # A crash or a stop keeps every finished epoch (its checkpoint is already on disk) and closes W&B.
        if s is not None and s.tracker is not None:
            s.tracker.finish(exit_code=1)
        raise
    finally:
        dist.cleanup(info)
