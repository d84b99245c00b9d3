"""`fastcifar train | flops | report`: parsing and messages only; the work lives in train.py, flops.py, report.py.

Expected failures (bad flags, missing or corrupt data, unwritable run dir, a diverged run) print one message
and exit non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from fastcifar import FastCifarError, __version__
from fastcifar.config import (AMP_CHOICES, AUTO_ON_OFF, DATASETS, DEVICES, LOADERS, OPTIMIZERS, RECIPES, SCHEDULERS,
                              WANDB_MODES, TrainConfig, build_config)

# Flags that may change when a run is resumed; everything else comes from the run's config.json.
RESUMABLE = {"progress", "wandb", "report", "num_workers", "data_dir"}


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 0,5,10, got {text!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--recipe", default="worksheet", choices=sorted(RECIPES),
                   help="defaults to start from: worksheet = the lab report's table (default); fast = batch 512 throughput")
    g = p.add_argument_group("recipe (defaults: the report's)")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, help=f"per process; default {d.batch_size}. The last partial batch of "
                                                  f"each epoch is dropped so shapes stay static")
    g.add_argument("--eval-batch-size", type=int, help="default: the training batch size")
    g.add_argument("--lr", type=float, help=f"peak learning rate; default {d.lr}")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    g.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    g.add_argument("--momentum", type=float, help=f"sgd only; default {d.momentum}")
    g.add_argument("--scheduler", choices=SCHEDULERS, help="cosine: annealed to 0 over the whole run, stepped every "
                                                           "optimizer step (default)")
    g.add_argument("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help="cifar10 (default) or a small learnable SYNTHETIC set")
    g.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: ~/.cache/fastcifar)")
    g.add_argument("--no-download", dest="download", action="store_const", const=False,
                   help="fail instead of downloading CIFAR-10 when it is missing")
    g.add_argument("--train-subset", type=int, metavar="N", help="seeded class-balanced subset of N training images")
    g.add_argument("--test-subset", type=int, metavar="N", help="seeded class-balanced subset of N test images")
    g.add_argument("--synthetic-size", type=int, metavar="N",
                   help=f"training images of --dataset synthetic (test: N/2); default {d.synthetic_size}")
    g.add_argument("--loader", choices=LOADERS, help="auto: dali on CUDA when installed, else torch")
    g.add_argument("--num-workers", type=int, help=f"torchvision loader workers; default {d.num_workers}")
    g = p.add_argument_group("performance (auto: what is fast on this device)")
    g.add_argument("--device", choices=DEVICES)
    g.add_argument("--compile", choices=AUTO_ON_OFF, help="auto: on for CUDA, off on CPU")
    g.add_argument("--channels-last", choices=AUTO_ON_OFF, help="auto: on")
    g.add_argument("--amp", choices=AMP_CHOICES, help="auto: bf16 on CUDA (fp16 + GradScaler without bf16), off on CPU")
    g.add_argument("--peak-tflops", type=float, help="device peak for MFU when the GPU is not in fastcifar's table")
    g = p.add_argument_group("monitoring and tracking")
    g.add_argument("--no-monitor", dest="monitor", action="store_const", const=False,
                   help="skip gradient-flow and weight-update sampling")
    g.add_argument("--grad-every", type=int, metavar="K", help="sample gradients every K steps (default: 4 per epoch)")
    g.add_argument("--grad-epochs", type=_int_list, metavar="E,E,..",
                   help="epochs (0-based) always sampled for the gradient-flow figure; default 0,5,10,15,20,last")
    g.add_argument("--grad-low", type=float, help="flag a layer whose gradient norm is below this (default 1e-7)")
    g.add_argument("--grad-high", type=float, help="flag a layer whose gradient norm is above this (default 1e3)")
    g.add_argument("--wandb", choices=WANDB_MODES, help="auto: online with an API key, offline otherwise")
    g.add_argument("--wandb-project", help=f"default {d.wandb_project}")
    g.add_argument("--progress", choices=AUTO_ON_OFF, help="auto: a live bar on a terminal, plain lines otherwise")
    g.add_argument("--no-report", dest="report", action="store_const", const=False, help="skip the PNGs at the end")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", help="default runs/<timestamp>-<recipe>")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    g.add_argument("--stop-after-epoch", type=int, metavar="K",
                   help="stop once K epochs of the schedule are done (resume later with --resume)")


TRAIN_KEYS = set(TrainConfig.__dataclass_fields__) - {"recipe"}


def run_train(args: argparse.Namespace) -> int:
    from fastcifar.train import fit

    given = {k: v for k, v in vars(args).items() if k in TRAIN_KEYS and v is not None}
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise FastCifarError(f"--stop-after-epoch must be a positive whole number, got {args.stop_after_epoch}")
    if args.resume:
        import json
        from pathlib import Path

        config_path = Path(args.resume) / "config.json"
        try:
            saved = json.loads(config_path.read_text())["config"]
        except (OSError, ValueError, KeyError) as exc:
            raise FastCifarError(f"cannot resume from {args.resume}: {config_path} is missing or unreadable ({exc}).")
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v)
        if changed:
            raise FastCifarError(f"--resume continues the run as it was configured; these flags differ from its "
                                 f"config.json and cannot change: {', '.join('--' + k.replace('_', '-') for k in changed)}")
        saved.update({k: v for k, v in given.items() if k in RESUMABLE})
        cfg = build_config(**saved)
    else:
        cfg = build_config(args.recipe, **given)
    summary = fit(cfg, resume_dir=args.resume, stop_after_epoch=args.stop_after_epoch)
    return 0 if summary is not None else 1


def run_report(args: argparse.Namespace) -> int:
    from fastcifar.report import make_report

    for path in make_report(args.run_dir, out_dir=args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastcifar.flops import add_flops_arguments, run_flops

    parser = argparse.ArgumentParser(prog="fastcifar", description="ResNet-18 on CIFAR-10, done right and fast.")
    parser.add_argument("--version", action="version", version=f"fastcifar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,flops,report}")
    p = sub.add_parser("train", help="train ResNet-18 on CIFAR-10 (the report's recipe by default)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser("flops", help="count FLOPs by hand, with fvcore and with FlopCounterMode; --verify cross-checks")
    add_flops_arguments(p)
    p.set_defaults(func=run_flops)
    p = sub.add_parser("report", help="draw the PNG plots of a run directory")
    p.add_argument("run_dir", help="a run directory written by fastcifar train")
    p.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
    # One line per warning (e.g. the md5 notice), without the source line that Python would print under it.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args)
    except FastCifarError as exc:
        print(f"fastcifar {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfastcifar {args.command}: interrupted. Finished epochs are kept in the run directory's last.pt; "
              f"continue with --resume RUN_DIR.", file=sys.stderr)
        return 130
