"""Detection metrics: hand-built fixtures, FROC by hand, and mAP against pycocotools / faster-coco-eval."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from medpeft.errors import ConfigError, DataError
from medpeft.tasks import det_metrics as dm

BOX = [10.0, 20.0, 110.0, 120.0]  # 100 x 100


def pred(boxes, scores, labels=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = {"boxes": boxes, "scores": np.asarray(scores, dtype=np.float64)}
    if labels is not None:
        out["labels"] = np.asarray(labels, dtype=np.int64)
    return out


def gt(boxes, labels=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = {"boxes": boxes}
    if labels is not None:
        out["labels"] = np.asarray(labels, dtype=np.int64)
    return out


def shifted(dx: float):
    return [BOX[0] + dx, BOX[1], BOX[2] + dx, BOX[3]]


# ----------------------------------------------------------------------------- hand-built fixtures
def test_perfect_boxes_score_one_everywhere():
    preds = [pred([BOX], [0.9]), pred([BOX, [150, 150, 200, 220]], [0.8, 0.7]), pred([], [])]
    targets = [gt([BOX]), gt([BOX, [150, 150, 200, 220]]), gt([])]
    r = dm.det_metrics(preds, targets, score_threshold=0.5)
    for name in dm.DET_METRICS:
        assert r[name] == pytest.approx(1.0), name
    assert r["counts"] == {"n_images": 3, "n_gt": 3, "n_pred": 3, "tp": 3, "fp": 0, "fn": 0,
                           "n_negative_images": 1, "n_true_negative_images": 1, "n_false_alarm_images": 0}


@pytest.mark.parametrize("dx, matched", [(31.0, True), (34.0, False)])
def test_iou_just_above_and_below_half(dx, matched):
    iou = (100 - dx) / (100 + dx)  # 0.527 and 0.493
    assert (iou >= 0.5) == matched and abs(iou - 0.5) < 0.03
    r = dm.det_metrics([pred([shifted(dx)], [0.9])], [gt([BOX])], score_threshold=0.5)
    if matched:
        # TP at IoU 0.5 only: AP 1 at the first of the ten IoU thresholds, 0 at the others
        assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(0.1)
        assert (r["precision"], r["recall"], r["f1"]) == (1.0, 1.0, 1.0)
        assert r["mean_iou"] == pytest.approx(iou)
    else:
        assert r["map50"] == 0 and r["map50_95"] == 0
        assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
        assert math.isnan(r["mean_iou"])
        assert r["counts"]["fp"] == 1 and r["counts"]["fn"] == 1


def test_missing_box_halves_recall():
    r = dm.det_metrics([pred([BOX], [0.9]), pred([], [])], [gt([BOX]), gt([BOX])], score_threshold=0.5)
    assert (r["precision"], r["recall"]) == (1.0, 0.5) and r["f1"] == pytest.approx(2 / 3)
    # precision 1 up to recall 0.5: 51 of the 101 recall points
    assert r["map50"] == pytest.approx(51 / 101)
    assert r["froc"] == pytest.approx(0.5)


@pytest.mark.parametrize("fp_score, ap", [(0.8, 1.0), (0.95, 0.5)])
def test_extra_box_costs_precision_and_ap_by_rank(fp_score, ap):
    preds = [pred([BOX, [150, 150, 200, 200]], [0.9, fp_score])]
    r = dm.det_metrics(preds, [gt([BOX])], score_threshold=0.5)
    assert (r["precision"], r["recall"]) == (0.5, 1.0)
    assert r["map50"] == pytest.approx(ap)


def test_duplicate_detection_is_a_false_positive():
    r = dm.precision_recall_f1([pred([BOX, shifted(1.0)], [0.9, 0.8])], [gt([BOX])], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)


def test_equal_iou_goes_to_the_later_box_like_pycocotools():
    # the first detection overlaps both lesions with IoU 2/3 exactly; pycocotools gives it the later
    # one, which leaves the earlier lesion to the second detection (IoU 2/3 with it, 1/4 with the other)
    lesions = [[10, 0, 20, 10], [14, 0, 24, 10]]
    preds = [pred([[12, 0, 22, 10], [8, 0, 18, 10]], [0.9, 0.8])]
    r = dm.precision_recall_f1(preds, [gt(lesions)], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
    preds[0]["labels"], targets = np.ones(2, int), [gt(lesions, [1, 1])]
    ref = coco_reference(preds, targets, "pycocotools")
    assert ref["map50"] == pytest.approx(1.0) and dm.coco_map(dm.match_all(preds, targets))[0, 0] == pytest.approx(1.0)


def test_classes_must_agree():
    r = dm.precision_recall_f1([pred([BOX], [0.9], [2])], [gt([BOX], [1])], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)


def test_empty_images_false_alarms_and_true_negatives():
    preds = [pred([BOX], [0.9]), pred([[0, 0, 30, 30]], [0.8]), pred([], [])]
    targets = [gt([BOX]), gt([]), gt([])]
    r = dm.det_metrics(preds, targets, score_threshold=0.5)
    assert (r["precision"], r["recall"]) == (0.5, 1.0)
    assert r["counts"]["n_false_alarm_images"] == 1 and r["counts"]["n_true_negative_images"] == 1
    # FP on the lesion-free image is ranked below the TP: AP stays 1
    assert r["map50"] == pytest.approx(1.0)
    rows = dm.per_image_values(preds, targets, 0.5)
    assert [row["outcome"] for row in rows] == ["found", "false alarm", "true negative"]
    assert rows[2]["f1"] == 1.0 and math.isnan(rows[2]["precision"]) and math.isnan(rows[2]["recall"])
    assert rows[1]["f1"] == 0.0 and rows[1]["fp"] == 1
    # the true negative counts in FP / image: 1 FP over 3 images
    curve = dm.froc_curve(preds, targets)
    assert curve["fp_per_image"][-1] == pytest.approx(1 / 3)


def test_score_threshold_filters_detections():
    preds = [pred([BOX, [150, 150, 200, 200]], [0.9, 0.3])]
    assert dm.precision_recall_f1(preds, [gt([BOX])], 0.5)["precision"] == 1.0
    assert dm.precision_recall_f1(preds, [gt([BOX])], 0.3)["precision"] == 0.5  # >= keeps the tie


def test_no_ground_truth_at_all():
    r = dm.det_metrics([pred([BOX], [0.9]), pred([], [])], [gt([]), gt([])], 0.5)
    assert math.isnan(r["map50"]) and math.isnan(r["map50_95"]) and math.isnan(r["recall"])
    assert r["precision"] == 0.0 and r["f1"] == 0.0 and math.isnan(r["froc"])
    with pytest.raises(DataError, match="no ground-truth boxes"):
        dm.choose_score_threshold([pred([BOX], [0.9])], [gt([])])


# ----------------------------------------------------------------------------- FROC by hand
def froc_fixture():
    # 4 images, 2 lesions; detections by score: TP .9 (img 0), FP .8 (img 2), FP .7 (img 3),
    # TP .6 (img 1), FP .5 (img 1, a second box on nothing)
    preds = [pred([BOX], [0.9]), pred([shifted(2.0), [150, 150, 200, 200]], [0.6, 0.5]),
             pred([BOX], [0.8]), pred([BOX], [0.7])]
    targets = [gt([BOX]), gt([BOX]), gt([]), gt([])]
    return preds, targets


def test_froc_hand_computed():
    curve = dm.froc_curve(*froc_fixture())
    assert curve["thresholds"] == [math.inf, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert curve["fp_per_image"] == pytest.approx([0, 0, 0.25, 0.5, 0.5, 0.75])
    assert curve["sensitivity"] == pytest.approx([0, 0.5, 0.5, 0.5, 1.0, 1.0])
    # step rule: the last operating point with FP/image <= rate
    expected = {0.125: 0.5, 0.25: 0.5, 0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert curve["at"] == pytest.approx(expected)
    assert curve["average_sensitivity"] == pytest.approx(6 / 7)
    assert dm.det_metrics(*froc_fixture(), score_threshold=0.5)["froc"] == pytest.approx(6 / 7)


def test_froc_never_splits_equal_scores():
    # a TP and an FP of the same score enter together: no point with the TP alone
    preds = [pred([BOX], [0.7]), pred([BOX], [0.7])]
    curve = dm.froc_curve(preds, [gt([BOX]), gt([])])
    assert curve["fp_per_image"] == pytest.approx([0, 0.5]) and curve["sensitivity"] == pytest.approx([0, 1.0])
    assert curve["at"][0.125] == 0.0 and curve["at"][0.5] == 1.0


# ----------------------------------------------------------------------------- threshold choice
def test_choose_threshold_maximises_f1():
    preds = [pred([BOX, [150, 150, 200, 200]], [0.9, 0.8]), pred([BOX], [0.7])]
    choice = dm.choose_score_threshold(preds, [gt([BOX]), gt([BOX])])
    # F1: 2/3 at .9, 1/2 at .8, 4/5 at .7
    assert choice["threshold"] == 0.7 and choice["f1"] == pytest.approx(0.8)
    assert choice["precision"] == pytest.approx(2 / 3) and choice["recall"] == 1.0


def test_choose_threshold_ties_go_to_the_highest():
    # F1 2/3 at .9 (1 TP) and again at .6 (2 TP, 2 FP): the higher threshold wins
    preds = [pred([BOX, [150, 150, 200, 200], [150, 0, 200, 50]], [0.9, 0.8, 0.7]), pred([BOX], [0.6])]
    choice = dm.choose_score_threshold(preds, [gt([BOX]), gt([BOX])])
    assert choice["threshold"] == 0.9 and choice["f1"] == pytest.approx(2 / 3)


def test_choose_threshold_without_detections_keeps_nothing():
    choice = dm.choose_score_threshold([pred([], [])], [gt([BOX])])
    assert choice["threshold"] == math.inf and choice["f1"] == 0.0


# ----------------------------------------------------------------------------- second implementations
def random_fixture(seed: int, n: int = 40, ties: bool = False):
    """Two classes, jittered hits, wrong-class hits, misses, spurious boxes, empty images."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n):
        k = int(rng.integers(0, 4)) if i % 5 else 0
        xy = rng.uniform(0, 200, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 50, (k, 2))], 1)
        labels = rng.integers(1, 3, k)
        hit = rng.random(k) < 0.8
        pb = boxes[hit] + rng.normal(0, 4, (int(hit.sum()), 4)).clip(-4, 4)  # jitter never inverts a box
        pl = np.where(rng.random(int(hit.sum())) < 0.9, labels[hit], 3 - labels[hit])
        ps = rng.random(int(hit.sum()))
        extra = int(rng.integers(0, 3))
        exy = rng.uniform(0, 200, (extra, 2))
        pb = np.concatenate([pb, np.concatenate([exy, exy + rng.uniform(10, 50, (extra, 2))], 1)])
        pl = np.concatenate([pl, rng.integers(1, 3, extra)])
        ps = np.concatenate([ps, rng.random(extra) * 0.7])
        if ties:
            ps = np.round(ps, 1)
        # float32 throughout: what a model outputs, and what torchmetrics hands to pycocotools
        preds.append(pred(pb.astype(np.float32), ps.astype(np.float32), pl))
        targets.append(gt(boxes.astype(np.float32), labels))
    return preds, targets


def coco_reference(preds, targets, library: str) -> dict[str, float]:
    """mAP50 / mAP50-95 straight from pycocotools or faster-coco-eval."""
    if library == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        faster = pytest.importorskip("faster_coco_eval")
        COCO, COCOeval = faster.COCO, faster.COCOeval_faster

    def xywh(b):
        b = [float(v) for v in b]
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    labels = sorted({int(v) for d in preds + targets for v in d["labels"]})
    anns = [{"id": k + 1, "image_id": i, "category_id": int(lab), "bbox": xywh(b), "iscrowd": 0,
             "area": xywh(b)[2] * xywh(b)[3]}
            for k, (i, b, lab) in enumerate((i, b, lab) for i, t in enumerate(targets)
                                            for b, lab in zip(t["boxes"], t["labels"]))]
    dets = [{"image_id": i, "category_id": int(lab), "bbox": xywh(b), "score": float(s)}
            for i, p in enumerate(preds) for b, s, lab in zip(p["boxes"], p["scores"], p["labels"])]
    truth = COCO()
    truth.dataset = {"images": [{"id": i, "width": 256, "height": 256} for i in range(len(targets))],
                     "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in labels]}
    truth.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(truth, truth.loadRes(dets), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return {"map50_95": float(evaluator.stats[0]), "map50": float(evaluator.stats[1])}


@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True)])
def test_map_agrees_with_pycocotools_and_faster_coco_eval(seed, ties):
    preds, targets = random_fixture(seed, ties=ties)
    ours = dm.coco_map(dm.match_all(preds, targets))[0]
    torchmetrics_map = dm.mean_average_precision(preds, targets)
    point = dm.det_metrics(preds, targets, 0.3)  # reports torchmetrics' values (float32)
    assert (point["map50"], point["map50_95"]) == (torchmetrics_map["map50"], torchmetrics_map["map50_95"])
    for library in ("pycocotools", "faster-coco-eval"):
        ref = coco_reference(preds, targets, library)
        assert 0.05 < ref["map50_95"] < ref["map50"] < 0.95  # a fixture that exercises the curve
        assert ours[0] == pytest.approx(ref["map50"], abs=1e-12), library
        assert ours.mean() == pytest.approx(ref["map50_95"], abs=1e-12), library
        # torchmetrics returns float32
        assert torchmetrics_map["map50"] == pytest.approx(ref["map50"], abs=1e-6), library
        assert torchmetrics_map["map50_95"] == pytest.approx(ref["map50_95"], abs=1e-6), library


@pytest.mark.parametrize("seed", [7, 8])
def test_weighted_map_equals_pycocotools_on_the_resampled_images(seed):
    # without equal scores (with them, AP depends on the order of the tied detections)
    preds, targets = random_fixture(seed)
    idx = np.sort(np.random.default_rng(3).integers(0, len(preds), len(preds)))  # duplicates included
    weights = np.bincount(idx, minlength=len(preds)).astype(float)
    ours = dm.coco_map(dm.match_all(preds, targets), weights)[0]
    ref = coco_reference([preds[i] for i in idx], [targets[i] for i in idx], "pycocotools")
    assert ours[0] == pytest.approx(ref["map50"], abs=1e-12)
    assert ours.mean() == pytest.approx(ref["map50_95"], abs=1e-12)


def with_spurious_boxes(preds, seed: int, k: int = 12):
    """Each image gets k more low-score boxes far from any lesion: long runs of false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for p in preds:
        xy = rng.uniform(300, 400, (k, 2))
        boxes = np.concatenate([p["boxes"], np.concatenate([xy, xy + 10], 1)]).astype(np.float32)
        scores = np.concatenate([p["scores"], rng.random(k) * 0.5]).astype(np.float32)
        out.append(pred(boxes, scores, np.concatenate([p["labels"], rng.integers(1, 3, k)])))
    return out


def test_runs_of_false_positives_collapse_without_moving_ap():
    """coco_map merges each run of detections false at every IoU threshold into one point (the
    bootstrap's speed-up): AP is bit-identical to the uncollapsed curve on every resample (zero
    weights included) and still equals pycocotools on the resampled images."""
    preds, targets = random_fixture(9, n=50)
    preds = with_spurious_boxes(preds, 9)
    m = dm.match_all(preds, targets)
    rng = np.random.default_rng(0)
    weights = np.stack([np.bincount(rng.integers(0, m.n_images, m.n_images), minlength=m.n_images)
                        for _ in range(40)]).astype(float)
    shrunk = 0
    for c in range(len(m.classes)):
        sel = m.order[(m.cls[m.order] == c) & (m.rank[m.order] < dm.MAX_DETECTIONS)]
        tp, w_det, n_gt = m.tp[:, sel], weights[:, m.image[sel]], weights @ m.gt_count[:, c]
        tp_c, w_c = dm._collapse_false_runs(tp, w_det)
        shrunk += tp.shape[1] - tp_c.shape[1]
        np.testing.assert_array_equal(dm._class_ap(tp_c, w_c, n_gt), dm._class_ap(tp, w_det, n_gt))
    assert shrunk > 300  # the fixture has long false runs, so the collapse is exercised
    idx = np.sort(rng.integers(0, len(preds), len(preds)))
    ours = dm.coco_map(m, np.bincount(idx, minlength=len(preds)).astype(float))[0]
    ref = coco_reference([preds[i] for i in idx], [targets[i] for i in idx], "pycocotools")
    assert ours[0] == pytest.approx(ref["map50"], abs=1e-12)
    assert ours.mean() == pytest.approx(ref["map50_95"], abs=1e-12)


def test_more_than_100_detections_per_image_are_capped_like_coco():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (130, 2))
    boxes = np.concatenate([xy, xy + 20], 1).astype(np.float32)
    scores = rng.random(130).astype(np.float32)
    preds = [pred(boxes, scores, np.ones(130, int))]
    targets = [gt(boxes[scores.argsort()[:10]] + 1, np.ones(10, int))]  # the 10 lowest-scored boxes are lesions
    ours = dm.coco_map(dm.match_all(preds, targets))[0]
    ref = coco_reference(preds, targets, "pycocotools")
    assert ours[0] == pytest.approx(ref["map50"], abs=1e-12) and ref["map50"] < 0.1


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_intervals():
    preds, targets = random_fixture(4, n=60)
    ci = dm.det_metrics_with_ci(preds, targets, 0.3, n_boot=300, seed=1)
    again = dm.det_metrics_with_ci(preds, targets, 0.3, n_boot=300, seed=1)
    assert ci == again
    for name in dm.DET_METRICS:
        v = ci[name]
        assert v["low"] <= v["value"] <= v["high"] and v["low"] < v["high"], name
    point = dm.det_metrics(preds, targets, 0.3)
    assert ci["map50"]["value"] == point["map50"] and ci["counts"] == point["counts"]


def test_bootstrap_of_a_perfect_model_is_one():
    preds = [pred([BOX], [0.9]), pred([], []), pred([BOX, [150, 150, 200, 220]], [0.8, 0.7])]
    targets = [gt([BOX]), gt([]), gt([BOX, [150, 150, 200, 220]])]
    ci = dm.det_metrics_with_ci(preds, targets, 0.5, n_boot=50)
    for name in dm.DET_METRICS:
        assert ci[name]["low"] == pytest.approx(1.0) and ci[name]["high"] == pytest.approx(1.0), name


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors():
    with pytest.raises(DataError, match="1 prediction entries but 2 targets"):
        dm.det_metrics([pred([BOX], [0.9])], [gt([BOX]), gt([])], 0.5)
    with pytest.raises(DataError, match=r"preds\[0\] has no 'scores'"):
        dm.det_metrics([{"boxes": np.zeros((1, 4))}], [gt([BOX])], 0.5)
    with pytest.raises(DataError, match=r"targets\[0\]\['boxes'\] has shape \(1, 3\)"):
        dm.det_metrics([pred([BOX], [0.9])], [{"boxes": np.zeros((1, 3))}], 0.5)
    with pytest.raises(DataError, match="2 boxes, 1 scores"):
        dm.det_metrics([pred([BOX, BOX], [0.9])], [gt([BOX])], 0.5)
    with pytest.raises(DataError, match=r"preds\[0\]\['boxes'\] row 1 .*x1 < x0"):
        dm.det_metrics([pred([BOX, [50, 0, 40, 10]], [0.9, 0.8])], [gt([BOX])], 0.5)
    with pytest.raises(DataError, match="non-finite"):
        dm.det_metrics([pred([BOX], [float("nan")])], [gt([BOX])], 0.5)
    with pytest.raises(ConfigError, match="score_threshold"):
        dm.det_metrics([pred([BOX], [0.9])], [gt([BOX])], "high")
    with pytest.raises(ConfigError, match="n_boot"):
        dm.det_metrics_with_ci([pred([BOX], [0.9])], [gt([BOX])], 0.5, n_boot=0)
    with pytest.raises(ConfigError, match="FROC rates"):
        dm.froc_curve([pred([BOX], [0.9])], [gt([BOX])], rates=[0])


def test_torch_inputs_like_torchvision_outputs():
    preds = [{"boxes": torch.tensor([BOX]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    targets = [{"boxes": torch.tensor([BOX]), "labels": torch.tensor([1])}]
    assert dm.det_metrics(preds, targets, 0.5)["map50"] == pytest.approx(1.0)
