"""The positive class of binary tasks: metrics against scikit-learn, name resolution, MedMNIST defaults."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score, roc_auc_score

from medpeft.data import DataConfig, load_data
from medpeft.data.medmnist_source import _CLINICAL_POSITIVE, _info, clinical_positive_class
from medpeft.errors import ConfigError
from medpeft.metrics import METRIC_NAMES, compute_metrics, metrics_with_ci, resolve_positive_class

TOL = 1e-12


def binary_scores(seed: int, n: int = 120):
    """Labels, P(class 1) on a 0.1 grid (ties), and [N, 2] scores whose rows do not sum to 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(np.round(0.35 * y + 0.65 * rng.random(n), 1), 0.0, 1.0)
    two = np.stack([rng.random(n), np.clip(0.4 * y + 0.6 * rng.random(n), 0, 1)], axis=1)
    return y, p, two


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("positive", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_follow_the_positive_class(positive, seed):
    y, p, two = binary_scores(seed)
    for scores in (p, two):
        s2 = np.stack([1 - p, p], axis=1) if scores is p else two
        pred = np.argmax(s2, axis=1)
        got = compute_metrics(y, scores, "binary", positive=positive)
        assert got["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=positive), abs=TOL)
        assert got["specificity"] == pytest.approx(recall_score(y, pred, pos_label=1 - positive), abs=TOL)
        # F1 is the positive class's F1, the clinical finding's (it follows the choice)
        assert got["f1"] == pytest.approx(f1_score(y, pred, pos_label=positive), abs=TOL)
        assert got["auroc"] == pytest.approx(roc_auc_score(y == positive, s2[:, positive]), abs=TOL)
        same = compute_metrics(y, scores, "binary", positive=1 - positive)
        assert (got["acc"], got["balanced_acc"]) == (same["acc"], same["balanced_acc"])


def test_positive_zero_swaps_sensitivity_and_specificity_and_default_is_one():
    y, p, _ = binary_scores(5)
    one, zero = compute_metrics(y, p, "binary", positive=1), compute_metrics(y, p, "binary", positive=0)
    assert one["sensitivity"] != one["specificity"]  # else the swap below proves nothing
    assert (zero["sensitivity"], zero["specificity"]) == (one["specificity"], one["sensitivity"])
    assert compute_metrics(y, p, "binary") == one == compute_metrics(y, p, "binary", positive=None)


def test_ci_follows_the_positive_class():
    y, p, _ = binary_scores(7, 200)
    zero = metrics_with_ci(y, p, "binary", n_boot=200, seed=3, positive=0)
    one = metrics_with_ci(y, p, "binary", n_boot=200, seed=3, positive=1)
    assert set(zero) == set(METRIC_NAMES)
    assert all(set(v) == {"value", "low", "high"} for v in zero.values())
    assert zero["sensitivity"]["value"] == pytest.approx(recall_score(y, p > 0.5, pos_label=0), abs=TOL)
    # same resamples (same seed): each resample's sensitivity for 0 is its specificity for 1
    assert zero["sensitivity"] == one["specificity"] and zero["specificity"] == one["sensitivity"]
    assert zero["auroc"] == pytest.approx(one["auroc"], abs=TOL)  # [1-p, p] scores: AUROC is symmetric
    assert zero["sensitivity"]["low"] <= zero["sensitivity"]["value"] <= zero["sensitivity"]["high"]


@pytest.mark.parametrize("bad", [2, -1, True, "0", 0.0])
def test_bad_positive_index_is_named(bad):
    y, p, _ = binary_scores(0, 20)
    with pytest.raises(ConfigError, match=rf"positive={bad!r}.*0 or 1"):
        compute_metrics(y, p, "binary", positive=bad)
    with pytest.raises(ConfigError, match=rf"positive={bad!r}"):
        metrics_with_ci(y, p, "binary", n_boot=10, positive=bad)


def test_positive_is_ignored_for_multiclass_and_multilabel():
    rng = np.random.default_rng(0)
    s = rng.dirichlet(np.ones(3), 30)
    y = rng.integers(0, 3, 30)
    assert compute_metrics(y, s, "multiclass", positive=2) == compute_metrics(y, s, "multiclass")
    yl, sl = rng.integers(0, 2, (30, 4)), rng.random((30, 4))
    assert compute_metrics(yl, sl, "multilabel", positive=0) == compute_metrics(yl, sl, "multilabel")


# ----------------------------------------------------------------------------- resolution

BREAST = ["malignant", "normal, benign"]


@pytest.mark.parametrize("requested, default, expected", [
    (None, None, 1),  # no default (folders, manifests): class 1, as before
    (None, "malignant", 0),
    ("MALIGNANT", None, 0),  # names match case-insensitively
    (" normal, benign ", "malignant", 1),  # the request beats the default
    ("0", "normal, benign", 0),  # an index as a string
    (None, 0, 0),
])
def test_resolve_positive_class(requested, default, expected):
    assert resolve_positive_class(BREAST, "binary", requested, default) == expected


def test_resolve_prefers_a_class_name_over_an_index():
    # integer manifest labels 1/2 become class names "1", "2": "1" is the name at index 0
    assert resolve_positive_class(["1", "2"], "binary", "1", None) == 0
    assert resolve_positive_class(["1", "2"], "binary", "2", None) == 1


@pytest.mark.parametrize("requested", ["benign", "2", "-1", ""])
def test_resolve_unknown_class_lists_the_names(requested):
    with pytest.raises(ConfigError, match=rf"positive class {requested!r} is not a class.*0='malignant', "
                                          r"1='normal, benign'"):
        resolve_positive_class(BREAST, "binary", requested, None)


def test_resolve_non_binary():
    names = ["a", "b", "c"]
    assert resolve_positive_class(names, "multiclass", None, "a") is None
    assert resolve_positive_class(names, "multilabel", None, None) is None
    with pytest.raises(ConfigError, match="positive class 'a' was given, but the task is multiclass with 3 classes"):
        resolve_positive_class(names, "multiclass", "a", None)


# ----------------------------------------------------------------------------- MedMNIST defaults


def test_clinical_defaults_are_spelled_as_in_medmnist_info():
    info = _info()
    for flag, name in _CLINICAL_POSITIVE.items():
        assert info[flag]["task"] == "binary-class" and name in info[flag]["label"].values(), flag
    assert clinical_positive_class("BreastMNIST") == "malignant"
    assert clinical_positive_class("pneumoniamnist") == "pneumonia"
    assert clinical_positive_class("pathmnist") is None


def test_breastmnist_defaults_to_malignant(medmnist_root):
    bundle = load_data(DataConfig(name="breastmnist", root=str(medmnist_root), image_size=28))
    assert bundle.positive_class == 0 and bundle.class_names[0] == "malignant"
    y = bundle.test.labels.numpy()
    scores = np.eye(2)[y]  # a perfect classifier
    scores[:5] = scores[:5, ::-1]  # five mistakes: which class they hit decides sensitivity
    got = compute_metrics(y, scores, "binary", positive=bundle.positive_class)
    assert got["sensitivity"] == pytest.approx(recall_score(y, np.argmax(scores, 1), pos_label=0), abs=TOL)
    asked = load_data(DataConfig(name="breastmnist", root=str(medmnist_root), image_size=28,
                                 positive_class="normal, benign"))
    assert asked.positive_class == 1


def test_pneumoniamnist_default_and_bad_requests_fail_before_reading(medmnist_root, tmp_path):
    bundle = load_data(DataConfig(name="pneumoniamnist", root=str(medmnist_root), image_size=28))
    assert bundle.class_names[bundle.positive_class] == "pneumonia"
    # tmp_path holds no npz: the ConfigError comes before the missing file would be reported
    with pytest.raises(ConfigError, match=r"'benign' is not a class.*'malignant'"):
        load_data(DataConfig(name="breastmnist", root=str(tmp_path), positive_class="benign"))
    with pytest.raises(ConfigError, match="binary tasks only"):
        load_data(DataConfig(name="pathmnist", root=str(tmp_path), positive_class="0"))
