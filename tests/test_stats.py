"""``medpeft.stats``: every statistic against statsmodels / scipy on known inputs."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from medpeft.errors import ConfigError, DataError
from medpeft.stats import (benjamini_hochberg, detectable_difference, holm, mean_std_ci, paired_test, seeds_needed,
                           tost_paired, verdict)

multitest = pytest.importorskip("statsmodels.stats.multitest")
weightstats = pytest.importorskip("statsmodels.stats.weightstats")
power = pytest.importorskip("statsmodels.stats.power")

PVALUES = [0.01, 0.04, 0.03, 0.2, 0.5, 0.001, 0.04, 0.9]  # ties and an unsorted order on purpose


@pytest.mark.parametrize("ours, method", [(holm, "holm"), (benjamini_hochberg, "fdr_bh")])
def test_adjusted_pvalues_match_statsmodels(ours, method):
    ref = multitest.multipletests(PVALUES, method=method)[1]
    assert ours(PVALUES) == pytest.approx(list(ref), abs=1e-12)
    # None passes through and is not part of the family
    with_none = [None, *PVALUES[:3], None, *PVALUES[3:]]
    got = ours(with_none)
    assert got[0] is None and got[4] is None
    assert [g for g in got if g is not None] == pytest.approx(list(ref), abs=1e-12)
    assert ours([]) == [] and ours([None]) == [None]
    assert ours([0.03]) == [0.03]


def test_holm_and_bh_differ_where_they_should():
    # Holm controls the family-wise error and is never below BH's q
    h, q = holm(PVALUES), benjamini_hochberg(PVALUES)
    assert all(a >= b - 1e-15 for a, b in zip(h, q)) and h != q


@pytest.mark.parametrize("bad", [[0.1, float("nan")], [1.2], [-0.1], ["x"]])
def test_adjusted_pvalues_reject_bad_input(bad):
    for fn in (holm, benjamini_hochberg):
        with pytest.raises(DataError, match="p-value"):
            fn(bad)


A = [0.81, 0.83, 0.80, 0.85, 0.82, 0.79]
B = [0.80, 0.82, 0.815, 0.84, 0.81, 0.80]


@pytest.mark.parametrize("margin", [0.005, 0.02, 0.1])
def test_tost_paired_matches_statsmodels(margin):
    got = tost_paired(A, B, margin)
    p, lower, upper = weightstats.ttost_paired(np.array(A), np.array(B), -margin, margin)
    assert got["p"] == pytest.approx(p, rel=1e-10)
    assert got["p_lower"] == pytest.approx(lower[1], rel=1e-10)
    assert got["p_upper"] == pytest.approx(upper[1], rel=1e-10)
    assert got["equivalent"] == (p < 0.05) and got["n"] == 6
    assert got["mean_diff"] == pytest.approx(np.mean(np.subtract(A, B)))


def test_tost_paired_edge_cases_and_errors():
    assert tost_paired([0.8], [0.7], 0.02)["p"] is None  # one pair: no test
    assert tost_paired([0.8], [0.7], 0.02)["equivalent"] is False
    same = tost_paired([0.8, 0.7, 0.9], [0.8, 0.7, 0.9], 0.02)  # zero spread inside the margin
    assert same["p"] == 0.0 and same["equivalent"]
    far = tost_paired([0.5, 0.75], [0.25, 0.5], 0.02)  # zero spread outside the margin (exact in binary)
    assert far["p"] == 1.0 and not far["equivalent"]
    with pytest.raises(ConfigError, match="margin"):
        tost_paired(A, B, 0)
    with pytest.raises(ConfigError, match="margin"):
        tost_paired(A, B, -0.02)
    with pytest.raises(DataError, match="NaN"):
        tost_paired([0.8, float("nan")], [0.7, 0.7], 0.02)
    with pytest.raises(DataError, match="paired"):
        tost_paired([0.8, 0.7], [0.7], 0.02)


@pytest.mark.parametrize("sd, margin", [(0.01, 0.02), (0.02, 0.02), (0.05, 0.02), (0.005, 0.02), (0.0137, 0.02),
                                        (0.3, 0.02)])
def test_seeds_needed_matches_statsmodels(sd, margin):
    n = power.TTestPower().solve_power(effect_size=margin / sd, alpha=0.05, power=0.8)
    assert seeds_needed(sd, margin) == max(2, math.ceil(n))


def test_seeds_needed_other_alpha_power_and_limits():
    n = power.TTestPower().solve_power(effect_size=0.5, alpha=0.01, power=0.9)
    assert seeds_needed(0.04, 0.02, alpha=0.01, power=0.9) == math.ceil(n)
    assert seeds_needed(0.001, 0.02) == 2  # tiny noise: the smallest paired design already suffices
    assert seeds_needed(0.0, 0.02) is None  # no noise seen: not estimable
    assert seeds_needed(1.0, 0.02) is None  # beyond max_n
    with pytest.raises(DataError, match="sd_diff"):
        seeds_needed(float("nan"), 0.02)
    with pytest.raises(ConfigError, match="margin"):
        seeds_needed(0.01, 0)
    with pytest.raises(ConfigError, match="power"):
        seeds_needed(0.01, 0.02, power=1.5)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 30])
def test_detectable_difference_matches_statsmodels(n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effect = power.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8)
    assert detectable_difference(0.01, n) == pytest.approx(0.01 * effect, rel=1e-5)
    # and the two agree: with seeds_needed(sd, mdd) seeds the mdd is detectable
    assert seeds_needed(0.01, detectable_difference(0.01, n) * (1 + 1e-6)) == n


def test_detectable_difference_errors():
    assert detectable_difference(0.0, 3) == 0.0
    with pytest.raises(DataError, match="n="):
        detectable_difference(0.01, 1)
    with pytest.raises(DataError, match="sd_diff"):
        detectable_difference(-0.01, 3)


def test_verdict_rules():
    assert verdict(0.03, 0.01, 0.4) == "better"
    assert verdict(-0.03, 0.01, 0.4) == "worse"
    assert verdict(0.005, 0.01, 0.001) == "better"  # significant and inside the margin: still better
    assert verdict(0.005, 0.3, 0.01) == "equivalent"
    assert verdict(0.005, 0.3, 0.2) == "inconclusive"
    assert verdict(0.03, 0.06, None) == "inconclusive"  # the adjusted p decides, not the raw one
    assert verdict(None, None, None) == "inconclusive"
    assert verdict(0.01, 0.04, 0.5, alpha=0.01) == "inconclusive"
    with pytest.raises(DataError, match="p_adj"):
        verdict(0.01, float("nan"), 0.5)
    with pytest.raises(ConfigError, match="alpha"):
        verdict(0.01, 0.01, 0.5, alpha=2)


def test_existing_summaries_still_agree_with_scipy():
    from scipy import stats

    s = mean_std_ci(A)
    assert s["mean"] == pytest.approx(np.mean(A)) and s["std"] == pytest.approx(np.std(A, ddof=1))
    assert paired_test(A, B)["t_pvalue"] == pytest.approx(stats.ttest_rel(A, B).pvalue)
