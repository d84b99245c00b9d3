"""stats.py against textbook values, and `fastcifar compare` on run and group directories written here (compare
reads files only, so these are made without training)."""

import json
import math

import pytest

from fastcifar.cli import main
from fastcifar.stats import describe, format_stat, seeds_needed, welch

T_975_3 = 3.182446305284263  # Student's t, 97.5th percentile, 3 degrees of freedom (any printed table)


def test_describe_is_the_student_t_interval_of_the_mean():
    d = describe([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5 / 3)  # sample standard deviation of 1..4
    assert d["n"] == 4 and d["mean"] == 2.5 and math.isclose(d["std"], std) and (d["min"], d["max"]) == (1.0, 4.0)
    half = T_975_3 * std / 2
    assert math.isclose(d["ci95"][0], 2.5 - half) and math.isclose(d["ci95"][1], 2.5 + half)
    one = describe([0.5])
    assert one["std"] is None and one["ci95"] is None and one["mean"] == 0.5


def test_format_is_mean_std_n_and_ci():
    d = {"n": 3, "mean": 0.9412, "std": 0.0011, "min": 0.94, "max": 0.9423, "ci95": [0.9385, 0.9439]}
    assert format_stat(d, 100, "%") == "94.12 ± 0.11 % (n=3, 95 % CI 93.85–94.39)"
    assert format_stat(describe([0.9412]), 100, "%") == "94.12 % (n=1)"


def test_welch_difference_interval_and_p_match_the_formulas():
    a, b = [0.940, 0.942, 0.941, 0.943], [0.945, 0.949, 0.947]
    r = welch(a, b)
    va, vb = describe(a)["std"] ** 2 / 4, describe(b)["std"] ** 2 / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)  # Welch–Satterthwaite
    assert math.isclose(r["df"], df)
    diff = sum(b) / 3 - sum(a) / 4
    assert math.isclose(r["diff"], diff)
    from scipy import stats

    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert math.isclose(r["ci95"][0], diff - half) and math.isclose(r["ci95"][1], diff + half)
    assert math.isclose(r["p"], 2 * stats.t.sf(diff / math.sqrt(va + vb), df))
    assert welch([0.9], b)["p"] is None  # one run: no spread to test against


def test_seeds_needed_is_the_smallest_n_that_would_be_significant():
    diff, sa, sb = 0.001, 0.002, 0.0015
    n = seeds_needed(diff, sa, sb)

    def p_at(k):
        return welch([0.0 + sa * z for z in _unit(k)], [diff + sb * z for z in _unit(k)])["p"]

    assert n is not None and p_at(n) < 0.05 <= p_at(n - 1)
    assert seeds_needed(0.0, sa, sb) is None


def _unit(k):
    """k values with mean 0 and sample standard deviation exactly 1."""
    xs = [i - (k - 1) / 2 for i in range(k)]
    s = math.sqrt(sum(x * x for x in xs) / (k - 1))
    return [x / s for x in xs]


def _run(folder, seed, best, final, epoch_s, lr=0.1, tta="off"):
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "train_time_s": epoch_s, "test_acc": best * (e + 1) / 2, "compile_s": 0.0} for e in range(2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"finished": True, "best_test_acc": best, "best_test_acc_no_tta": best, "final_test_acc": final,
               "final_test_acc_tta": None, "mean_epoch_time_s": epoch_s, "mean_train_time_s": epoch_s,
               "best_epoch": 1, "epochs_done": 2, "headline": "no TTA"}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.json").write_text(json.dumps({"config": {"lr": lr, "seed": seed, "tta": tta, "epochs": 2,
                                                                "run_dir": str(folder)}}))
    return summary


def _group(folder, bests, lr):
    runs = [{"seed": k, "run_dir": str(folder / f"seed-{k}"),
             "summary": _run(folder / f"seed-{k}", k, b, b, 2.0 + 0.01 * k, lr)} for k, b in enumerate(bests)]
    (folder / "group.json").write_text(json.dumps({"seeds": list(range(len(bests))),
                                                   "config": {"lr": lr, "tta": "off", "epochs": 2, "seed": None}}))
    (folder / "summary.json").write_text(json.dumps({"seeds": list(range(len(bests))), "runs": runs, "stats": {}}))
    return folder


def test_compare_groups_that_differ_says_so(tmp_path, capsys):
    a = _group(tmp_path / "a", [0.940, 0.941, 0.942], lr=0.1)
    b = _group(tmp_path / "b", [0.950, 0.951, 0.952], lr=0.2)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "best test accuracy (headline): A 94.10 ± 0.10 % (n=3) | B 95.10 ± 0.10 % (n=3)" in out
    assert "B − A: +1.00 % (95 % CI" in out and "distinguishable from seed noise at n=3 vs 3" in out
    assert "not distinguishable" not in out.split("final test accuracy")[0]
    assert "--lr" in out and "0.1" in out and "0.2" in out
    assert main(["compare", str(a), str(b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = result["metrics"]["best_test_acc"]
    assert best["distinguishable"] is True and math.isclose(best["diff"], 0.01) and best["p"] < 0.05
    assert result["config_diff"] == {"lr": [0.1, 0.2]}


def test_compare_within_noise_says_how_many_seeds_would_tell(tmp_path, capsys):
    a = _group(tmp_path / "a", [0.940, 0.944, 0.942], lr=0.1)
    b = _group(tmp_path / "b", [0.941, 0.946, 0.943], lr=0.1)
    assert main(["compare", str(a), str(b), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["metrics"]["best_test_acc"]
    assert best["distinguishable"] is False
    assert best["seeds_needed"] == seeds_needed(best["diff"], best["a"]["std"], best["b"]["std"]) > 3
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"about {best['seeds_needed']} seeds per side would make it so" in out
    assert "nothing but the seeds" in out
    assert max(map(len, out.splitlines())) <= 120  # a terminal's width: the advice wraps onto its own line


def test_compare_a_single_run_cannot_tell(tmp_path, capsys):
    _run(tmp_path / "r", 0, 0.93, 0.93, 2.0)
    g = _group(tmp_path / "g", [0.940, 0.941, 0.942], lr=0.1)
    assert main(["compare", str(tmp_path / "r"), str(g)]) == 0
    assert "cannot tell: n=1 vs 3" in capsys.readouterr().out


def test_every_verdict_fits_120_columns_whole_words_kept():
    """The longest verdicts (a single run against 100; advice on seeds) wrap within a terminal's width."""
    from fastcifar.compare import format_comparison

    side = lambda n: {"n": n, "mean": 0.94, "std": None if n == 1 else 0.001}  # noqa: E731
    metrics = {"best_test_acc": {"a": side(1), "b": side(100), "diff": 0.0, "ci95": None, "p": None,
                                 "distinguishable": False},
               "final_test_acc": {"a": side(3), "b": side(3), "diff": 1e-4, "ci95": [-1e-3, 1e-3], "p": 0.812,
                                  "distinguishable": False, "seeds_needed": None}}
    text = format_comparison({"a": {"path": "runs/a", "kind": "run", "runs": 1},
                              "b": {"path": "runs/b", "kind": "group", "runs": 100}, "metrics": metrics,
                              "config_diff": {}})
    assert max(map(len, text.splitlines())) <= 120, text
    words = " ".join(text.split())
    assert "cannot tell: n=1 vs 100, a single run has no spread to judge the difference against (train each with " \
        "--seeds 3 or more)" in words and "even 1000 seeds per side would not at the observed spread" in words


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "holds no summary.json"),
    (lambda p: (p.mkdir(), (p / "summary.json").write_text("{")), "missing or unreadable"),
])
def test_compare_of_something_else_is_one_clear_error(tmp_path, capsys, make, message):
    make(tmp_path / "x")
    _run(tmp_path / "r", 0, 0.93, 0.93, 2.0)
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
