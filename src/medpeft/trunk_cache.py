"""Frozen-trunk caching: run the frozen front of the network once per data set, not once per epoch.

When every trainable parameter sits after some point of the network, the activations at that
point are the same in every epoch (no augmentation: identical inputs; frozen weights: identical
function). They are computed once per split and training runs only the rest:

- ``features``: head-only training (linear probing). Cached: the pre-logit features; trained:
  the classifier.
- ``prefix``: the first blocks are frozen (``partial``: only the last k blocks train). Cached: the
  output of the frozen prefix (ViT: patch_embed/_pos_embed/norm_pre/blocks[:j]; EfficientNet-style
  CNN: conv_stem/bn1/blocks[:j]; ResNet: conv1..maxpool/layer1..j); trained: blocks[j:], the top
  norm/conv and the head.

``plan_cache`` decides and says why not when it cannot: augmentation (or anything else that changes
the inputs per epoch) makes a cache stale; a trainable parameter inside the prefix, a stochastic
prefix (dropout/drop-path in training mode) or a forward that does not follow the timm structure
(checked numerically on a probe batch) make the split wrong; a cache larger than the budget does
not fit. Activations are kept in the dtype the prefix produced them (bf16 under autocast), so the
suffix sees exactly what it would see in the plain path.

Within one process, caches are memoised by a fingerprint of the frozen weights and the images, so a
sweep over seeds/methods with the same frozen prefix extracts once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .methods import set_train_mode

_log = logging.getLogger(__name__)

# Budget for cached activations (train+val+test) and for the in-process memo, in bytes.
MAX_CACHE_BYTES = int(float(os.environ.get("MEDPEFT_FEATURE_CACHE_GB", "4")) * 2**30)


# --------------------------------------------------------------------------- splitting the network


def _trainable(module: nn.Module | nn.Parameter | None) -> bool:
    if module is None:
        return False
    if isinstance(module, nn.Parameter):
        return module.requires_grad
    return any(p.requires_grad for p in module.parameters())


class _Stage(nn.Module):
    """Base of the prefix/suffix views: holds the whole model (for train/eval modes and state)."""

    def __init__(self, model: nn.Module, split: int):
        super().__init__()
        self.model = model
        self.split = split


class VitPrefix(_Stage):
    def forward(self, x):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for i in range(self.split):
            x = m.blocks[i](x)
        return x


class VitSuffix(_Stage):
    def forward(self, x):
        m = self.model
        for i in range(self.split, len(m.blocks)):
            x = m.blocks[i](x)
        return m.forward_head(m.norm(x))


class EffNetPrefix(_Stage):
    def forward(self, x):
        m = self.model
        x = m.bn1(m.conv_stem(x))
        for i in range(self.split):
            x = m.blocks[i](x)
        return x


class EffNetSuffix(_Stage):
    def forward(self, x):
        m = self.model
        for i in range(self.split, len(m.blocks)):
            x = m.blocks[i](x)
        return m.forward_head(m.bn2(m.conv_head(x)))


_RESNET_STEM = ("conv1", "bn1", "act1", "maxpool")
_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class ResNetPrefix(_Stage):
    def forward(self, x):
        m = self.model
        for name in _RESNET_STEM:
            x = getattr(m, name)(x)
        for name in _RESNET_LAYERS[:self.split]:
            x = getattr(m, name)(x)
        return x


class ResNetSuffix(_Stage):
    def forward(self, x):
        m = self.model
        for name in _RESNET_LAYERS[self.split:]:
            x = getattr(m, name)(x)
        return m.forward_head(x)


class FeatureHead(nn.Module):
    """Stand-in model over cached pre-logit features: only the classifier runs per epoch."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)


class FeatureExtractor(nn.Module):
    """Everything before the classifier (the frozen trunk of head-only training)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@dataclass
class TrunkSplit:
    prefix: nn.Module
    suffix: nn.Module
    kind: str  # "features" | "prefix"
    frozen_units: int  # blocks/stages in the prefix
    total_units: int
    prefix_modules: list  # modules (and parameters) whose weights define the prefix (fingerprint)
    digest: str | None = None  # their fingerprint, computed once (the prefix is frozen)

    def describe(self) -> str:
        if self.kind == "features":
            return "frozen trunk cached (pre-logit features), head trained"
        return f"frozen prefix cached ({self.frozen_units}/{self.total_units} blocks), suffix trained"


def _leading_frozen(units: list[nn.Module]) -> int:
    j = 0
    while j < len(units) and not _trainable(units[j]):
        j += 1
    return j


def split_frozen_trunk(model: nn.Module) -> TrunkSplit | None:
    """The largest frozen prefix of a timm ViT / EfficientNet-style CNN / ResNet, or None.

    Head-only models give the ``features`` split. Structure only: ``plan_cache`` also checks it
    numerically before it is used.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and all(id(p) in head_ids for p in trainable) and hasattr(model, "forward_features"):
        frozen = [m for m in model.children() if m is not head]
        return TrunkSplit(FeatureExtractor(model), FeatureHead(head), "features", 0, 0,
                          frozen + [p for n, p in model.named_parameters(recurse=False)])
    if "forward_features" in vars(model) or "forward" in vars(model):  # a patched forward: unknown structure
        return None
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential):
        stem = [model.patch_embed, getattr(model, "norm_pre", None)]
        stem_params = [getattr(model, n, None) for n in ("cls_token", "reg_token", "pos_embed")]
        if any(_trainable(m) for m in stem + stem_params):
            return None
        units = list(blocks)
        j = _leading_frozen(units)
        prefix_cls, suffix_cls = VitPrefix, VitSuffix
        fingerprint = [m for m in stem if m is not None] + [p for p in stem_params if p is not None] + units[:j]
    elif all(hasattr(model, n) for n in ("conv_stem", "bn1", "conv_head", "bn2")) and isinstance(blocks, nn.Sequential):
        stem = [model.conv_stem, model.bn1]
        if any(_trainable(m) for m in stem):
            return None
        units = list(blocks)
        j = _leading_frozen(units)
        prefix_cls, suffix_cls = EffNetPrefix, EffNetSuffix
        fingerprint = stem + units[:j]
    elif all(isinstance(getattr(model, n, None), nn.Module) for n in _RESNET_STEM + _RESNET_LAYERS):
        stem = [getattr(model, n) for n in _RESNET_STEM]
        if any(_trainable(m) for m in stem):
            return None
        units = [getattr(model, n) for n in _RESNET_LAYERS]
        j = _leading_frozen(units)
        prefix_cls, suffix_cls = ResNetPrefix, ResNetSuffix
        fingerprint = stem + units[:j]
    else:
        return None
    if j == 0:
        return None
    return TrunkSplit(prefix_cls(model, j), suffix_cls(model, j), "prefix", j, len(units), fingerprint)


# --------------------------------------------------------------------------- deciding


@dataclass
class CachePlan:
    split: TrunkSplit | None
    reason: str  # why (not) cached, for the log and the run's metrics

    @property
    def active(self) -> bool:
        return self.split is not None


def _outputs_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def check_split(model: nn.Module, split: TrunkSplit, probe: torch.Tensor) -> str | None:
    """Numerical checks on a probe batch; a reason the split is unusable, or None."""
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[probe.device] if probe.device.type == "cuda" else []):
            set_train_mode(model, True)
            with torch.enable_grad():
                train_out = split.prefix(probe)
            if train_out.requires_grad:
                return "a trainable parameter acts inside the frozen prefix"
            with torch.no_grad():
                again = split.prefix(probe)
                set_train_mode(model, False)
                eval_out = split.prefix(probe)
                composed = split.suffix(eval_out)
                plain = model(probe)
        if not torch.equal(train_out, again):
            return "the frozen prefix is stochastic in training mode (dropout / drop-path)"
        if not _outputs_equal(train_out, eval_out):
            return "the frozen prefix computes differently in training and evaluation mode"
        if not _outputs_equal(composed, plain):
            return "the model's forward does not follow the timm structure the split assumes"
        return None
    finally:
        set_train_mode(model, was_training)


def plan_cache(model: nn.Module, mode: str, stale_reasons: list[str], probe: torch.Tensor,
               n_images: int) -> CachePlan:
    """Whether (and how) to cache. ``mode``: auto | on | off. ``stale_reasons``: what changes the
    inputs every epoch (augmentation, MixUp, ...). ``n_images``: images to cache (all splits)."""
    from .errors import ConfigError

    def refuse(reason: str) -> CachePlan:
        if mode == "on":
            raise ConfigError(f"cache_features=on but the frozen trunk cannot be cached: {reason}; "
                              "use cache_features=auto or off")
        return CachePlan(None, f"feature cache off: {reason}")

    if mode == "off":
        return CachePlan(None, "feature cache off (cache_features=off)")
    if stale_reasons:
        split = split_frozen_trunk(model)
        if split is None:
            return refuse("no frozen prefix to cache")
        return refuse(f"{' and '.join(stale_reasons)} change(s) the inputs every epoch, so cached "
                      f"activations would be stale")
    split = split_frozen_trunk(model)
    if split is None:
        return refuse("no frozen block before the first trainable parameter (or an unknown model structure)")
    problem = check_split(model, split, probe)
    if problem:
        return refuse(problem)
    with torch.no_grad():
        set_train_mode(model, False)
        one = split.prefix(probe[:1])
    need = one.element_size() * one.numel() * n_images
    if need > MAX_CACHE_BYTES:
        return refuse(f"the cache would take {need / 2**30:.1f} GiB, more than the "
                      f"{MAX_CACHE_BYTES / 2**30:.1f} GiB budget (MEDPEFT_FEATURE_CACHE_GB)")
    return CachePlan(split, split.describe())


# --------------------------------------------------------------------------- extracting (memoised)

_MEMO: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_MEMO_LOCK = threading.Lock()  # sweeps may train in threads
MEMO_STATS = {"hits": 0, "misses": 0}


def _digest_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.contiguous().cpu().numpy().tobytes())


def weights_fingerprint(items) -> str:
    """Digest of the parameters and buffers (BatchNorm statistics) of modules / parameters."""
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        if isinstance(item, nn.Module):  # the classes too: a patched block computes differently
            h.update(",".join(type(m).__name__ for m in item.modules()).encode())
        tensors = [item] if isinstance(item, torch.Tensor) else list(item.state_dict().values())
        for t in tensors:
            if isinstance(t, torch.Tensor):
                _digest_tensor(h, t)
    return h.hexdigest()


def images_fingerprint(images: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    _digest_tensor(h, images)
    return h.hexdigest()


def memo_clear() -> None:
    with _MEMO_LOCK:
        _MEMO.clear()


@torch.no_grad()
def extract(prefix: nn.Module, loader, amp_dtype=None, key: tuple | None = None) -> torch.Tensor:
    """Prefix activations of every image of ``loader`` in order (evaluation mode, no augmentation)."""
    if key is not None:
        with _MEMO_LOCK:
            if key in _MEMO:
                _MEMO.move_to_end(key)
                MEMO_STATS["hits"] += 1
                return _MEMO[key]
    set_train_mode(prefix, False)
    out = []
    for x, _ in loader:
        with torch.autocast(loader.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(prefix(x))
    feats = torch.cat(out)
    if key is not None:
        with _MEMO_LOCK:
            MEMO_STATS["misses"] += 1
            _MEMO[key] = feats
            total = sum(t.numel() * t.element_size() for t in _MEMO.values())
            while total > MAX_CACHE_BYTES and _MEMO:  # oldest first
                _, dropped = _MEMO.popitem(last=False)
                total -= dropped.numel() * dropped.element_size()
    return feats


def memo_key(split: TrunkSplit, images: torch.Tensor, loader, amp_dtype) -> tuple:
    """What the cached activations depend on: the frozen weights (and module classes), the split
    point, the images and how they are turned into inputs."""
    if split.digest is None:
        split.digest = weights_fingerprint(split.prefix_modules)
    return (split.kind, split.frozen_units, split.digest, images_fingerprint(images),
            tuple(loader.mean.flatten().tolist()), tuple(loader.std.flatten().tolist()), str(loader.device),
            str(amp_dtype), loader.channels_last)
