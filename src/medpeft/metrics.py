"""Classification metrics with percentile-bootstrap confidence intervals.

Pure numpy (no scikit-learn here; scikit-learn is the reference in the tests).

Inputs
------
``y_true`` and ``scores`` may be numpy arrays, lists or CPU tensors.

* ``"binary"``: ``y_true`` [N] (or [N, 1]) in {0, 1}; ``scores`` [N, 2] class probabilities,
  or [N] (or [N, 1]) probability of class 1, which is treated as the [N, 2] matrix
  ``[1 - p, p]``. Prediction = argmax, ties -> class 0 (so a [N] score predicts 1 iff p > 0.5).
  ``positive`` (0 or 1, default 1) is the index of the clinically positive class: on
  BreastMNIST class 0 is "malignant", so ``positive=0`` there (see ``resolve_positive_class``).
* ``"multiclass"``: ``y_true`` [N] (or [N, 1]) in {0..K-1}; ``scores`` [N, K] probabilities.
  Prediction = argmax (ties -> lowest class index).
* ``"multilabel"``: ``y_true`` [N, L] 0/1; ``scores`` [N, L] probabilities.
  Prediction = ``score >= 0.5`` per label.

Scores must be finite and lie in [0, 1] (apply softmax/sigmoid to logits first).
Labels may be ints, bools or integral floats.

Definitions (``METRIC_NAMES``)
------------------------------
Per class (binary/multiclass, one-vs-rest) or per label (multilabel) we count tp, fp, fn, tn;
recall = tp/(tp+fn), specificity = tn/(tn+fp), F1 = 2tp/(2tp+fp+fn).

============ ======================== =============================== =============================
metric       binary                   multiclass                      multilabel
============ ======================== =============================== =============================
acc          fraction correct         fraction correct                mean over labels of per-label
                                                                      accuracy (= 1 - Hamming loss)
balanced_acc mean recall of the       mean per-class recall           mean over labels of per-label
             classes present          (classes present in y_true)     balanced acc (mean of recall
                                                                      and specificity, present ones)
f1           F1 of ``positive`` (the  macro F1 over classes           macro F1 over labels
             clinical finding's F1)
sensitivity  recall of ``positive``   macro per-class recall          macro per-label recall
                                      (= balanced_acc)
specificity  recall of the other      macro one-vs-rest specificity   macro per-label specificity
             class
auroc        from the positive        one-vs-rest macro AUROC         macro AUROC over labels
             class's score
============ ======================== =============================== =============================

AUROC is the Mann-Whitney statistic P(score_pos > score_neg) + 0.5 P(equal), i.e. the rank
formula with average ranks for ties (identical to the trapezoidal ROC area).

Undefined values are NaN, never an exception: recall of a class absent from ``y_true``,
specificity when every sample is positive, F1 of a class that is neither present nor
predicted, AUROC of a class/label without both positives and negatives. Macro averages skip
undefined members (e.g. one-vs-rest AUROC skips classes absent from ``y_true`` where
scikit-learn would raise; macro F1 skips classes that are neither present nor predicted, which
matches scikit-learn's default label set, or ``zero_division=np.nan`` for multilabel). A macro
average with no defined member is NaN.

Bootstrap
---------
``metrics_with_ci`` resamples the N samples with replacement ``n_boot`` times (numpy
``Generator(seed)``) and reports the percentile interval. Everything is vectorised: the index
matrix is turned into per-resample sample counts (``bincount``), confusion counts are a matrix
product with those counts, and AUROC is computed for all resamples at once from one sort of
the scores (a resample is the same samples with integer weights, so the order never changes).
Resamples in which a metric is undefined are dropped for that metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medpeft.errors import ConfigError, DataError, unknown_name

METRIC_NAMES = ("acc", "balanced_acc", "f1", "sensitivity", "specificity", "auroc")
TASKS = ("binary", "multiclass", "multilabel")

# Bootstrap work is done in blocks of resamples holding at most this many [resample, sample]
# entries, so memory stays bounded (~16 MB per array) for large test sets.
_MAX_BLOCK_ENTRIES = 2_000_000


@dataclass(frozen=True)
class _Prepared:
    """Validated inputs reduced to per-unit indicators (unit = class one-vs-rest, or label)."""

    task: str
    target: np.ndarray  # bool [N, U]: sample is positive for unit u
    predicted: np.ndarray  # bool [N, U]: sample is predicted positive for unit u
    auc_scores: np.ndarray  # float [N, A]: score column used for AUROC of each AUROC unit
    auc_target: np.ndarray  # bool [N, A]
    positive: int = 1  # binary: index of the positive class (sensitivity, AUROC score column)

    @property
    def n(self) -> int:
        return int(self.target.shape[0])


# ----------------------------------------------------------------------------- validation


def _as_labels(y_true) -> np.ndarray:
    try:
        arr = np.asarray(y_true)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"y_true could not be read as an array ({exc}); expected integer labels") from exc
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError("y_true contains NaN/inf; expected integer class labels")
        if not np.all(arr == np.round(arr)):
            bad = arr[arr != np.round(arr)].ravel()[0]
            raise DataError(f"y_true contains non-integer value {bad!r}; expected integer class labels")
        return arr.astype(np.int64)
    raise DataError(f"y_true has dtype {arr.dtype}; expected integer class labels")


def _as_scores(scores) -> np.ndarray:
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except Exception as exc:
        raise DataError(f"scores could not be read as a float array ({exc}); expected probabilities") from exc
    finite = np.isfinite(arr)
    if not finite.all():
        first = np.argwhere(~finite)[0]
        where = tuple(int(i) for i in first) if arr.ndim > 1 else int(first[0])
        raise DataError(
            f"scores contain {int((~finite).sum())} NaN/inf value(s) (first at index {where}); "
            "expected finite probabilities in [0, 1]"
        )
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise DataError(
            f"scores range from {arr.min():.4g} to {arr.max():.4g}; expected probabilities in [0, 1] "
            "(apply softmax/sigmoid to logits first)"
        )
    return arr


def _flat_labels(y: np.ndarray, task: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"y_true has shape {y.shape}; for task {task!r} expected [N] class labels")
    return y


def _check_range(y: np.ndarray, n_classes: int, what: str) -> None:
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        values = sorted(set(np.unique(y[bad]).tolist()))[:5]
        raise DataError(f"y_true contains label(s) {values} out of range; expected {what}")


def _check_positive(positive, task: str) -> int:
    """The positive class index for a binary task (None -> 1); ignored (1) for other tasks."""
    if task != "binary" or positive is None:
        return 1
    if isinstance(positive, bool) or not isinstance(positive, (int, np.integer)) or positive not in (0, 1):
        raise ConfigError(f"positive={positive!r}; expected 0 or 1 (index of the positive class of a binary task)")
    return int(positive)


def _prepare(y_true, scores, task: str, positive: int | None = 1) -> _Prepared:
    if task not in TASKS:
        raise unknown_name("task", str(task), TASKS)
    positive = _check_positive(positive, task)
    y = _as_labels(y_true)
    s = _as_scores(scores)
    if y.ndim == 0 or y.shape[0] == 0:
        raise DataError(f"y_true has shape {y.shape}; expected at least one sample")
    if s.ndim == 0 or s.shape[0] != y.shape[0]:
        raise DataError(
            f"y_true has {y.shape[0]} samples but scores has shape {s.shape}; expected the same number of samples"
        )
    n = y.shape[0]

    if task == "binary":
        y = _flat_labels(y, task)
        _check_range(y, 2, "0 or 1 for task 'binary'")
        if s.ndim == 2 and s.shape[1] == 1:
            s = s[:, 0]
        if s.ndim == 1:
            s = np.stack([1.0 - s, s], axis=1)
        if s.ndim != 2 or s.shape[1] != 2:
            raise DataError(f"scores has shape {s.shape}; for task 'binary' expected [N, 2] or [N] (P(class 1))")
        target = np.eye(2, dtype=bool)[y]
        predicted = np.eye(2, dtype=bool)[np.argmax(s, axis=1)]
        # AUROC is symmetric (AUROC of class 0's score vs class 0 = that of class 1 vs class 1 for
        # [N, 2] probabilities summing to 1), but use the positive class's column explicitly
        col = slice(positive, positive + 1)
        return _Prepared(task, target, predicted, s[:, col], target[:, col], positive)

    if task == "multiclass":
        y = _flat_labels(y, task)
        if s.ndim != 2 or s.shape[1] < 2:
            raise DataError(f"scores has shape {s.shape}; for task 'multiclass' expected [N, K] with K >= 2")
        k = s.shape[1]
        _check_range(y, k, f"0..{k - 1} (scores has {k} columns)")
        target = np.eye(k, dtype=bool)[y]
        predicted = np.eye(k, dtype=bool)[np.argmax(s, axis=1)]
        return _Prepared(task, target, predicted, s, target)

    # multilabel
    if y.ndim != 2:
        raise DataError(f"y_true has shape {y.shape}; for task 'multilabel' expected [N, L] of 0/1")
    if s.shape != y.shape:
        raise DataError(f"scores has shape {s.shape} but y_true has shape {y.shape}; expected the same [N, L] shape")
    _check_range(y, 2, "0 or 1 for task 'multilabel'")
    assert n == y.shape[0]
    target = y.astype(bool)
    return _Prepared(task, target, s >= 0.5, s, target)


# ----------------------------------------------------------------------------- core maths


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0 (undefined), without warnings."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _mean_defined(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where nothing is defined."""
    ok = ~np.isnan(x)
    return _div(np.where(ok, x, 0.0).sum(axis=-1), ok.sum(axis=-1).astype(np.float64))


def _weighted_auroc(weights: np.ndarray, score: np.ndarray, target: np.ndarray) -> np.ndarray:
    """AUROC of one score column for every weight row: weights [B, N] -> [B].

    Mann-Whitney with ties counted 1/2. A bootstrap resample is the original samples with
    integer multiplicities, so one sort serves all resamples: group tied scores, sum positive
    and negative weight per group, and count negatives strictly below each group.
    """
    order = np.argsort(score, kind="stable")
    s_sorted = score[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w_sorted = weights[:, order]
    t_sorted = target[order]
    pos = np.add.reduceat(np.where(t_sorted, w_sorted, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(t_sorted, 0.0, w_sorted), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _div(num, pos.sum(axis=1) * neg.sum(axis=1))


def _metrics_from_weights(p: _Prepared, weights: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics for each row of sample weights [B, N] (ones = the data as given)."""
    u = p.target.shape[1]
    indicators = np.concatenate([p.target & p.predicted, p.target, p.predicted], axis=1).astype(np.float64)
    counts = weights @ indicators  # [B, 3U]
    tp, pos, ppos = counts[:, :u], counts[:, u : 2 * u], counts[:, 2 * u :]
    n = weights.sum(axis=1)[:, None]
    fn, fp = pos - tp, ppos - tp
    tn = n - pos - fp

    recall = _div(tp, tp + fn)
    specificity = _div(tn, tn + fp)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    auroc_per_unit = np.stack(
        [_weighted_auroc(weights, p.auc_scores[:, a], p.auc_target[:, a]) for a in range(p.auc_scores.shape[1])],
        axis=1,
    )
    auroc = _mean_defined(auroc_per_unit)

    if p.task == "multilabel":
        balanced_per_label = _mean_defined(np.stack([recall, specificity], axis=-1))
        return {
            "acc": ((tp + tn) / n).mean(axis=1),
            "balanced_acc": _mean_defined(balanced_per_label),
            "f1": _mean_defined(f1),
            "sensitivity": _mean_defined(recall),
            "specificity": _mean_defined(specificity),
            "auroc": auroc,
        }
    acc = tp.sum(axis=1) / n[:, 0]
    balanced = _mean_defined(recall)
    if p.task == "binary":
        # The positive class's one-vs-rest specificity equals the recall of the other class.
        sensitivity, spec, f1_score = recall[:, p.positive], recall[:, 1 - p.positive], f1[:, p.positive]
    else:
        sensitivity, spec, f1_score = balanced, _mean_defined(specificity), _mean_defined(f1)
    return {
        "acc": acc,
        "balanced_acc": balanced,
        "f1": f1_score,
        "sensitivity": sensitivity,
        "specificity": spec,
        "auroc": auroc,
    }


# ----------------------------------------------------------------------------- public API


def compute_metrics(y_true, scores, task: str, positive: int | None = 1) -> dict[str, float]:
    """All ``METRIC_NAMES`` for one prediction set; undefined values are NaN (see module doc).

    ``positive``: index (0 or 1) of the positive class of a binary task (None means 1); it sets
    which class's recall is sensitivity and whose score gives AUROC. Ignored for other tasks.
    """
    p = _prepare(y_true, scores, task, positive)
    values = _metrics_from_weights(p, np.ones((1, p.n)))
    return {name: float(values[name][0]) for name in METRIC_NAMES}


def _check_boot_options(n_boot, alpha) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r}; expected an integer >= 1 (number of bootstrap resamples)")
    if not isinstance(alpha, (int, float, np.floating)) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha={alpha!r}; expected a number in (0, 1), e.g. 0.05 for a 95% interval")


def bootstrap_weight_blocks(n: int, n_boot: int, seed: int, max_entries: int = _MAX_BLOCK_ENTRIES):
    """The ``n_boot`` bootstrap resamples of ``n`` items as per-item counts, in blocks [rows, n]
    of at most ``max_entries`` entries (memory stays bounded; vectorised metrics read a block as
    weights). One stream per seed: the same resamples for any block size that divides the draws
    the same way, and for every metric module that uses it."""
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, max_entries // max(n, 1)))
    done = 0
    while done < n_boot:
        rows = min(block, n_boot - done)
        idx = rng.integers(0, n, size=(rows, n))
        flat = (idx + n * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        done += rows


def _bootstrap_distribution(p: _Prepared, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Metric values for each of ``n_boot`` resamples (NaN where undefined)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for weights in bootstrap_weight_blocks(p.n, n_boot, seed):
        values = _metrics_from_weights(p, weights)
        for name in METRIC_NAMES:
            parts[name].append(values[name])
    return {name: np.concatenate(parts[name]) for name in METRIC_NAMES}


def metrics_with_ci(
    y_true, scores, task: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
    positive: int | None = 1,
) -> dict[str, dict]:
    """Point estimates plus percentile-bootstrap ``1 - alpha`` intervals.

    Returns ``{metric: {"value": v, "low": lo, "high": hi}}`` for every name in ``METRIC_NAMES``.
    Resamples where a metric is undefined are dropped for that metric; if the point value is
    undefined, or no resample is defined, the interval is NaN. Same inputs and seed give
    identical intervals. The percentile interval usually, but not provably always, contains
    the point estimate. ``positive`` as in ``compute_metrics``.
    """
    _check_boot_options(n_boot, alpha)
    p = _prepare(y_true, scores, task, positive)
    point = _metrics_from_weights(p, np.ones((1, p.n)))
    boot = _bootstrap_distribution(p, int(n_boot), seed)
    out: dict[str, dict] = {}
    for name in METRIC_NAMES:
        out[name] = percentile_ci(float(point[name][0]), boot[name], alpha)
    return out


def percentile_ci(value: float, boot: np.ndarray, alpha: float) -> dict:
    """{"value", "low", "high"}: the percentile-bootstrap interval of the defined resamples; NaN
    bounds when the point value is undefined or no resample is defined."""
    dist = boot[~np.isnan(boot)]
    if np.isnan(value) or dist.size == 0:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    low, high = (float(q) for q in np.quantile(dist, [alpha / 2, 1 - alpha / 2]))
    return {"value": value, "low": low, "high": high}


# ----------------------------------------------------------------------------- positive class


def resolve_positive_class(class_names: list[str], task: str, requested: str | None,
                           default: str | int | None) -> int | None:
    """Index of the positive class of a binary task, or None for other tasks.

    ``requested`` (the user's choice, e.g. ``--positive-class malignant``) wins over ``default``
    (the data set's clinical default, e.g. ``clinical_positive_class("breastmnist")``). Either
    may be a class name (case-insensitive exact match; a name beats an index, so a class named
    "0" is found by name) or an index, as an int or a digit string. With neither, the positive
    class is index 1 (the second class: for image folders and manifests, the second class name in
    sorted order), as before positive classes were configurable.

    ConfigError: an unknown name or index (the message lists the class names), or a requested
    positive class for a multiclass/multilabel task (sensitivity is macro-averaged there).
    """
    names = [str(n) for n in class_names]
    if task != "binary":
        if requested is not None:
            raise ConfigError(f"positive class {requested!r} was given, but the task is {task} with "
                              f"{len(names)} classes; a positive class applies to binary tasks only")
        return None
    if len(names) != 2:
        raise ConfigError(f"a binary task needs 2 class names, got {len(names)}: {names}")
    value, origin = (requested, "positive class") if requested is not None else (default, "default positive class")
    if value is None:
        return 1
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        index = int(value)
    elif isinstance(value, str):
        text = value.strip()
        matches = [i for i, n in enumerate(names) if n.strip().lower() == text.lower()] if text else []
        exact = [i for i in matches if names[i].strip() == text]
        if len(matches) == 1 or len(exact) == 1:
            return (exact or matches)[0]
        index = int(text) if text.isdigit() else None
    else:
        index = None
    if index in (0, 1):
        return index
    choices = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    raise ConfigError(f"{origin} {value!r} is not a class of this data set; expected one of the class names "
                      f"or indices: {choices}")
