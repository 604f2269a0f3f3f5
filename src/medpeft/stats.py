"""Summaries over seeds and paired comparisons of two methods run on the same seeds.

Used by the benchmark report to say how a method compares with full fine-tuning:
``mean_std_ci`` summarises one method's metric over seeds; ``paired_test`` compares two
methods seed by seed (seed i of ``a`` is paired with seed i of ``b``); ``holm`` and
``benjamini_hochberg`` adjust many such p-values; ``tost_paired`` tests equivalence within a
margin; ``seeds_needed`` / ``detectable_difference`` size the seed count (paired t power);
``verdict`` turns one comparison into better / worse / equivalent / inconclusive.
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


def _paired(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, a - b) as checked arrays of one value per seed each."""
    x = _as_values(a, "a")
    y = _as_values(b, "b")
    if x.size != y.size:
        raise DataError(f"a has {x.size} values but b has {y.size}; expected one value per seed in both (paired)")
    return x, y, x - y


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
    x, y, d = _paired(a, b)
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


# ---------------------------------------------------------------------- multiplicity, equivalence, power


def _pvalues(pvalues) -> tuple[list, np.ndarray, np.ndarray]:
    """(list, positions of the non-None entries, their values); NaN or out-of-range p is an error."""
    values = list(pvalues)
    where = [i for i, p in enumerate(values) if p is not None]
    try:
        p = np.asarray([values[i] for i in where], dtype=np.float64)
    except Exception as exc:
        raise DataError(f"p-values could not be read as numbers ({exc}); expected numbers in [0, 1] or None") from exc
    bad = [where[i] for i in np.flatnonzero(~np.isfinite(p) | (p < 0) | (p > 1))]
    if bad:
        raise DataError(f"p-value(s) at position(s) {bad[:5]} are NaN or outside [0, 1]; expected numbers in "
                        "[0, 1], or None for a comparison without a test")
    return values, np.asarray(where, dtype=np.int64), p


def _put_back(n: int, where: np.ndarray, adjusted: np.ndarray) -> list:
    out: list = [None] * n
    for i, q in zip(where.tolist(), adjusted.tolist()):
        out[i] = float(q)
    return out


def holm(pvalues) -> list:
    """Holm step-down adjusted p-values (family-wise error), in the input order.

    None entries (comparisons without a test) pass through as None and do not count in the
    family. Equals ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]``.
    """
    values, where, p = _pvalues(pvalues)
    m = p.size
    if m == 0:
        return list(values)
    order = np.argsort(p, kind="mergesort")
    # k-th smallest times (m - k + 1), made monotone non-decreasing, capped at 1
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return _put_back(len(values), where, adjusted)


def benjamini_hochberg(pvalues) -> list:
    """Benjamini-Hochberg q-values (false discovery rate), in the input order; None passes through.

    Equals ``statsmodels.stats.multitest.multipletests(p, method="fdr_bh")[1]``.
    """
    values, where, p = _pvalues(pvalues)
    m = p.size
    if m == 0:
        return list(values)
    order = np.argsort(p, kind="mergesort")
    # k-th smallest times m / k, made monotone from the largest down, capped at 1
    scaled = p[order] * m / np.arange(1, m + 1)
    stepped = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return _put_back(len(values), where, adjusted)


def _check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(margin)) or float(margin) <= 0:
        raise ConfigError(f"margin={margin!r}; expected a positive number on the metric's scale, e.g. 0.02 "
                          "(differences within +-margin count as equivalent)")
    return float(margin)


def _check_sd(sd_diff) -> float:
    try:
        sd = float(sd_diff)
    except (TypeError, ValueError):
        raise DataError(f"sd_diff={sd_diff!r}; expected the standard deviation of the paired differences") from None
    if not math.isfinite(sd) or sd < 0:
        raise DataError(f"sd_diff={sd_diff!r}; expected a finite number >= 0 (the SD of the paired differences; "
                        "it needs at least two seeds)")
    return sd


def _check_power(power) -> float:
    if isinstance(power, bool) or not isinstance(power, (int, float, np.floating)) or not 0.0 < float(power) < 1.0:
        raise ConfigError(f"power={power!r}; expected a number in (0, 1), e.g. 0.8")
    return float(power)


def tost_paired(a, b, margin: float, alpha: float = 0.05) -> dict:
    """Paired two one-sided t-tests: is mean(a - b) inside (-margin, +margin)?

    Returns ``{"n", "mean_diff", "p_lower", "p_upper", "p", "equivalent"}``: ``p_lower`` tests
    H0 mean <= -margin, ``p_upper`` H0 mean >= +margin, ``p = max`` of both and ``equivalent = p
    < alpha``. Matches ``statsmodels.stats.weightstats.ttost_paired(a, b, -margin, margin)``.
    With one pair the p-values are None (not equivalent); with zero spread in the differences
    the t statistics are infinite and each p is 0 or 1 (whether the mean lies inside that bound).
    """
    margin = _check_margin(margin)
    alpha = _check_alpha(alpha)
    x, y, d = _paired(a, b)
    n = int(d.size)
    mean = float(d.mean())
    out = {"n": n, "mean_diff": mean, "p_lower": None, "p_upper": None, "p": None, "equivalent": False}
    if n < 2:
        return out
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        p_lower, p_upper = float(mean <= -margin), float(mean >= margin)
    else:
        p_lower = float(_sps.t.sf((mean + margin) / se, df=n - 1))
        p_upper = float(_sps.t.cdf((mean - margin) / se, df=n - 1))
    p = max(p_lower, p_upper)
    out.update(p_lower=p_lower, p_upper=p_upper, p=p, equivalent=bool(p < alpha))
    return out


def _paired_power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample (paired) t-test for a standardised effect with n pairs."""
    df = n - 1
    crit = float(_sps.t.isf(alpha / 2.0, df))
    nc = abs(effect) * math.sqrt(n)
    upper = float(_sps.nct.sf(crit, df, nc))
    lower = float(_sps.nct.cdf(-crit, df, nc))
    # scipy's noncentral t returns NaN far in its lower tail; with nc >= 0 that tail is ~0
    return upper + (0.0 if math.isnan(lower) else lower)


def seeds_needed(sd_diff, margin: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 10_000) -> int | None:
    """Paired seeds a two-sided paired t-test needs to detect a mean difference of ``margin``.

    ``sd_diff``: SD of the paired differences (a - b over seeds). Smallest n >= 2 whose power
    (noncentral t) reaches ``power``: ``ceil`` of ``statsmodels TTestPower().solve_power``.
    None when it is not estimable: zero spread (no noise seen yet) or more than ``max_n`` seeds.
    """
    sd = _check_sd(sd_diff)
    margin = _check_margin(margin)
    alpha, power = _check_alpha(alpha), _check_power(power)
    if sd == 0:
        return None
    effect = margin / sd
    if _paired_power(effect, 2, alpha) >= power:
        return 2
    lo, hi = 2, 4  # power grows with n: double until it is reached, then bisect
    while _paired_power(effect, hi, alpha) < power:
        if hi >= max_n:
            return None
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _paired_power(effect, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def detectable_difference(sd_diff, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean paired difference a two-sided paired t-test on ``n`` seeds detects with ``power``.

    Effect size from ``statsmodels TTestPower().solve_power(nobs=n)`` times ``sd_diff``; 0.0 when
    the differences have no spread.
    """
    sd = _check_sd(sd_diff)
    alpha, power = _check_alpha(alpha), _check_power(power)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise DataError(f"n={n!r}; expected a whole number of paired seeds >= 2")
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    hi = 1.0
    while _paired_power(hi, int(n), alpha) < power:  # bracket the effect size
        hi *= 2.0
    effect = brentq(lambda e: _paired_power(e, int(n), alpha) - power, 0.0, hi, xtol=1e-12)
    return float(effect * sd)


VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def verdict(delta, p_adj, tost_p, alpha: float = 0.05) -> str:
    """One word for a comparison with the reference (delta = method minus reference).

    * "better" / "worse": the (multiplicity-adjusted) paired test is significant, p_adj < alpha,
      and delta > 0 / < 0. A difference that is significant *and* inside the equivalence margin
      is still called better/worse: the test says it is real, the margin only says it is small.
    * "equivalent": not better/worse and the TOST p < alpha (the difference lies within the margin).
    * "inconclusive": neither (too few seeds or too much noise to say); also when a p is None.
    """
    alpha = _check_alpha(alpha)
    for name, value in (("delta", delta), ("p_adj", p_adj), ("tost_p", tost_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
                                  or math.isnan(float(value))):
            raise DataError(f"{name}={value!r}; expected a number or None (no test)")
    if delta is not None and p_adj is not None and p_adj < alpha and delta != 0:
        return "better" if delta > 0 else "worse"
    if tost_p is not None and tost_p < alpha:
        return "equivalent"
    return "inconclusive"
