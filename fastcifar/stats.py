"""The statistics of repeated runs: a metric's mean, spread and 95 % confidence interval over seeds, and the
comparison of two sets of runs (difference, its confidence interval, Welch's t-test, the seeds that would tell
them apart). scipy.stats supplies the t distribution; nothing here is a hand-written distribution.

Confidence intervals are Student's t intervals of the mean, mean ± t(0.975, n-1) · s / √n with the sample
standard deviation s (n-1 in the denominator): seed-to-seed results are a small sample whose spread is estimated
from the same runs.
"""

from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
MAX_SEEDS_SUGGESTED = 1000  # beyond this "how many seeds" answers "more than 1000"


def describe(values: list[float]) -> dict:
    """{"n", "mean", "std", "min", "max", "ci95": [lo, hi]}; std and ci95 are None for a single value."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    ci = None
    if n > 1:
        half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values), "ci95": ci}


def format_stat(d: dict, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """`94.12 ± 0.11 % (n=3, 95 % CI 93.85–94.39)`; one value: `94.12 % (n=1)`; none: `—`."""
    if not d or not d["n"]:
        return "—"
    unit = f" {unit}" if unit else ""
    mean = f"{scale * d['mean']:.{digits}f}"
    if d["std"] is None:
        return f"{mean}{unit} (n=1)"
    lo, hi = (scale * v for v in d["ci95"])
    return f"{mean} ± {scale * d['std']:.{digits}f}{unit} (n={d['n']}, 95 % CI {lo:.{digits}f}–{hi:.{digits}f})"


def welch(a: list[float], b: list[float]) -> dict:
    """B - A: the difference of the means, its 95 % confidence interval (Welch–Satterthwaite degrees of freedom)
    and Welch's t-test p-value (scipy.stats.ttest_ind, equal_var=False). None where a side has fewer than 2 runs
    (no spread to judge against) or neither side varies at all."""
    from scipy import stats

    diff = statistics.fmean(b) - statistics.fmean(a) if a and b else None
    out = {"diff": diff, "ci95": None, "p": None, "df": None}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return out
    result = stats.ttest_ind(b, a, equal_var=False)
    ci = result.confidence_interval(CONFIDENCE)
    out.update(ci95=[float(ci.low), float(ci.high)], p=float(result.pvalue), df=float(result.df))
    return out


def seeds_needed(diff: float, std_a: float, std_b: float, max_n: int = MAX_SEEDS_SUGGESTED) -> int | None:
    """The smallest number of seeds per side at which Welch's test would call `diff` significant at the 5 %
    level, if the means and standard deviations stayed as observed; None when even max_n would not (or no
    difference at all)."""
    from scipy import stats

    if diff == 0:
        return None
    spread = std_a ** 2 + std_b ** 2
    if spread == 0:
        return 2
    for n in range(2, max_n + 1):
        se2 = spread / n
        df = se2 ** 2 / ((std_a ** 2 / n) ** 2 / (n - 1) + (std_b ** 2 / n) ** 2 / (n - 1))
        if 2 * stats.t.sf(abs(diff) / math.sqrt(se2), df) < ALPHA:
            return n
    return None
