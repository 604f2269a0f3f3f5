"""Where medpeft's training step spends its time, and what removing medpeft's own overheads bought.

1. Phase breakdown (simple timers around the same calls ``train_epoch`` makes): input batch
   (gather + augmentation + normalisation), forward, backward, gradient clipping, optimizer step,
   LR scheduler. ``--profiler`` adds torch.profiler's top operators.
2. Before/after in one run: the training step as it was before this work (commit 409c4ab:
   foreach AdamW on CPU, a host sync per step to accumulate the loss, unfused input
   normalisation and augmentation of grayscale images as 3 channels, NCHW CNNs on CPU) vs the
   current ``train_epoch``, on two identical copies of the model, interleaved, median images/s.

    python benchmarks/profile_step.py --quick
"""
from __future__ import annotations

import argparse
import copy
import math
import time

from common import device_of, header, interleaved, load_bundle, median, paired_ratio, sync, table

import torch


class LegacyInputs:
    """BatchLoader.to_input before the fused normalisation (same batches, same augmentation)."""

    def __init__(self, loader, channels_last: bool):
        self.loader = loader
        self.channels_last = channels_last

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        loader = self.loader
        n = len(loader.data)
        gen = torch.Generator().manual_seed(loader.seed * 100_003 + loader.epoch)
        order = torch.randperm(n, generator=gen).to(loader.device)
        loader.epoch += 1
        for i in range(len(loader)):
            idx = order[i * loader.batch_size:(i + 1) * loader.batch_size]
            x = loader.images[idx].float().div_(255)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if loader.augment is not None:
                x = loader.augment(x, gen)
            x = (x - loader.mean) / loader.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, loader.labels[idx]


def legacy_epoch(model, loader, optimizer, scheduler, criterion, params, grad_clip, max_steps, device, amp_dtype):
    """The loop body of train_model at commit 409c4ab."""
    from medpeft.methods import set_train_mode

    set_train_mode(model, True)
    total, count = 0.0, 0
    for step, (x, y) in enumerate(loader):
        if step >= max_steps:
            break
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


def phases(setup, steps: int, device) -> dict:
    from medpeft.methods import set_train_mode

    s = setup
    set_train_mode(s.net, True)
    times = {k: 0.0 for k in ("input batch", "forward", "backward", "grad clip", "optimizer", "scheduler")}
    it = iter(s.train_loader)

    def tick(name, t0):
        sync(device)
        now = time.perf_counter()
        times[name] += now - t0
        return now

    for _ in range(steps):
        t = time.perf_counter()
        x, y = next(it)
        t = tick("input batch", t)
        with torch.autocast(device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            logits = s.step_net(x)
        loss = s.criterion(logits.float(), y)
        t = tick("forward", t)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = tick("backward", t)
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
        t = tick("grad clip", t)
        s.optimizer.step()
        t = tick("optimizer", t)
        s.scheduler.step()
        tick("scheduler", t)
    total = sum(times.values())
    return {k: 100 * v / total for k, v in times.items()} | {"step ms": 1000 * total / steps}


def main(argv=None):
    from medpeft.methods import get_method
    from medpeft.run import build_model
    from medpeft.train import TrainConfig, prepare_training, train_epoch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", default="efficientnet_lite0:full,efficientnet_lite0:lora,dinov2_vits14:full,"
                                        "dinov2_vits14:lora")
    p.add_argument("--augment", default="light")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profiler", action="store_true", help="also print torch.profiler's top operators")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    sizes = {"efficientnet_lite0": 64, "dinov2_vits14": 56} if args.quick else {"efficientnet_lite0": 224,
                                                                               "dinov2_vits14": 224}
    batch, steps, repeats = (16, 3, 5) if args.quick else (64, 10, 5)
    print(header("medpeft's training step: phases, and before/after removing its overheads", device, sizes=sizes,
                 batch=batch, steps=steps, repeats=repeats, augment=args.augment), flush=True)
    phase_rows, ratio_rows = [], []
    bundles = {}
    for spec in args.configs.split(","):
        backbone, method = spec.split(":")
        size = sizes[backbone]
        bundle = bundles.setdefault(size, load_bundle("breastmnist", size))
        torch.manual_seed(0)
        model, info, _, _ = build_model(backbone, bundle.num_classes, size, method, {})
        twin = copy.deepcopy(model)
        cfg = TrainConfig(epochs=1000, batch_size=batch, augment=args.augment, device=str(device), seed=0)
        lr = get_method(method).default_lr
        new = prepare_training(model, bundle, info.mean, info.std, cfg, lr, with_test=False)
        old = prepare_training(twin, bundle, info.mean, info.std, cfg, lr, with_test=False)
        # the old optimizer: foreach AdamW on CPU (fused only on CUDA)
        old.optimizer = torch.optim.AdamW(old.params, lr=lr, weight_decay=cfg.weight_decay,
                                          fused=device.type == "cuda")
        total = cfg.epochs * len(old.train_loader)
        old.scheduler = torch.optim.lr_scheduler.LambdaLR(
            old.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
        legacy_cl = device.type == "cuda"  # the old code: channels_last on a GPU only
        twin.to(memory_format=torch.channels_last if legacy_cl else torch.contiguous_format)
        old_inputs = LegacyInputs(old.train_loader, legacy_cl)

        def before(n):
            legacy_epoch(twin, old_inputs, old.optimizer, old.scheduler, old.criterion, old.params, cfg.grad_clip,
                         n, device, old.amp_dtype)
            return n * batch

        train_epoch(new, max_steps=1)
        before(1)
        phase_rows.append({"config": spec, **phases(new, steps, device)})
        rates = interleaved({
            "before": lambda: before(steps),
            "after": lambda: (train_epoch(new, max_steps=steps), steps * batch)[1],
        }, repeats, device)
        ratio_rows.append({"config": spec, "before img/s": median(rates["before"]),
                           "after img/s": median(rates["after"]),
                           "after/before": paired_ratio(rates, "after", "before")})
        print(f"  {spec}: after/before {ratio_rows[-1]['after/before']:.3f}", flush=True)
        if args.profiler:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                train_epoch(new, max_steps=steps)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print()
    print(table(phase_rows, ["config", "step ms", "input batch", "forward", "backward", "grad clip", "optimizer",
                             "scheduler"]))
    print("(phases in % of the step)\n")
    print(table(ratio_rows, ["config", "before img/s", "after img/s", "after/before"]))
    return phase_rows, ratio_rows


if __name__ == "__main__":
    main()
