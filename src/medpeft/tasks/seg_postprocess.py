"""Connected-component post-processing of predicted masks, chosen on validation (as nnU-Net decides
on its validation folds whether to keep only the largest component).

Per image and foreground class, components (8-connected) smaller than ``min_area`` (a fraction of
the image's pixels) become background, and with ``largest_component`` only the biggest one that is
left stays. The candidates below are scored by mean validation Dice; the best one wins, ties go to
the earlier (simpler) candidate, so "nothing" stays unless it is beaten. Test predictions, the run's
mask files and ``medpeft predict`` then apply the chosen setting; the test set never takes part.
"""
from __future__ import annotations

import numpy as np

MIN_AREAS = (0.0, 0.0025, 0.005, 0.01, 0.02)
CANDIDATES = tuple({"largest_component": largest, "min_area": area}
                   for largest in (False, True) for area in MIN_AREAS)
NOTHING = {"largest_component": False, "min_area": 0.0}
MODES = ("auto", "none")


def apply(masks: np.ndarray, setting: dict | None) -> np.ndarray:
    """Label maps [N, H, W] (class index per pixel) with the setting applied; a copy, or the input
    itself when the setting does nothing."""
    from scipy import ndimage

    setting = setting or NOTHING
    largest, min_area = bool(setting.get("largest_component")), float(setting.get("min_area", 0.0))
    if not largest and min_area <= 0:
        return masks
    masks = np.asarray(masks)
    out = masks.copy()
    structure = np.ones((3, 3), dtype=bool)
    for i in range(len(masks)):
        smallest = min_area * masks[i].size
        for c in np.unique(masks[i]):
            if c == 0:
                continue
            labels, n = ndimage.label(masks[i] == c, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            keep = sizes >= smallest
            if largest and keep.any():
                keep = np.zeros_like(keep)
                keep[int(np.argmax(sizes))] = True
            drop = np.flatnonzero(~keep) + 1
            if drop.size:
                out[i][np.isin(labels, drop)] = 0
    return out


def choose(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """The candidate with the best mean validation Dice, with that Dice and the raw masks' Dice:
    ``{"largest_component", "min_area", "val_dice", "val_dice_raw"}``."""
    from .seg_metrics import mean_scores

    scored = []
    for candidate in CANDIDATES:
        dice = mean_scores(apply(predictions, candidate), targets, num_classes, distances=False)["dice"]
        scored.append((candidate, float(dice)))
    best = max(range(len(scored)), key=lambda i: (np.nan_to_num(scored[i][1], nan=-1.0), -i))
    return {**scored[best][0], "val_dice": scored[best][1], "val_dice_raw": scored[0][1]}


def _name(setting: dict) -> str:
    parts = (["largest"] if setting["largest_component"] else []) + \
        ([f"min_area={setting['min_area']:g}"] if setting["min_area"] > 0 else [])
    return "+".join(parts) or "none"


def describe(setting: dict | None) -> str:
    return _name({**NOTHING, **(setting or {})})
