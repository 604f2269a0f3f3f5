"""Linear probing: epochs over cached features vs loops that re-run the frozen backbone every epoch.

Three ways to train the same linear head on the same data:
- naive: the plain PyTorch loop users write (DataLoader with per-sample transforms, frozen timm
  backbone + trainable head, AdamW, validation every epoch): the backbone runs every epoch;
- medpeft, cache off: medpeft's own loop with ``cache_features=off`` (also re-runs the backbone);
- medpeft, cache on: the frozen trunk runs once per split, every epoch then trains only the head.
Per-epoch time is the median over epochs (training + validation); the one-time extraction is
reported too (included in "wall s"). medpeft off and on follow the same trajectory (same batches,
same updates): their test accuracy must agree; the naive loop is shown for reference.

    python benchmarks/linear_probe_cache.py --quick
"""
from __future__ import annotations

import argparse
import time

from common import device_of, header, load_bundle, median, reference_loader, sync, table

import numpy as np
import torch
import torch.nn.functional as F


def naive_loop(backbone, bundle, size, epochs, batch_size, lr, device):
    from medpeft.backbones import create_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, info = create_backbone(backbone, num_classes=bundle.num_classes, image_size=size)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    train = reference_loader(bundle.train, info.mean, info.std, batch_size, False, 0, device)
    val = reference_loader(bundle.val, info.mean, info.std, 128, False, 0, device, shuffle=False, drop_last=False)
    test = reference_loader(bundle.test, info.mean, info.std, 128, False, 0, device, shuffle=False, drop_last=False)
    times = []
    start = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            val_acc = np.mean([float((model(x.to(device)).argmax(1).cpu() == y).float().mean()) for x, y in val])
        sync(device)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        preds = torch.cat([model(x.to(device)).argmax(1).cpu() for x, _ in test])
    wall = time.perf_counter() - start
    del val_acc
    return {"epoch s": median(times), "wall s": wall, "test acc": float((preds == bundle.test.labels).float().mean())}


def medpeft_loop(backbone, bundle, size, epochs, batch_size, cache, device):
    from medpeft.methods import get_method
    from medpeft.run import build_model
    from medpeft.train import TrainConfig, train_model
    from medpeft.trunk_cache import memo_clear

    memo_clear()  # every run extracts: nothing carried over from an earlier one
    torch.manual_seed(0)
    model, info, _, _ = build_model(backbone, bundle.num_classes, size, "linear", {})
    cfg = TrainConfig(epochs=epochs, patience=epochs, batch_size=batch_size, cache_features=cache,
                      device=str(device), seed=0)
    start = time.perf_counter()
    result = train_model(model, bundle, info.mean, info.std, cfg, get_method("linear").default_lr)
    wall = time.perf_counter() - start
    seconds = [0.0] + [row["seconds"] for row in result.history]
    per_epoch = [b - a for a, b in zip(seconds, seconds[1:])]
    acc = float((torch.as_tensor(result.test_probs).argmax(1) == bundle.test.labels).float().mean())
    return {"epoch s": median(per_epoch), "wall s": wall, "test acc": acc,
            "extract s": wall - result.train_seconds, "note": result.feature_cache_note,
            "test probs": result.test_probs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backbones", default="efficientnet_lite0,dinov2_vits14")
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    sizes = {"efficientnet_lite0": 64, "dinov2_vits14": 56} if args.quick else {"efficientnet_lite0": 224,
                                                                               "dinov2_vits14": 224}
    epochs = args.epochs or (4 if args.quick else 10)
    batch = 32
    print(header("Linear probing: cached features vs re-running the frozen backbone", device, data=args.data,
                 sizes=sizes, epochs=epochs, batch=batch), flush=True)
    rows = []
    for backbone in args.backbones.split(","):
        bundle = load_bundle(args.data, sizes[backbone])
        on = medpeft_loop(backbone, bundle, sizes[backbone], epochs, batch, "auto", device)
        off = medpeft_loop(backbone, bundle, sizes[backbone], epochs, batch, "off", device)
        naive = naive_loop(backbone, bundle, sizes[backbone], epochs, batch, 1e-2, device)
        same = np.allclose(on.pop("test probs"), off.pop("test probs"), atol=1e-5)
        for name, r in (("naive loop", naive), ("medpeft cache off", off), ("medpeft cache on", on)):
            rows.append({"backbone": backbone, "loop": name, **r,
                         "epoch s / cached": r["epoch s"] / on["epoch s"],
                         "wall s / cached": r["wall s"] / on["wall s"]})
        rows[-1]["note"] = f"{on['note']}; test probs identical to cache off: {same}"
        print(f"  {backbone}: per epoch naive {naive['epoch s']:.2f} s, off {off['epoch s']:.2f} s, "
              f"cached {on['epoch s']:.4f} s -> x{naive['epoch s'] / on['epoch s']:.0f} / "
              f"x{off['epoch s'] / on['epoch s']:.0f}; test acc {naive['test acc']:.3f} / {off['test acc']:.3f} / "
              f"{on['test acc']:.3f}", flush=True)
    print()
    print(table(rows, ["backbone", "loop", "epoch s", "epoch s / cached", "wall s", "wall s / cached",
                       "extract s", "test acc", "note"]))
    print("\n(\"/ cached\": that loop's time divided by the cached loop's; the target is >= 20x per epoch)")
    return rows


if __name__ == "__main__":
    main()
