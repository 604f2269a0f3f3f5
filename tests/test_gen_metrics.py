"""Generator metrics (issue 18, part 2): FD against the closed form and 0 for identical sets, the
unbiased KID estimate against a reference loop and centred on 0 for one distribution, the k-NN
precision/recall limits, and a planted copy flagged by the memorisation check."""
from __future__ import annotations

import numpy as np
import pytest

from medpeft.gen_metrics import (frechet_distance, frechet_distance_gaussians, kernel_inception_distance, memorisation,
                                 mmd2_unbiased, precision_recall)


def test_frechet_distance_closed_form_and_identity():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert frechet_distance_gaussians(mu1, s1, mu2, s2) == pytest.approx(closed)
    x = np.random.default_rng(0).normal(size=(200, 5))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(x, x + 2.0)
    assert shifted == pytest.approx(5 * 4.0, rel=1e-6)  # only the means differ: ||2 * 1||^2


def test_kid_is_the_unbiased_mmd_and_centred_for_one_distribution():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)
    same = [mmd2_unbiased(rng.normal(size=(50, 4)), rng.normal(size=(50, 4))) for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(200)  # unbiased: centred on 0
    far = kernel_inception_distance(rng.normal(size=(80, 4)), rng.normal(3.0, size=(80, 4)), subsets=5, subset_size=50)
    assert far["mean"] > 1.0


def test_precision_recall_limits():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 4))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = precision_recall(x, x + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    collapsed = precision_recall(x, np.repeat(x[:1], 60, axis=0) + rng.normal(scale=1e-3, size=(60, 4)))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.2  # mode collapse: real, not diverse


def test_a_planted_copy_is_flagged():
    rng = np.random.default_rng(3)
    training = rng.normal(size=(100, 16))
    samples = rng.normal(size=(20, 16))
    samples[7] = training[42]  # an exact copy of a training image
    result = memorisation(samples, training)
    assert 7 in result["flagged"] and result["nearest"][7] == 42 and result["distance"][7] == pytest.approx(0.0, abs=1e-6)
    assert result["flagged_fraction"] == pytest.approx(1 / 20)
