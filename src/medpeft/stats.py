"""Summaries over seeds and paired comparisons of two methods run on the same seeds.

Used by the benchmark report to say how a method compares with full fine-tuning:
``mean_std_ci`` summarises one method's metric over seeds; ``paired_test`` compares two
methods seed by seed (seed i of ``a`` is paired with seed i of ``b``).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats as _sps

from medpeft.errors import ConfigError, DataError

# Fewer pairs make the Wilcoxon signed-rank test uninformative (the smallest possible two-sided
# exact p-value is 2/2^n: 0.125 for n = 4), so it is only reported from this many pairs on.
WILCOXON_MIN_N = 5


def _as_values(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except Exception as exc:
        raise DataError(f"{name} could not be read as numbers ({exc}); expected one value per seed") from exc
    if arr.ndim != 1:
        raise DataError(f"{name} has shape {arr.shape}; expected a flat list with one value per seed")
    if arr.size == 0:
        raise DataError(f"{name} is empty; expected at least one value (one per seed)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(
            f"{name} contains NaN/inf at position(s) {bad.tolist()[:5]}; expected finite values "
            "(drop or recompute those seeds first)"
        )
    return arr


def _check_alpha(alpha) -> float:
    if not isinstance(alpha, (int, float, np.floating)) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha={alpha!r}; expected a number in (0, 1), e.g. 0.05 for a 95% interval")
    return float(alpha)


def _none_if_nan(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def mean_std_ci(values, alpha: float = 0.05) -> dict:
    """Mean, sample std (ddof=1) and Student-t ``1 - alpha`` CI of the mean over seeds.

    Returns ``{"mean", "std", "low", "high", "n"}``. With one value, std and the CI are NaN
    (undefined); with zero spread the CI collapses to the mean.
    """
    alpha = _check_alpha(alpha)
    x = _as_values(values, "values")
    n = int(x.size)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "std": float("nan"), "low": float("nan"), "high": float("nan"), "n": n}
    std = float(x.std(ddof=1))
    half = float(_sps.t.ppf(1.0 - alpha / 2.0, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


def paired_test(a, b) -> dict:
    """Paired comparison of two methods over the same seeds (difference = a - b).

    Returns ``{"n", "mean_diff", "std_diff", "diff_low", "diff_high", "t_stat", "t_pvalue",
    "wilcoxon_pvalue"}`` (two-sided; CI of the mean difference at 95%, t-based):

    * ``t_pvalue``: paired t-test (``scipy.stats.ttest_rel``); None for n = 1. If all
      differences are identical the t-test is degenerate: p = 1.0 when they are all zero
      (the methods agree exactly), None otherwise (t would be infinite).
    * ``wilcoxon_pvalue``: Wilcoxon signed-rank (``scipy.stats.wilcoxon``, defaults) when
      n >= 5, else None; 1.0 when all differences are zero.
    """
    x = _as_values(a, "a")
    y = _as_values(b, "b")
    if x.size != y.size:
        raise DataError(f"a has {x.size} values but b has {y.size}; expected one value per seed in both (paired)")
    d = x - y
    n = int(d.size)
    summary = mean_std_ci(d)
    out = {
        "n": n,
        "mean_diff": summary["mean"],
        "std_diff": summary["std"],
        "diff_low": summary["low"],
        "diff_high": summary["high"],
        "t_stat": None,
        "t_pvalue": None,
        "wilcoxon_pvalue": None,
    }
    all_zero = bool(np.all(d == 0))
    if n >= 2:
        if all_zero:
            out["t_stat"], out["t_pvalue"] = 0.0, 1.0
        elif np.all(d == d[0]):
            pass  # constant non-zero difference: zero variance, t-test undefined
        else:
            res = _sps.ttest_rel(x, y)
            out["t_stat"], out["t_pvalue"] = _none_if_nan(res.statistic), _none_if_nan(res.pvalue)
    if n >= WILCOXON_MIN_N:
        if all_zero:
            out["wilcoxon_pvalue"] = 1.0
        else:
            with warnings.catch_warnings():
                # scipy warns when it falls back to the normal approximation (ties/zeros); fine here.
                warnings.simplefilter("ignore")
                out["wilcoxon_pvalue"] = _none_if_nan(_sps.wilcoxon(x, y).pvalue)
    return out
