"""Peak training memory: LoRA (and other methods) vs full fine-tuning at the same batch size.

Each configuration runs in a fresh subprocess, so one run's allocations cannot hide another's:
- CPU, torch allocations (``torch_train_mb``): what training holds at its peak in steady state =
  the bytes resident between steps (optimizer state + gradients, counted exactly after a first
  step) + the peak of the running sum of every allocation and free of the second step, recorded
  by torch.profiler (``profile_memory``): activations, gradients, temporaries. Free of the C
  allocator's caching and fragmentation, which is why it is the headline CPU figure;
- CPU, process: the kernel's peak resident set size (``ru_maxrss``) after a few training steps,
  minus the peak before training (libraries, model, data and one no-grad forward already
  loaded), and the whole-process peak. With glibc's default (dynamic) mmap threshold, memory a
  step frees stays in the heap and fragments, which inflates these for methods whose allocation
  pattern fragments more; ``rss_mmap128k_train_mb`` repeats the RSS measure with
  ``MALLOC_MMAP_THRESHOLD_=131072`` (large blocks mapped and returned to the OS on free), where the
  process's peak follows what training really holds;
- GPU: ``torch.cuda.max_memory_allocated`` over the training steps (weights included) and the
  same minus what was allocated before the first step.
The ratio method/full of each is printed; the issue's target is LoRA <= 0.7x full on dinov2_vits14.
Children alternate (full, lora, full, lora, ...) and medians are taken.

    python benchmarks/memory.py --quick
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from common import device_of, header, median, table


def child(args) -> dict:
    import torch

    from common import load_bundle
    from medpeft.batching import BatchLoader
    from medpeft.methods import get_method
    from medpeft.run import build_model
    from medpeft.train import TrainConfig, prepare_training, train_epoch

    device = device_of(args.device)
    bundle = load_bundle(args.data, args.size)
    torch.manual_seed(0)
    model, info, _, _ = build_model(args.backbone, bundle.num_classes, args.size, args.method, {})
    cfg = TrainConfig(epochs=100, batch_size=args.batch, device=str(device), augment=args.augment)
    setup = prepare_training(model, bundle, info.mean, info.std, cfg, get_method(args.method).default_lr,
                             with_test=False)
    x, _ = next(iter(BatchLoader(bundle.train, args.batch, info.mean, info.std, device=device)))
    with torch.no_grad():
        model.eval()(x)  # forward workspace is part of the baseline: both sides need inference
    if args.measure == "torch":  # a separate process: the profiler's own memory must not count in RSS
        import itertools

        from torch.profiler import ProfilerActivity, profile

        train_epoch(setup, max_steps=1)  # creates the optimizer state; the gradients stay until the next step
        resident = sum(t.numel() * t.element_size() for st in setup.optimizer.state.values() for t in st.values()
                       if isinstance(t, torch.Tensor))
        resident += sum(p.grad.numel() * p.grad.element_size() for p in setup.params if p.grad is not None)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_epoch(setup, max_steps=1)
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]" and "CPU" in str(e.device_type())), key=lambda e: e.start_ns())
        peak = max(itertools.accumulate((e.nbytes() for e in events), initial=0))
        return {"torch_train_mb": (resident + peak) / 2**20}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_epoch(setup, max_steps=args.steps)
    out = {"rss_before_mb": before_rss, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["rss_train_mb"] = out["rss_peak_mb"] - out["rss_before_mb"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_train_mb"] = out["gpu_peak_mb"] - before
    return out


def run_child(args, method: str, measure: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--measure", measure,
           "--backbone", args.backbone, "--method", method,
           "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
           "--data", args.data, "--augment", args.augment]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    import os

    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backbone", default="dinov2_vits14")
    p.add_argument("--methods", default="lora", help="compared with full fine-tuning")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--augment", default="light")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="rss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return None
    device = device_of(args.device)
    args.device = str(device)
    args.size = args.size or (112 if args.quick else 224)
    args.batch = args.batch or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    print(header("Peak training memory vs full fine-tuning (fresh process per run)", device, backbone=args.backbone,
                 size=args.size, batch=args.batch, steps=args.steps, repeats=args.repeats, augment=args.augment),
          flush=True)
    methods = ["full"] + [m for m in args.methods.split(",") if m != "full"]
    runs = {m: [] for m in methods}
    for r in range(args.repeats):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            result = run_child(args, m, "rss")
            if device.type == "cpu":
                result.update(run_child(args, m, "torch"))
                fixed = run_child(args, m, "rss", {"MALLOC_MMAP_THRESHOLD_": "131072"})
                result["rss_mmap128k_train_mb"] = fixed["rss_train_mb"]
            runs[m].append(result)
    keys = (["torch_train_mb", "rss_train_mb", "rss_mmap128k_train_mb", "rss_peak_mb"] if device.type == "cpu"
            else ["gpu_train_mb", "gpu_peak_mb", "rss_peak_mb"])
    med = {m: {k: median([run[k] for run in runs[m]]) for k in keys} for m in methods}
    rows = []
    for m in methods:
        row = {"backbone": args.backbone, "method": m}
        for k in keys:
            row[k] = med[m][k]
            row[f"{k} / full"] = med[m][k] / med["full"][k]
        rows.append(row)
    cols = ["backbone", "method"]
    for k in keys:
        cols += [k, f"{k} / full"]
    print(table(rows, cols))
    return rows


if __name__ == "__main__":
    main()
