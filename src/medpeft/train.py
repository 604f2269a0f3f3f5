"""The training loop: AdamW over the trainable parameters only, cosine schedule with
warmup, early stopping on a validation metric, and a real copy of the best state that
is restored before the single test evaluation.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batching import AUGMENTATIONS, BatchLoader
from .data.base import DataBundle, ImageSet
from .errors import ConfigError
from .methods import set_train_mode, trained_state_dict
from .metrics import compute_metrics

MONITORS = ("auroc", "acc", "balanced_acc", "f1", "loss")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float | None = None  # None: the method's default learning rate
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 6  # epochs without validation improvement before stopping
    monitor: str = "auroc"  # validation metric for early stopping / model selection
    class_weighted: bool = False  # inverse-frequency class weights in the loss
    grad_clip: float | None = 1.0
    augment: str = "auto"  # none | light | auto (none for head-only methods, else light)
    cache_features: str = "auto"  # auto | on | off: frozen-trunk feature caching for head-only training
    device: str = "auto"  # auto | cpu | cuda[:N]
    amp: bool = True  # bf16 autocast on a GPU (ignored on CPU)
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: torch's default
    max_minutes: float | None = None  # stop training after this wall time (best state still restored)

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor {self.monitor!r} is not one of {', '.join(MONITORS)}")
        if self.augment not in ("auto", *AUGMENTATIONS):
            raise ConfigError(f"augment {self.augment!r} is not one of auto, {', '.join(AUGMENTATIONS)}")
        if self.cache_features not in ("auto", "on", "off"):
            raise ConfigError(f"cache_features {self.cache_features!r} is not one of auto, on, off")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = float("nan")
    train_seconds: float = 0.0
    stopped_early: bool = False
    feature_cache: bool = False
    augment: str = "none"
    val_probs: np.ndarray | None = None  # of the restored best state
    test_probs: np.ndarray | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def only_head_trains(model: nn.Module) -> bool:
    head = {id(p) for p in model.get_classifier().parameters()}
    return all(id(p) in head for p in model.parameters() if p.requires_grad)


def loss_fn(task: str, class_weights: torch.Tensor | None):
    if task == "multilabel":
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=class_weights)
    return lambda logits, y: F.cross_entropy(logits, y, weight=class_weights)


def to_probs(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=-1)


def class_weights_for(labels: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    if task == "multilabel":
        pos = labels.float().sum(0).clamp(min=1)
        return (labels.shape[0] - pos) / pos  # pos_weight = negatives / positives
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


class _FeatureHead(nn.Module):
    """Stand-in model over cached pre-logit features: only the head runs per epoch."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)


@torch.inference_mode()
def extract_features(model: nn.Module, loader: BatchLoader, amp_dtype=None) -> torch.Tensor:
    set_train_mode(model, False)
    out = []
    for x, _ in loader:
        with torch.autocast(loader.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
    return torch.cat(out)


class _TensorLoader:
    """Minimal loader over cached feature tensors, with the same seeded shuffling."""

    def __init__(self, feats, labels, batch_size, shuffle=False, seed=0):
        self.feats, self.labels, self.batch_size, self.shuffle, self.seed = feats, labels, batch_size, shuffle, seed
        self.epoch = 0
        self.device = feats.device

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.labels), generator=gen) if self.shuffle else torch.arange(len(self.labels))
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.feats[idx], self.labels[idx]


@torch.inference_mode()
def predict(model: nn.Module, loader, task: str, amp_dtype=None) -> tuple[np.ndarray, float]:
    """Probabilities [N, K] and mean loss over a loader (model in eval mode)."""
    set_train_mode(model, False)
    probs, losses, n = [], 0.0, 0
    criterion = loss_fn(task, None)
    for x, y in loader:
        with torch.autocast(loader.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        losses += float(criterion(logits, y)) * len(y)
        n += len(y)
        probs.append(to_probs(logits, task).cpu())
    return torch.cat(probs).numpy(), losses / max(n, 1)


def evaluate(model, loader, data: ImageSet, task: str, amp_dtype=None) -> dict:
    probs, loss = predict(model, loader, task, amp_dtype)
    metrics = compute_metrics(data.labels.numpy(), probs, task)
    metrics["loss"] = loss
    return metrics


def _score(metrics: dict, monitor: str) -> float:
    """Higher is better; NaN (e.g. AUROC with one class in val) falls back to accuracy."""
    if monitor == "loss":
        return -metrics["loss"]
    value = metrics.get(monitor, float("nan"))
    return metrics["acc"] if value != value else value


def make_loaders(bundle: DataBundle, mean, std, cfg: TrainConfig, device, augment, with_test: bool = True):
    kw = dict(mean=mean, std=std, device=device, channels_last=device.type == "cuda")
    train = BatchLoader(bundle.train, cfg.batch_size, shuffle=True, augment=augment, seed=cfg.seed,
                        drop_last=True, **kw)
    val = BatchLoader(bundle.val, cfg.eval_batch_size, **kw)
    # without the test split (HPO trials) it is not even touched: the loader would copy its images
    test = BatchLoader(bundle.test, cfg.eval_batch_size, **kw) if with_test else None
    return train, val, test


def train_model(model: nn.Module, bundle: DataBundle, mean, std, cfg: TrainConfig, lr: float,
                progress=None, evaluate_test: bool = True) -> TrainResult:
    """Train in place and restore the best validation state.

    The test split is predicted exactly once, after training, by the best validation state
    (``result.test_probs``); nothing during training or selection reads it.
    ``progress(epoch, row)`` is called after every epoch (for progress bars / logs).
    ``evaluate_test=False`` (HPO trials) never reads the test split; ``test_probs`` stays None.
    """
    device = resolve_device(cfg.device)
    amp_dtype = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    head_only = only_head_trains(model)
    augment_name = cfg.augment if cfg.augment != "auto" else ("none" if head_only else "light")
    augment = AUGMENTATIONS[augment_name]() if AUGMENTATIONS[augment_name] else None
    if cfg.cache_features == "on" and not (head_only and augment is None):
        raise ConfigError("cache_features=on needs a head-only method (linear) and augment=none: "
                          "with augmentation or a trained trunk the cached features would be stale")
    use_cache = cfg.cache_features != "off" and head_only and augment is None
    train_loader, val_loader, test_loader = make_loaders(bundle, mean, std, cfg, device, augment,
                                                         with_test=evaluate_test)
    result = TrainResult(feature_cache=use_cache, augment=augment_name)

    net = model
    if use_cache:  # the frozen trunk runs once per split instead of once per epoch
        net = _FeatureHead(model.get_classifier())
        # extraction reads every training image once, in order (not the shuffled, drop-last loader)
        ordered = BatchLoader(bundle.train, cfg.eval_batch_size, mean, std, device=device)
        train_loader = _TensorLoader(extract_features(model, ordered, amp_dtype), ordered.labels,
                                     cfg.batch_size, shuffle=True, seed=cfg.seed)
        val_loader = _TensorLoader(extract_features(model, val_loader, amp_dtype), val_loader.labels,
                                   cfg.eval_batch_size)

    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    steps_per_epoch = max(len(train_loader), 1)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    weights = class_weights_for(bundle.train.labels, bundle.task, bundle.num_classes).to(device) \
        if cfg.class_weighted else None
    criterion = loss_fn(bundle.task, weights)

    best_score, best_state, stale = -math.inf, None, 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(net if use_cache else model, True)
        total, count = 0.0, 0
        for x, y in train_loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        val = evaluate(net, val_loader, bundle.val, bundle.task, amp_dtype)
        score = _score(val, cfg.monitor)
        improved = score > best_score
        if improved:  # a real copy: later steps must not change the kept state
            best_score, stale, result.best_epoch = score, 0, epoch
            best_state = {k: v.detach().clone() for k, v in trained_state_dict(model).items()}
        else:
            stale += 1
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - start, **{f"val_{k}": v for k, v in val.items()}}
        result.history.append(row)
        if progress:
            progress(epoch, row)
        if stale >= cfg.patience:
            result.stopped_early = True
            break
        if cfg.max_minutes and (time.perf_counter() - start) > 60 * cfg.max_minutes:
            result.stopped_early = True
            break
    result.train_seconds = time.perf_counter() - start
    result.best_val = best_score if cfg.monitor != "loss" else -best_score
    model.load_state_dict(best_state, strict=False)
    # Selection is over; the test split is read here, once, by the restored best state.
    result.val_probs = predict(net, val_loader, bundle.task, amp_dtype)[0]
    if not evaluate_test:
        return result
    if use_cache:
        test_loader = _TensorLoader(extract_features(model, test_loader, amp_dtype), test_loader.labels,
                                    cfg.eval_batch_size)
    result.test_probs = predict(net, test_loader, bundle.task, amp_dtype)[0]
    return result


def predict_probs(model, images: ImageSet, mean, std, task: str, batch_size=128, device="cpu") -> np.ndarray:
    loader = BatchLoader(images, batch_size, mean, std, device=resolve_device(device))
    model.to(loader.device)
    return predict(model, loader, task)[0]
