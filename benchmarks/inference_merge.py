"""Inference throughput of merged LoRA / SSF models vs the unmerged ones vs the base model.

For each backbone and method: the base model (same head), the adapted model with non-trivial
trained-looking parameters (random, so that merging changes the weights) and a copy merged with
``merge_methods``. The merged model must give the unmerged model's logits (checked) and run at the
base model's speed (target: within 5 %). Timing: eval mode, ``torch.inference_mode``, interleaved
repeats, median images/s.

    python benchmarks/inference_merge.py --quick
"""
from __future__ import annotations

import argparse
import copy

from common import device_of, header, interleaved, median, paired_ratio, table

import torch


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every method parameter a random value (LoRA's B starts at zero: merging would be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    head = {id(p) for p in model.get_classifier().parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and id(p) not in head:
                p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p))
    return model


def main(argv=None):
    from medpeft.backbones import create_backbone
    from medpeft.methods import merge_methods
    from medpeft.run import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backbones", default="efficientnet_lite0,dinov2_vits14")
    p.add_argument("--methods", default="lora,ssf")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    sizes = {"efficientnet_lite0": 128, "dinov2_vits14": 112} if args.quick else {"efficientnet_lite0": 224,
                                                                                 "dinov2_vits14": 224}
    batch = 32 if args.quick else 256
    batches = 2 if args.quick else 20
    repeats = args.repeats or (7 if args.quick else 9)
    amp = torch.bfloat16 if device.type == "cuda" else None
    print(header("Inference: merged vs unmerged vs base", device, sizes=sizes, batch=batch, batches_per_repeat=batches,
                 repeats=repeats, amp=amp), flush=True)
    rows = []
    for backbone in args.backbones.split(","):
        size = sizes[backbone]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base, _ = create_backbone(backbone, num_classes=2, image_size=size)
        x = torch.randn(batch, 3, size, size, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        for method in args.methods.split(","):
            unmerged = perturbed(build_model(backbone, 2, size, method, {})[0])
            merged = merge_methods(copy.deepcopy(unmerged))
            models = {"base": base, "unmerged": unmerged, "merged": merged}
            for m in models.values():
                m.eval().to(device)
                if device.type == "cuda":
                    m.to(memory_format=torch.channels_last)
            with torch.inference_mode():
                err = (merged(x) - unmerged(x)).abs().max().item()

            def runner(model):
                def go():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        for _ in range(batches):
                            model(x)
                    return batches * batch
                return go

            for fn in (runner(m) for m in models.values()):  # warm-up
                fn()
            rates = interleaved({k: runner(m) for k, m in models.items()}, repeats, device)
            med = {k: median(v) for k, v in rates.items()}
            rows.append({"backbone": backbone, "method": method, "base img/s": med["base"],
                         "unmerged img/s": med["unmerged"], "merged img/s": med["merged"],
                         "unmerged/base": paired_ratio(rates, "unmerged", "base"),
                         "merged/base": paired_ratio(rates, "merged", "base"),
                         "max |logit diff| merged vs unmerged": err})
            print(f"  {backbone} {method}: merged/base {rows[-1]['merged/base']:.3f}, "
                  f"unmerged/base {rows[-1]['unmerged/base']:.3f}, logit diff {err:.1e}", flush=True)
    print()
    print(table(rows, ["backbone", "method", "base img/s", "unmerged img/s", "merged img/s", "unmerged/base",
                       "merged/base", "max |logit diff| merged vs unmerged"]))
    return rows


if __name__ == "__main__":
    main()
