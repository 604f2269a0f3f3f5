"""Input pipeline alone: medpeft's BatchLoader (uint8 tensors in memory, whole-batch augmentation
and normalisation on the training device, no per-sample Python) vs a torch DataLoader over a
Dataset with torchvision v2 transforms per sample (the same augmentation), images/s of ready
training batches on the device.

    python benchmarks/data_pipeline.py --quick
"""
from __future__ import annotations

import argparse

from common import device_of, header, interleaved, load_bundle, median, paired_ratio, reference_loader, table

import torch


def main(argv=None):
    from medpeft.batching import BatchLoader, LightAugment

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", default=None, help="comma list of reference DataLoader worker counts")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    sizes = [64, 112] if args.quick else [64, 224]
    batch = 32 if args.quick else 128
    workers = [int(w) for w in args.workers.split(",")] if args.workers else ([0, 2] if args.quick else [0, 8])
    repeats = 5
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    print(header("Input pipeline: batched on-device vs per-sample DataLoader", device, sizes=sizes, batch=batch,
                 ref_workers=workers, repeats=repeats), flush=True)
    rows = []
    for size in sizes:
        bundle = load_bundle("breastmnist", size)
        for augment in (True, False):
            ours = BatchLoader(bundle.train, batch, mean, std, device=device, shuffle=True,
                               augment=LightAugment() if augment else None, drop_last=True)
            cases = {}

            def run_ours():
                n = 0
                for x, y in ours:
                    n += len(y)
                return n
            cases["medpeft"] = run_ours
            for w in workers:
                loader = reference_loader(bundle.train, mean, std, batch, augment, w, device)

                def run_ref(loader=loader):
                    n = 0
                    for x, y in loader:
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        n += len(y)
                    return n
                cases[f"DataLoader w={w}"] = run_ref
            for fn in cases.values():
                fn()
            rates = interleaved(cases, repeats, device)
            for name, r in rates.items():
                rows.append({"size": size, "augment": "light" if augment else "none", "pipeline": name,
                             "img/s": median(r), "medpeft / this": paired_ratio(rates, "medpeft", name)})
            print(f"  {size}px augment={augment}: " + ", ".join(f"{n} {median(r):.0f} img/s" for n, r in rates.items()),
                  flush=True)
    print()
    print(table(rows, ["size", "augment", "pipeline", "img/s", "medpeft / this"]))
    return rows


if __name__ == "__main__":
    main()
