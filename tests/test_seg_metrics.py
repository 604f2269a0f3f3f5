"""Segmentation metrics and losses (medpeft.tasks.seg_metrics / seg_loss), MONAI as the reference."""
import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

monai_metrics = pytest.importorskip("monai.metrics")
monai_losses = pytest.importorskip("monai.losses")

from medpeft.errors import ConfigError, DataError  # noqa: E402
from medpeft.tasks.seg_loss import SEG_LOSSES, seg_loss  # noqa: E402
from medpeft.tasks.seg_metrics import (  # noqa: E402
    SEG_METRICS, mean_scores, per_image, seg_metrics_with_ci,
)

# ----------------------------------------------------------------------------- synthetic masks


def _shapes(n, h, w, k, rng, p_absent=0.2):
    """Label maps with ellipses, rectangles, rings and single pixels (some touching the border)."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), np.int64)
    for i in range(n):
        for c in range(1, k):
            if rng.random() < p_absent:
                continue
            kind = rng.integers(0, 4)
            cy, cx = rng.uniform(-2, h + 2), rng.uniform(-2, w + 2)
            ry, rx = rng.uniform(1, h / 4), rng.uniform(1, w / 4)
            if kind == 0:
                m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            elif kind == 1:
                m = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            elif kind == 2:  # ring: an inner boundary too
                r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                m = (r <= 1) & (r >= 0.3)
            else:
                m = (yy == int(np.clip(cy, 0, h - 1))) & (xx == int(np.clip(cx, 0, w - 1)))
            out[i][m] = c
    return out


def _perturb(t, k, rng):
    """A plausible prediction: shifted target, plus spurious specks, minus some classes."""
    p = t.copy()
    for i in range(len(p)):
        p[i] = np.roll(p[i], tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
        if rng.random() < 0.3:
            specks = rng.random(p[i].shape) < 0.003
            p[i][specks] = rng.integers(1, k, size=specks.sum())
        if rng.random() < 0.15:
            p[i][p[i] == rng.integers(1, k)] = 0
    return p


def _onehot(x, k):
    return F.one_hot(torch.from_numpy(x), k).permute(0, 3, 1, 2).float()


def _monai_reference(pred, target, k, tol):
    """Per-image metrics from MONAI, with this module's empty-mask conventions applied."""
    P, T = _onehot(pred, k), _onehot(target, k)
    n, h, w = pred.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = monai_metrics.compute_dice(P, T, include_background=False, ignore_empty=False).numpy()
        iou = monai_metrics.compute_iou(P, T, include_background=False, ignore_empty=False).numpy()
        hd = monai_metrics.compute_hausdorff_distance(P, T, include_background=False, percentile=95).numpy()
        asd = monai_metrics.compute_average_surface_distance(P, T, include_background=False, symmetric=True).numpy()
        nsd = monai_metrics.compute_surface_dice(P, T, class_thresholds=[tol] * (k - 1)).numpy()
    p_any = P[:, 1:].flatten(2).any(-1).numpy()
    t_any = T[:, 1:].flatten(2).any(-1).numpy()
    both, one = ~p_any & ~t_any, p_any != t_any
    diag = math.hypot(h, w)
    hd, asd, nsd = hd.astype(np.float64), asd.astype(np.float64), nsd.astype(np.float64)
    assert np.isnan(hd[both]).all() and np.isnan(asd[both]).all() and np.isnan(nsd[both]).all()
    assert not np.isfinite(hd[one]).any() and not np.isfinite(asd[one]).any()  # MONAI: inf (or nan)
    hd[one], asd[one] = diag, diag
    nsd[both] = 1.0
    # VS has no MONAI function: from per-class pixel counts
    pc, tc = P[:, 1:].numpy().astype(bool), T[:, 1:].numpy().astype(bool)
    tp = (pc & tc).sum((2, 3))
    fp = (pc & ~tc).sum((2, 3))
    fn = (~pc & tc).sum((2, 3))
    den = 2 * tp + fp + fn
    vs = np.where(den == 0, 1.0, 1 - np.abs(fp - fn) / np.maximum(den, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        return {"dice": dice.mean(1), "iou": iou.mean(1), "vs": vs.mean(1), "hd95": np.nanmean(hd, 1),
                "assd": np.nanmean(asd, 1), "nsd": nsd.mean(1)}


@pytest.mark.parametrize("n,h,w,k,tol", [
    (40, 64, 64, 2, 2.0), (25, 100, 80, 2, 1.0), (6, 256, 256, 2, 2.0), (30, 64, 64, 3, 2.0), (15, 96, 72, 4, 3.0),
])
def test_every_metric_matches_monai(n, h, w, k, tol):
    rng = np.random.default_rng(n * h + k)
    target = _shapes(n, h, w, k, rng)
    pred = _perturb(target, k, rng)
    pred[0], target[0] = 0, 0                               # both empty
    pred[1] = 0                                             # missed
    ours = per_image(pred, target, k, nsd_tolerance=tol)
    ref = _monai_reference(pred, target, k, tol)
    assert set(ours) == set(SEG_METRICS) | {"counts"}
    for m in SEG_METRICS:
        assert ours[m].shape == (n,)
        np.testing.assert_allclose(ours[m], ref[m], rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=m)
    # sanity: the synthetic set exercises defined distances, both-empty and one-empty cases
    assert np.isfinite(ours["hd95"]).sum() > n // 2
    assert 0 < ours["counts"]["n_both_empty"] and 0 < ours["counts"]["n_one_empty"]


# ----------------------------------------------------------------------------- hand-computed values


def _square(h, w, r0, c0, size=4):
    m = np.zeros((h, w), np.int64)
    m[r0:r0 + size, c0:c0 + size] = 1
    return m


def test_two_squares_offset_by_one_pixel():
    t = _square(12, 12, 2, 2)[None]
    p = _square(12, 12, 2, 3)[None]
    # TP = 12, FP = FN = 4; each 12-pixel boundary: 6 pixels at distance 0, 6 at distance 1
    r = per_image(p, t, 2, nsd_tolerance=0.5)
    assert r["dice"][0] == pytest.approx(24 / 32)
    assert r["iou"][0] == pytest.approx(12 / 20)
    assert r["vs"][0] == pytest.approx(1.0)
    assert r["hd95"][0] == pytest.approx(1.0)
    assert r["assd"][0] == pytest.approx(0.5)
    assert r["nsd"][0] == pytest.approx(0.5)
    assert per_image(p, t, 2, nsd_tolerance=1)["nsd"][0] == pytest.approx(1.0)


def test_two_squares_offset_by_two_pixels():
    t = _square(12, 12, 2, 2)[None]
    p = _square(12, 12, 2, 4)[None]
    # TP = 8, FP = FN = 8; each boundary: 4 pixels at distance 0, 4 at 1, 4 at 2
    r = per_image(p, t, 2)
    assert r["dice"][0] == pytest.approx(0.5)
    assert r["iou"][0] == pytest.approx(1 / 3)
    assert r["vs"][0] == pytest.approx(1.0)
    assert r["hd95"][0] == pytest.approx(2.0)
    assert r["assd"][0] == pytest.approx(1.0)
    assert r["nsd"][0] == pytest.approx(1.0)                                   # tolerance 2 (default)
    assert per_image(p, t, 2, nsd_tolerance=1.0)["nsd"][0] == pytest.approx(2 / 3)
    assert per_image(p, t, 2, nsd_tolerance=0)["nsd"][0] == pytest.approx(1 / 3)


def test_single_pixels_at_known_distance_and_volume_similarity():
    t = np.zeros((1, 10, 10), np.int64)
    p = t.copy()
    t[0, 3, 3] = 1
    p[0, 6, 7] = 1                                          # 3-4-5 triangle
    r = per_image(p, t, 2)
    assert (r["dice"][0], r["iou"][0], r["nsd"][0]) == (0.0, 0.0, 0.0)
    assert r["vs"][0] == pytest.approx(1.0)                 # same volume
    assert r["hd95"][0] == pytest.approx(5.0) and r["assd"][0] == pytest.approx(5.0)
    assert per_image(p, t, 2, nsd_tolerance=5)["nsd"][0] == 1.0
    # VS: a 2x2 prediction inside a 4x4 target: TP 4, FP 0, FN 12 -> 1 - 12/20
    t2 = _square(8, 8, 2, 2)[None]
    p2 = _square(8, 8, 3, 3, size=2)[None]
    assert per_image(p2, t2, 2)["vs"][0] == pytest.approx(1 - 12 / 20)
    assert per_image(p2, t2, 2)["dice"][0] == pytest.approx(8 / 20)


# ----------------------------------------------------------------------------- empty masks, counts


def test_empty_mask_conventions_and_counts():
    h, w = 10, 20
    sq = _square(h, w, 2, 2)
    z = np.zeros((h, w), np.int64)
    pred = np.stack([z, sq, z, sq])
    target = np.stack([z, z, sq, sq])      # both empty, false alarm, missed, perfect
    r = per_image(pred, target, 2)
    diag = math.hypot(h, w)
    np.testing.assert_array_equal(r["dice"], [1, 0, 0, 1])
    np.testing.assert_array_equal(r["iou"], [1, 0, 0, 1])
    np.testing.assert_array_equal(r["vs"], [1, 0, 0, 1])
    np.testing.assert_array_equal(r["nsd"], [1, 0, 0, 1])
    np.testing.assert_allclose(r["hd95"], [np.nan, diag, diag, 0], equal_nan=True)
    np.testing.assert_allclose(r["assd"], [np.nan, diag, diag, 0], equal_nan=True)
    assert r["counts"] == {"n_images": 4, "n_class_slots": 4, "n_both_empty": 1, "n_one_empty": 2,
                           "n_missed": 1, "n_false_alarm": 1, "n_distance_undefined": 1}
    ci = seg_metrics_with_ci(pred, target, 2, n_boot=50)
    assert ci["hd95"]["value"] == pytest.approx(2 * diag / 3)   # the both-empty image is skipped
    assert ci["dice"]["value"] == pytest.approx(0.5)
    assert ci["counts"] == r["counts"]


def test_multiclass_averages_foreground_classes_and_counts_per_class():
    h, w = 16, 16
    one = _square(h, w, 1, 1)
    two = _square(h, w, 8, 8) * 2
    z = np.zeros((h, w), np.int64)
    # image 0: class 1 perfect, class 2 absent from both; image 1: class 1 perfect, class 2 missed;
    # image 2: nothing anywhere
    target = np.stack([one, one + two, z])
    pred = np.stack([one, one, z])
    r = per_image(pred, target, 3)
    diag = math.hypot(h, w)
    np.testing.assert_allclose(r["dice"], [1, 0.5, 1])
    np.testing.assert_allclose(r["nsd"], [1, 0.5, 1])
    np.testing.assert_allclose(r["hd95"], [0, diag / 2, np.nan], equal_nan=True)
    assert r["counts"] == {"n_images": 3, "n_class_slots": 6, "n_both_empty": 3, "n_one_empty": 1,
                           "n_missed": 1, "n_false_alarm": 0, "n_distance_undefined": 1}


def test_no_defined_distance_gives_nan_value_and_interval():
    z = np.zeros((5, 8, 8), np.int64)
    ci = seg_metrics_with_ci(z, z, 2, n_boot=20)
    assert ci["dice"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    for m in ("hd95", "assd"):
        assert all(math.isnan(ci[m][key]) for key in ("value", "low", "high"))
    assert ci["counts"]["n_distance_undefined"] == 5


# ----------------------------------------------------------------------------- bootstrap


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(7)
    target = _shapes(120, 48, 48, 2, rng, p_absent=0.25)
    return _perturb(target, 2, rng), target


def test_ci_brackets_value_and_is_seeded(dataset):
    pred, target = dataset
    a = seg_metrics_with_ci(pred, target, 2, n_boot=400, seed=3)
    b = seg_metrics_with_ci(pred, target, 2, n_boot=400, seed=3)
    c = seg_metrics_with_ci(pred, target, 2, n_boot=400, seed=4)
    assert a == b
    pi = per_image(pred, target, 2)
    differs = 0
    for m in SEG_METRICS:
        v = a[m]
        assert v["value"] == pytest.approx(np.nanmean(pi[m]))
        assert v["low"] < v["value"] < v["high"], m
        differs += (v["low"], v["high"]) != (c[m]["low"], c[m]["high"])
    assert differs == len(SEG_METRICS)
    wide = seg_metrics_with_ci(pred, target, 2, n_boot=400, seed=3, alpha=0.01)
    assert all(wide[m]["high"] - wide[m]["low"] > a[m]["high"] - a[m]["low"] for m in SEG_METRICS)


def test_bootstrap_equals_naive_resampling(dataset):
    pred, target = dataset
    pred, target = pred.copy(), target.copy()
    pred[:10], target[:10] = 0, 0                            # NaN distances to skip
    n_boot, seed, alpha = 200, 11, 0.1
    ci = seg_metrics_with_ci(pred, target, 2, n_boot=n_boot, seed=seed, alpha=alpha)
    pi = per_image(pred, target, 2)
    idx = np.random.default_rng(seed).integers(0, len(pred), size=(n_boot, len(pred)))
    for m in SEG_METRICS:
        means = np.array([np.nanmean(pi[m][row]) for row in idx])
        lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        assert ci[m]["low"] == pytest.approx(lo, rel=1e-9) and ci[m]["high"] == pytest.approx(hi, rel=1e-9), m


def test_mean_scores_matches_per_image_and_can_skip_distances(dataset):
    pred, target = dataset
    full = mean_scores(pred, target, 2)
    pi = per_image(pred, target, 2)
    assert set(full) == set(SEG_METRICS)
    for m in SEG_METRICS:
        assert full[m] == pytest.approx(np.nanmean(pi[m]))
    cheap = mean_scores(pred, target, 2, distances=False)
    assert set(cheap) == {"dice", "iou", "vs"} and all(cheap[m] == full[m] for m in cheap)
    assert mean_scores(pred, target, 2, nsd_tolerance=0.5)["nsd"] < full["nsd"]


def test_seg_metrics_with_ci_is_fast_on_600_images():
    rng = np.random.default_rng(0)
    target = _shapes(600, 128, 128, 2, rng)
    pred = _perturb(target, 2, rng)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        ci = seg_metrics_with_ci(pred, target, 2, n_boot=1000)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(torch_threads)
    assert ci["counts"]["n_images"] == 600
    assert elapsed < 10.0, f"seg_metrics_with_ci took {elapsed:.1f} s on 600 images of 128 px"


# ----------------------------------------------------------------------------- input checking


def test_accepts_bools_integral_floats_and_tensors(dataset):
    pred, target = dataset
    ref = per_image(pred, target, 2)
    for p, t in [(pred.astype(bool), target.astype(bool)), (pred.astype(np.float32), target.astype(float)),
                 (torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8)),
                 (torch.from_numpy(pred).float().requires_grad_(True), target.tolist())]:
        got = per_image(p, t, 2)
        for m in SEG_METRICS:
            np.testing.assert_array_equal(got[m], ref[m])


@pytest.mark.parametrize("pred,target,k,needle", [
    (np.zeros((2, 8, 8), int), np.zeros((2, 8, 9), int), 2, "same [N, H, W]"),
    (np.zeros((8, 8), int), np.zeros((8, 8), int), 2, "expected an integer label map [N, H, W]"),
    (np.zeros((2, 1, 8, 8), int), np.zeros((2, 1, 8, 8), int), 2, "[N, H, W]"),
    (np.full((2, 8, 8), 2), np.zeros((2, 8, 8), int), 2, "class index 2; expected values in 0..1"),
    (np.zeros((2, 8, 8), int), np.full((2, 8, 8), -1), 3, "target contains class index -1"),
    (np.full((2, 8, 8), 0.5), np.zeros((2, 8, 8), int), 2, "pred has non-integer values"),
    (np.full((2, 8, 8), np.nan), np.zeros((2, 8, 8), int), 2, "non-integer"),
    (np.zeros((2, 8, 8), int), np.full((2, 8, 8), "a"), 2, "target has dtype"),
    (np.zeros((0, 8, 8), int), np.zeros((0, 8, 8), int), 2, "pred is empty"),
    (np.zeros((2, 0, 8), int), np.zeros((2, 0, 8), int), 2, "at least one image"),
])
def test_bad_input_raises_data_error(pred, target, k, needle):
    for fn in (per_image, mean_scores, seg_metrics_with_ci):
        with pytest.raises(DataError) as exc:
            fn(pred, target, k)
        assert needle in str(exc.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_classes": 1}, "num_classes=1"), ({"num_classes": 2.0}, "num_classes=2.0"),
    ({"nsd_tolerance": -1}, "nsd_tolerance=-1"), ({"nsd_tolerance": float("inf")}, "nsd_tolerance=inf"),
    ({"n_boot": 0}, "n_boot=0"), ({"alpha": 1.0}, "alpha=1.0"),
])
def test_bad_options_raise_config_error(kwargs, needle):
    z = np.zeros((2, 8, 8), np.int64)
    args = {"num_classes": 2, **kwargs}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        seg_metrics_with_ci(z, z, **args)


# ----------------------------------------------------------------------------- losses


def _batch(k, seed=0, b=3, h=24, w=20):
    g = torch.Generator().manual_seed(seed)
    target = torch.from_numpy(_shapes(b, h, w, k, np.random.default_rng(seed), p_absent=0.0))
    logits = torch.randn(b, k, h, w, generator=g)
    return logits, target


def _manual_dice(logits, target, k):
    """Soft Dice over the foreground classes, TP/FP/FN summed over the batch, smooth 1e-5."""
    p = logits.softmax(1)
    oh = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    inter = (p * oh).sum((0, 2, 3))[1:]
    den = (p + oh).sum((0, 2, 3))[1:]
    return (1 - (2 * inter + 1e-5) / (den + 1e-5)).mean()


def _manual_focal(logits, target, k):
    logp = logits.log_softmax(1)
    oh = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    return (-(1 - logp.exp()) ** 2 * logp * oh).mean()      # mean over B, K, H, W (MONAI's reduction)


@pytest.mark.parametrize("k", [2, 3])
def test_losses_equal_monai_and_manual(k):
    logits, target = _batch(k, seed=k)
    kw = dict(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    t1 = target.unsqueeze(1)
    expect = {
        "dice_ce": monai_losses.DiceCELoss(**kw)(logits, t1),
        "dice": monai_losses.DiceLoss(**kw)(logits, t1),
        "ce": monai_losses.DiceCELoss(**kw, lambda_dice=0.0)(logits, t1),
        "dice_focal": monai_losses.DiceLoss(**kw)(logits, t1)
        + monai_losses.FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)(logits, t1),
    }
    manual = {
        "dice_ce": _manual_dice(logits, target, k) + F.cross_entropy(logits, target),
        "dice": _manual_dice(logits, target, k),
        "ce": F.cross_entropy(logits, target),
        "dice_focal": _manual_dice(logits, target, k) + _manual_focal(logits, target, k),
    }
    assert set(expect) == set(SEG_LOSSES)
    for name in SEG_LOSSES:
        got = seg_loss(name, k)(logits, target)
        assert got.ndim == 0
        torch.testing.assert_close(got, expect[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got, manual[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", SEG_LOSSES)
@pytest.mark.parametrize("k", [2, 3])
def test_loss_decreases_toward_target(name, k):
    logits, target = _batch(k, seed=10 + k)
    loss = seg_loss(name, k)
    oh = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    toward = [loss(logits * 0.2 + a * (2 * oh - 1), target).item() for a in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(x > y for x, y in zip(toward, toward[1:])), toward
    x = logits.clone().requires_grad_(True)
    before = loss(x, target)
    before.backward()
    after = loss(x.detach() - 2.0 * x.grad / x.grad.norm() * math.sqrt(x.numel()) * 0.05, target)
    assert after.item() < before.item()


def test_loss_bad_name_and_shapes():
    with pytest.raises(ConfigError) as exc:
        seg_loss("dice_bce", 2)
    assert "dice_bce" in str(exc.value) and all(n in str(exc.value) for n in SEG_LOSSES)
    with pytest.raises(ConfigError, match="num_classes=1"):
        seg_loss("dice", 1)
    loss = seg_loss("dice_ce", 3)
    logits, target = _batch(3)
    with pytest.raises(DataError, match=r"expected \[B, 3, H, W\]"):
        loss(logits[:, :2], target)
    for bad in (target[:, :-1], target.unsqueeze(1), target[0]):
        with pytest.raises(DataError, match="target has shape"):
            loss(logits, bad)
