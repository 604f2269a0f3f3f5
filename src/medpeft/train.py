"""The training loop: AdamW over the trainable parameters only, cosine schedule with
warmup, early stopping on a validation metric, and a real copy of the best state that
is restored before the single test evaluation.
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from torch import nn

from .augment import MixConfig, check_augment, mix_batch
from .batching import BatchLoader
from .data.base import DataBundle, ImageSet
from .errors import ConfigError
from .methods import set_train_mode, trained_state_dict
from .tasks import get_task
from .trunk_cache import CachePlan, extract, memo_key, plan_cache

_log = logging.getLogger(__name__)

def known_monitors() -> set[str]:
    from .tasks import TASKS

    return {"auto", "loss"} | {m for task in TASKS.values() for m in task.metrics}


@dataclass
class TrainConfig:
    epochs: int = 30
    # the training budget in optimizer steps (None: ``epochs``); epochs = ceil(steps / steps per
    # epoch), so 1 % and 100 % of the labels get the same number of updates when asked to
    steps: int | None = None
    # at least this many optimizer steps: with 1% of the labels an epoch is one step, so the
    # epoch count is raised until the budget is met (0: plain epochs)
    min_steps: int = 0
    # BatchNorm running statistics during training: frozen (default; see methods.set_train_mode
    # for the measurement behind it) or update (layers whose affine parameters train)
    bn_stats: str = "frozen"
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float | None = None  # None: the method's default learning rate
    # learning rate of the task head / decoder (trained from scratch by every method); None: lr.
    # A segmentation comparison gives every method's decoder the same rate, so the methods differ
    # only in how the encoder learns (full fine-tuning's 1e-4 would otherwise also slow its decoder)
    head_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 6  # epochs without validation improvement before stopping
    # validation metric for early stopping / model selection: auto (the task's primary metric:
    # AUROC, Dice), loss, or a metric of the task (acc, f1, ...; dice, iou, hd95, ...)
    monitor: str = "auto"
    seg_loss: str = "dice_ce"  # segmentation loss: dice_ce | dice | ce | dice_focal
    nsd_tolerance: float = 2.0  # segmentation: surface-Dice tolerance in pixels
    # segmentation: auto (connected-component clean-up chosen on validation Dice, tasks/seg_postprocess.py)
    # or none (the raw argmax masks)
    seg_postprocess: str = "auto"
    # segmentation with a promptable model (litemedsam): none (a learned default prompt) or box
    # (each image's ground-truth bounding box, jittered in training): "prompted" results, never
    # to be ranked with unprompted ones
    prompt: str = "none"
    class_weighted: bool = False  # inverse-frequency class weights in the loss
    grad_clip: float | None = 1.0
    # auto (light, for every method alike: a comparison gives each method the same augmentation) |
    # none | light | medical | geometric |
    # intensity | artefact | a comma list of operations, e.g. "flip,rotation=0.5,speckle" (see augment.py)
    augment: str = "auto"
    augment_strength: float = 1.0  # scales every augmentation magnitude (0 disables)
    mix: str = "none"  # none | mixup | cutmix | mixup+cutmix: batch mixing with soft targets
    # unsupervised domain adaptation (adapt.py): none | dann, with unlabelled images of the target
    # domain (a folder) and the weight of the domain loss
    adapt: str = "none"
    target_unlabelled: str | None = None
    adapt_weight: float = 1.0
    # noise-robust training (strategies.py): plain cross-entropy | gce | cufit (curriculum)
    strategy: str = "plain"
    # semi-supervised training on the unlabelled rest of the training split (semi.py): none | fixmatch
    semi: str = "none"
    semi_threshold: float = 0.95  # FixMatch's pseudo-label confidence threshold
    semi_weight: float = 1.0  # weight of the unlabelled loss
    semi_ratio: int = 1  # unlabelled images per labelled image in a step (FixMatch's mu; the paper: 7)
    semi_rounds: int = 1  # self-training: pseudo-label rounds after the supervised one
    # auto | on | off: cache the frozen front of the network once per split (head-only training: the
    # features; partial/last-k-blocks: the frozen prefix's output). Needs augment=none and mix=none.
    cache_features: str = "auto"
    device: str = "auto"  # auto | cpu | cuda[:N]
    amp: bool = True  # bf16 autocast on a GPU (ignored on CPU)
    seed: int = 0  # drives head initialisation, data order, augmentation, mixing and dropout
    # model selection: "holdout" (early stopping on the validation split) or "cv:K" (K folds inside
    # the labelled training subset choose the epoch; no validation labels are used)
    select: str = "holdout"
    threads: int | None = None  # torch CPU threads; None: torch's default
    max_minutes: float | None = None  # stop training after this wall time (best state still restored)
    compile: bool = False  # torch.compile the trained network (the first steps pay for the compilation)
    channels_last: str = "auto"  # auto (CNNs on any device, every model on a GPU) | on | off
    fused_adamw: bool = True  # the fused AdamW kernel where torch has one for the device (CUDA, CPU)

    def __post_init__(self):
        if self.monitor not in known_monitors():  # which task's metrics fit is checked by the task
            raise ConfigError(f"monitor {self.monitor!r} is not one of {', '.join(sorted(known_monitors()))}")
        from .tasks.seg_loss import SEG_LOSSES

        if self.prompt not in ("none", "box"):
            raise ConfigError(f"prompt {self.prompt!r} is not one of none, box")
        from .adapt import ADAPTATIONS
        from .strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        from .semi import SEMI

        if self.semi not in SEMI:
            raise ConfigError(f"semi {self.semi!r} is not one of {', '.join(SEMI)}")
        if not (_real(self.semi_threshold) and 0 < self.semi_threshold < 1):
            raise ConfigError(f"semi_threshold must be a probability in (0, 1), got {self.semi_threshold!r}")
        if not _whole(self.semi_rounds) or self.semi_rounds < 1:
            raise ConfigError(f"semi_rounds must be a whole number >= 1, got {self.semi_rounds!r}")
        if not (_real(self.semi_weight) and self.semi_weight > 0) or not _whole(self.semi_ratio) or self.semi_ratio < 1:
            raise ConfigError(f"semi_weight must be > 0 and semi_ratio a whole number >= 1, got {self.semi_weight!r}, "
                              f"{self.semi_ratio!r}")

        if self.adapt not in ADAPTATIONS:
            raise ConfigError(f"adapt {self.adapt!r} is not one of {', '.join(ADAPTATIONS)}")
        if (self.adapt != "none") != bool(self.target_unlabelled):
            raise ConfigError("adapt dann needs target_unlabelled (a folder of unlabelled target images), and "
                              "target_unlabelled needs adapt dann")
        if not (_real(self.adapt_weight) and self.adapt_weight > 0):
            raise ConfigError(f"adapt_weight must be a number > 0, got {self.adapt_weight!r}")
        if self.seg_loss not in SEG_LOSSES:
            raise ConfigError(f"seg_loss {self.seg_loss!r} is not one of {', '.join(SEG_LOSSES)}")
        if self.seg_postprocess not in ("auto", "none"):
            raise ConfigError(f"seg_postprocess {self.seg_postprocess!r} is not one of auto, none")
        if isinstance(self.nsd_tolerance, bool) or not isinstance(self.nsd_tolerance, (int, float)) \
                or self.nsd_tolerance < 0:
            raise ConfigError(f"nsd_tolerance must be a number of pixels >= 0, got {self.nsd_tolerance!r}")
        check_augment("none" if self.augment == "auto" else self.augment, self.augment_strength)
        MixConfig(mode=self.mix)  # ConfigError for an unknown mode
        if self.bn_stats not in ("frozen", "update"):
            raise ConfigError(f"bn_stats {self.bn_stats!r} is not one of frozen, update")
        if self.cache_features not in ("auto", "on", "off"):
            raise ConfigError(f"cache_features {self.cache_features!r} is not one of auto, on, off")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"channels_last {self.channels_last!r} is not one of auto, on, off")
        for name, low, what in (("epochs", 1, "training epochs"), ("batch_size", 1, "images"),
                                ("eval_batch_size", 1, "images"),
                                ("patience", 1, "epochs without improvement"), ("min_steps", 0, "optimizer steps"),
                                ("steps", 1, "optimizer steps"), ("threads", 1, "CPU threads"),
                                ("seed", None, "the seed")):
            value = getattr(self, name)
            if value is None and name in ("steps", "threads"):
                continue
            if not _whole(value) or (low is not None and value < low):
                bound = f" >= {low}" if low is not None else ""
                raise ConfigError(f"{name} must be a whole number{bound} ({what}), got {value!r}")
        for name, low, high, optional in (("lr", 0, 10, True), ("head_lr", 0, 10, True)):
            value = getattr(self, name)
            if (value is None and optional) or (_real(value) and low < value < high):
                continue
            raise ConfigError(f"{name} must be a positive learning rate below {high} (e.g. 1e-3)"
                              + " or unset" * optional + f", got {value!r}")
        for name, optional in (("weight_decay", False), ("warmup_epochs", False), ("grad_clip", True)):
            value = getattr(self, name)
            if not ((value is None and optional) or (_real(value) and value >= 0)):
                raise ConfigError(f"{name} must be a number >= 0{' or unset' * optional}, got {value!r}")
        if self.max_minutes is not None and not (_real(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(f"max_minutes must be a number of minutes > 0 or unset, got {self.max_minutes!r}")
        for name in ("class_weighted", "amp", "compile", "fused_adamw"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_device(self.device)
        cv_folds(self.select)  # ConfigError for a bad selection mode


def _whole(value) -> bool:
    """A whole number (not a bool, not a string, no fractional part)."""
    if isinstance(value, bool) or not isinstance(value, (Integral, Real)):
        return False
    return isinstance(value, Integral) or (math.isfinite(value) and float(value).is_integer())


def _real(value) -> bool:
    """A finite number (not a bool, not a string)."""
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def check_device(name) -> None:
    """auto, cpu, mps, cuda or cuda:N; ConfigError naming anything else (checked before any work)."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|(cpu|mps|cuda)(:\d+)?", name.strip()):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N (a GPU index), mps")


def cv_folds(select: str) -> int | None:
    """K of a "cv:K" selection mode, None for "holdout"; ConfigError otherwise."""
    if select == "holdout":
        return None
    head, _, k = str(select).partition(":")
    if head == "cv" and k.isdigit() and int(k) >= 2:
        return int(k)
    raise ConfigError(f"select {select!r} is not 'holdout' or 'cv:K' with K >= 2 (e.g. cv:5)")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = float("nan")
    train_seconds: float = 0.0
    stopped_early: bool = False
    feature_cache: bool = False
    feature_cache_note: str = ""  # what was cached, or why nothing was (augmentation, trainable stem, ...)
    augment: str = "none"
    val_probs: np.ndarray | None = None  # of the restored best state
    test_probs: np.ndarray | None = None
    steps_per_epoch: int = 1
    epochs_planned: int = 0  # the schedule's length in epochs (training may stop before it)
    epoch_val_probs: list = field(default_factory=list)  # per epoch, when asked (cross-validation folds)
    curve: list = field(default_factory=list)  # [[optimizer step, monitored validation score], ...]

    # the best epoch was the last one of the schedule: more steps might still have helped
    best_is_last: bool = False
    curriculum: dict | None = None  # strategy cufit: what each stage kept (strategies.curriculum_record)


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
    check_device(name)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def plan_epochs(n_train: int, cfg: TrainConfig) -> tuple[int, int]:
    """(epochs, optimizer steps per epoch) of a training run on ``n_train`` images: the loaders
    drop the last partial batch only when there is more than one batch."""
    bs = int(cfg.batch_size)
    steps_per_epoch = max(n_train // bs if n_train > bs else math.ceil(n_train / bs), 1)
    epochs = int(cfg.epochs) if cfg.steps is None else math.ceil(int(cfg.steps) / steps_per_epoch)
    return max(epochs, math.ceil(cfg.min_steps / steps_per_epoch)), steps_per_epoch


def task_options(bundle: DataBundle, cfg: TrainConfig, device=None) -> dict:
    """What a task's loss, predictions and metrics need to know of the data and the run."""
    task = get_task(bundle.task)
    return {"kind": bundle.task, "num_classes": bundle.num_classes,
            "positive": 1 if bundle.positive_class is None else int(bundle.positive_class),
            "class_weighted": cfg.class_weighted, "seg_loss": cfg.seg_loss, "nsd_tolerance": cfg.nsd_tolerance,
            "seg_postprocess": cfg.seg_postprocess,
            "monitor": task.resolve_monitor(cfg.monitor), "device": device or "cpu", "prompt": cfg.prompt,
            "strategy": cfg.strategy}


class _TensorLoader:
    """Loader over cached activations with BatchLoader's seeded order and drop-last rule, so the
    cached path sees exactly the batches of the plain path."""

    def __init__(self, feats, labels, batch_size, shuffle=False, seed=0, drop_last=False):
        self.feats, self.labels, self.batch_size, self.shuffle, self.seed = feats, labels, batch_size, shuffle, seed
        self.drop_last = drop_last and len(labels) > batch_size
        self.epoch = 0
        self.device = feats.device
        # indexing returns NCHW: give a channels-last suffix the layout it runs fastest in
        self.channels_last = feats.dim() == 4 and feats.is_contiguous(memory_format=torch.channels_last) \
            and not feats.is_contiguous()

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.labels), generator=gen) if self.shuffle else torch.arange(len(self.labels))
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            feats = self.feats[idx]
            yield (feats.contiguous(memory_format=torch.channels_last) if self.channels_last else feats), self.labels[idx]


@torch.inference_mode()
def predict(model: nn.Module, loader, task, options: dict, amp_dtype=None) -> tuple[np.ndarray, float]:
    """The task's predictions (class probabilities, label maps) and the mean unweighted loss
    over a loader (model in eval mode)."""
    set_train_mode(model, False)
    outs, losses, n = [], 0.0, 0
    criterion = options["plain_loss"]
    for x, y in loader:
        with torch.autocast(loader.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = task.forward(model, x, y, options)
        logits = logits.float()
        losses += float(criterion(logits, y)) * len(y)
        n += len(y)
        outs.append(task.predictions(logits, options).cpu())
    return torch.cat(outs).numpy(), losses / max(n, 1)


def evaluate(model, loader, data: ImageSet, task, options: dict, amp_dtype=None) -> tuple[np.ndarray, dict]:
    """(predictions, metrics with the loss) of one split."""
    preds, loss = predict(model, loader, task, options, amp_dtype)
    return preds, {**task.scores(task.targets(data).numpy(), preds, options), "loss": loss}


def use_channels_last(model: nn.Module, cfg: TrainConfig, device: torch.device) -> bool:
    """NHWC activations: oneDNN (CPU) and cuDNN run a CNN's convolutions faster in it (~1.5x for
    EfficientNet-Lite0 on CPU); a ViT has one conv (patch embedding), so only on a GPU as before."""
    if cfg.channels_last != "auto":
        return cfg.channels_last == "on"
    from .backbones import backbone_family

    return device.type == "cuda" or backbone_family(model) == "cnn"


def make_loaders(bundle: DataBundle, mean, std, cfg: TrainConfig, device, augment, with_test: bool = True,
                 channels_last: bool | None = None):
    if channels_last is None:
        channels_last = device.type == "cuda"
    kw = dict(mean=mean, std=std, device=device, channels_last=channels_last,
              targets=get_task(bundle.task).targets)
    train = BatchLoader(bundle.train, cfg.batch_size, shuffle=True, augment=augment, seed=cfg.seed,
                        drop_last=True, **kw)
    val = BatchLoader(bundle.val, cfg.eval_batch_size, **kw)
    # without the test split (HPO trials) it is not even touched: the loader would copy its images
    test = BatchLoader(bundle.test, cfg.eval_batch_size, **kw) if with_test else None
    return train, val, test


@dataclass
class TrainingSetup:
    """The moving parts of one training run, built once by ``prepare_training``
    (``train_model`` loops ``train_epoch`` over it; benchmarks time ``train_epoch`` directly)."""

    model: nn.Module
    net: nn.Module  # what a step runs: the model, or the part after a cached frozen trunk
    step_net: nn.Module  # net, torch.compile'd with TrainConfig.compile
    train_loader: object
    val_loader: object
    test_loader: object | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: object
    params: list
    device: torch.device
    amp_dtype: object
    cache: CachePlan
    augment_name: str
    mix: MixConfig
    mix_gen: torch.Generator
    prompt_gen: torch.Generator  # box-prompt jitter (its own stream, like mixing)
    num_classes: int
    grad_clip: float | None
    bn_stats: str = "frozen"
    dann: object = None  # adapt.Dann: the domain classifier and target batches (adapt dann)
    cufit: object = None  # strategies.Cufit: CUFIT's probe and intermediate modules (strategy cufit)
    semi: object = None  # semi.FixMatch: the unlabelled batches (semi fixmatch)
    input_stats: tuple = ()  # (mean, std) of the backbone's normalisation
    task: object = None  # the Task: predictions and metrics
    options: dict = field(default_factory=dict)  # task_options(), with "plain_loss" (unweighted)
    epochs: int = 1  # cfg.epochs, raised to meet cfg.min_steps
    steps_per_epoch: int = 1
    domain_loss: float | None = None  # the last epoch's mean weighted domain loss (adapt dann)


def _cached_loader(plan: CachePlan, loader, images, amp_dtype, batch_size, **kw) -> "_TensorLoader":
    feats = extract(plan.split.prefix, loader, amp_dtype, key=memo_key(plan.split, images, loader, amp_dtype))
    return _TensorLoader(feats, loader.labels, batch_size, **kw)


def make_adamw(params, lr: float, weight_decay: float, device: torch.device, fused: bool = True):
    """AdamW over exactly ``params`` (frozen weights get neither gradients nor optimizer state);
    the fused kernel where torch has one for the device (CUDA, CPU), else the foreach one."""
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def prepare_training(model: nn.Module, bundle: DataBundle, mean, std, cfg: TrainConfig, lr: float,
                     with_test: bool = True, target: ImageSet | None = None,
                     curriculum: tuple | None = None) -> TrainingSetup:
    get_task(bundle.task).check_model(model, {"prompt": cfg.prompt, "mix": cfg.mix})  # before anything is moved or cached
    device = resolve_device(cfg.device)
    amp_dtype = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None
    model.to(device)
    channels_last = use_channels_last(model, cfg, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # one policy for every method (parity): the linear probe augments like the others unless
    # the user turns augmentation off, which is also what lets it cache features
    augment_name = cfg.augment if cfg.augment != "auto" else "light"
    augment = get_task(bundle.task).build_augment(augment_name, cfg.augment_strength)
    mix = MixConfig(mode=cfg.mix)
    train_loader, val_loader, test_loader = make_loaders(bundle, mean, std, cfg, device, augment,
                                                         with_test=with_test, channels_last=channels_last)
    stale = [f"augment={augment_name!r}"] * (augment is not None) + [f"mix={cfg.mix!r}"] * mix.active \
        + [f"prompt={cfg.prompt!r}"] * (cfg.prompt != "none") \
        + [f"adapt={cfg.adapt!r}"] * (cfg.adapt != "none") \
        + [f"strategy={cfg.strategy!r}"] * (cfg.strategy == "cufit") \
        + [f"semi={cfg.semi!r}"] * (cfg.semi == "fixmatch")  # the prompt enters after the trunk; DANN and CUFIT read it
    n_cached = len(bundle.train) + len(bundle.val) + (len(bundle.test) if with_test else 0)
    probe = train_loader.to_input(train_loader.images[:4])  # no generator: not augmented
    plan = plan_cache(model, cfg.cache_features, stale, probe, n_cached)
    _log.info("%s", plan.reason)

    net = model
    if plan.active:  # the frozen trunk/prefix runs once per split instead of once per epoch
        net = plan.split.suffix
        # extraction reads every training image once, in order (not the shuffled, drop-last loader)
        ordered = BatchLoader(bundle.train, cfg.eval_batch_size, mean, std, device=device,
                              channels_last=train_loader.channels_last, targets=get_task(bundle.task).targets)
        train_loader = _cached_loader(plan, ordered, bundle.train.images, amp_dtype, cfg.batch_size,
                                      shuffle=True, seed=cfg.seed, drop_last=True)
        val_loader = _cached_loader(plan, val_loader, bundle.val.images, amp_dtype, cfg.eval_batch_size)

    params = [p for p in model.parameters() if p.requires_grad]
    groups = params
    if cfg.head_lr is not None:  # the head / decoder in its own group (the schedule scales both alike)
        head = {id(p) for p in model.get_classifier().parameters()}
        groups = [{"params": [p for p in params if id(p) not in head]},
                  {"params": [p for p in params if id(p) in head], "lr": float(cfg.head_lr)}]
        groups = [group for group in groups if group["params"]]
    epochs, steps_per_epoch = plan_epochs(len(bundle.train), cfg)
    dann = None
    if cfg.adapt == "dann":
        if target is None:
            raise ConfigError("adapt dann: no target images were given to the trainer")
        from .adapt import Dann

        from .augment import build_augment

        # the images' own augmentation (no targets to move), from its own seeded stream
        target_loader = BatchLoader(target, cfg.batch_size, mean, std, device=device, shuffle=True,
                                    augment=build_augment(augment_name, cfg.augment_strength),
                                    seed=cfg.seed * 100_003 + 55_511, channels_last=train_loader.channels_last)
        dann = Dann(get_task(bundle.task).methods_target(model), target_loader, cfg.adapt_weight,
                    epochs * steps_per_epoch)
        groups = (groups if isinstance(groups[0], dict) else [{"params": groups}]) + [
            {"params": list(dann.parameters()), "lr": float(cfg.head_lr or lr)}]
    cufit = None
    if cfg.strategy == "cufit":
        if curriculum is None:
            raise ConfigError("strategy cufit: the trainer was given no probe / intermediate modules")
        from .methods import get_method
        from .strategies import Cufit

        cufit = Cufit(*(m.to(device) for m in curriculum))
        if channels_last:
            for module in cufit.modules():
                module.to(memory_format=torch.channels_last)
        groups = (groups if isinstance(groups[0], dict) else [{"params": groups}]) + [
            # A: a linear probe at the linear method's rate; B: the run's method at the run's rate
            {"params": [p for p in cufit.probe.parameters() if p.requires_grad],
             "lr": float(cfg.head_lr or get_method("linear").default_lr)},
            {"params": [p for p in cufit.intermediate.parameters() if p.requires_grad]}]
    semi = None
    if cfg.semi == "fixmatch":
        from .augment import build_augment
        from .semi import STRONG_AUGMENT, FixMatch, check_semi

        check_semi(cfg.semi, bundle.task, bundle.unlabelled)
        views = [BatchLoader(bundle.unlabelled, cfg.batch_size * int(cfg.semi_ratio), mean, std, device=device,
                             shuffle=True, augment=augment_view, seed=cfg.seed * 100_003 + 33_331, drop_last=True,
                             channels_last=train_loader.channels_last)
                 for augment_view in (build_augment("light", 1.0), build_augment(*STRONG_AUGMENT))]
        semi = FixMatch(*views, cfg.semi_threshold, cfg.semi_weight)
    optimizer = make_adamw(groups, lr, cfg.weight_decay, device, fused=cfg.fused_adamw)
    total_steps = epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    task = get_task(bundle.task)
    options = task_options(bundle, cfg, device)
    options["plain_loss"] = task.loss(bundle, {**options, "class_weighted": False, "strategy": "plain"})
    step_net = torch.compile(net) if cfg.compile else net
    return TrainingSetup(
        model=model, net=net, step_net=step_net, train_loader=train_loader, val_loader=val_loader,
        test_loader=test_loader, optimizer=optimizer, scheduler=scheduler,
        criterion=task.loss(bundle, options), params=params, task=task, options=options, device=device, amp_dtype=amp_dtype, cache=plan,
        augment_name=augment_name, mix=mix,
        mix_gen=torch.Generator().manual_seed(cfg.seed * 100_003 + 99_991),  # own stream: mixing on/off keeps the order
        prompt_gen=torch.Generator().manual_seed(cfg.seed * 100_003 + 77_773),
        num_classes=bundle.num_classes, grad_clip=cfg.grad_clip, epochs=epochs, steps_per_epoch=steps_per_epoch,
        bn_stats=cfg.bn_stats, dann=dann, cufit=cufit, semi=semi, input_stats=(mean, std),
    )


def train_epoch(setup: TrainingSetup, max_steps: int | None = None) -> float:
    """One pass over the training batches (at most ``max_steps``); returns the mean training loss.

    The loss is summed on the device and read once per epoch: no host sync per step.
    """
    s = setup
    set_train_mode(s.net, True, s.bn_stats)
    for module in (s.cufit.modules() if s.cufit is not None else []):
        set_train_mode(module, True, s.bn_stats)
    total = torch.zeros((), device=s.device)
    domain_total = torch.zeros((), device=s.device)
    count = 0
    for step, (x, y) in enumerate(s.train_loader):
        if max_steps is not None and step >= max_steps:
            break
        if s.mix.active:  # soft targets [B, K]; cross-entropy takes class probabilities
            x, y = mix_batch(x, y, s.num_classes, s.mix_gen, s.mix)
        with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            logits = s.task.forward(s.step_net, x, y, s.options, gen=s.prompt_gen)
        # CUFIT: the three modules' losses (C = the model, on the samples B agrees with)
        loss = s.cufit.loss(logits, x, y) if s.cufit is not None else s.criterion(logits.float(), y)
        if s.semi is not None:  # FixMatch: confident weak-view predictions supervise the strong view
            loss = loss + s.semi.loss(lambda u: s.task.forward(s.step_net, u, None, s.options))
        if s.dann is not None:  # the domain classifier on these features and a target batch's
            domain = s.dann.loss(len(y))
            loss = loss + domain
            domain_total += domain.detach() * len(y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
        s.optimizer.step()
        s.scheduler.step()
        total += loss.detach() * len(y)
        count += len(y)
    s.domain_loss = float(domain_total) / max(count, 1) if s.dann is not None else None
    return float(total) / max(count, 1)


def train_model(model: nn.Module, bundle: DataBundle, mean, std, cfg: TrainConfig, lr: float,
                progress=None, evaluate_test: bool = True, record_val_probs: bool = False,
                stop_epoch: int | None = None, target: ImageSet | None = None,
                curriculum: tuple | None = None) -> TrainResult:
    """Train in place and restore the best validation state.

    The test split is predicted exactly once, after training, by the best validation state
    (``result.test_probs``); nothing during training or selection reads it.
    ``progress(epoch, row)`` is called after every epoch (for progress bars / logs).
    ``evaluate_test=False`` (HPO trials) never reads the test split; ``test_probs`` stays None.
    ``record_val_probs``: keep every epoch's validation probabilities and never stop early (the
    folds of cross-validated selection). ``stop_epoch``: train the planned schedule up to this
    epoch with no validation at all and keep that state (the refit after cross-validation).
    ``target``: unlabelled target-domain images for ``adapt: dann``.
    """
    setup = prepare_training(model, bundle, mean, std, cfg, lr, with_test=evaluate_test, target=target,
                             curriculum=curriculum)
    try:
        result = _run_training(model, bundle, cfg, setup, progress, evaluate_test, record_val_probs, stop_epoch)
        if setup.cufit is not None:
            from .strategies import curriculum_record

            flipped = {i for split, i, *_ in (bundle.label_noise or {}).get("flipped", []) if split == "train"}
            noisy = torch.tensor([i in flipped for i in bundle.train.ids]) if bundle.label_noise else None
            ordered = BatchLoader(bundle.train, cfg.eval_batch_size, mean, std, device=setup.device,
                                  channels_last=setup.train_loader.channels_last)
            result.curriculum = curriculum_record(setup.cufit, ordered, noisy)
        return result
    finally:
        if setup.dann is not None:
            setup.dann.close()  # no hook is left on the model that is saved, merged or exported


def _run_training(model, bundle, cfg, setup, progress, evaluate_test, record_val_probs, stop_epoch) -> TrainResult:
    net, amp_dtype = setup.net, setup.amp_dtype
    result = TrainResult(feature_cache=setup.cache.active, feature_cache_note=setup.cache.reason,
                         augment=setup.augment_name, steps_per_epoch=setup.steps_per_epoch,
                         epochs_planned=setup.epochs)
    validate = stop_epoch is None
    monitor = setup.options["monitor"]
    last_epoch = setup.epochs if validate else min(int(stop_epoch), setup.epochs)

    best_score, best_state, stale = -math.inf, None, 0
    start = time.perf_counter()
    for epoch in range(1, last_epoch + 1):
        train_loss = train_epoch(setup)
        row = {"epoch": epoch, "epochs_total": setup.epochs, "step": epoch * setup.steps_per_epoch,
               "train_loss": train_loss, "lr": setup.optimizer.param_groups[0]["lr"]}
        if setup.domain_loss is not None:
            row["domain_loss"] = setup.domain_loss
        if setup.cufit is not None:  # the fraction of the epoch's samples stages B and C trained on
            row.update(setup.cufit.epoch_fractions())
        if setup.semi is not None:  # the fraction of unlabelled images confident enough to be pseudo-labelled
            row["pseudo_label_rate"] = setup.semi.epoch_rate()
        if validate:
            probs, val = evaluate(net, setup.val_loader, bundle.val, setup.task, setup.options, amp_dtype)
            if record_val_probs:
                result.epoch_val_probs.append(probs)
            score = setup.task.score(val, monitor)
            row["score"] = score
            if score > best_score:  # a real copy: later steps must not change the kept state
                best_score, stale, result.best_epoch = score, 0, epoch
                best_state = {k: v.detach().clone() for k, v in trained_state_dict(model).items()}
            else:
                stale += 1
            row.update({f"val_{k}": v for k, v in val.items()})
        row["seconds"] = time.perf_counter() - start
        result.history.append(row)
        if progress:
            progress(epoch, row)
        if validate and not record_val_probs and stale >= cfg.patience \
                and epoch * setup.steps_per_epoch >= cfg.min_steps:
            result.stopped_early = True
            break
        if cfg.max_minutes and (time.perf_counter() - start) > 60 * cfg.max_minutes:
            result.stopped_early = True
            break
    result.train_seconds = time.perf_counter() - start
    result.curve = [[row["step"], row["score"]] for row in result.history if "score" in row]
    if validate:
        # the monitored value itself (a loss or an HD95 as it is, not negated)
        result.best_val = best_score if setup.task.direction(monitor) == "max" else -best_score
        model.load_state_dict(best_state, strict=False)
        # Selection is over; the test split is read here, once, by the restored best state.
        result.val_probs = predict(net, setup.val_loader, setup.task, setup.options, amp_dtype)[0]
        result.best_is_last = result.best_epoch == len(result.history)
    else:
        result.best_epoch = len(result.history)
    if not evaluate_test:
        return result
    test_loader = setup.test_loader
    if setup.cache.active:
        test_loader = _cached_loader(setup.cache, test_loader, bundle.test.images, amp_dtype, cfg.eval_batch_size)
    result.test_probs = predict(net, test_loader, setup.task, setup.options, amp_dtype)[0]
    return result


def predict_images(model, images: ImageSet, mean, std, kind: str, num_classes: int, batch_size=128,
                   device="cpu", boxes: torch.Tensor | None = None) -> np.ndarray:
    """The task's predictions for images without targets (``medpeft predict``); ``boxes`` [N, 4] in
    pixels of the model input (NaN rows: no box) for a box-prompted segmenter."""
    task = get_task(kind)
    loader = BatchLoader(images, batch_size, mean, std, device=resolve_device(device), targets=lambda d: d.labels)
    model.to(loader.device)
    set_train_mode(model, False)
    options = {"kind": kind, "num_classes": num_classes, "prompt": "none" if boxes is None else "box"}
    task.check_model(model, options)
    outs = []
    with torch.inference_mode():
        for i, (x, _) in enumerate(loader):
            batch = options if boxes is None else {**options, "boxes": boxes[i * batch_size:(i + 1) * batch_size]}
            outs.append(task.predictions(task.forward(model, x, None, batch).float(), batch).cpu())
    return torch.cat(outs).numpy()
