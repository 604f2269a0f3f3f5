"""Training throughput (images/s) and training memory per method: medpeft vs the loop users write.

Reference (what a user would otherwise write):
- methods HF peft has (lora, dora, loha, lokr, oft, vera, ia3): timm model + the peft config on the
  same layers + ``get_peft_model`` (head in ``modules_to_save``) + ``AdamW(model.parameters())``,
  as the peft docs show (ViT LoRA on the whole fused qkv: peft cannot adapt q/v slices);
- every other method: the same medpeft-built model with only ``requires_grad`` switched, trained in a
  plain loop over the trainable parameters;
- both: a torch ``DataLoader`` over a ``Dataset`` of the same in-memory uint8 images with torchvision
  v2 transforms per sample, equivalent to medpeft's augmentation (``light`` unless the method's
  default is none), cross-entropy, ``loss.backward()``, ``optimizer.step()``.
medpeft: ``prepare_training`` + ``train_epoch`` (its own training step: batched on-device
augmentation, grad clipping, LR schedule, fused AdamW, caching where the method allows it).

Columns: images/s (median of interleaved repeats), medpeft/ref (median of the per-round ratios),
medpeft/full (the method's speed
relative to full fine-tuning in medpeft; ~1.5x is the ideal for a method that back-propagates
through the whole trunk), and the training state in MB (activations saved for backward +
gradients + optimizer state, counted exactly for one step; GPU: also the allocator's peak).

    python benchmarks/throughput.py --quick             # 2 CPU cores, a few minutes
    python benchmarks/throughput.py                     # full sizes (GPU machine)
"""
from __future__ import annotations

import argparse
import gc
import json
import time

from common import (PEFT_METHODS, ReferenceLoop, device_of, header, interleaved, load_bundle, median,
                    paired_ratio, peft_reference_model, reference_loader, sync, table, train_state_bytes)

import torch


def variants(backbone_family: str, only: list[str] | None):
    from medpeft.methods import get_method, list_methods

    out = []
    for name in list_methods():
        if backbone_family in get_method(name).families:
            out.append((name, name, {}, "auto"))
    # the same layers on both sides (peft's qkv), and partial where caching applies
    if backbone_family == "vit":
        out.append(("lora[qkv]", "lora", {"lora_targets": "qkv"}, "auto"))
    out.append(("partial[aug=none]", "partial", {}, "none"))
    if only:
        out = [v for v in out if v[0] in only or v[1] in only]
    out.sort(key=lambda v: (v[0] != "full", v[0]))
    return out


def measure(backbone: str, label: str, method: str, options: dict, augment: str, bundle, args, device):
    from medpeft.backbones import backbone_family
    from medpeft.methods import count_parameters, get_method
    from medpeft.run import build_model
    from medpeft.train import TrainConfig, prepare_training, train_epoch

    size = args.sizes[backbone]
    torch.manual_seed(0)
    model, info, _, _ = build_model(backbone, bundle.num_classes, size, method, options)
    lr = get_method(method).default_lr
    cfg = TrainConfig(epochs=1000, batch_size=args.batch_size, augment=augment, device=str(device), seed=0)
    start = time.perf_counter()
    setup = prepare_training(model, bundle, info.mean, info.std, cfg, lr, with_test=False)
    setup_s = time.perf_counter() - start
    counts = count_parameters(model)

    if method in PEFT_METHODS:
        ref_model = peft_reference_model(backbone, method, bundle.num_classes, size, options)
        ref_params = list(ref_model.parameters())  # the docs pass every parameter to the optimizer
        qv = method == "lora" and backbone_family(model) == "vit" and options.get("lora_targets", "auto") in ("auto", "qv")
        ref_kind = "peft (qkv)" if qv else "peft"  # peft cannot adapt q/v slices: nearest is the whole qkv
    else:
        torch.manual_seed(0)
        ref_model, _, _, _ = build_model(backbone, bundle.num_classes, size, method, options)
        ref_params = [p for p in ref_model.parameters() if p.requires_grad]
        ref_kind = "requires_grad"
    ref_model.to(device)
    ref_opt = torch.optim.AdamW(ref_params, lr=lr, weight_decay=1e-4)
    ref_loader = reference_loader(bundle.train, info.mean, info.std, args.batch_size, setup.augment_name != "none",
                                  args.workers, device)
    ref = ReferenceLoop(ref_model, ref_loader, ref_opt, device, setup.amp_dtype)

    n = args.steps
    mem_ref = train_state_bytes(ref_model, ref_opt, lambda: ref.steps(1))
    mem_med = train_state_bytes(model, setup.optimizer, lambda: train_epoch(setup, max_steps=1))
    for _ in range(args.warmup):
        ref.steps(1)
        train_epoch(setup, max_steps=1)
    peaks = {"ref": [], "medpeft": []}

    def run(side, fn):
        def go():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            items = fn()
            if device.type == "cuda":
                sync(device)
                peaks[side].append(torch.cuda.max_memory_allocated(device) / 2**20)
            return items
        return go

    rates = interleaved({
        "ref": run("ref", lambda: ref.steps(n)),
        "medpeft": run("medpeft", lambda: (train_epoch(setup, max_steps=n), n * args.batch_size)[1]),
    }, args.repeats, device)

    def mb(m):
        return (m["activations"] + m["grads"] + m["optimizer"]) / 2**20

    # grads exist during every step even where a loop frees them after it: count trainable bytes
    mem_ref["grads"] = sum(p.numel() * p.element_size() for p in ref_params if p.requires_grad)
    mem_med["grads"] = sum(p.numel() * p.element_size() for p in setup.params)
    row = {
        "backbone": backbone, "method": label, "trainable %": counts["trainable_pct"], "reference": ref_kind,
        "augment": setup.augment_name,
        "ref img/s": median(rates["ref"]), "medpeft img/s": median(rates["medpeft"]),
        "ref state MB": mb(mem_ref), "medpeft state MB": mb(mem_med),
        "setup s": setup_s, "note": setup.cache.reason if setup.cache.active else "",
    }
    row["medpeft/ref"] = paired_ratio(rates, "medpeft", "ref")
    if peaks["ref"]:
        row["ref peak GPU MB"], row["medpeft peak GPU MB"] = max(peaks["ref"]), max(peaks["medpeft"])
    del setup, model, ref, ref_model, ref_opt
    gc.collect()
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small images / few steps (2 CPU cores, minutes)")
    p.add_argument("--backbones", default="efficientnet_lite0,dinov2_vits14")
    p.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="reference DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    quick = args.quick
    args.sizes = {"efficientnet_lite0": 64, "dinov2_vits14": 56} if quick else {"efficientnet_lite0": 224,
                                                                              "dinov2_vits14": 224}
    args.batch_size = args.batch_size or (16 if quick else 64)
    args.steps = args.steps or (3 if quick else 20)
    args.repeats = args.repeats or 5
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    # on 2 CPU cores worker processes only take cores from the model; on a GPU machine they help
    args.workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 8)
    from medpeft.backbones import create_backbone, backbone_family

    rows = []
    print(header("Training throughput: medpeft vs the plain timm/peft loop", device, data=args.data,
                 sizes=args.sizes, batch=args.batch_size, steps=args.steps, repeats=args.repeats,
                 ref_workers=args.workers), flush=True)
    only = args.methods.split(",") if args.methods else None
    for backbone in args.backbones.split(","):
        bundle = load_bundle(args.data, args.sizes[backbone])
        family = backbone_family(create_backbone(backbone, num_classes=2, image_size=args.sizes[backbone],
                                                 pretrained=False)[0])
        for label, method, options, augment in variants(family, only):
            try:
                row = measure(backbone, label, method, options, augment, bundle, args, device)
            except Exception as err:  # a method that cannot run here is reported, not fatal
                row = {"backbone": backbone, "method": label, "note": f"failed: {type(err).__name__}: {err}"}
            rows.append(row)
            print(f"  {backbone:18s} {label:18s} ref {row.get('ref img/s', float('nan')):8.1f} img/s  "
                  f"medpeft {row.get('medpeft img/s', float('nan')):8.1f} img/s  "
                  f"x{row.get('medpeft/ref', float('nan')):.2f}  {row.get('note', '')}", flush=True)
        full = next((r for r in rows if r["backbone"] == backbone and r["method"] == "full" and "medpeft img/s" in r),
                    None)
        for r in rows:
            if r["backbone"] == backbone and full and "medpeft img/s" in r:
                r["medpeft/full"] = r["medpeft img/s"] / full["medpeft img/s"]
    columns = ["backbone", "method", "trainable %", "reference", "augment", "ref img/s", "medpeft img/s",
               "medpeft/ref", "medpeft/full", "ref state MB", "medpeft state MB"]
    if device.type == "cuda":
        columns += ["ref peak GPU MB", "medpeft peak GPU MB"]
    columns += ["setup s", "note"]
    print()
    print(table(rows, columns))
    ok = [r for r in rows if "medpeft/ref" in r]
    if ok:
        worst = min(ok, key=lambda r: r["medpeft/ref"])
        print(f"\nmedpeft/ref: min {worst['medpeft/ref']:.2f} ({worst['backbone']} {worst['method']}), "
              f"median {median([r['medpeft/ref'] for r in ok]):.2f}; "
              f"{sum(r['medpeft/ref'] >= 1.0 for r in ok)}/{len(ok)} rows >= 1.0")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=float)
    return rows


if __name__ == "__main__":
    main()
