"""Bootstrap CIs of the detection metrics on an external-set-sized input: coco_map with runs of
false positives collapsed (now) vs the uncollapsed curve (before commit "det_metrics: collapse").

Synthetic, shaped like a 64 px FCOS on Kvasir-SEG's 998 frames: one polyp per image and 56
detections per image (10 around the polyp, 46 elsewhere at lower scores). Both sides must give
identical intervals (checked); the figure is the speed-up, a ratio of interleaved runs.

    python benchmarks/det_bootstrap.py --quick
"""
from __future__ import annotations

import argparse

from common import header, interleaved, median, paired_ratio, table

import numpy as np
import torch


def fixture(n_images: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n_images):
        xy = rng.uniform(0, 40, (1, 2))
        truth = np.concatenate([xy, xy + rng.uniform(8, 24, (1, 2))], 1)
        targets.append({"boxes": truth, "labels": np.ones(1, int)})
        near = truth + rng.normal(0, 3, (10, 4))
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
        xy = rng.uniform(0, 48, (46, 2))
        far = np.concatenate([xy, xy + rng.uniform(4, 16, (46, 2))], 1)
        preds.append({"boxes": np.concatenate([near, far]), "labels": np.ones(56, int),
                      "scores": np.concatenate([rng.uniform(0.2, 1, 10), rng.uniform(0.05, 0.6, 46)])})
    return preds, targets


def main(argv=None):
    from medpeft.tasks import det_metrics as dm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=None, help="default 998 (Kvasir-SEG)")
    p.add_argument("--n-boot", type=int, default=None, help="default 1000 (the sweeps'); --quick 200")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    n_images = args.images or 998
    n_boot = args.n_boot or (200 if args.quick else 1000)
    repeats = args.repeats or (2 if args.quick else 4)
    preds, targets = fixture(n_images)
    collapse = dm._collapse_false_runs
    results = {}

    def run(name, fn):
        def go():
            dm._collapse_false_runs = fn
            try:
                results[name] = dm.det_metrics_with_ci(preds, targets, 0.4, n_boot=n_boot, seed=0)
            finally:
                dm._collapse_false_runs = collapse
            return 1
        return go

    print(header("Detection bootstrap CIs: false runs collapsed vs not", torch.device("cpu"),
                 images=n_images, detections_per_image=56, n_boot=n_boot, repeats=repeats))
    dm.det_metrics_with_ci(preds, targets, 0.4, n_boot=1, seed=0)  # imports and caches off the clock
    rates = interleaved({"collapsed": run("collapsed", collapse),
                         "uncollapsed": run("uncollapsed", lambda tp, w: (tp, w))}, repeats, torch.device("cpu"))
    same = results["collapsed"] == results["uncollapsed"]
    rows = [{"variant": k, "seconds per call (median)": median([1 / r for r in v])} for k, v in rates.items()]
    print(table(rows, ["variant", "seconds per call (median)"]))
    print(f"\nspeed-up collapsed / uncollapsed: {paired_ratio(rates, 'collapsed', 'uncollapsed'):.2f}x; "
          f"identical intervals and counts: {same}")
    if not same:
        raise SystemExit("the collapsed bootstrap changed a metric")


if __name__ == "__main__":
    main()
