"""Metrics against scikit-learn, bootstrap CIs against a plain loop, stats against scipy."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

from medpeft.errors import ConfigError, DataError
from medpeft.metrics import (
    METRIC_NAMES,
    _bootstrap_distribution,
    _prepare,
    compute_metrics,
    metrics_with_ci,
)
from medpeft.stats import mean_std_ci, paired_test

TOL = 1e-12


# ----------------------------------------------------------------------------- data makers


def binary_data(seed: int, n: int):
    """Labels and P(class 1) on a 0.1 grid: many ties, including exactly 0.5."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(np.round(0.35 * y + 0.65 * rng.random(n), 1), 0.0, 1.0)
    return y, p


def multiclass_data(seed: int, n: int, k: int):
    """Rows drawn from a small palette of probability vectors (ties in every column) or fresh."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(k), rng.integers(0, k, n - k)]  # every class present
    palette = rng.dirichlet(np.ones(k), size=4)
    fresh = rng.dirichlet(np.ones(k), size=n)
    s = np.where(rng.random(n)[:, None] < 0.5, palette[rng.integers(0, 4, n)], fresh)
    s[np.arange(n), y] += 0.3 * rng.random(n)  # some signal
    return y, s / s.sum(axis=1, keepdims=True)


def multilabel_data(seed: int, n: int, labels: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, labels))
    y[0], y[1] = 0, 1  # both classes in every label
    s = np.clip(np.round(0.3 * y + 0.7 * rng.random((n, labels)), 1), 0.0, 1.0)  # ties, incl. 0.5
    return y, s


# ----------------------------------------------------------------------------- vs scikit-learn


def sklearn_binary(y, p1, pred):
    return {
        "acc": accuracy_score(y, pred),
        "balanced_acc": balanced_accuracy_score(y, pred),
        "f1": f1_score(y, pred, pos_label=1),  # the positive class's F1 (default positive: class 1)
        "sensitivity": recall_score(y, pred, pos_label=1),
        "specificity": recall_score(y, pred, pos_label=0),
        "auroc": roc_auc_score(y, p1),
    }


@pytest.mark.parametrize("seed,n", [(0, 40), (1, 97), (2, 300), (3, 13)])
def test_binary_matches_sklearn_both_score_shapes(seed, n):
    y, p = binary_data(seed, n)
    assert np.any(p == 0.5)  # the tie-breaking rule is exercised
    two_col = np.stack([1 - p, p], axis=1)
    pred = np.argmax(two_col, axis=1)  # ties -> class 0
    assert np.array_equal(pred, (p > 0.5).astype(int))
    expected = sklearn_binary(y, p, pred)
    for scores in (p, two_col, p[:, None]):
        got = compute_metrics(y, scores, "binary")
        assert set(got) == set(METRIC_NAMES)
        for name in METRIC_NAMES:
            assert got[name] == pytest.approx(expected[name], abs=TOL), name


def test_binary_two_column_scores_not_summing_to_one_use_argmax_and_column_one():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.random((80, 2)), 1)
    pred = np.argmax(s, axis=1)
    got = compute_metrics(y, s, "binary")
    expected = sklearn_binary(y, s[:, 1], pred)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(expected[name], abs=TOL), name


@pytest.mark.parametrize("seed,n,k", [(0, 60, 3), (1, 200, 5), (2, 150, 9), (3, 30, 2)])
def test_multiclass_matches_sklearn(seed, n, k):
    y, s = multiclass_data(seed, n, k)
    pred = np.argmax(s, axis=1)
    mcm = multilabel_confusion_matrix(y, pred, labels=list(range(k)))
    tn, fp = mcm[:, 0, 0], mcm[:, 0, 1]
    expected = {
        "acc": accuracy_score(y, pred),
        "balanced_acc": balanced_accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="macro"),
        "sensitivity": recall_score(y, pred, average="macro", labels=list(range(k))),
        "specificity": np.mean(tn / (tn + fp)),
        "auroc": (
            roc_auc_score(y, s[:, 1])
            if k == 2
            else roc_auc_score(y, s, multi_class="ovr", average="macro")
        ),
    }
    got = compute_metrics(y, s, "multiclass")
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(expected[name], abs=TOL), name
    # sensitivity is macro recall, the same as balanced accuracy
    assert got["sensitivity"] == pytest.approx(got["balanced_acc"], abs=TOL)


@pytest.mark.parametrize("seed,n,labels", [(0, 50, 3), (1, 120, 14), (2, 400, 5)])
def test_multilabel_matches_sklearn(seed, n, labels):
    y, s = multilabel_data(seed, n, labels)
    assert np.any(s == 0.5)
    pred = (s >= 0.5).astype(int)
    expected = {
        "acc": np.mean([accuracy_score(y[:, j], pred[:, j]) for j in range(labels)]),
        "balanced_acc": np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(labels)]),
        "f1": f1_score(y, pred, average="macro", zero_division=np.nan),
        "sensitivity": recall_score(y, pred, average="macro"),
        "specificity": recall_score(1 - y, 1 - pred, average="macro"),
        "auroc": roc_auc_score(y, s, average="macro"),
    }
    got = compute_metrics(y, s, "multilabel")
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(expected[name], abs=TOL), name


def test_labels_accept_column_vectors_floats_and_bools():
    y, p = binary_data(7, 50)
    ref = compute_metrics(y, p, "binary")
    for y_alt in (y[:, None], y.astype(np.float32), y.astype(bool), y.tolist()):
        assert compute_metrics(y_alt, p, "binary") == ref
    ym, sm = multilabel_data(7, 50, 4)
    assert compute_metrics(ym.astype(np.float32), sm, "multilabel") == compute_metrics(ym, sm, "multilabel")


# ----------------------------------------------------------------------------- extremes


def test_perfect_and_inverted_predictors():
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    perfect = np.where(y == 1, 0.9, 0.2)
    got = compute_metrics(y, perfect, "binary")
    assert all(got[m] == 1.0 for m in METRIC_NAMES), got
    got = compute_metrics(y, 1 - perfect, "binary")
    assert all(got[m] == 0.0 for m in METRIC_NAMES), got

    k = 4
    ym = np.array([0, 1, 2, 3, 3, 2, 1, 0, 2])
    onehot = np.eye(k)[ym] * 0.7 + 0.1
    got = compute_metrics(ym, onehot, "multiclass")
    assert all(got[m] == 1.0 for m in METRIC_NAMES), got
    inverted = (1 - np.eye(k)[ym]) / (k - 1)  # true class gets the lowest score
    got = compute_metrics(ym, inverted, "multiclass")
    assert got["auroc"] == 0.0 and got["sensitivity"] == 0.0

    yl = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    got = compute_metrics(yl, yl * 0.8 + 0.1, "multilabel")
    assert all(got[m] == 1.0 for m in METRIC_NAMES), got
    got = compute_metrics(yl, (1 - yl) * 0.8 + 0.1, "multilabel")
    assert all(got[m] == 0.0 for m in METRIC_NAMES), got


# ----------------------------------------------------------------------------- undefined -> NaN


def test_binary_single_class_gives_nan_not_error():
    y = np.zeros(10, dtype=int)
    p = np.linspace(0.05, 0.95, 10)
    got = compute_metrics(y, p, "binary")
    assert math.isnan(got["auroc"]) and math.isnan(got["sensitivity"])
    assert got["specificity"] == pytest.approx(recall_score(y, p > 0.5, pos_label=0))
    assert got["balanced_acc"] == got["specificity"]  # mean over the classes present
    assert got["f1"] == pytest.approx(f1_score(y, p > 0.5, pos_label=1))  # positive absent, predicted: F1 0
    ci = metrics_with_ci(y, p, "binary", n_boot=50)
    assert math.isnan(ci["auroc"]["value"]) and math.isnan(ci["auroc"]["low"]) and math.isnan(ci["auroc"]["high"])
    assert ci["acc"]["low"] <= ci["acc"]["value"] <= ci["acc"]["high"]


def test_multiclass_absent_class_is_skipped_in_macro_auroc():
    y, s = multiclass_data(11, 80, 4)
    keep = y != 2
    y, s = y[keep], s[keep]  # class 2 absent from y_true but still a score column
    got = compute_metrics(y, s, "multiclass")
    present = [0, 1, 3]
    expected_auc = np.mean([roc_auc_score(y == c, s[:, c]) for c in present])
    assert got["auroc"] == pytest.approx(expected_auc, abs=TOL)
    pred = np.argmax(s, axis=1)
    assert got["balanced_acc"] == pytest.approx(
        recall_score(y, pred, labels=present, average="macro"), abs=TOL
    )
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=TOL)


def test_multilabel_label_without_positives_is_skipped():
    y, s = multilabel_data(12, 60, 4)
    y[:, 2] = 0
    s[:, 2] = np.minimum(s[:, 2], 0.4)  # never predicted either -> F1 undefined for that label
    pred = (s >= 0.5).astype(int)
    got = compute_metrics(y, s, "multilabel")
    others = [0, 1, 3]
    assert got["auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in others]), abs=TOL)
    assert got["sensitivity"] == pytest.approx(np.mean([recall_score(y[:, j], pred[:, j]) for j in others]), abs=TOL)
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=np.nan), abs=TOL)
    # per-label balanced accuracy averages the recalls of the classes present (label 2: specificity only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the single-class label
        expected_bal = np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(4)])
    assert got["balanced_acc"] == pytest.approx(expected_bal, abs=TOL)
    assert not any(math.isnan(got[m]) for m in METRIC_NAMES)


# ----------------------------------------------------------------------------- bootstrap


def loop_bootstrap(y, s, task, n_boot, seed):
    """Reference: draw the same index matrix and compute each resample separately."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    rows = [compute_metrics(y[i], s[i], task) for i in idx]
    return {m: np.array([r[m] for r in rows]) for m in METRIC_NAMES}


def rare_class(y, s, cls, keep_one_at):
    """Relabel so that class ``cls`` occurs only once: many resamples then miss it."""
    y = y.copy()
    y[y == cls] = 1 - cls if cls in (0, 1) else 0
    y[keep_one_at] = cls
    return y, s


@pytest.mark.parametrize(
    "task,data,expect_nan",
    [
        ("binary", binary_data(3, 25), False),
        ("binary", rare_class(*binary_data(4, 25), cls=1, keep_one_at=5), True),
        ("multiclass", multiclass_data(3, 30, 4), False),
        ("multiclass", rare_class(*multiclass_data(5, 30, 4), cls=3, keep_one_at=7), True),
        ("multilabel", multilabel_data(3, 20, 3), False),
    ],
)
def test_vectorised_bootstrap_equals_per_resample_loop(task, data, expect_nan):
    y, s = data
    fast = _bootstrap_distribution(_prepare(y, s, task), n_boot=60, seed=9)
    slow = loop_bootstrap(y, s, task, n_boot=60, seed=9)
    for m in METRIC_NAMES:
        np.testing.assert_allclose(fast[m], slow[m], atol=1e-12, equal_nan=True, err_msg=m)
    if expect_nan:
        # the rare class is missing from some resamples, so the undefined/skip path is exercised
        idx = np.random.default_rng(9).integers(0, len(y), size=(60, len(y)))
        rare = 1 if task == "binary" else 3
        assert (~np.any(y[idx] == rare, axis=1)).any()
        if task == "binary":
            assert np.isnan(fast["auroc"]).any() and np.isnan(fast["sensitivity"]).any()
            assert not np.isnan(fast["acc"]).any()


def test_bootstrap_resample_matches_sklearn_with_duplicates():
    y, s = multiclass_data(4, 40, 3)
    idx = np.random.default_rng(0).integers(0, 40, size=40)
    yb, sb = y[idx], s[idx]
    assert len(np.unique(yb)) == 3 and len(np.unique(idx)) < 40  # all classes, real duplicates
    got = compute_metrics(yb, sb, "multiclass")
    assert got["auroc"] == pytest.approx(roc_auc_score(yb, sb, multi_class="ovr"), abs=TOL)
    assert got["f1"] == pytest.approx(f1_score(yb, np.argmax(sb, axis=1), average="macro"), abs=TOL)


def test_ci_structure_contains_point_and_is_deterministic():
    for task, (y, s) in [
        ("binary", binary_data(0, 200)),
        ("multiclass", multiclass_data(0, 200, 4)),
        ("multilabel", multilabel_data(0, 200, 5)),
    ]:
        a = metrics_with_ci(y, s, task, n_boot=300, seed=1)
        b = metrics_with_ci(y, s, task, n_boot=300, seed=1)
        c = metrics_with_ci(y, s, task, n_boot=300, seed=2)
        assert a == b
        assert a != c
        point = compute_metrics(y, s, task)
        for m in METRIC_NAMES:
            assert set(a[m]) == {"value", "low", "high"}
            assert a[m]["value"] == point[m]
            assert a[m]["low"] <= a[m]["value"] <= a[m]["high"], (task, m, a[m])
            assert a[m]["low"] < a[m]["high"], (task, m)


def test_ci_narrows_with_more_data_and_wider_with_smaller_alpha():
    y_small, p_small = binary_data(21, 100)
    y_big, p_big = binary_data(21, 2000)
    small = metrics_with_ci(y_small, p_small, "binary", n_boot=400)
    big = metrics_with_ci(y_big, p_big, "binary", n_boot=400)
    for m in METRIC_NAMES:
        assert big[m]["high"] - big[m]["low"] < 0.6 * (small[m]["high"] - small[m]["low"]), m
    ci99 = metrics_with_ci(y_small, p_small, "binary", n_boot=400, alpha=0.01)
    for m in METRIC_NAMES:
        assert ci99[m]["high"] - ci99[m]["low"] > small[m]["high"] - small[m]["low"], m


def test_ci_matches_percentiles_and_drops_undefined_resamples():
    # one positive in 15: many resamples have no positive -> AUROC/sensitivity undefined there
    y = np.zeros(15, dtype=int)
    y[3] = 1
    p = np.linspace(0.1, 0.9, 15)
    dist = loop_bootstrap(y, p, "binary", n_boot=200, seed=4)
    assert np.isnan(dist["auroc"]).any() and (~np.isnan(dist["auroc"])).any()
    ci = metrics_with_ci(y, p, "binary", n_boot=200, seed=4)
    for m in METRIC_NAMES:
        valid = dist[m][~np.isnan(dist[m])]
        lo, hi = np.quantile(valid, [0.025, 0.975])
        assert (ci[m]["low"], ci[m]["high"]) == pytest.approx((lo, hi), abs=1e-12), m


def test_large_test_set_is_processed_in_blocks_consistently():
    # N large enough that resamples are processed in several blocks
    y, p = binary_data(8, 30_000)
    ci = metrics_with_ci(y, p, "binary", n_boot=150, seed=0)
    assert ci == metrics_with_ci(y, p, "binary", n_boot=150, seed=0)
    for m in METRIC_NAMES:
        assert ci[m]["low"] <= ci[m]["value"] <= ci[m]["high"]
        assert ci[m]["high"] - ci[m]["low"] < 0.03


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "y,s,task,exc,match",
    [
        ([0, 1, 1], [0.2, 0.8], "binary", DataError, "3 samples"),
        ([0, 1, 2], [0.2, 0.8, 0.4], "binary", DataError, r"label\(s\) \[2\]"),
        ([0, 1, -1], np.full((3, 3), 1 / 3), "multiclass", DataError, r"\[-1\].*0\.\.2"),
        ([0, 1, 3], np.full((3, 3), 1 / 3), "multiclass", DataError, r"\[3\].*3 columns"),
        ([0, 1, 0], [0.2, float("nan"), 0.4], "binary", DataError, "NaN/inf.*index 1"),
        ([0, 1, 0], [0.2, 1.7, 0.4], "binary", DataError, r"\[0, 1\]"),
        ([0, 1, 0], np.full((3, 3), 1 / 3), "binary", DataError, r"\[N, 2\]"),
        ([0, 1, 0], [0.2, 0.5, 0.4], "multiclass", DataError, r"\[N, K\]"),
        ([[0, 1], [1, 0]], [0.2, 0.5], "binary", DataError, r"expected \[N\]"),
        ([0, 1], [[0.2, 0.3], [0.1, 0.2]], "multilabel", DataError, r"\[N, L\]"),
        ([[0, 1], [1, 0]], [[0.2, 0.3, 0.1], [0.1, 0.2, 0.1]], "multilabel", DataError, "same"),
        ([[0, 2], [1, 0]], [[0.2, 0.3], [0.1, 0.2]], "multilabel", DataError, r"\[2\]"),
        ([0, 1.5, 0], [0.2, 0.5, 0.4], "binary", DataError, "non-integer"),
        (["a", "b"], [0.2, 0.5], "binary", DataError, "dtype"),
        ([], [], "binary", DataError, "at least one"),
        ([0, 1], [0.2, 0.5], "regression", ConfigError, "task.*binary, multiclass, multilabel"),
    ],
)
def test_bad_input_raises_named_errors(y, s, task, exc, match):
    with pytest.raises(exc, match=match):
        compute_metrics(y, s, task)


@pytest.mark.parametrize("kwargs,match", [({"n_boot": 0}, "n_boot"), ({"n_boot": 2.5}, "n_boot"), ({"alpha": 1.5}, "alpha")])
def test_bad_bootstrap_options(kwargs, match):
    y, p = binary_data(0, 20)
    with pytest.raises(ConfigError, match=match):
        metrics_with_ci(y, p, "binary", **kwargs)


# ----------------------------------------------------------------------------- stats


def test_mean_std_ci_hand_computed():
    values = [0.80, 0.82, 0.79, 0.85]
    mean = 3.26 / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    t_975_df3 = 3.182446305284263  # Student t table, 97.5% quantile, 3 degrees of freedom
    half = t_975_df3 * std / 2
    got = mean_std_ci(values)
    assert got["n"] == 4
    assert got["mean"] == pytest.approx(mean, abs=TOL)
    assert got["std"] == pytest.approx(std, abs=TOL)
    assert (got["low"], got["high"]) == pytest.approx((mean - half, mean + half), abs=1e-9)
    lo, hi = sps.t.interval(0.9, df=3, loc=mean, scale=std / 2)
    got90 = mean_std_ci(values, alpha=0.1)
    assert (got90["low"], got90["high"]) == pytest.approx((lo, hi), abs=TOL)


def test_mean_std_ci_edge_cases():
    one = mean_std_ci([0.7])
    assert one["mean"] == 0.7 and one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["low"])
    flat = mean_std_ci([0.5, 0.5, 0.5])
    assert flat["std"] == 0.0 and flat["low"] == flat["high"] == 0.5
    with pytest.raises(DataError, match="empty"):
        mean_std_ci([])
    with pytest.raises(DataError, match=r"position\(s\) \[1\]"):
        mean_std_ci([0.1, float("nan")])
    with pytest.raises(ConfigError, match="alpha"):
        mean_std_ci([0.1, 0.2], alpha=0)


@pytest.mark.parametrize("n,seed", [(5, 0), (8, 1), (3, 2), (12, 3)])
def test_paired_test_matches_scipy(n, seed):
    rng = np.random.default_rng(seed)
    b = rng.normal(0.8, 0.02, n)
    a = b + rng.normal(0.01, 0.01, n)
    got = paired_test(a, b)
    t_ref = sps.ttest_rel(a, b)
    assert got["n"] == n
    assert got["mean_diff"] == pytest.approx(np.mean(a - b), abs=TOL)
    assert got["t_stat"] == pytest.approx(t_ref.statistic, rel=1e-12)
    assert got["t_pvalue"] == pytest.approx(t_ref.pvalue, rel=1e-12)
    ci = mean_std_ci(a - b)
    assert (got["diff_low"], got["diff_high"]) == pytest.approx((ci["low"], ci["high"]), abs=TOL)
    if n >= 5:
        assert got["wilcoxon_pvalue"] == pytest.approx(sps.wilcoxon(a, b).pvalue, rel=1e-12)
    else:
        assert got["wilcoxon_pvalue"] is None


def test_paired_test_with_ties_and_zero_differences_matches_scipy():
    a = np.array([0.81, 0.80, 0.83, 0.79, 0.82, 0.80, 0.84])
    b = np.array([0.80, 0.80, 0.81, 0.80, 0.80, 0.78, 0.82])  # one zero difference, tied |d|
    got = paired_test(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy notes the normal approximation used for ties/zeros
        ref = sps.wilcoxon(a, b)
    assert got["wilcoxon_pvalue"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert got["t_pvalue"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)


def test_paired_test_degenerate_cases():
    one = paired_test([0.9], [0.8])
    assert one["n"] == 1 and one["t_pvalue"] is None and one["wilcoxon_pvalue"] is None
    assert one["mean_diff"] == pytest.approx(0.1)

    same = paired_test([0.8, 0.7, 0.9, 0.6, 0.75], [0.8, 0.7, 0.9, 0.6, 0.75])
    assert same["mean_diff"] == 0.0 and same["t_pvalue"] == 1.0 and same["wilcoxon_pvalue"] == 1.0

    shifted = paired_test([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])  # constant non-zero difference
    assert shifted["mean_diff"] == 0.5 and shifted["std_diff"] == 0.0
    assert shifted["t_pvalue"] is None

    with pytest.raises(DataError, match="a has 3 values but b has 2"):
        paired_test([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="b contains NaN"):
        paired_test([1, 2], [1, float("nan")])
