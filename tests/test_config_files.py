"""Configuration as timm and Lightning users expect it, through the command line: --config files with flags over
them, --print-config, a run's own config.json repeated; a recipe's warm-up that follows --epochs; quick checks
(--limit-steps, --fast-dev-run); and the small things (version, eval of a run directory, the .lock)."""

import json
import re
import tomllib

import pytest
import yaml

from support import REPO, run_cli

TINY = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--wandb", "off", "--progress",
        "off", "--no-report"]


class Result:
    def __init__(self, returncode, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


@pytest.fixture
def cli(capsys):
    """`fastcifar ARGS` in this process (the same main() the console script calls; no interpreter start-up)."""
    from fastcifar.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        return Result(code, capsys.readouterr())

    return run


@pytest.fixture
def printed_config(cli):
    def printed(*args) -> dict:
        result = cli("train", *args, "--print-config")
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)

    return printed


def test_a_yaml_file_sets_flags_and_the_command_line_overrides_it(tmp_path, printed_config):
    (tmp_path / "run.yaml").write_text("recipe: fast\nepochs: 4\nbatch-size: 64\nlr: 1e-2\ngrad_epochs: [0, 3]\n"
                                       "augment: crop,flip\n")
    config = printed_config("--config", str(tmp_path / "run.yaml"), "--epochs", "6")
    assert config["recipe"] == "fast" and config["optimizer"] == "sgd"  # the file's recipe, its other defaults
    assert config["epochs"] == 6 and config["batch_size"] == 64  # the flag over the file, the file over the recipe
    assert config["lr"] == 0.01 and config["grad_epochs"] == [0, 3]  # PyYAML's "1e-2" string read as the number
    # --print-config is a file --config reads back to the same configuration
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(config))
    assert printed_config("--config", str(tmp_path / "printed.yaml")) == config


def test_a_runs_config_json_repeats_the_run_in_a_new_directory(tmp_path, cli):
    first = tmp_path / "first"
    assert cli("train", *TINY, "--epochs", "1", "--seed", "3", "--run-dir", str(first)).returncode == 0
    again = tmp_path / "again"
    result = cli("train", "--config", str(first / "config.json"), "--run-dir", str(again))
    assert result.returncode == 0, result.stderr
    assert "is a run's config: the new run gets its own --run-dir" in result.stdout
    saved = [json.loads((d / "config.json").read_text())["config"] for d in (first, again)]
    assert {**saved[0], "run_dir": None} == {**saved[1], "run_dir": None} and saved[1]["seed"] == 3
    rows = [json.loads((d / "metrics.jsonl").read_text()) for d in (first, again)]
    assert rows[0]["train_loss"] == rows[1]["train_loss"] and rows[0]["test_acc"] == rows[1]["test_acc"]


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown setting(s) epochz"),
    ("epochs: ten\n", "epochs must be a whole number, got 'ten'"),
    ("monitor: maybe\n", "monitor must be true or false"),
    ("- 1\n- 2\n", "must be a mapping of flag: value"),
    ("epochs: [\n", "is neither valid YAML nor JSON"),
    ("lr: -1\n", "--lr must be positive"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path, text, message, cli):
    (tmp_path / "bad.yaml").write_text(text)
    result = cli("train", "--config", str(tmp_path / "bad.yaml"), "--print-config")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_config_and_resume_are_one_or_the_other(tmp_path, cli):
    (tmp_path / "run.yaml").write_text("epochs: 2\n")
    result = cli("train", "--config", str(tmp_path / "run.yaml"), "--resume", str(tmp_path))
    assert result.returncode == 1 and "--config starts a new run: pick one" in result.stderr


def test_a_recipes_warm_up_follows_epochs(tmp_path, printed_config, cli):
    config = printed_config("--recipe", "fast", "--epochs", "3")
    assert config["warmup_epochs"] == pytest.approx(2 * 3 / 15)  # the recipe's 2 of 15 epochs, as a share
    assert printed_config("--recipe", "fast", "--epochs", "3", "--warmup-epochs", "1")["warmup_epochs"] == 1
    assert printed_config("--recipe", "fast")["warmup_epochs"] == 2
    # a run's file of the recipe follows --epochs too
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(printed_config("--recipe", "fast")))
    assert printed_config("--config", str(tmp_path / "fast.yaml"), "--epochs", "2")["warmup_epochs"] == \
        pytest.approx(2 * 2 / 15)
    result = cli("train", "--recipe", "fast", "--epochs", "2", "--warmup-epochs", "2")
    assert result.returncode == 1 and "--warmup-epochs (2) must be at least 0 and less than --epochs (2)" in \
        result.stderr
    result = cli("train", *TINY, "--recipe", "fast", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "note: the fast recipe warms up for 2 of its 15 epochs; for --epochs 1 that is 0.133" in result.stdout


def test_fast_dev_run_goes_through_train_eval_checkpoint_and_report_in_a_few_steps(tmp_path):
    run = tmp_path / "r"
    result = run_cli("train", "--dataset", "synthetic", "--fast-dev-run", "--batch-size", "32", "--progress", "off",
                     "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert "quick check (--limit-steps 2): 2 steps of 32 and at most 2 evaluation batches per epoch" in result.stdout
    assert "Results (quick check, --limit-steps 2)" in result.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["train_images"] == 2 * 32 for r in rows)
    assert len((run / "steps.jsonl").read_text().splitlines()) == 4
    assert {"last.pt", "best.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    assert len(list((run / "plots").glob("*.png"))) == 3
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["limit_steps"] == 2 and config["epochs"] == 2 and config["wandb"] == "off"


def test_limit_steps_trains_and_evaluates_only_that_many_batches(tmp_path, cli):
    import torch

    from fastcifar.data.loaders import make_eval_loader
    from fastcifar.data.plan import LimitedEvalLoader

    run = tmp_path / "r"
    result = cli("train", *TINY, "--synthetic-size", "64", "--epochs", "1", "--limit-steps", "3",
                     "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "metrics.jsonl").read_text())["train_images"] == 3 * 8
    assert len((run / "steps.jsonl").read_text().splitlines()) == 3
    # eval names only the subset it took (it once said "subset 32 train" of a training set it never loaded)
    result = cli("eval", run / "last.pt", "--test-subset", "10")
    assert result.returncode == 0 and "SYNTHETIC data (64 train / 32 test, not CIFAR-10), subset 10 test" in \
        " ".join(result.stdout.split()), result.stdout  # wrapped to the terminal's width
    images, labels = torch.zeros(20, 32, 32, 3, dtype=torch.uint8).numpy(), torch.arange(20).numpy() % 10
    loader = make_eval_loader("torch", images, labels, 8, torch.device("cpu"))
    assert (len(LimitedEvalLoader(loader, 2)), LimitedEvalLoader(loader, 2).num_images) == (2, 16)
    assert LimitedEvalLoader(loader, 5).num_images == 20  # all 3 batches, the last one padded: the padding not counted
    assert sum(len(b[1]) for b in LimitedEvalLoader(loader, 2)) == 16


def test_the_version_has_one_source():
    import fastcifar

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastcifar.__version__"}
    assert run_cli("--version").stdout.strip() == f"fastcifar {fastcifar.__version__}"


def test_eval_of_a_run_directory_names_its_checkpoints(tmp_path, cli):
    result = cli("eval", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"is a run directory; evaluate a checkpoint in it: {tmp_path / 'best.pt'} (the best epoch)" in \
        result.stderr


def test_init_from_at_the_recipes_lr_says_how_to_fine_tune(tmp_path, cli):
    first = tmp_path / "first"
    assert cli("train", *TINY, "--epochs", "1", "--run-dir", str(first)).returncode == 0
    result = cli("train", *TINY, "--epochs", "1", "--init-from", str(first / "best.pt"),
                     "--run-dir", str(tmp_path / "second"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"to fine-tune, pass about a tenth of it \(--lr\) and --warmup-epochs 1", result.stdout)
