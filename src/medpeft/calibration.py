"""Calibrated probabilities and a clinical operating point for classification runs.

Calibration
-----------
A map fitted on the **validation** predictions of the run's restored best state (with
``select cv:K``: on the pooled out-of-fold predictions of the labelled training images, as
scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` does) and applied unchanged to test
and to ``medpeft predict``:

* binary tasks: **Platt scaling**, ``p' = sigmoid(a * logit(p) + b)`` on the probability of the
  positive class, fitted by Newton's method on Platt's smoothed targets
  ((N+ + 1)/(N+ + 2) for positives, 1/(N- + 2) for negatives; Platt 1999, Lin et al. 2007), which
  keeps the fit finite on a small, separable validation split. A slope ``a <= 0`` (the model ranks
  validation images no better than chance) is not applied: the map stays the identity, with a note.
* multi-class tasks: **temperature scaling** (Guo et al. 2017), ``p' = softmax(log(p) / T)``
  (log-probabilities are the logits up to a per-image constant, so this is exactly temperature
  scaling of the logits; probabilities are clipped at 1e-12 first), T minimising the validation
  NLL within [0.05, 20] (the NLL is convex in 1/T; found by bisection on its derivative).

Both maps are monotone: argmax (multi-class), the ranking of images and so AUROC are unchanged.
Multi-label and segmentation runs are not calibrated (their probabilities are per label / per pixel).

Metrics (``calibration_metrics``), with percentile-bootstrap 95 % CIs over the images
-------------------------------------------------------------------------------------
* **ECE**: top-label expected calibration error with ``n_bins`` (15) equal-width bins of the
  top-label confidence c = max_k p_k over [0, 1] (bin b holds (b/B, (b+1)/B], the first also 0):
  ECE = sum_b (n_b / n) * |acc_b - conf_b|, acc_b the fraction of the bin's images whose argmax is
  their label, conf_b their mean confidence.
* **MCE**: max_b |acc_b - conf_b| over the non-empty bins.
* **Brier**: binary tasks the usual binary Brier score mean((p_pos - y_pos)^2) in [0, 1];
  multi-class tasks Brier's original score mean_i sum_k (p_ik - onehot_ik)^2 in [0, 2] (the squared
  error of the probability vector against the one-hot label, summed over classes; twice the binary
  score for K = 2).
* **NLL**: mean of -log p_i,label (probabilities clipped at 1e-12).

The validation numbers "after" are fitted and measured on the same images (optimistic); test is
the honest number.

Operating point
---------------
``--operating-point sensitivity=X | specificity=X | youden`` (binary tasks only): a threshold t on
P(positive class) (the calibrated probability when calibration is on); an image is called positive
when ``P >= t``. Candidate thresholds are the distinct validation scores plus one just above the
largest (nothing called positive).

* ``sensitivity=X``: the **largest** candidate whose validation sensitivity is >= X (the highest
  specificity meeting the target);
* ``specificity=X``: the **smallest** candidate whose validation specificity is >= X (the highest
  sensitivity meeting the target);
* ``youden``: the candidate maximising sensitivity + specificity - 1; ties: the smallest threshold
  (the higher sensitivity).

Test sensitivity, specificity, PPV and NPV at t come with percentile-bootstrap CIs. On a small
validation split the achievable sensitivities are multiples of 1/(validation positives): the
entry says how many there were.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .metrics import percentile_ci

N_BINS = 15
ALPHA = 0.05
EPS = 1e-12
T_RANGE = (0.05, 20.0)  # temperatures searched
CALIBRATION_FILE = "calibration.json"
RELIABILITY_FILE = "reliability.png"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
CALIBRATED_TASKS = ("binary", "multiclass")
CAL_METRICS = ("ece", "mce", "brier", "nll")
OP_METRICS = ("sensitivity", "specificity", "ppv", "npv")
SMALL_FIT = 50  # fewer fitting images than this: the entry carries a note
MIN_PER_CLASS = 5  # Platt: at least this many fitting images of each class, else no calibration
MIN_TEMPERATURE = 10  # temperature scaling: at least this many fitting images
_MAX_BLOCK_ENTRIES = 2_000_000

DEFINITIONS = {
    "ece": f"top-label ECE, {N_BINS} equal-width confidence bins: sum_b n_b/n * |acc_b - conf_b|",
    "mce": "max over non-empty bins of |acc_b - conf_b|",
    "brier_binary": "mean (p_positive - y_positive)^2, in [0, 1]",
    "brier_multiclass": "mean over images of sum over classes (p_k - onehot_k)^2, in [0, 2]",
    "nll": "mean -log p(label), probabilities clipped at 1e-12",
}


# ----------------------------------------------------------------------------- inputs


def _prepare(y, probs) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N] int and probabilities [N, K] float64 (a [N] score is P(class 1) of a binary task)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if p.ndim != 2 or p.shape[1] < 2 or y.ndim != 1 or len(y) != len(p):
        raise DataError(f"calibration needs labels [N] and probabilities [N, K>=2]; got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise DataError("calibration needs at least one image")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise DataError("calibration needs finite probabilities in [0, 1]")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"labels out of range 0..{p.shape[1] - 1} for {p.shape[1]} probability columns")
    return y, p


def _per_image(y: np.ndarray, p: np.ndarray, n_bins: int) -> dict:
    """What every calibration metric sums over: confidence, correctness, bin, squared error, -log p."""
    n, k = p.shape
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    onehot = np.eye(k)[y]
    sq = ((p[:, 1] - onehot[:, 1]) ** 2) if k == 2 else ((p - onehot) ** 2).sum(axis=1)
    nll = -np.log(np.clip(p[np.arange(n), y], EPS, 1.0))
    return {"conf": conf, "correct": correct, "bins": bins, "sq": sq, "nll": nll, "n_bins": n_bins}


def _from_weights(parts: dict, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of image weights [R, N] (a row of ones: the data as given)."""
    b = np.eye(parts["n_bins"])[parts["bins"]]  # [N, B]
    count = weights @ b
    acc_sum = weights @ (b * parts["correct"][:, None])
    conf_sum = weights @ (b * parts["conf"][:, None])
    n = weights.sum(axis=1)
    gap_sum = np.abs(acc_sum - conf_sum)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(count > 0, gap_sum / np.where(count > 0, count, 1.0), -np.inf)
    return {"ece": gap_sum.sum(axis=1) / n, "mce": gap.max(axis=1),
            "brier": weights @ parts["sq"] / n, "nll": weights @ parts["nll"] / n}


def _bootstrap(n: int, n_boot: int, seed: int, fn) -> dict[str, np.ndarray]:
    """``fn(weights [R, N])`` -> {name: [R]} for ``n_boot`` resamples of the N images, in blocks."""
    from .metrics import bootstrap_weight_blocks

    parts: dict[str, list] = {}
    for weights in bootstrap_weight_blocks(n, n_boot, seed, _MAX_BLOCK_ENTRIES):
        for name, values in fn(weights).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(v) for name, v in parts.items()}


def calibration_metrics(y, probs, n_bins: int = N_BINS) -> dict[str, float]:
    """ECE, MCE, Brier and NLL of one prediction set (definitions in the module docstring)."""
    y, p = _prepare(y, probs)
    values = _from_weights(_per_image(y, p, n_bins), np.ones((1, len(y))))
    return {name: float(values[name][0]) for name in CAL_METRICS}


def calibration_metrics_with_ci(y, probs, n_boot: int = 1000, seed: int = 0, n_bins: int = N_BINS,
                                alpha: float = ALPHA) -> dict[str, dict]:
    """{metric: {"value", "low", "high"}}: percentile-bootstrap intervals over the images."""
    y, p = _prepare(y, probs)
    parts = _per_image(y, p, n_bins)
    point = _from_weights(parts, np.ones((1, len(y))))
    boot = _bootstrap(len(y), int(n_boot), seed, lambda w: _from_weights(parts, w))
    return {name: percentile_ci(float(point[name][0]), boot[name], alpha) for name in CAL_METRICS}


def reliability_bins(y, probs, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per bin: image count, accuracy and mean confidence (NaN for empty bins)."""
    y, p = _prepare(y, probs)
    parts = _per_image(y, p, n_bins)
    b = np.eye(n_bins)[parts["bins"]]
    count = b.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(count > 0, (b * parts["correct"][:, None]).sum(0) / count, np.nan)
        conf = np.where(count > 0, (b * parts["conf"][:, None]).sum(0) / count, np.nan)
    return {"count": count, "acc": acc, "conf": conf}


# ----------------------------------------------------------------------------- fitting


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(y, probs) -> float:
    """The temperature T in [0.05, 20] minimising the NLL of softmax(log p / T)."""
    y, p = _prepare(y, probs)
    z = np.log(np.clip(p, EPS, 1.0))
    zy = z[np.arange(len(y)), y]

    def slope(beta: float) -> float:  # d NLL / d beta, beta = 1/T; increasing (the NLL is convex in beta)
        return float(np.mean((_softmax(beta * z) * z).sum(axis=1) - zy))

    lo, hi = math.log(1 / T_RANGE[1]), math.log(1 / T_RANGE[0])
    if slope(math.exp(lo)) >= 0:
        return T_RANGE[1]
    if slope(math.exp(hi)) <= 0:
        return T_RANGE[0]
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if slope(math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / math.exp(0.5 * (lo + hi)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_platt(is_positive, p_positive) -> tuple[float, float]:
    """(a, b) of p' = sigmoid(a * logit(p) + b): Newton's method with step halving on the
    cross-entropy against Platt's smoothed targets."""
    y = np.asarray(is_positive, dtype=bool)
    x = _logit(np.asarray(p_positive, dtype=np.float64))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(a, b):
        f = a * x + b  # -[t log s + (1 - t) log(1 - s)] written stably
        return float(np.sum(np.logaddexp(0.0, f) - t * f))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(200):
        s = _sigmoid(a * x + b)
        g = np.array([np.sum((s - t) * x), np.sum(s - t)])
        w = s * (1 - s)
        h = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-12 * np.eye(2)
        if np.abs(g).max() < 1e-10 * len(x):
            break
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = g
        scale = 1.0
        while scale > 1e-10:
            na, nb = a - scale * step[0], b - scale * step[1]
            new = loss(na, nb)
            if new <= current - 1e-4 * scale * float(g @ step):  # Armijo: enough decrease
                break
            scale /= 2
        else:
            break
        if abs(current - new) < 1e-12 * max(1.0, abs(current)):
            a, b, current = na, nb, new
            break
        a, b, current = na, nb, new
    return float(a), float(b)


def apply_calibration(probs, calibration: dict | None) -> np.ndarray:
    """Calibrated probabilities [N, K] (a copy; ``None`` or method "none": unchanged)."""
    p = np.asarray(probs, dtype=np.float64).copy()
    if not calibration or calibration.get("method") in (None, "none"):
        return p
    params = calibration.get("params") or {}
    if calibration["method"] == "temperature":
        return _softmax(np.log(np.clip(p, EPS, 1.0)) / float(params["temperature"]))
    if calibration["method"] == "platt":
        if p.ndim != 2 or p.shape[1] != 2:
            raise ConfigError(f"Platt scaling is for 2-class probabilities; got shape {p.shape}")
        pos = int(params.get("positive_index", 1))
        q = _sigmoid(float(params["a"]) * _logit(p[:, pos]) + float(params["b"]))
        p[:, pos], p[:, 1 - pos] = q, 1.0 - q
        return p
    raise ConfigError(f"unknown calibration method {calibration['method']!r}; expected temperature or platt")


def fit_calibration(task: str, y, probs, positive: int | None = 1, force: bool = False) -> tuple[dict, str | None]:
    """({"method", "params"}, note or None) fitted on (y, probs). Too few fitting images (fewer than
    ``MIN_PER_CLASS`` of either class for Platt's two parameters, fewer than ``MIN_TEMPERATURE``
    images for the temperature) or a Platt slope <= 0 give method "none" (the identity) with a
    note, unless ``force``: a map fitted on two positives is noise that predict would apply."""
    y, p = _prepare(y, probs)
    none = {"method": "none", "params": {}}
    if task == "binary":
        pos = 1 if positive is None else int(positive)
        n_pos, n_neg = int((y == pos).sum()), int((y != pos).sum())
        if min(n_pos, n_neg) < MIN_PER_CLASS and not force:
            return none, (f"not calibrated: the fitting set holds {n_pos} positive and {n_neg} negative image(s), "
                          f"fewer than {MIN_PER_CLASS} of a class, too few to fit Platt scaling's two parameters; "
                          "the probabilities are left as they are (more validation labels, e.g. --val-labels full, "
                          "or 'medpeft calibrate RUN --force')")
        a, b = fit_platt(y == pos, p[:, pos])
        if not a > 0:
            return none, (f"not calibrated: the fitted Platt slope was {a:.3g} <= 0 (the model ranks the fitting "
                          "images no better than chance); the probabilities are left as they are")
        return {"method": "platt", "params": {"a": a, "b": b, "positive_index": pos}}, None
    if task == "multiclass":
        if len(y) < MIN_TEMPERATURE and not force:
            return none, (f"not calibrated: {len(y)} fitting images, fewer than {MIN_TEMPERATURE}; the probabilities "
                          "are left as they are ('medpeft calibrate RUN --force' fits it anyway)")
        t = fit_temperature(y, p)
        note = None
        if t in T_RANGE:
            note = f"the temperature reached the edge of the searched range {T_RANGE}"
        return {"method": "temperature", "params": {"temperature": t}}, note
    raise ConfigError(f"calibration applies to binary and multi-class classification, not {task}")


# ----------------------------------------------------------------------------- operating point


def parse_operating_point(text: str | None) -> tuple[str, float | None] | None:
    """"sensitivity=0.95" -> ("sensitivity", 0.95); "youden" -> ("youden", None); None -> None."""
    if text is None:
        return None
    raw = str(text).strip()
    low = raw.lower()
    if low in ("youden", "youden_j", "j"):
        return "youden", None
    name, sep, value = low.partition("=")
    name = {"sens": "sensitivity", "tpr": "sensitivity", "recall": "sensitivity",
            "spec": "specificity", "tnr": "specificity"}.get(name.strip(), name.strip())
    if sep and name in ("sensitivity", "specificity"):
        try:
            target = float(value)
        except ValueError:
            target = float("nan")
        if 0 < target <= 1:
            return name, target
        raise ConfigError(f"operating point {raw!r}: the target must be a number in (0, 1], e.g. {name}=0.95")
    raise ConfigError(f"operating point {raw!r} is not sensitivity=X, specificity=X (0 < X <= 1) or youden")


def operating_point_label(kind: str, value: float | None) -> str:
    return "youden" if kind == "youden" else f"{kind}={value:g}"


def check_operating_point(text: str | None, task: str, num_classes: int | None = None) -> None:
    """ConfigError before any training when an operating point cannot apply to the task."""
    if parse_operating_point(text) is None:
        return
    if task != "binary":
        what = f"{task} with {num_classes} classes" if num_classes and task != "segmentation" else task
        raise ConfigError(f"--operating-point {text}: a decision threshold applies to binary classification only; "
                          f"this run is {what} (multi-class decisions are the argmax of the probabilities)")


def _counts(weights: np.ndarray, is_pos: np.ndarray, called: np.ndarray) -> dict[str, np.ndarray]:
    ind = np.stack([is_pos & called, ~is_pos & called, ~is_pos & ~called, is_pos & ~called], axis=1)
    c = weights @ ind.astype(np.float64)
    return {"tp": c[:, 0], "fp": c[:, 1], "tn": c[:, 2], "fn": c[:, 3]}


def _rates(c: dict) -> dict[str, np.ndarray]:
    def div(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)

    return {"sensitivity": div(c["tp"], c["tp"] + c["fn"]), "specificity": div(c["tn"], c["tn"] + c["fp"]),
            "ppv": div(c["tp"], c["tp"] + c["fp"]), "npv": div(c["tn"], c["tn"] + c["fn"])}


def choose_threshold(is_positive, score, kind: str, target: float | None) -> float:
    """The threshold of the operating point on validation (rules in the module docstring)."""
    is_pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    need = {"sensitivity": n_pos > 0, "specificity": n_neg > 0, "youden": n_pos > 0 and n_neg > 0}[kind]
    if not need:
        raise DataError(f"operating point {operating_point_label(kind, target)}: the validation predictions hold "
                        f"{n_pos} positive and {n_neg} negative image(s); the threshold cannot be chosen (use more "
                        "validation labels, e.g. --val-labels full)")
    candidates = np.unique(s)
    candidates = np.append(candidates, np.nextafter(candidates[-1], np.inf))  # last: nothing called positive
    # counts at every candidate from sorted scores (called positive: score >= t)
    tp = n_pos - np.searchsorted(np.sort(s[is_pos]), candidates, side="left")
    tn = np.searchsorted(np.sort(s[~is_pos]), candidates, side="left")
    if kind == "sensitivity":
        ok = np.flatnonzero(tp / max(n_pos, 1) >= target)
        return float(candidates[ok[-1]])  # sensitivity is non-increasing in t: the largest that meets it
    if kind == "specificity":
        ok = np.flatnonzero(tn / max(n_neg, 1) >= target)
        return float(candidates[ok[0]])  # specificity is non-decreasing in t: the smallest that meets it
    j = tp * n_neg + tn * n_pos  # Youden's J * n_pos * n_neg + const: exact integers, ties found exactly
    return float(candidates[int(np.flatnonzero(j == j.max())[0])])  # ties: the smallest threshold


def metrics_at_threshold(is_positive, score, threshold: float, n_boot: int = 1000, seed: int = 0,
                         alpha: float = ALPHA) -> dict:
    """Sensitivity, specificity, PPV, NPV (value + CI) and the counts at ``P(positive) >= threshold``."""
    is_pos = np.asarray(is_positive, dtype=bool)
    called = np.asarray(score, dtype=np.float64) >= threshold
    counts = _counts(np.ones((1, len(is_pos))), is_pos, called)
    point = _rates(counts)
    boot = _bootstrap(len(is_pos), int(n_boot), seed, lambda w: _rates(_counts(w, is_pos, called)))
    out = {name: percentile_ci(float(point[name][0]), boot[name], alpha) for name in OP_METRICS}
    out["counts"] = {k: int(v[0]) for k, v in counts.items()}
    return out


# ----------------------------------------------------------------------------- a run's entries


def compute_entries(task: str, class_names: list[str], positive: int | None, val_y, val_probs, test_y, test_probs,
                    n_boot: int, seed: int, calibrate: bool = True, operating_point: str | None = None,
                    fitted_on: str = "validation", force: bool = False) -> dict:
    """{"calibration": entry or None, "operating_point": entry or None} (the metrics.json entries)."""
    if task not in CALIBRATED_TASKS:
        raise ConfigError(f"calibration and operating points apply to binary and multi-class classification; "
                          f"this run is {task}")
    check_operating_point(operating_point, task, len(class_names))
    val_y, val_p = _prepare(val_y, val_probs)
    test_y, test_p = _prepare(test_y, test_probs)
    out: dict = {"calibration": None, "operating_point": None}
    calibration = None
    if calibrate:
        calibration, note = fit_calibration(task, val_y, val_p, positive, force=force)
        notes = [note] if note else []
        if len(val_y) < SMALL_FIT and calibration["method"] != "none":
            notes.append(f"fitted on {len(val_y)} images: the calibration map itself is uncertain; compare the "
                         "test numbers before and after")
        val_after, test_after = apply_calibration(val_p, calibration), apply_calibration(test_p, calibration)
        out["calibration"] = {
            **calibration, "fitted_on": fitted_on, "n_fit": int(len(val_y)), "n_bins": N_BINS,
            "brier": "binary" if task == "binary" else "multiclass",
            "definitions": {k: v for k, v in DEFINITIONS.items()
                            if not k.startswith("brier_") or k == f"brier_{'binary' if task == 'binary' else 'multiclass'}"},
            "val": {"before": calibration_metrics_with_ci(val_y, val_p, n_boot, seed),
                    "after": calibration_metrics_with_ci(val_y, val_after, n_boot, seed)},
            "test": {"before": calibration_metrics_with_ci(test_y, test_p, n_boot, seed),
                     "after": calibration_metrics_with_ci(test_y, test_after, n_boot, seed)},
            "notes": notes,
        }
    parsed = parse_operating_point(operating_point)
    if calibration is not None and calibration["method"] == "none":
        calibration = None  # not applied: the threshold is on the raw probabilities
    if parsed is not None:
        pos = 1 if positive is None else int(positive)
        val_s = apply_calibration(val_p, calibration)[:, pos]
        test_s = apply_calibration(test_p, calibration)[:, pos]
        threshold = choose_threshold(val_y == pos, val_s, *parsed)
        n_pos, n_neg = int((val_y == pos).sum()), int((val_y != pos).sum())
        out["operating_point"] = {
            "target": operating_point_label(*parsed), "threshold": threshold,
            "positive_class": class_names[pos], "positive_index": pos,
            "negative_class": class_names[1 - pos], "calibrated": calibration is not None,
            "rule": f"{class_names[pos]} when {'calibrated ' if calibration is not None else ''}"
                    f"P({class_names[pos]}) >= threshold",
            "chosen_on": fitted_on, "n_val_positive": n_pos, "n_val_negative": n_neg,
            "val": metrics_at_threshold(val_y == pos, val_s, threshold, n_boot, seed),
            "test": metrics_at_threshold(test_y == pos, test_s, threshold, n_boot, seed),
            "notes": [f"chosen on {n_pos} positive and {n_neg} negative validation image(s): validation sensitivity "
                      f"moves in steps of 1/{n_pos} and specificity in steps of 1/{n_neg}"] if n_pos and n_neg else [],
        }
    return out


def add_to_metrics(metrics: dict, cfg, positive: int | None, val_y, val_probs, test_y, test_probs) -> None:
    """``medpeft run``: the "calibration" and "operating_point" entries of a classification run.

    Segmentation and multi-label runs get none (nothing to calibrate per image); with
    ``calibration: off`` only the operating point (on the raw probabilities)."""
    task = metrics.get("task")
    if task not in CALIBRATED_TASKS or val_probs is None or test_probs is None:
        return
    fitted_on = "validation"
    if (metrics.get("selection") or {}).get("mode", "holdout") != "holdout":
        fitted_on = "out-of-fold predictions of the labelled training images (select cv:K)"
    args = (task, metrics["class_names"], positive, val_y, val_probs, test_y, test_probs, cfg.n_boot, cfg.train.seed)
    calibrate = getattr(cfg, "calibration", "auto") != "off"
    target = getattr(cfg, "operating_point", None)
    try:
        entries = compute_entries(*args, calibrate=calibrate, operating_point=target, fitted_on=fitted_on)
    except DataError as err:  # after training: keep the run, record why there is no threshold
        if target is None:
            raise
        warnings.warn(f"operating point not set: {err}", stacklevel=2)
        entries = compute_entries(*args, calibrate=calibrate, operating_point=None, fitted_on=fitted_on)
        entries["operating_point"] = {"target": target, "threshold": None, "error": str(err)}
    metrics.update(entries)


def adapter_metadata(entries: dict) -> dict[str, str]:
    """What predict needs, as safetensors metadata strings (empty when there is nothing)."""
    meta = {}
    cal = entries.get("calibration")
    if cal and cal["method"] != "none":
        meta["calibration"] = json.dumps({"method": cal["method"], "params": cal["params"]})
    op = entries.get("operating_point")
    if op and op.get("threshold") is not None:
        meta["operating_point"] = json.dumps({k: op[k] for k in ("target", "threshold", "positive_class",
                                                                 "positive_index", "negative_class", "calibrated")})
    return meta


# ----------------------------------------------------------------------------- files


def write_prediction_csv(path: Path, ids, labels, probs, class_names) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"] + [f"p_{c}" for c in class_names])
        for ident, label, row in zip(ids, np.asarray(labels).tolist(), np.asarray(probs)):
            writer.writerow([ident, int(label)] + [repr(float(v)) for v in row])  # exact: thresholds are scores


def read_prediction_csv(path: Path, class_names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels [N], probabilities [N, K]) of a run's val/test predictions CSV."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [f"p_{c}" for c in class_names]
    if not rows or any(c not in rows[0] for c in ["id", "label"] + columns):
        raise DataError(f"{path.name} does not have the columns id, label, {', '.join(columns)}")
    try:
        labels = np.array([int(r["label"]) for r in rows])
        probs = np.array([[float(r[c]) for c in columns] for r in rows])
    except ValueError as err:
        raise DataError(f"{path.name}: {err}") from None
    return [r["id"] for r in rows], labels, probs


def write_run_files(out: Path, metrics: dict, val_ids, val_y, val_probs) -> list[str]:
    """``medpeft run``: the validation predictions (what ``calibrate`` refits on) and the reliability
    diagram; returns the file names written."""
    if metrics.get("task") not in CALIBRATED_TASKS or val_probs is None:
        return []
    write_prediction_csv(out / VAL_PREDICTIONS_FILE, val_ids, val_y, val_probs, metrics["class_names"])
    written = [VAL_PREDICTIONS_FILE]
    cal = metrics.get("calibration")
    if cal and metrics.get("test") is not None:
        test_path = out / TEST_PREDICTIONS_FILE
        if test_path.is_file():
            _, test_y, test_p = read_prediction_csv(test_path, metrics["class_names"])
            reliability_plot(out / RELIABILITY_FILE, {"validation": (val_y, val_probs), "test": (test_y, test_p)},
                             cal, title=f"{metrics.get('method')} on {Path(str(metrics.get('data'))).name}")
            written.append(RELIABILITY_FILE)
    return written


def reliability_plot(path: Path, splits: dict, calibration: dict, title: str = "") -> Path:
    """One panel per split: accuracy vs mean confidence per bin, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method = calibration.get("method") if calibration else "none"
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.2), squeeze=False)
    for ax, (name, (y, probs)) in zip(axes[0], splits.items()):
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
        curves = [("raw" if method == "none" else "before", probs, "0.45")]
        if method != "none":
            curves.append(("after", apply_calibration(probs, calibration), "C0"))
        for label, p, color in curves:
            bins = reliability_bins(y, p)
            ok = bins["count"] > 0
            ece = calibration_metrics(y, p)["ece"]
            size = 12 + 120 * bins["count"][ok] / max(bins["count"].max(), 1)
            ax.plot(bins["conf"][ok], bins["acc"][ok], color=color, lw=1)
            ax.scatter(bins["conf"][ok], bins["acc"][ok], s=size, color=color, label=f"{label}: ECE {ece:.3f}")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
        ax.set_xlabel("mean top-label confidence (bin)")
        ax.set_ylabel("accuracy (bin)")
        ax.set_title(f"{name} (n={len(np.asarray(y))})", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    what = "not calibrated" if method == "none" else f"{method} scaling"
    fig.suptitle(f"Reliability, {what}" + (f" - {title}" if title else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- predict


def predict_settings(run_path: str | Path, metadata: dict) -> tuple[dict | None, dict | None, str]:
    """(calibration, operating point, source) that ``predict`` applies: the run folder's
    calibration.json (written by ``medpeft calibrate``, checked against the adapter's sha256) when
    present, else the adapter's metadata (written by ``medpeft run``)."""
    from .run import ADAPTER_FILE

    path = Path(run_path)
    adapter = path / ADAPTER_FILE if path.is_dir() else path
    side = adapter.parent / CALIBRATION_FILE
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{side.name} beside {adapter.name} is not readable JSON ({err}); delete it or run "
                              "'medpeft calibrate' again") from None
        if data.get("adapter_sha256") != sha256_file(adapter):
            raise ConfigError(f"{side.name} was computed for another {adapter.name} (sha256 differs); run "
                              f"'medpeft calibrate' on this run again, or delete {side.name}")
        op = data.get("operating_point")
        op = {k: op[k] for k in ("target", "threshold", "positive_class", "positive_index", "negative_class",
                                 "calibrated")} if op else None
        cal = data.get("calibration")
        cal = {"method": cal["method"], "params": cal["params"]} if cal and cal["method"] != "none" else None
        return cal, op, side.name
    cal = json.loads(metadata["calibration"]) if metadata.get("calibration") else None
    op = json.loads(metadata["operating_point"]) if metadata.get("operating_point") else None
    return cal, op, adapter.name


def apply_for_predict(probs, calibration: dict | None, operating_point: dict | None, class_names: list[str],
                      uncalibrated: bool = False) -> tuple[np.ndarray, list[dict] | None]:
    """(probabilities shown, per-image extra columns: the decision at the operating point, or None).

    The decision is made on the probabilities the threshold was chosen on (calibrated ones when
    the operating point says so), also with ``uncalibrated``, which only changes what is shown."""
    raw = np.asarray(probs, dtype=np.float64)
    calibrated = apply_calibration(raw, calibration)
    shown = raw if uncalibrated else calibrated
    if not operating_point:
        return shown, None
    pos = int(operating_point["positive_index"])
    basis = calibrated if operating_point.get("calibrated") else raw
    t = float(operating_point["threshold"])
    extra = [{"decision": class_names[pos] if float(row[pos]) >= t else class_names[1 - pos],
              "threshold": t, "operating_point": operating_point["target"]} for row in basis]
    return shown, extra


def predict_note(calibration: dict | None, operating_point: dict | None, source: str, uncalibrated: bool) -> str:
    parts = []
    if calibration and not uncalibrated:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in calibration["params"].items())
        parts.append(f"probabilities calibrated ({calibration['method']}: {params})")
    elif calibration:
        parts.append("uncalibrated probabilities (--uncalibrated)")
    else:
        parts.append("probabilities not calibrated (the run has no calibration)")
    if operating_point:
        parts.append(f"decision at the operating point {operating_point['target']}: {operating_point['positive_class']}"
                     f" when {'calibrated ' if operating_point.get('calibrated') else ''}P("
                     f"{operating_point['positive_class']}) >= {operating_point['threshold']:.4g}")
    return "; ".join(parts) + f" (from {source})"


# ----------------------------------------------------------------------------- benchmark tables


def calibration_columns(metrics: dict) -> dict:
    """runs.csv columns of a run: the calibration method and test ECE / Brier before ("raw") and
    after ("cal", with the CI) calibration; empty values for runs without calibration."""
    cal = (metrics or {}).get("calibration") or {}
    test = cal.get("test") or {}
    before, after = test.get("before") or {}, test.get("after") or {}
    out = {"calibration": cal.get("method")}
    for name in ("ece", "brier"):
        out[f"test_{name}_raw"] = (before.get(name) or {}).get("value")
        m = after.get(name) or {}
        out[f"test_{name}_cal"], out[f"test_{name}_cal_low"], out[f"test_{name}_cal_high"] = \
            m.get("value"), m.get("low"), m.get("high")
    return out


def calibration_summary_lines(summary: list[dict], baseline: str = "full") -> tuple[str | None, list[list[str]]]:
    """report.md: (one sentence, rows of a per-cell table) comparing the mean test ECE of the PEFT
    methods with full fine-tuning's, before and after calibration; (None, []) without calibration."""
    cells: dict = {}
    for r in summary:
        cells.setdefault((r["data"], r["backbone"], r["fraction"]), []).append(r)

    def known(x):
        return x is not None and x == x

    rows, wins_raw, wins_cal, compared = [], 0, 0, 0
    for (data, backbone, fraction), group in cells.items():
        full = next((r for r in group if r["method"] == baseline), None)
        peft = [r for r in group if r["method"] != baseline and known(r.get("ece_raw"))]
        if full is None or not known(full.get("ece_raw")) or not peft:
            continue
        compared += 1
        lower_raw = [r for r in peft if r["ece_raw"] < full["ece_raw"]]
        lower_cal = [r for r in peft if known(r.get("ece")) and known(full.get("ece")) and r["ece"] < full["ece"]]
        wins_raw += 2 * len(lower_raw) > len(peft)
        wins_cal += 2 * len(lower_cal) > len(peft)
        best = min(peft, key=lambda r: r["ece_raw"])
        rows.append([str(Path(str(data)).name), backbone, f"{fraction:g}", f"{full['ece_raw']:.3f}",
                     f"{full['ece']:.3f}" if known(full.get("ece")) else "-",
                     f"{sum(r['ece_raw'] for r in peft) / len(peft):.3f}",
                     f"{len(lower_raw)}/{len(peft)}", f"{len(lower_cal)}/{len(peft)}",
                     f"{best['method']} ({best['ece_raw']:.3f})"])
    if not compared:
        return None, []
    sentence = (f"Calibration (test ECE, {N_BINS} bins, mean over seeds): most PEFT methods had a lower ECE than full "
                f"fine-tuning in {wins_raw} of {compared} cell(s) before calibration and in {wins_cal} of {compared} "
                f"after Platt / temperature scaling fitted on validation. ECE differences between methods are "
                f"descriptive (no test).")
    return sentence, rows


CALIBRATION_TABLE_HEADER = ["data", "backbone", "fraction", "full ECE raw", "full ECE calibrated",
                            "PEFT mean ECE raw", "PEFT lower raw", "PEFT lower calibrated", "best PEFT (raw ECE)"]


def summary_lines(metrics: dict) -> list[str]:
    """The lines ``medpeft run`` prints under its metrics table."""
    def ci(m):
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" if m.get("low") == m.get("low") \
            else f"{m['value']:.3f}"

    lines = []
    cal = metrics.get("calibration")
    if cal and cal["method"] == "none":
        lines.append(f"calibration: {'; '.join(cal.get('notes') or ['not calibrated'])}; test ECE "
                     f"{ci(cal['test']['before']['ece'])} (raw)")
    elif cal:
        before, after = cal["test"]["before"], cal["test"]["after"]
        lines.append(f"calibration ({cal['method']}, fitted on {cal['n_fit']} {cal['fitted_on']} images): test ECE "
                     f"{ci(before['ece'])} -> {ci(after['ece'])}, Brier {ci(before['brier'])} -> {ci(after['brier'])}"
                     f", NLL {before['nll']['value']:.3f} -> {after['nll']['value']:.3f}")
    op = metrics.get("operating_point")
    if op and op.get("threshold") is not None:
        t = op["test"]
        lines.append(f"operating point {op['target']}: {op['positive_class']} when P >= {op['threshold']:.4g} "
                     f"(validation sensitivity {op['val']['sensitivity']['value']:.3f} on {op['n_val_positive']} "
                     f"positives); test sensitivity {ci(t['sensitivity'])}, specificity {ci(t['specificity'])}, "
                     f"PPV {ci(t['ppv'])}, NPV {ci(t['npv'])}")
    elif op:
        lines.append(f"operating point {op['target']}: not set ({op.get('error')})")
    return lines
