"""Segmentation metrics (2D label maps) with percentile-bootstrap confidence intervals.

Inputs
------
``pred`` and ``target`` are integer label maps ``[N, H, W]`` (numpy arrays, CPU tensors or
nested lists) with values in ``0 .. num_classes - 1``; 0 is background, a binary task has
classes {0, 1}. Bools and integral floats are accepted; anything else is a ``DataError``.

Metrics (``SEG_METRICS``: name -> "max" if higher is better, "min" if lower is better)
--------------------------------------------------------------------------------------
For one image and one foreground class c, with TP/FP/FN the pixel counts of ``pred == c``
against ``target == c``:

* ``dice`` = 2TP / (2TP + FP + FN)
* ``iou``  = TP / (TP + FP + FN)
* ``vs``   (volumetric similarity) = 1 - |FP - FN| / (2TP + FP + FN)
* surface distances follow MONAI (``monai.metrics``, Euclidean, unit pixel spacing): the
  boundary of a mask is the mask XOR its binary erosion (4-connected cross, pixels outside
  the image count as background), and every boundary pixel of one mask gets its exact
  Euclidean distance to the nearest boundary pixel of the other mask. With ``d_pt`` the
  distances from the prediction's boundary to the target's and ``d_tp`` the reverse:
* ``hd95`` = max(q95(d_pt), q95(d_tp)), q95 the 95th percentile with linear interpolation
  (``compute_hausdorff_distance(percentile=95)``), in pixels;
* ``assd`` = mean of the concatenation of d_pt and d_tp
  (``compute_average_surface_distance(symmetric=True)``), in pixels;
* ``nsd``  (normalised surface Dice) = (#{d_pt <= tol} + #{d_tp <= tol}) / (|d_pt| + |d_tp|)
  with ``tol = nsd_tolerance`` pixels (default 2; ``compute_surface_dice`` without
  sub-voxels).

The distances are computed here with ``scipy.ndimage`` (binary erosion + exact Euclidean
distance transform on the masks' bounding box), which is faster on CPU than calling MONAI per
image; the tests check every metric against MONAI's functions.

Empty masks (per image and class)
---------------------------------
* **both empty** (class absent from target and prediction: a correct "nothing here"):
  Dice = IoU = VS = NSD = 1; HD95 and ASSD are undefined (NaN). MONAI gives NaN for all
  (with ``ignore_empty=True``) -- we count it as a success for the overlap metrics.
* **exactly one empty** (a missed lesion, or a prediction on a lesion-free image):
  Dice = IoU = NSD = 0, VS = 0 (its formula), and HD95 = ASSD = the image diagonal
  ``sqrt(H**2 + W**2)`` pixels -- a finite worst case, larger than any attainable distance, so
  a model that predicts nothing on a lesion image is penalised instead of being silently
  skipped (MONAI returns inf there, which would make every mean infinite).

Per image, a metric is the mean over the foreground classes 1..K-1 (only class 1 when K = 2);
HD95/ASSD average the classes where they are defined and are NaN if none is (every class
both-empty). Over images, ``value`` is the mean, skipping NaN images for HD95/ASSD; how many
were skipped is in ``counts``:

* ``n_images``: N
* ``n_class_slots``: N * (K - 1) (image, foreground class) pairs
* ``n_both_empty``: pairs where prediction and target are both empty
* ``n_one_empty``: pairs where exactly one is empty = ``n_missed + n_false_alarm``
* ``n_missed``: target has the class, prediction is empty
* ``n_false_alarm``: prediction has the class, target is empty
* ``n_distance_undefined``: images whose HD95/ASSD is NaN (left out of their means)

Bootstrap
---------
``seg_metrics_with_ci`` resamples the N images with replacement ``n_boot`` times (numpy
``default_rng(seed)``, the same resamples for every metric) and reports the percentile
interval of the resampled means. Per-image values are computed once; a resample is a matrix
product of per-image counts with the values, so the bootstrap costs milliseconds.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import ndimage

from medpeft.metrics import percentile_ci
from medpeft.errors import ConfigError, DataError

SEG_METRICS: dict[str, str] = {
    "dice": "max", "iou": "max", "vs": "max", "hd95": "min", "assd": "min", "nsd": "max",
}
OVERLAP_METRICS = ("dice", "iou", "vs")
DISTANCE_METRICS = ("hd95", "assd", "nsd")

_MAX_BLOCK_ENTRIES = 20_000_000  # bootstrap count-matrix entries per block (~160 MB float64)


# ----------------------------------------------------------------------------- validation


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r}; expected an integer >= 2 (background + foreground classes)")
    return int(num_classes)


def _check_tolerance(nsd_tolerance) -> float:
    if isinstance(nsd_tolerance, bool) or not isinstance(nsd_tolerance, numbers.Real) \
            or not math.isfinite(float(nsd_tolerance)) or nsd_tolerance < 0:
        raise ConfigError(f"nsd_tolerance={nsd_tolerance!r}; expected a finite number >= 0 (pixels)")
    return float(nsd_tolerance)


def _check_boot_options(n_boot, alpha) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r}; expected an integer >= 1 (number of bootstrap resamples)")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha={alpha!r}; expected a number in (0, 1), e.g. 0.05 for a 95% interval")


def _as_label_map(x, what: str, num_classes: int) -> np.ndarray:
    """Convert to an int64 [N, H, W] array of labels in 0..num_classes-1 or raise DataError."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{what} could not be read as an array ({exc}); expected an integer label map [N, H, W]") \
            from None
    if arr.ndim != 3:
        raise DataError(f"{what} has shape {arr.shape}; expected an integer label map [N, H, W] "
                        "(N images of H x W pixels, one class index per pixel)")
    if arr.size == 0:
        raise DataError(f"{what} is empty (shape {arr.shape}); expected at least one image of at least 1 x 1 pixels")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{what} has non-integer values (dtype {arr.dtype}); expected integer class indices "
                            f"0..{num_classes - 1} (take argmax over the class scores first)")
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int64, copy=False)
    else:
        raise DataError(f"{what} has dtype {arr.dtype}; expected integer class indices 0..{num_classes - 1}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"{what} contains class index {bad}; expected values in 0..{num_classes - 1} "
                        f"(num_classes={num_classes}, 0 = background)")
    return arr


def _prepare(pred, target, num_classes) -> tuple[np.ndarray, np.ndarray, int]:
    k = _check_num_classes(num_classes)
    p = _as_label_map(pred, "pred", k)
    t = _as_label_map(target, "target", k)
    if p.shape != t.shape:
        raise DataError(f"pred has shape {p.shape} but target has shape {t.shape}; expected the same [N, H, W]")
    return p, t, k


# ----------------------------------------------------------------------------- per-image values


def _confusion(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Per-image confusion matrices [N, K, K] (rows = target class, columns = predicted class)."""
    n = pred.shape[0]
    code = (target * k + pred).reshape(n, -1)
    code += (np.arange(n, dtype=np.int64) * (k * k))[:, None]
    return np.bincount(code.ravel(), minlength=n * k * k).reshape(n, k, k)


def _overlap(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Dice/IoU/VS per image and foreground class [N, K-1], plus TP/FP/FN."""
    tp = np.diagonal(conf, axis1=1, axis2=2)[:, 1:].astype(np.float64)
    fp = conf.sum(axis=1)[:, 1:] - tp   # predicted c, target not c
    fn = conf.sum(axis=2)[:, 1:] - tp   # target c, predicted not c
    den = 2 * tp + fp + fn
    empty = den == 0
    safe = np.where(empty, 1.0, den)
    dice = np.where(empty, 1.0, 2 * tp / safe)
    iou = np.where(empty, 1.0, tp / np.where(empty, 1.0, tp + fp + fn))
    vs = np.where(empty, 1.0, 1.0 - np.abs(fp - fn) / safe)
    return {"dice": dice, "iou": iou, "vs": vs, "tp": tp, "fp": fp, "fn": fn}


def _boundary_distances(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred-boundary -> target-boundary and back, for two non-empty 2D masks."""
    rows = np.flatnonzero((p | t).any(axis=1))
    cols = np.flatnonzero((p | t).any(axis=0))
    # outside the union's bounding box everything is background, so cropping to it changes
    # neither the boundaries (erosion treats outside-the-array as background) nor the
    # nearest-boundary distances (both boundaries lie inside the box)
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    p, t = p[box], t[box]
    ep = p & ~ndimage.binary_erosion(p)
    et = t & ~ndimage.binary_erosion(t)
    d_pt = ndimage.distance_transform_edt(~et)[ep]
    d_tp = ndimage.distance_transform_edt(~ep)[et]
    return d_pt, d_tp


def _distances(pred: np.ndarray, target: np.ndarray, k: int, tol: float,
               pred_any: np.ndarray, target_any: np.ndarray) -> dict[str, np.ndarray]:
    """HD95/ASSD/NSD per image and foreground class [N, K-1] with the empty-mask conventions."""
    n, h, w = pred.shape
    diag = math.hypot(h, w)
    hd95 = np.full((n, k - 1), np.nan)
    assd = np.full((n, k - 1), np.nan)
    nsd = np.ones((n, k - 1))
    one_empty = pred_any != target_any
    hd95[one_empty] = diag
    assd[one_empty] = diag
    nsd[one_empty] = 0.0
    for i, c in zip(*np.nonzero(pred_any & target_any)):
        if k == 2:
            p, t = pred[i].astype(bool), target[i].astype(bool)
        else:
            p, t = pred[i] == c + 1, target[i] == c + 1
        d_pt, d_tp = _boundary_distances(p, t)
        hd95[i, c] = max(np.quantile(d_pt, 0.95), np.quantile(d_tp, 0.95))
        total = d_pt.size + d_tp.size
        assd[i, c] = (d_pt.sum() + d_tp.sum()) / total
        nsd[i, c] = (np.count_nonzero(d_pt <= tol) + np.count_nonzero(d_tp <= tol)) / total
    return {"hd95": hd95, "assd": assd, "nsd": nsd}


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over axis 1 skipping NaN; NaN (without a warning) where a row is all NaN."""
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=1)
    s = np.where(ok, x, 0.0).sum(axis=1)
    return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def _per_image(pred: np.ndarray, target: np.ndarray, k: int, tol: float, distances: bool) -> dict:
    conf = _confusion(pred, target, k)
    ov = _overlap(conf)
    pred_any = (ov["tp"] + ov["fp"]) > 0
    target_any = (ov["tp"] + ov["fn"]) > 0
    out: dict = {name: ov[name].mean(axis=1) for name in OVERLAP_METRICS}
    if distances:
        dist = _distances(pred, target, k, tol, pred_any, target_any)
        out["hd95"] = _nanmean_rows(dist["hd95"])
        out["assd"] = _nanmean_rows(dist["assd"])
        out["nsd"] = dist["nsd"].mean(axis=1)
    n = pred.shape[0]
    missed = int(np.count_nonzero(target_any & ~pred_any))
    false_alarm = int(np.count_nonzero(pred_any & ~target_any))
    out["counts"] = {
        "n_images": n,
        "n_class_slots": n * (k - 1),
        "n_both_empty": int(np.count_nonzero(~pred_any & ~target_any)),
        "n_one_empty": missed + false_alarm,
        "n_missed": missed,
        "n_false_alarm": false_alarm,
        "n_distance_undefined": int(np.count_nonzero(np.isnan(out["hd95"]))) if distances else None,
    }
    return out


def per_image(pred, target, num_classes: int, nsd_tolerance: float = 2.0) -> dict[str, np.ndarray]:
    """One value per image for every metric in ``SEG_METRICS``, plus ``"counts"``.

    Returns ``{metric: float64 array [N]}`` (mean over the foreground classes; HD95/ASSD NaN
    where undefined) and ``"counts": {...}`` (a dict of ints, see the module docstring).
    """
    p, t, k = _prepare(pred, target, num_classes)
    return _per_image(p, t, k, _check_tolerance(nsd_tolerance), distances=True)


def _mean(values: np.ndarray) -> float:
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def mean_scores(pred, target, num_classes: int, nsd_tolerance: float = 2.0,
                distances: bool = True) -> dict[str, float]:
    """Cheap per-epoch scores for model selection: ``{metric: mean over images}``, no bootstrap.

    ``distances=False`` skips the boundary metrics (HD95, ASSD, NSD: a loop over images) and
    returns only Dice, IoU and VS (fully vectorised).
    """
    p, t, k = _prepare(pred, target, num_classes)
    vals = _per_image(p, t, k, _check_tolerance(nsd_tolerance), distances=bool(distances))
    names = SEG_METRICS if distances else OVERLAP_METRICS
    return {name: _mean(vals[name]) for name in names}


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap_means(values: dict[str, np.ndarray], n: int, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Means over ``n_boot`` resamples of the images (NaN-skipping; NaN if a resample has none)."""
    from ..metrics import bootstrap_weight_blocks

    names = list(values)
    ok = {m: ~np.isnan(values[m]) for m in names}
    filled = {m: np.where(ok[m], values[m], 0.0) for m in names}
    parts: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for weights in bootstrap_weight_blocks(n, n_boot, seed, _MAX_BLOCK_ENTRIES):
        for m in names:
            cnt = weights @ ok[m].astype(np.float64)
            tot = weights @ filled[m]
            with np.errstate(invalid="ignore", divide="ignore"):
                parts[m].append(np.where(cnt > 0, tot / cnt, np.nan))
    return {m: np.concatenate(parts[m]) for m in names}


def seg_metrics_with_ci(pred, target, num_classes: int, nsd_tolerance: float = 2.0,
                        n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Mean of every metric over images with a percentile-bootstrap ``1 - alpha`` interval.

    Returns ``{metric: {"value", "low", "high"}}`` for every name in ``SEG_METRICS`` plus
    ``"counts"`` (see the module docstring). HD95/ASSD means skip images where they are
    undefined; if no image (or no resample) has a defined value the interval is NaN. Same
    inputs and seed give identical intervals. The percentile interval usually, but not
    provably always, contains the point value.
    """
    p, t, k = _prepare(pred, target, num_classes)
    tol = _check_tolerance(nsd_tolerance)
    _check_boot_options(n_boot, alpha)
    vals = _per_image(p, t, k, tol, distances=True)
    metric_vals = {m: vals[m] for m in SEG_METRICS}
    boot = _bootstrap_means(metric_vals, p.shape[0], int(n_boot), int(seed))
    out: dict = {}
    for m in SEG_METRICS:
        out[m] = percentile_ci(_mean(metric_vals[m]), boot[m], alpha)
    out["counts"] = vals["counts"]
    return out
