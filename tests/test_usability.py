"""What users of timm, Lightning and W&B expect: extendable runs, evaluation of a checkpoint, paths that mean what
they say, fast help, a console that fits, and the README's snippet that loads best.pt."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from support import REPO, tiny_config
from fastcifar.checkpoint import save_checkpoint
from fastcifar.cli import main
from fastcifar.config import build_config
from fastcifar.console import epoch_line
from fastcifar.train import fit

FLAGS = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--wandb", "off", "--progress",
         "off", "--no-report"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    run = tmp_path_factory.mktemp("usability") / "run"
    fit(tiny_config(run, epochs=2))
    return run


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_more_epochs_extends_the_run_and_says_what_the_lr_does(two_epochs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_epochs, run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--progress", "off", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "extending the run from 2 to 3 epochs" in out and "planned for 3 epochs" in out
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # 4 steps an epoch: epoch 2 starts at step 8 of the 12-step cosine the 3-epoch run follows
    assert rows[2]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 12)))
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["epochs"] == 3
    assert config["extended"] == [{"from_epochs": 2, "to_epochs": 3, "at_epoch": 2,
                                   "lr_at_epoch": pytest.approx(rows[2]["lr"])}]
    assert json.loads((run / "summary.json").read_text())["finished"]


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(two_epochs, tmp_path, capsys):
    new = tmp_path / "new"
    rc = main(["train", *FLAGS, "--epochs", "1", "--lr", "1e-12", "--init-from", str(two_epochs / "best.pt"),
               "--run-dir", str(new)])
    assert rc == 0
    assert f"starting from the weights of {two_epochs / 'best.pt'}" in capsys.readouterr().out
    source = torch.load(two_epochs / "best.pt", weights_only=False)["model"]
    trained = torch.load(new / "last.pt", weights_only=False)["model"]
    assert torch.allclose(source["conv1.weight"], trained["conv1.weight"], atol=1e-8)  # lr 1e-12: barely moved
    assert json.loads((new / "config.json").read_text())["config"]["init_from"] == str(two_epochs / "best.pt")


def test_resume_can_shorten_the_run_and_set_save_every_back_to_auto(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FLAGS, "--epochs", "4", "--save-every", "2", "--stop-after-epoch", "2",
                 "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["save_every"] == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--save-every", "auto"]) == 0
    assert "shortening the run from 4 to 3 epochs" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["epochs"] == 3 and config["save_every"] is None
    assert [r["epoch"] for r in metrics(run)] == [0, 1, 2]


def test_eval_reports_a_checkpoints_accuracy_and_loss(two_epochs, capsys):
    last = metrics(two_epochs)[-1]
    assert main(["eval", str(two_epochs / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc"] == pytest.approx(last["test_acc"]) and result["test_images"] == 16
    assert result["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5) and result["epoch"] == 1
    assert main(["eval", str(two_epochs / "best.pt"), "--tta", "flip"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"test accuracy \d+\.\d\d %, loss \d\.\d{4} over 16 images \| flip TTA: accuracy", out), out
    assert main(["eval", str(two_epochs / "missing.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_eval_takes_its_own_flags_and_this_machines_precision(two_epochs, tmp_path, capsys):
    assert main(["eval", str(two_epochs / "best.pt"), "--batch-size", "0"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size must be a positive whole number" in err and "--eval-batch-size" not in err
    best = torch.load(two_epochs / "best.pt", weights_only=False)  # trained on a GPU with explicit fp16:
    save_checkpoint(tmp_path / "gpu.pt", {**best, "config": {**best["config"], "amp": "fp16", "loader": "dali"}})
    assert main(["eval", str(tmp_path / "gpu.pt"), "--device", "cpu"]) == 0, capsys.readouterr().err


def test_the_readme_loads_best_pt_in_three_lines_and_classifies_as_training_did(two_epochs):
    from fastcifar.data.augment import Normalizer
    from fastcifar.data.cifar import SYNTHETIC_DATA_SEED, make_synthetic

    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"<!-- load-best -->\s*```python\n(.*?)```", readme, re.S).group(1)
    code = [line for line in snippet.splitlines() if line.strip()]
    assert len(code) == 3, code
    namespace = {}
    exec(snippet.replace("runs/RUN", str(two_epochs)), namespace)
    best = torch.load(two_epochs / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(v, best[k]) for k, v in namespace["model"].state_dict().items())
    # the next snippet: inputs in [0, 1], normalised with the stored mean/std, give the class names of the
    # predictions on the loader's normalisation of the same pixels
    classify = re.search(r"<!-- classify -->\s*```python\n(.*?)```", readme, re.S).group(1)
    pixels = torch.from_numpy(make_synthetic(20, 10, seed=SYNTHETIC_DATA_SEED).train_images).permute(0, 3, 1, 2)
    namespace["x"] = pixels.float() / 255
    printed = []
    namespace["print"] = printed.append
    with torch.no_grad():
        exec(classify, namespace)
        want = namespace["model"](Normalizer()(pixels)).argmax(1)
    assert printed == [[f"synthetic-{i}" for i in want.tolist()]]


def test_paths_expand_home_and_environment_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTCIFAR_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", *FLAGS, "--epochs", "1", "--run-dir=~/runs/a"]) == 0
    assert (tmp_path / "home" / "runs" / "a" / "summary.json").exists()
    assert main(["train", "--dataset", "cifar10", "--data-dir=$FASTCIFAR_TEST_DATA", "--no-download",
                 "--run-dir=~/runs/b"]) == 1
    assert f"looked in: {tmp_path / 'data'}" in capsys.readouterr().err
    assert not (tmp_path / "~").exists() and not (tmp_path / "$FASTCIFAR_TEST_DATA").exists()
    assert main(["train", "--resume=~/runs/a", "--progress", "off"]) == 1  # expanded, found, and finished
    assert "already finished all 1 epochs" in capsys.readouterr().err


def test_the_header_says_how_many_images_an_epoch_trains_on(tmp_path, capsys):
    assert main(["train", *FLAGS[:2], "--synthetic-size", "40", "--batch-size", "16", "--epochs", "1", *FLAGS[6:],
                 "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "training on 32 of 40 images per epoch (2 steps of 16; the last 8 are dropped" in out
    assert "warning: 20.0% of the training set is dropped every epoch" in out
    assert "torch ops on the CPU" in out and "GPU-resident" not in out


def test_epoch_lines_fit_120_columns_and_the_table_says_where_the_weights_are(two_epochs, tmp_path, capsys):
    cfg = build_config(epochs=100, tta="flip")
    row = {"epoch": 99, "train_loss": 12.3456, "test_loss": 123.4567, "train_acc": 1.0, "test_acc": 0.9999,
           "test_acc_tta": 0.9999, "lr": 1.234e-3, "lr_end": 1.0e-12, "epoch_time_s": 1234.56,
           "checkpoint_time_s": 12.34, "train_images_per_s": 123_456.0, "mfu": 0.4567, "compile_s": 55.5,
           "first_reached": [0.9, 0.92], "elapsed_s": 100.0,
           "flags": {"vanishing": [f"layer{i}.0.conv1" for i in range(8)], "exploding": []}}
    line, *notes = epoch_line(cfg, row).splitlines()
    assert len(line) <= 120, (len(line), line)
    assert any("55.5 s of compilation" in n for n in notes) and any("FLAGGED vanishing" in n for n in notes)
    assert "lr 1.2e-3→1e-12" in line
    assert main(["train", *FLAGS, "--epochs", "1", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 120 for line in out.splitlines() if line.startswith("epoch "))
    assert re.search(r"Total wall time +\| \d", out)
    assert f"| {tmp_path / 'r' / 'last.pt'}" in out and f"| {tmp_path / 'r' / 'best.pt'}" in out


def test_help_is_instant_because_it_imports_no_torch():
    code = ("import sys\nfrom fastcifar.cli import build_parser\np = build_parser()\n"
            "for cmd in ('train', 'eval', 'flops', 'report'):\n"
            "    p._subparsers._group_actions[0].choices[cmd].format_help()\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'fvcore', 'matplotlib', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_device_name_counts_ddp_processes():
    from fastcifar.flops import device_name, throughput

    assert device_name("cpu", world_size=2).endswith(" x 2") and "x 2" not in device_name("cpu")
    # MFU: the image rate is global, the peak per GPU
    assert throughput(1000.0, 10**9, "cuda", peak_tflops=1.0, world_size=4)["mfu"] == pytest.approx(0.25)
    assert throughput(1000.0, 10**9, "cuda", peak_tflops=1.0)["mfu"] == pytest.approx(1.0)
