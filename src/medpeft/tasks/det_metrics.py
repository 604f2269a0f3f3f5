"""Detection metrics (lesion boxes) with percentile-bootstrap confidence intervals.

Inputs
------
``preds`` and ``targets`` are lists with one entry per image, in the same order:
``{"boxes": [N, 4], "scores": [N], "labels": [N]}`` and ``{"boxes": [M, 4], "labels": [M]}``
(torch tensors, numpy arrays or lists; the output format of torchvision's detection models and
the targets of ``medpeft.data.boxes``). Boxes are ``(x0, y0, x1, y1)`` continuous pixels, labels
1..K (0 = background) - the conventions of ``medpeft.data.boxes``; ``labels`` may be left out
for a one-class task (all 1). An image without objects has boxes of shape ``(0, 4)``. A box with
x1 < x0 or y1 < y0 is a DataError (pycocotools would silently ignore it: negative area).

Matching (shared by every metric)
---------------------------------
Per image and class, detections are taken in descending score order and each is matched to the
unmatched ground-truth box of the same class with the highest IoU, if that IoU is >= the
threshold (the COCO rule; ties in IoU go to the later box as in pycocotools). A matched
detection is a true positive (TP), any other detection a false positive (FP) - also a second
detection of an already found lesion -, an unmatched ground-truth box a false negative (FN).
Because matching is greedy by score, the matches of the detections above a score threshold are
those of the full matching restricted to them: one matching serves every threshold.

Metrics (``DET_METRICS``: name -> "max" if higher is better)
-----------------------------------------------------------
* ``map50`` / ``map50_95``: COCO average precision at IoU 0.5 / averaged over IoU 0.50:0.05:0.95
  (101-point interpolated precision, at most 100 detections per image, all areas), averaged over
  the classes that have ground truth; computed by torchmetrics' ``MeanAveragePrecision``
  (pycocotools backend). NaN when no image has a ground-truth box.
* ``precision``, ``recall``, ``f1`` at IoU 0.5 for the detections with ``score >= score_threshold``,
  pooled over images and classes (micro): TP / (TP + FP), TP / (TP + FN), 2TP / (2TP + FP + FN).
  Precision is NaN without detections, recall NaN without ground truth, F1 NaN with neither.
  ``choose_score_threshold`` picks the threshold maximising F1 on validation data.
* ``mean_iou``: mean IoU of the TP pairs (IoU >= 0.5, score >= threshold); NaN without a TP.
* ``froc``: the FROC curve (``froc_curve``) is sensitivity = TP / (ground-truth boxes) against
  FP / image, with the IoU >= 0.5 one-to-one matching above as the hit criterion (a box whose
  centre lies in a lesion but overlaps it less does not count; a duplicate detection is an FP),
  over all score thresholds, pooled over classes; ``froc`` is the mean sensitivity at
  ``FROC_RATES`` = 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per image. Interpolation: none (step rule) -
  the sensitivity at rate r is that of the lowest threshold whose FP / image is <= r, i.e. the
  best sensitivity reachable without exceeding r FPs per image (conservative; 0 when even the
  highest-scoring detection exceeds r, and the final sensitivity when all detections stay below
  r). A threshold never splits detections of equal score. Unlike mAP no 100-per-image cap.

Empty images
------------
* an image with ground truth and no detection: its boxes are FNs (recall, FROC sensitivity, AP
  all go down);
* an image without ground truth but with detections: every detection is an FP (precision,
  FROC's FP / image and AP go down; COCO counts them too);
* an image with neither (a true negative): adds nothing to TP/FP/FN, so precision, recall, F1,
  mean IoU and AP do not see it; FROC counts it in the number of images (it lowers FP / image,
  as a correct negative should); its per-image F1 is 1 (a correct "nothing here", as in the
  segmentation metrics) and ``counts["n_true_negative_images"]`` counts it.

Bootstrap
---------
``det_metrics_with_ci`` resamples the images with replacement ``n_boot`` times (numpy
``default_rng(seed)``, the same resamples for every metric) and reports percentile intervals
(``medpeft.metrics.percentile_ci``). Matching is per image, so a resample only re-weights the
matched detections: AP, FROC and the counts are recomputed from weights without re-matching
(an image drawn twice counts twice). The resampled AP is computed here (``coco_map``, the COCO
accumulation with per-image weights; the tests check it equals pycocotools, faster-coco-eval
and torchmetrics on unweighted data, and pycocotools on a resampled list); the point values are
torchmetrics'. Equal scores are where AP is arbitrary (their order decides the curve):
between images they are ordered by image, as pycocotools orders them by image id, so a
resample is scored as if its images kept their original order; an image drawn twice keeps its
copies' tied detections together, where pycocotools on a literal list of the copies would
interleave them. Without equal scores the resampled AP is exactly pycocotools' on the list.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from medpeft.errors import ConfigError, DataError
from medpeft.metrics import percentile_ci

DET_METRICS: dict[str, str] = {
    "map50": "max", "map50_95": "max", "precision": "max", "recall": "max", "f1": "max",
    "mean_iou": "max", "froc": "max",
}
MATCH_IOU = 0.5  # IoU for precision/recall/F1, mean IoU and FROC hits (IOU_THRESHOLDS[0])
# COCO's grids, built exactly as pycocotools builds them (the same floats)
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETECTIONS = 100  # per image (and class), COCO's default for mAP
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_EPS = np.spacing(1)  # pycocotools' guard in TP / (TP + FP)
_MAX_BLOCK_ENTRIES = 20_000_000  # per bootstrap block: resamples x IoU thresholds x detections


# ----------------------------------------------------------------------------- inputs
def _array(x, what: str, shape_tail: tuple, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} could not be read as numbers") from None
    if arr.size == 0:
        arr = arr.reshape((0, *shape_tail))
    if arr.shape[1:] != shape_tail or arr.ndim != 1 + len(shape_tail):
        raise DataError(f"{what} has shape {arr.shape}; expected [N{''.join(f', {s}' for s in shape_tail)}]")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what} has non-finite values")
    if dtype is np.int64:
        if not np.all(arr == np.round(arr)):
            raise DataError(f"{what} has non-integer values; expected class labels 1..K")
        return arr.astype(np.int64)
    return arr


def _image(entry, i: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes [N, 4], scores [N] (ones for targets), labels [N]) of one image, checked."""
    if not isinstance(entry, dict) or "boxes" not in entry:
        raise DataError(f"{kind}[{i}] is not a dict with 'boxes'")
    boxes = _array(entry["boxes"], f"{kind}[{i}]['boxes']", (4,), np.float64)
    n = len(boxes)
    if kind == "preds":
        if "scores" not in entry:
            raise DataError(f"preds[{i}] has no 'scores'; every detection needs a confidence score")
        scores = _array(entry["scores"], f"preds[{i}]['scores']", (), np.float64)
    else:
        scores = np.ones(n)
    labels = _array(entry["labels"], f"{kind}[{i}]['labels']", (), np.int64) if "labels" in entry \
        else np.ones(n, dtype=np.int64)
    if len(scores) != n or len(labels) != n:
        raise DataError(f"{kind}[{i}] has {n} boxes, {len(scores)} scores and {len(labels)} labels; "
                        "expected one score and one label per box")
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if len(inverted):
        # COCO would silently ignore such a box (negative area); it is a bug upstream
        raise DataError(f"{kind}[{i}]['boxes'] row {int(inverted[0])} is {boxes[inverted[0]].tolist()}: x1 < x0 or "
                        "y1 < y0; expected (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
    return boxes, scores, labels


def _images(preds, targets) -> tuple[list, list]:
    if len(preds) != len(targets):
        raise DataError(f"{len(preds)} prediction entries but {len(targets)} targets; expected one of each per image")
    if len(preds) == 0:
        raise DataError("no images: expected at least one prediction/target pair")
    return ([_image(p, i, "preds") for i, p in enumerate(preds)],
            [_image(t, i, "targets") for i, t in enumerate(targets)])


# ----------------------------------------------------------------------------- matching
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()  # float64 in, float64 out


def match_detections(pred_boxes, pred_scores, gt_boxes, iou_thresholds=IOU_THRESHOLDS):
    """COCO greedy matching of one image and class.

    Returns (order [N]: detection indices by descending score (stable), tp [T, N] bool in that
    order, iou [T, N] the IoU of each matched pair (0 where unmatched))."""
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="mergesort")
    ious = _iou(pred_boxes[order], gt_boxes)
    thresholds = np.atleast_1d(np.asarray(iou_thresholds, dtype=np.float64))
    tp = np.zeros((len(thresholds), len(order)), dtype=bool)
    matched = np.zeros((len(thresholds), len(order)))
    for t, thr in enumerate(thresholds):
        used = np.zeros(len(gt_boxes), dtype=bool)
        limit = min(thr, 1 - 1e-10)  # pycocotools' cap: IoU 1 still matches at threshold 1
        for d in range(len(order)):
            free = np.where(used, -1.0, ious[d])
            best = free.max(initial=-1.0)
            if best < limit:
                continue
            g = len(free) - 1 - int(np.argmax(free[::-1] == best))  # last box with the best IoU
            used[g], tp[t, d], matched[t, d] = True, True, best
    return order, tp, matched


@dataclass
class Matched:
    """Every detection of a data set, matched once; what all metrics and resamples read.

    Detections are in COCO's accumulation order: by image, within an image by class and then
    descending score; ``order`` sorts them globally by descending score (stable)."""

    n_images: int
    classes: np.ndarray  # [C] labels having ground truth or detections
    gt_count: np.ndarray  # [n_images, C] ground-truth boxes per image and class
    image: np.ndarray  # [D] image index of each detection
    cls: np.ndarray  # [D] class position (index into ``classes``)
    score: np.ndarray  # [D]
    rank: np.ndarray  # [D] rank within its image and class (0 = best score)
    tp: np.ndarray  # [T, D] bool, matched at IOU_THRESHOLDS[t]
    iou: np.ndarray  # [D] IoU with the matched box at MATCH_IOU (0 if unmatched)
    order: np.ndarray  # [D] global descending-score order (stable in the order above)

    @property
    def tp50(self) -> np.ndarray:
        return self.tp[0]


def match_all(preds, targets) -> Matched:
    """Check the inputs and match every image and class once (module docstring)."""
    pred_list, gt_list = _images(preds, targets)
    labels = [lab for _, _, lab in pred_list] + [lab for _, _, lab in gt_list]
    classes = np.unique(np.concatenate(labels)) if any(len(x) for x in labels) else np.zeros(0, np.int64)
    gt_count = np.zeros((len(gt_list), len(classes)), dtype=np.int64)
    parts: dict[str, list] = {k: [] for k in ("image", "cls", "score", "rank", "tp", "iou")}
    for i, ((pb, ps, pl), (gb, _, gl)) in enumerate(zip(pred_list, gt_list)):
        for c, label in enumerate(classes):
            gt_count[i, c] = int(np.sum(gl == label))
            keep = pl == label
            if not keep.any():
                continue
            order, tp, matched = match_detections(pb[keep], ps[keep], gb[gl == label])
            parts["image"].append(np.full(len(order), i)), parts["cls"].append(np.full(len(order), c))
            parts["score"].append(ps[keep][order]), parts["rank"].append(np.arange(len(order)))
            parts["tp"].append(tp), parts["iou"].append(matched[0])
    if parts["image"]:
        flat = {k: np.concatenate(v, axis=-1) for k, v in parts.items()}
    else:
        flat = {"image": np.zeros(0, np.int64), "cls": np.zeros(0, np.int64), "score": np.zeros(0),
                "rank": np.zeros(0, np.int64), "tp": np.zeros((len(IOU_THRESHOLDS), 0), bool), "iou": np.zeros(0)}
    order = np.argsort(-flat["score"], kind="mergesort")
    return Matched(len(gt_list), classes, gt_count, order=order, **flat)


# ----------------------------------------------------------------------------- AP (COCO)
def _weights(m: Matched, weights) -> np.ndarray:
    """[B, n_images] image weights (one row of ones by default)."""
    if weights is None:
        return np.ones((1, m.n_images))
    w = np.asarray(weights, dtype=np.float64)
    return w.reshape(1, -1) if w.ndim == 1 else w


def _class_ap(tp: np.ndarray, w_det: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """[B, T] COCO AP of one class: tp [T, D] in descending score order, w_det [B, D] the
    detections' image weights, n_gt [B] the weighted ground-truth count (AP NaN where 0)."""
    b, (t, d) = w_det.shape[0], tp.shape
    if d == 0:
        return np.where(n_gt[:, None] > 0, 0.0, np.nan) * np.ones((b, t))
    tps = np.cumsum(w_det[:, None, :] * tp[None], axis=-1)  # [B, T, D]
    fps = np.cumsum(w_det[:, None, :] * ~tp[None], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = tps / n_gt[:, None, None]
    pr = tps / (tps + fps + _EPS)
    pr = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]  # precision envelope
    # row by row on the raw floats: recall often equals a recall threshold up to the last bit
    # (k / n vs j / 100), so any arithmetic on rc here could change which point is taken
    flat_rc = np.nan_to_num(rc, nan=0.0).reshape(b * t, d)
    idx = np.stack([np.searchsorted(row, RECALL_THRESHOLDS, side="left") for row in flat_rc]).reshape(b, t, -1)
    q = np.where(idx < d, np.take_along_axis(pr, np.minimum(idx, d - 1), axis=-1), 0.0)
    ap = q.mean(axis=-1)
    return np.where(n_gt[:, None] > 0, ap, np.nan)


def _collapse_false_runs(tp: np.ndarray, w_det: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tp [T, D], w_det [B, D] with each run of detections that are false at every IoU threshold
    merged into one point carrying the run's summed weight. AP reads precision where recall first
    reaches a threshold (at a true positive) and the envelope to its right; inside such a run
    recall is flat and precision falls, so only the run's end - its cumulative weight - matters.
    Bootstrap weights are counts (whole numbers in float64), so the sums are exact and AP equals
    the uncollapsed one to the last bit; on a Kvasir-sized set D drops from ~56 k to ~2 k."""
    key = tp.any(axis=0)
    if key.size == 0 or key.all():
        return tp, w_det
    starts = np.flatnonzero(key | np.concatenate([[True], key[:-1]]))  # each key point; each false run
    return tp[:, starts], np.add.reduceat(w_det, starts, axis=1)


def coco_map(m: Matched, weights=None) -> np.ndarray:
    """[B, T] mean over classes (with ground truth) of COCO AP at each of ``IOU_THRESHOLDS``;
    ``weights`` [B, n_images] (or [n_images]) counts each image (default once). Column 0 is
    mAP50, the row mean mAP50-95. NaN where no class has ground truth."""
    w = _weights(m, weights)
    per_class = []
    for c in range(len(m.classes)):
        sel = m.order[(m.cls[m.order] == c) & (m.rank[m.order] < MAX_DETECTIONS)]
        per_class.append(_class_ap(*_collapse_false_runs(m.tp[:, sel], w[:, m.image[sel]]), w @ m.gt_count[:, c]))
    if not per_class:
        return np.full((w.shape[0], len(IOU_THRESHOLDS)), np.nan)
    stack = np.stack(per_class)  # [C, B, T]
    ok = ~np.isnan(stack)
    total = np.where(ok, stack, 0.0).sum(0)
    count = ok.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _tensors(entry, with_scores: bool) -> dict[str, torch.Tensor]:
    boxes, scores, labels = entry
    out = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
           "labels": torch.as_tensor(labels, dtype=torch.int64)}
    if with_scores:
        out["scores"] = torch.as_tensor(scores, dtype=torch.float32)
    return out


def mean_average_precision(preds, targets) -> dict[str, float]:
    """{"map50", "map50_95"} by torchmetrics' ``MeanAveragePrecision`` (COCO definition,
    pycocotools backend); NaN instead of COCO's -1 when there is no ground truth."""
    from torchmetrics.detection import MeanAveragePrecision  # heavy import, only when needed

    pred_list, gt_list = _images(preds, targets)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update([_tensors(p, True) for p in pred_list], [_tensors(g, False) for g in gt_list])
    result = metric.compute()

    def value(key: str) -> float:
        v = float(result[key])
        return float("nan") if v < 0 else v

    return {"map50": value("map_50"), "map50_95": value("map")}


# ----------------------------------------------------------------------------- thresholded counts
def _check_threshold(score_threshold) -> float:
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, numbers.Real) \
            or math.isnan(float(score_threshold)):
        raise ConfigError(f"score_threshold={score_threshold!r}; expected a number "
                          "(detections with a score >= it are kept)")
    return float(score_threshold)


def _per_image_counts(m: Matched, score_threshold: float) -> dict[str, np.ndarray]:
    """Per image at IoU 0.5 and ``score >= score_threshold``: tp, fp, fn, n_gt, n_pred, iou_sum."""
    kept = m.score >= score_threshold
    n = m.n_images
    tp = np.bincount(m.image[kept & m.tp50], minlength=n).astype(np.float64)
    n_pred = np.bincount(m.image[kept], minlength=n).astype(np.float64)
    iou_sum = np.bincount(m.image[kept & m.tp50], weights=m.iou[kept & m.tp50], minlength=n)
    n_gt = m.gt_count.sum(1).astype(np.float64)
    return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "n_gt": n_gt, "n_pred": n_pred, "iou_sum": iou_sum}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _prf(tp, fp, fn, iou_sum) -> dict[str, np.ndarray]:
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "mean_iou": _ratio(iou_sum, tp)}


def precision_recall_f1(preds, targets, score_threshold: float) -> dict[str, float]:
    """precision, recall, f1, mean_iou and tp/fp/fn at IoU 0.5 for detections with
    ``score >= score_threshold``, pooled over images and classes."""
    m = match_all(preds, targets)
    counts = _per_image_counts(m, _check_threshold(score_threshold))
    sums = {k: float(v.sum()) for k, v in counts.items()}
    out = {k: float(v) for k, v in _prf(sums["tp"], sums["fp"], sums["fn"], sums["iou_sum"]).items()}
    return {**out, **{k: int(sums[k]) for k in ("tp", "fp", "fn")}}


def per_image_values(preds, targets, score_threshold: float) -> list[dict]:
    """One dict per image at IoU 0.5 and ``score >= score_threshold``: n_gt, n_pred, tp, fp, fn,
    precision, recall, f1, mean_iou and ``outcome``: "true negative" (no box, no detection; F1
    1), "false alarm" (no box, detections), "missed" (boxes, no TP), "found" (at least one TP)."""
    m = match_all(preds, targets)
    c = _per_image_counts(m, _check_threshold(score_threshold))
    prf = _prf(c["tp"], c["fp"], c["fn"], c["iou_sum"])
    out = []
    for i in range(m.n_images):
        negative = c["n_gt"][i] == 0
        outcome = ("true negative" if c["n_pred"][i] == 0 else "false alarm") if negative else \
            ("found" if c["tp"][i] > 0 else "missed")
        row = {k: int(c[k][i]) for k in ("n_gt", "n_pred", "tp", "fp", "fn")}
        row.update({k: float(prf[k][i]) for k in ("precision", "recall", "f1", "mean_iou")})
        if outcome == "true negative":
            row["f1"] = 1.0
        out.append({"image": i, **row, "outcome": outcome})
    return out


# ----------------------------------------------------------------------------- operating points
def _operating_points(m: Matched, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative weighted (TP [B, G+1], FP [B, G+1]) at each distinct score, highest first, and
    the thresholds [G+1]; point 0 keeps nothing (threshold +inf)."""
    w = _weights(m, weights)
    order = m.order
    scores = m.score[order]
    w_det = w[:, m.image[order]]
    tp = np.cumsum(w_det * m.tp50[order], axis=1)
    fp = np.cumsum(w_det * ~m.tp50[order], axis=1)
    # the last detection of each run of equal scores: a threshold never splits a tie
    ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if len(order) else np.zeros(0, int)
    zero = np.zeros((w.shape[0], 1))
    return (np.concatenate([zero, tp[:, ends]], 1), np.concatenate([zero, fp[:, ends]], 1),
            np.concatenate([[math.inf], scores[ends]]))


def choose_score_threshold(preds, targets) -> dict[str, float]:
    """The score threshold maximising F1 at IoU 0.5 (choose it on validation data, apply it to
    test data). Candidates are the distinct detection scores (keep ``score >= t``) and +inf (keep
    nothing). Ties in F1 go to the highest threshold (fewest detections: the same F1 with fewer
    alarms to review). With no detection matching anything, F1 is 0 everywhere and the result is
    +inf. DataError when the data hold no ground-truth box (F1 cannot rank thresholds).
    Returns {"threshold", "f1", "precision", "recall"} at the chosen threshold."""
    m = match_all(preds, targets)
    n_gt = float(m.gt_count.sum())
    if n_gt == 0:
        raise DataError("no ground-truth boxes: F1 is undefined, so no score threshold can be chosen; "
                        "use validation images that contain objects")
    tp, fp, thresholds = _operating_points(m, None)
    tp, fp = tp[0], fp[0]
    f1 = 2 * tp / (tp + fp + n_gt)
    best = int(np.flatnonzero(f1 == f1.max())[0])  # points run from high to low threshold
    precision = tp[best] / (tp[best] + fp[best]) if tp[best] + fp[best] > 0 else math.nan
    return {"threshold": float(thresholds[best]), "f1": float(f1[best]), "precision": float(precision),
            "recall": float(tp[best] / n_gt)}


def _froc_from_points(tp, fp, n_images, n_gt, rates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FP per image [B, G+1], sensitivity [B, G+1], sensitivity at ``rates`` [B, R]) by the step rule."""
    fppi = fp / n_images[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / n_gt[:, None]
    # last operating point with FP/image <= r (FP/image and sensitivity never decrease along points)
    last = (fppi[:, :, None] <= np.asarray(rates)[None, None, :]).sum(1) - 1
    return fppi, sens, np.take_along_axis(sens, last, axis=1)


def _check_rates(rates) -> tuple[float, ...]:
    try:
        values = tuple(float(r) for r in rates)
    except (TypeError, ValueError):
        raise ConfigError(f"FROC rates {rates!r}; expected positive numbers of false positives per image") from None
    if not values or not all(math.isfinite(r) and r > 0 for r in values):
        raise ConfigError(f"FROC rates {rates!r}; expected positive numbers of false positives per image")
    return values


def _froc(m: Matched, rates) -> dict:
    tp, fp, thresholds = _operating_points(m, None)
    fppi, sens, at = _froc_from_points(tp, fp, np.array([m.n_images], float),
                                       np.array([float(m.gt_count.sum())]), rates)
    return {"fp_per_image": fppi[0].tolist(), "sensitivity": sens[0].tolist(), "thresholds": thresholds.tolist(),
            "at": {float(r): float(s) for r, s in zip(rates, at[0])}, "average_sensitivity": float(at[0].mean())}


def froc_curve(preds, targets, rates=FROC_RATES) -> dict:
    """FROC: {"fp_per_image", "sensitivity", "thresholds"} (lists, one entry per distinct score,
    starting at (0, 0) for threshold +inf), {"at": {rate: sensitivity}} and "average_sensitivity"
    (the mean over ``rates``). Sensitivity NaN without ground truth."""
    return _froc(match_all(preds, targets), _check_rates(rates))


# ----------------------------------------------------------------------------- all metrics
def _values_from_weights(m: Matched, counts: dict, weights: np.ndarray, rates) -> dict[str, np.ndarray]:
    """Every metric (the mAPs by ``coco_map``) for each weight row [B, n_images]."""
    sums = {k: weights @ v for k, v in counts.items()}
    out = _prf(sums["tp"], sums["fp"], sums["fn"], sums["iou_sum"])
    aps = coco_map(m, weights)
    out["map50"], out["map50_95"] = aps[:, 0], aps.mean(1)
    tp, fp, _ = _operating_points(m, weights)
    _, _, at = _froc_from_points(tp, fp, weights.sum(1), weights @ m.gt_count.sum(1).astype(float), rates)
    out["froc"] = at.mean(1)
    return out


def _counts_summary(m: Matched, c: dict) -> dict[str, int]:
    negative = c["n_gt"] == 0
    return {"n_images": m.n_images, "n_gt": int(c["n_gt"].sum()), "n_pred": int(c["n_pred"].sum()),
            "tp": int(c["tp"].sum()), "fp": int(c["fp"].sum()), "fn": int(c["fn"].sum()),
            "n_negative_images": int(negative.sum()),
            "n_true_negative_images": int((negative & (c["n_pred"] == 0)).sum()),
            "n_false_alarm_images": int((negative & (c["n_pred"] > 0)).sum())}


def _point(m: Matched, c: dict, preds, targets, rates) -> dict:
    values = {k: float(v[0]) for k, v in _values_from_weights(m, c, np.ones((1, m.n_images)), rates).items()}
    values.update(mean_average_precision(preds, targets))  # the point mAPs come from torchmetrics
    return {**{k: values[k] for k in DET_METRICS}, "froc_at": _froc(m, rates)["at"], "counts": _counts_summary(m, c)}


def det_metrics(preds, targets, score_threshold: float, rates=FROC_RATES) -> dict:
    """Point values: every name of ``DET_METRICS`` (floats), ``froc_at`` {rate: sensitivity}
    and ``counts`` (images, boxes, TP/FP/FN at the threshold, negative / true-negative /
    false-alarm images)."""
    m = match_all(preds, targets)
    c = _per_image_counts(m, _check_threshold(score_threshold))
    return _point(m, c, preds, targets, _check_rates(rates))


def _check_boot_options(n_boot, alpha) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r}; expected an integer >= 1 (number of bootstrap resamples)")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha={alpha!r}; expected a number in (0, 1), e.g. 0.05 for a 95% interval")


def det_metrics_with_ci(preds, targets, score_threshold: float, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05, rates=FROC_RATES) -> dict:
    """``det_metrics`` plus percentile-bootstrap ``1 - alpha`` intervals over images:
    ``{metric: {"value", "low", "high"}}`` for every name of ``DET_METRICS``, and ``froc_at``,
    ``counts`` as in ``det_metrics``. Same inputs and seed give the same intervals."""
    _check_boot_options(n_boot, alpha)
    rates = _check_rates(rates)
    m = match_all(preds, targets)
    c = _per_image_counts(m, _check_threshold(score_threshold))
    point = _point(m, c, preds, targets, rates)
    rng = np.random.default_rng(seed)
    per_row = max(1, len(IOU_THRESHOLDS) * max(len(m.score), m.n_images))
    block = max(1, min(n_boot, _MAX_BLOCK_ENTRIES // per_row))
    parts: dict[str, list] = {k: [] for k in DET_METRICS}
    done = 0
    while done < n_boot:
        rows = min(block, n_boot - done)
        idx = rng.integers(0, m.n_images, size=(rows, m.n_images))
        weights = np.stack([np.bincount(r, minlength=m.n_images) for r in idx]).astype(np.float64)
        for k, v in _values_from_weights(m, c, weights, rates).items():
            parts[k].append(v)
        done += rows
    out = {k: percentile_ci(point[k], np.concatenate(parts[k]), alpha) for k in DET_METRICS}
    return {**out, "froc_at": point["froc_at"], "counts": point["counts"]}
