"""`fastcifar train | eval | predict | flops | report`: parsing and messages only; the work lives in train.py, flops.py,
report.py. Heavy modules (torch, torchvision, fvcore, matplotlib) are imported by the command that runs, so
`fastcifar --help` answers at once.

Expected failures (bad flags, missing or corrupt data, unwritable or busy run dir, a diverged run, a full disk, a
run file that cannot be written) print one message and exit non-zero without a traceback; so does any other error
the operating system raises (OSError), naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings
from pathlib import Path

from fastcifar import FastCifarError, __version__
from fastcifar.config import (AMP_CHOICES, AUTO_ON_OFF, DATASETS, DEVICES, LOADERS, RECIPES, RESUMABLE, TTA_MODES,
                              WANDB_MODES, TrainConfig, build_config, config_yaml, expand_path, read_config_file,
                              recipe_warmup)
from fastcifar.console import WIDTH, surviving_output
from fastcifar.optim import OPTIMIZERS, SCHEDULES



def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 0,5,10, got {text!r}") from None


DEFAULT_PROFILE_STEPS = 10  # fastcifar.profiling.DEFAULT_STEPS (not imported: it loads torch)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of steps, got {text!r}")
    return value


AUTO = "auto"  # what an `auto` flag parses to: kept apart from an absent flag (None) until run_train


def _auto_or_int(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="defaults to start from: worksheet = the lab report's table (default); fast = the 15-epoch "
                        "recipe (SGD, batch 512, cutout, flip TTA; see README)")
    g = p.add_argument_group("recipe (defaults: the report's)")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}; with --resume, more epochs extend the run")
    g.add_argument("--batch-size", type=int, help=f"per process; default {d.batch_size}. The last partial batch of "
                                                  f"each epoch is dropped so shapes stay static")
    g.add_argument("--eval-batch-size", type=int, help="default: 1000 on CUDA, the training batch size on the CPU")
    g.add_argument("--lr", type=float, help=f"peak learning rate; default {d.lr}")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    g.add_argument("--weight-decay", type=float, help=f"on conv and linear weights; default {d.weight_decay}")
    g.add_argument("--decay-norm-and-bias", action=argparse.BooleanOptionalAction,
                   help="apply weight decay to BatchNorm weights and biases too (default: not)")
    g.add_argument("--momentum", type=float, help=f"sgd only; default {d.momentum}")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="sgd: Nesterov momentum (default) or "
                                                                            "plain momentum")
    g.add_argument("--scheduler", choices=SCHEDULES, help="LR decay to 0 over the run, stepped every optimizer step; "
                                                          "default cosine")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up before the decay; default 0")
    g.add_argument("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction,
                   help="start each residual block's last BatchNorm at 0 (the fast recipe does; --no-... to not)")
    g.add_argument("--ema", type=float, metavar="DECAY", help="evaluate an exponential moving average of the weights "
                                                              "with this per-step decay (e.g. 0.999); default off")
    g.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation: flip averages each test image's logits "
                                                    "with its mirror image's; default off")
    g.add_argument("--augment", metavar="SPEC",
                   help="comma-separated: crop (RandomCrop 32, padding 4), crop=P (padding P), flip, cutout=N "
                        "(an N x N square of the mean colour), or none; default crop,flip")
    g.add_argument("--target-acc", type=float, metavar="A", help="stop once the test accuracy reaches A (e.g. 0.94), "
                                                                 "after that epoch's checkpoint")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help="cifar10 (default), cifar100 (100 fine labels) or a small "
                                                      "learnable SYNTHETIC set")
    g.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: "
                                      "~/.cache/fastcifar)")
    g.add_argument("--no-download", dest="download", action="store_const", const=False,
                   help="fail instead of downloading the dataset when it is missing")
    g.add_argument("--train-subset", type=int, metavar="N", help="seeded class-balanced subset of N training images")
    g.add_argument("--test-subset", type=int, metavar="N", help="seeded class-balanced subset of N test images")
    g.add_argument("--val-split", type=int, metavar="N",
                   help="hold out N training images (seeded, class-balanced; taken after --train-subset) as a "
                        "validation set: the best epoch and best.pt are chosen on it, not on the test set")
    g.add_argument("--synthetic-size", type=int, metavar="N",
                   help=f"training images of --dataset synthetic (test: N/2); default {d.synthetic_size}")
    g.add_argument("--loader", choices=LOADERS, help="auto: dali on CUDA when installed, else torch")
    g.add_argument("--num-workers", type=int, help=f"torchvision loader workers; default {d.num_workers}")
    g = p.add_argument_group("performance (auto: what is fast on this device)")
    g.add_argument("--device", choices=DEVICES)
    g.add_argument("--compile", choices=AUTO_ON_OFF, help="auto: on for CUDA, off on CPU")
    g.add_argument("--channels-last", choices=AUTO_ON_OFF, help="auto: on")
    g.add_argument("--amp", choices=AMP_CHOICES, help="auto: bf16 on CUDA (fp16 + GradScaler without bf16), off on CPU")
    g.add_argument("--cuda-graphs", choices=AUTO_ON_OFF, help="capture the whole training step in a CUDA graph; "
                                                              "auto: on for CUDA when compile is on")
    g.add_argument("--peak-tflops", type=float, help="device peak for MFU when the GPU is not in fastcifar's table")
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="BatchNorm statistics over the global batch of all processes (default: off, each process "
                        "normalises with its own batch's)")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help=f"a process that waits longer than this for the others (one died or hangs) stops with a "
                        f"message naming it and what it was doing; default {d.dist_timeout:g}")
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
    g.add_argument("--log-interval", type=float, metavar="SECONDS",
                   help="without a terminal (nohup, Slurm, CI): a progress line with loss, LR, images/s and time "
                        f"left every SECONDS inside an epoch (0: every step); default {d.log_interval:g}")
    g.add_argument("--no-report", dest="report", action="store_const", const=False, help="skip the PNGs at the end")
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="read flags from a YAML or JSON file (or a run's config.json, to "
                                                    "repeat it); flags on the command line override it")
    g.add_argument("--print-config", action="store_true", help="print the whole configuration as YAML (a file "
                                                                "--config reads back) and exit")
    g.add_argument("--run-dir", help="default runs/<timestamp>-<recipe>; must not hold another run")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt (or the group "
                                                       "of seeds in RUN_DIR: its unfinished seeds)")
    g.add_argument("--seeds", metavar="N|S,S,..", help="train once per seed in one process (compiled once): N = "
                   "seeds 0..N-1, or a list like 0,1,2 (one seed: 7,). --run-dir is the group's folder: a run "
                   "folder seed-K per seed and summary.json with mean, std and 95%% CI of each metric")
    g.add_argument("--resume-if-exists", action="store_true",
                   help="with --run-dir: continue from RUN_DIR/last.pt when there is one (the same command again, "
                        "e.g. after torchrun restarts a failed job), else start there; refuses a run of another "
                        "configuration")
    g.add_argument("--init-from", metavar="CHECKPOINT", help="start a new run from a checkpoint's model weights "
                                                             "(last.pt or best.pt)")
    g.add_argument("--save-every", type=_auto_or_int, metavar="K", help="save last.pt every K epochs (and always "
                   "the last); auto (default): every epoch on the CPU, on CUDA when saving costs <= 5%% of the "
                   "training time since the last save")
    g.add_argument("--stop-after-epoch", type=int, metavar="K",
                   help="stop once K epochs of the schedule are done (resume later with --resume)")
    g.add_argument("--profile", type=_positive_int, nargs="?", const=DEFAULT_PROFILE_STEPS, metavar="STEPS",
                   help=f"record torch.profiler over STEPS training steps after the warm-up (default "
                        f"{DEFAULT_PROFILE_STEPS}) into RUN_DIR/profile/: a trace for Perfetto, chrome://tracing or "
                        f"TensorBoard, and profile.txt (top kernels, host and device time per step)")
    g = p.add_argument_group("quick checks (seconds: every part of a run, no meaningful numbers)")
    g.add_argument("--limit-steps", type=int, metavar="N",
                   help="train only the first N steps of each epoch and evaluate only N batches")
    g.add_argument("--fast-dev-run", action="store_true",
                   help="a whole run in seconds: --limit-steps 2 --epochs 2 --wandb off unless given otherwise; "
                        "trains, evaluates, saves, resumes and draws as a full run does")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="last.pt or best.pt of a run (best.pt holds the best epoch's weights)")
    p.add_argument("--tta", choices=TTA_MODES, default="off", help="flip: also report flip test-time augmentation")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: the run's, else ~/.cache)")
    p.add_argument("--no-download", dest="download", action="store_false", help="fail instead of downloading")
    p.add_argument("--test-subset", type=int, metavar="N", help="seeded class-balanced subset of N test images")
    p.add_argument("--batch-size", type=int, help="evaluation batch (default: the run's: 1000 on CUDA, its training "
                                                  "batch on the CPU)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="best.pt (or last.pt) of a run")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... of any size: made RGB, the shorter "
                                                             "side resized to 32 pixels, centre-cropped to 32 x 32")
    p.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")


def add_flops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", type=int, default=32, help="square input side in pixels (default 32, >= 8)")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar", help="model stem (default cifar)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--batch-size", type=int, default=1, help="batch counted; reported per image and per batch")
    p.add_argument("--json", action="store_true", help="print one JSON object of exact integers")
    p.add_argument("--verify", action="store_true",
                   help="exit 1 unless hand counter, fvcore and FlopCounterMode agree on conv+linear")


TRAIN_KEYS = set(TrainConfig.__dataclass_fields__) - {"recipe"}


def _resumed_config(run_dir: str, given: dict, recipe: str | None) -> TrainConfig:
    config_path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(config_path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        from fastcifar.tracking import RunDir

        RunDir(run_dir).check_usable()  # a live run that has not written its config yet is named, not misread
        raise FastCifarError(f"cannot resume from {run_dir}: {config_path} is missing or unreadable ({exc}).") from None
    changed = sorted(k for k, v in {**given, "recipe": recipe or saved.get("recipe")}.items()
                     if k not in RESUMABLE and saved.get(k) != v)
    if changed:
        raise FastCifarError(f"--resume continues the run as it was configured; these flags differ from its "
                             f"config.json and cannot change: {', '.join('--' + k.replace('_', '-') for k in changed)}")
    saved.update({k: v for k, v in given.items() if k in RESUMABLE})
    return build_config(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def run_train(args: argparse.Namespace) -> int:
    from fastcifar.train import fit

    # a flag given as `auto` counts as given (on resume it replaces the run's value) and means None (automatic)
    given = {k: None if v == AUTO else v for k, v in vars(args).items() if k in TRAIN_KEYS and v is not None}
    if args.fast_dev_run:
        given = {"limit_steps": 2, "epochs": 2, "wandb": "off", **given}
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise FastCifarError(f"--stop-after-epoch must be a positive whole number, got {args.stop_after_epoch}")
    resume = expand_path(args.resume)
    if resume and args.config:
        raise FastCifarError("--resume continues a run with its own config.json; --config starts a new run: pick one.")
    recipe, given = _with_config_file(args, given)
    if args.print_config and not resume:
        print(config_yaml(build_config(recipe or "worksheet", **given)), end="")
        return 0
    if args.seeds is not None or (resume and _is_group(resume)):
        return _run_group(args, given, resume, recipe)
    if resume and args.init_from:
        raise FastCifarError("--resume continues a run with its own weights; --init-from starts a new one: pick one.")
    if args.resume_if_exists and (resume or not args.run_dir):
        raise FastCifarError("--resume-if-exists needs --run-dir (the folder a restarted command continues in) and "
                             "no --resume.")
    cfg = _resumed_config(resume, given, recipe) if resume else build_config(recipe or "worksheet", **given)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    summary = fit(cfg, resume_dir=resume, init_from=cfg.init_from if not resume else None,
                  stop_after_epoch=args.stop_after_epoch, profile=args.profile,
                  resume_if_exists=args.resume_if_exists)
    return summary.get("exit_code", 0) if summary else 0


def _with_config_file(args: argparse.Namespace, given: dict) -> tuple[str | None, dict]:
    """--config FILE under the flags: the recipe it names (flags first) and the flags it sets that were not given."""
    if not args.config:
        return args.recipe, given
    from_file, note = read_config_file(expand_path(args.config))
    recipe = args.recipe or from_file.pop("recipe", None) or "worksheet"
    from_file.pop("recipe", None)
    if recipe not in RECIPES:
        raise FastCifarError(f"--config {args.config}: unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    # a file's warm-up that is its recipe's share follows --epochs on the command line, as the recipe's own does
    if "epochs" in given and "warmup_epochs" not in given and from_file.get("warmup_epochs") == \
            recipe_warmup(recipe, from_file.get("epochs") or RECIPES[recipe].get("epochs", TrainConfig.epochs)):
        from_file.pop("warmup_epochs")
    if note and not args.print_config and os.environ.get("RANK", "0") == "0":
        print(note)
    return recipe, {**{k: v for k, v in from_file.items() if v is not None}, **given}


def _is_group(path: str) -> bool:
    from fastcifar.seeds import is_group

    return is_group(path)


def _run_group(args: argparse.Namespace, given: dict, resume: str | None, recipe: str | None) -> int:
    """--seeds, or --resume of a group: seeds.py."""
    from fastcifar.seeds import fit_group, parse_seeds, resumed_group, start_group
    from fastcifar.tracking import default_run_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would make and train the group on its own
        raise FastCifarError("--seeds trains its seeds one after another in one process; under torchrun, start one "
                             "job per seed (--seed K, each with its own --run-dir), then `fastcifar compare` them.")
    for flag, value in (("--seed", args.seed), ("--stop-after-epoch", args.stop_after_epoch),
                        ("--profile", args.profile), ("--resume-if-exists", args.resume_if_exists or None),
                        ("--init-from", args.init_from if resume else None)):
        if value is not None:
            raise FastCifarError(f"{flag} does not go with " + ("--resume of a group of seeds" if resume else
                                 "--seeds (each seed is one run of the group)") + ": leave it out.")
    if resume:
        if args.seeds is not None:
            raise FastCifarError(f"--resume {resume} continues the group's own seeds: leave out --seeds."
                                 if _is_group(resume) else "--seeds starts a new group of runs and --resume "
                                 "continues one: pick one.")
        group = resumed_group(Path(resume), given, recipe)
    else:
        cfg = build_config(recipe or "worksheet", **given)
        group = start_group(cfg, parse_seeds(args.seeds), Path(cfg.run_dir or default_run_dir(cfg.recipe)))
    return fit_group(group).get("exit_code", 0)


def run_eval(args: argparse.Namespace) -> int:
    from fastcifar.evaluation import evaluate_checkpoint

    checkpoint = expand_path(args.checkpoint)
    if Path(checkpoint).is_dir():
        raise FastCifarError(f"{checkpoint} is a run directory; evaluate a checkpoint in it: "
                             f"{Path(checkpoint) / 'best.pt'} (the best epoch) or {Path(checkpoint) / 'last.pt'}")
    result = evaluate_checkpoint(checkpoint, tta=args.tta, data_dir=expand_path(args.data_dir),
                                 download=args.download, test_subset=args.test_subset, device=args.device,
                                 batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
        return 0
    tta = f" | flip TTA: accuracy {100 * result['test_acc_tta']:.2f} %, loss {result['test_loss_tta']:.4f}" \
        if args.tta == "flip" else ""
    # the path stays whole on the first line (it may hold spaces); the dataset's description wraps after it
    what = f"{result['checkpoint']} ({result['weights']}, epoch {result['epoch']})"
    on = f"on {result['dataset']}:"
    print(f"{what} {on}" if len(what) + 1 + len(on) <= WIDTH else
          what + "\n" + textwrap.fill(on, WIDTH, initial_indent="    ", subsequent_indent="    "))
    print(f"test accuracy {100 * result['test_acc']:.2f} %, loss {result['test_loss']:.4f} over "
          f"{result['test_images']:,} images{tta}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from fastcifar.predict import predict

    for result in predict(expand_path(args.checkpoint), [expand_path(p) for p in args.images], top=args.top):
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f} %"
                                                      for t in result["top"]))
    return 0


def run_flops(args: argparse.Namespace) -> int:
    from fastcifar.flops import run_flops as flops_command

    return flops_command(args)


def run_report(args: argparse.Namespace) -> int:
    from fastcifar.report import make_report

    for path in make_report(expand_path(args.run_dir), out_dir=expand_path(args.out)):
        print(path)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from fastcifar.compare import run_compare as compare_command

    args.a, args.b = expand_path(args.a), expand_path(args.b)
    return compare_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcifar", description="ResNet-18 on CIFAR-10, done right and fast.")
    parser.add_argument("--version", action="version", version=f"fastcifar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,flops,report,compare}")
    p = sub.add_parser("train", help="train ResNet-18 on CIFAR-10 (the report's recipe by default)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on the test set: accuracy and loss")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
    p = sub.add_parser("predict", help="the top classes of images (PNG, JPEG, any size) under a checkpoint")
    add_predict_arguments(p)
    p.set_defaults(func=run_predict)
    p = sub.add_parser("flops", help="count FLOPs by hand, with fvcore and with FlopCounterMode; --verify cross-checks")
    add_flops_arguments(p)
    p.set_defaults(func=run_flops)
    p = sub.add_parser("report", help="draw the PNG plots of a run directory (or of a --seeds group)")
    p.add_argument("run_dir", help="a run directory written by fastcifar train, or a --seeds group directory")
    p.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=run_report)
    p = sub.add_parser("compare", help="two runs or groups of seeds: mean ± std, difference with 95%% CI, Welch's "
                                       "t-test, and what differs in their configs")
    p.add_argument("a", help="a run directory or a --seeds group directory")
    p.add_argument("b", help="another one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    with surviving_output():  # a closed terminal or a broken pipe must not end a training run
        args = build_parser().parse_args(argv)
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        # One line per warning (e.g. the md5 notice), without the source line that Python would print under it.
        warnings.formatwarning = lambda msg, cat, *a, **k: textwrap.fill(f"warning: {msg}", 120,
                                                                         subsequent_indent="    ") + "\n"
        try:
            return args.func(args)
        except FastCifarError as exc:
            print(f"fastcifar {args.command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"\nfastcifar {args.command}: interrupted before anything was saved.", file=sys.stderr)
            return 130
        except OSError as exc:  # the system refused something no check above foresaw: still one line
            where = f": {exc.filename}" if exc.filename else ""
            print(f"fastcifar {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
            return 1
