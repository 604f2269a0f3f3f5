"""Shared pieces of the benchmarks: data, the reference loop users would otherwise write,
interleaved timing with medians, memory accounting, machine description and tables.

Every figure a benchmark prints is a ratio of two measurements taken in the same process on
the same machine, interleaved (A B B A A B ...) and summarised by medians, so a machine shared
with other jobs shifts both sides alike.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("MEDPEFT_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATA_ROOT = Path(os.environ.get("MEDPEFT_SHARED_DATA", REPO.parent / "shared" / "data")) / "medmnist"


# --------------------------------------------------------------------------- machine / timing


def device_of(name: str = "auto") -> torch.device:
    from medpeft.train import resolve_device

    return resolve_device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, load average {load_average()}")
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def median(values) -> float:
    return float(statistics.median(values))


def interleaved(cases: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Run each case's ``fn() -> items`` ``repeats`` times, alternating the order each round
    (A B, B A, A B, ...); returns items/second per run, in round order."""
    rates = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            start = time.perf_counter()
            items = cases[name]()
            sync(device)
            rates[name].append(items / (time.perf_counter() - start))
    return rates


def paired_ratio(rates: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of num/den from the same round: both were measured back to back, so a
    change of machine load between rounds cancels out."""
    return median([a / b for a, b in zip(rates[num], rates[den])])


# --------------------------------------------------------------------------- data


def load_bundle(name: str, image_size: int, seed: int = 0):
    from medpeft.data import load_data
    from medpeft.data.base import DataConfig

    if not (DATA_ROOT / f"{name}.npz").is_file():
        raise SystemExit(f"benchmark data {DATA_ROOT / (name + '.npz')} not found; set MEDPEFT_SHARED_DATA")
    return load_data(DataConfig(name=name, root=str(DATA_ROOT), image_size=image_size, split_seed=seed))


class UInt8ImageDataset(torch.utils.data.Dataset):
    """What a user writes: one sample at a time from the uint8 array, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference_transform(mean, std, augment: bool):
    """torchvision per-sample pipeline equivalent to medpeft's ``light`` augmentation
    (flip, +-10 deg rotation, 0.9-1.1 scale, 5 % translation, +-10 % brightness/contrast)."""
    from torchvision.transforms import v2

    ops = [v2.ToDtype(torch.float32, scale=True), v2.Lambda(lambda x: x.expand(3, -1, -1) if x.shape[0] == 1 else x)]
    if augment:
        ops += [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                v2.ColorJitter(brightness=0.1, contrast=0.1)]
    ops.append(v2.Normalize(mean, std))
    return v2.Compose(ops)


def reference_loader(split, mean, std, batch_size: int, augment: bool, workers: int, device, shuffle=True,
                     drop_last=True):
    ds = UInt8ImageDataset(split.images, split.labels, reference_transform(mean, std, augment))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0)


# --------------------------------------------------------------------------- the reference loop


@dataclass
class ReferenceLoop:
    """The plain loop of the peft / timm docs: DataLoader -> model -> cross-entropy -> AdamW."""

    model: torch.nn.Module
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: object = None
    _it: object = None

    def steps(self, n: int) -> int:
        """``n`` training steps (data loading included); returns the number of images."""
        self.model.train()
        seen = 0
        total = torch.zeros((), device=self.device)
        for _ in range(n):
            try:
                x, y = next(self._it)
            except (StopIteration, TypeError):
                self._it = iter(self.loader)
                x, y = next(self._it)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            total += loss.detach()
            seen += len(y)
        float(total)  # the docs' loops read the loss at least once per logging interval
        return seen


PEFT_METHODS = ("lora", "dora", "loha", "lokr", "oft", "vera", "ia3")


def peft_reference_model(backbone: str, method: str, num_classes: int, image_size: int, options: dict):
    """timm model + the peft config of the docs (``get_peft_model``, head in ``modules_to_save``),
    on the same layers medpeft adapts (ViT LoRA: the whole fused ``qkv``; peft cannot do q/v slices)."""
    import peft

    from medpeft.backbones import backbone_family, create_backbone
    from medpeft.methods.lora import resolve_targets

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = create_backbone(backbone, num_classes=num_classes, image_size=image_size)
    family = backbone_family(model)
    head = [n for n, m in model.named_modules() if m is model.get_classifier()][0]
    if method == "ia3":
        if family == "vit":
            config = peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"], modules_to_save=[head])
        else:
            _, names = resolve_targets(model, "pw")
            config = peft.IA3Config(target_modules=names, feedforward_modules=[], modules_to_save=[head])
        return peft.get_peft_model(model, config)
    targets = options.get(f"{method}_targets", "auto")
    targets = ("qkv" if family == "vit" else "pw") if targets in ("auto", "qv") else targets
    _, names = resolve_targets(model, targets)
    if method in ("lora", "dora"):
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=names, use_dora=method == "dora",
                                 modules_to_save=[head])
    elif method == "loha":
        config = peft.LoHaConfig(r=8, alpha=8, target_modules=names, modules_to_save=[head])
    elif method == "lokr":
        config = peft.LoKrConfig(r=8, alpha=8, target_modules=names, modules_to_save=[head])
    elif method == "oft":
        config = peft.OFTConfig(r=0, oft_block_size=8, target_modules=names, module_dropout=0.0, modules_to_save=[head])
    elif method == "vera":
        config = peft.VeraConfig(r=256, d_initial=0.1, target_modules=names, projection_prng_key=0,
                                 save_projection=False, modules_to_save=[head])
    else:
        raise ValueError(method)
    return peft.get_peft_model(model, config)


# --------------------------------------------------------------------------- memory


def train_state_bytes(model: torch.nn.Module, optimizer, step) -> dict:
    """Bytes training keeps beyond the weights, counted exactly for one step:
    activations autograd saves for backward (tensors that are not parameters/buffers),
    gradients and optimizer state. (On a GPU benchmarks also report the allocator's peak.)"""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(t):
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own:
                storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"activations": sum(storages.values()), "grads": grads, "optimizer": state}


# --------------------------------------------------------------------------- tables


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def header(title: str, device: torch.device, **settings) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"\n## {title}\n\nmachine: {machine(device)}\nsettings: {opts}\n"
