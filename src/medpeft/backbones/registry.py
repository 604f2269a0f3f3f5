"""Backbone registry: build a timm model with a fresh head and the best weights available.

Weights are resolved in this order (the winner is recorded in ``BackboneInfo.weights_source``):

1. ``weights=FILE``: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` checkpoint ("file:<path>").
2. timm's hub weights, only when online ("hub"); a failed download falls through.
3. the offline providers for ``efficientnet_lite0``, ``dinov2_vits14`` and ``litemedsam`` ("offline:<package>").
4. nothing else: ``pretrained=False`` gives random init ("random"); asking for pretrained weights
   that no source can give is a ConfigError (a silently random backbone would spoil a comparison).

The head is always a fresh ``num_classes`` head, except with ``keep_head=True``, which loads the
checkpoint's classifier as well (it must have ``num_classes`` outputs), e.g. to check ImageNet
predictions or to reload a fine-tuned checkpoint of the same task.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from medpeft.backbones import offline
from medpeft.errors import ConfigError, unknown_name

_log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CNN_MIN_SIZE = 32  # five stride-2 stages need at least this many pixels
# Below these grids a backbone sees too little spatial detail to be worth pretraining: a ViT with
# 2x2 tokens, or a CNN whose last stage is a single pixel, is mostly padding and position bias.
VIT_MIN_TOKENS = 8  # per side: 8x8 patch tokens
CNN_MIN_MAP = 2  # per side: 2x2 final feature map


@dataclass
class BackboneInfo:
    name: str  # registry name, e.g. "efficientnet_lite0"
    timm_name: str  # e.g. "tf_efficientnet_lite0"
    family: str  # "cnn" or "vit"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int  # e.g. 224
    patch_size: int | None  # ViT patch size (image size must be a multiple), None for CNNs
    min_size: int  # smallest accepted image size
    weights_source: str = "random"  # "file:<path>", "hub", "offline:<package>", "random"
    weights_sha256: str | None = None
    # total stride of the final feature map: the patch size for a ViT, 32 for EfficientNet/ResNet
    # (timm's feature_info[-1]["reduction"]); None: unknown (no resolution warning for a CNN)
    reduction: int | None = None

    def grid(self, image_size: int) -> int | None:
        """Tokens (ViT) or final feature-map pixels (CNN) per side at ``image_size``; None if unknown.

        Stride-2 convolutions and pools with "same"-style padding give ceil(size / stride) per stage,
        so ceil(size / reduction) overall; a ViT's patch embedding drops a partial patch.
        """
        stride = self.reduction or self.patch_size
        if not stride:
            return None
        return image_size // stride if self.family == "vit" else -(-image_size // stride)


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int
    patch_size: int | None = None
    min_size: int = CNN_MIN_SIZE
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    builder: Callable[..., nn.Module] | None = None  # instead of timm.create_model(timm_name)
    random_only: bool = False  # test backbones: never pretrained
    reduction: int | None = None  # CNN total stride (a test checks it against timm's feature_info)
    # a foundation model's own segmentation decoder: segmenter(num_classes, image_size, pretrained, in_chans)
    # -> a module with ``encoder`` and ``decode(embedding, boxes, size)`` (LiteMedSAM: SAM's mask decoder)
    segmenter: Callable[..., nn.Module] | None = None

    def info(self, name: str) -> BackboneInfo:
        return BackboneInfo(name, self.timm_name, self.family, self.mean, self.std, self.native_size,
                            self.patch_size, self.min_size, reduction=self.reduction or self.patch_size)


def _build_tiny_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "dynamic_img_size": True, **kwargs}
    model = VisionTransformer(**kwargs)
    model.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 32, 32),
                            "classifier": "head", "first_conv": "patch_embed.proj", "num_classes": 0}
    return model


def _build_tiny_cnn(**kwargs) -> nn.Module:
    """An EfficientNet-style CNN (BatchNorm, depthwise convs, 4 blocks in 3 stages), ~10k params."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e3_c16"], ["ir_r1_k3_s2_e3_c24"]]
    kwargs.pop("img_size", None)
    model = EfficientNet(block_args=decode_arch_def(arch), stem_size=8, num_features=64, **kwargs)
    model.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 32, 32),
                            "classifier": "classifier", "first_conv": "conv_stem", "num_classes": 0}
    return model


def _build_litemedsam(**kwargs) -> nn.Module:
    from medpeft.backbones.litemedsam import build_litemedsam_encoder

    return build_litemedsam_encoder(**kwargs)


def _litemedsam_segmenter(num_classes: int, image_size: int, pretrained: bool, in_chans: int) -> nn.Module:
    from medpeft.backbones.litemedsam import create_litemedsam_segmenter

    return create_litemedsam_segmenter(num_classes=num_classes, image_size=image_size, pretrained=pretrained,
                                       in_chans=in_chans)


REGISTRY: dict[str, BackboneSpec] = {
    # offline default CNN (ImageNet-1k supervised); offline default ViT (DINOv2-derived ViT-S/14)
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "cnn", HALF, HALF, 224, reduction=32),
    # native 224: DINOv2 trained mostly at 224 (518 only at the end); any multiple of 14 works
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2", "vit", IMAGENET_MEAN, IMAGENET_STD, 224,
                                  patch_size=14, min_size=14),
    # offline medical foundation encoder: LiteMedSAM's TinyViT + SAM neck (256x64x64 embedding at its native
    # 256 px, stride 4); pixels / 255 without mean/std, as LiteMedSAM was trained
    "litemedsam": BackboneSpec("litemedsam_tinyvit", "cnn", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 256,
                               builder=_build_litemedsam, reduction=4, segmenter=_litemedsam_segmenter),
    # online (hub) or --weights only
    "resnet18": BackboneSpec("resnet18", "cnn", IMAGENET_MEAN, IMAGENET_STD, 224, reduction=32),
    "resnet50": BackboneSpec("resnet50", "cnn", IMAGENET_MEAN, IMAGENET_STD, 224, reduction=32),
    "vit_base_patch16_224": BackboneSpec("vit_base_patch16_224", "vit", HALF, HALF, 224, patch_size=16, min_size=16),
    "vit_small_patch16_224": BackboneSpec("vit_small_patch16_224", "vit", HALF, HALF, 224, patch_size=16, min_size=16),
    # tiny random-weight backbones for fast tests of everything built on top
    "tiny_vit": BackboneSpec("VisionTransformer", "vit", IMAGENET_MEAN, IMAGENET_STD, 32, patch_size=4,
                             min_size=8, builder=_build_tiny_vit, random_only=True),
    "tiny_cnn": BackboneSpec("EfficientNet", "cnn", IMAGENET_MEAN, IMAGENET_STD, 32,
                             builder=_build_tiny_cnn, random_only=True, reduction=8),
}


def list_backbones() -> list[str]:
    return list(REGISTRY)


def backbone_family(model: nn.Module) -> str:
    """"vit" for timm VisionTransformer-like models (``.patch_embed`` and ``.blocks`` with ``.attn``), else "cnn"."""
    if hasattr(model, "get_base_model"):  # a peft wrapper
        model = model.get_base_model()
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "patch_embed") and isinstance(blocks, nn.Module):
        if any(hasattr(block, "attn") for block in blocks.children()):
            return "vit"
    return "cnn"


DEFAULT_IMAGE_SIZE = 64  # CPU-friendly floor; 28 px MedMNIST upsampled about 2x


def backbone_info(name: str) -> BackboneInfo:
    """The backbone's family, sizes and normalisation without building it (checks the name)."""
    return _resolve_spec(name).info(name)


def _smallest_adequate_size(info: BackboneInfo) -> int | None:
    """Smallest image size reaching the grid threshold (8x8 tokens / 2x2 map of whole cells)."""
    stride = info.reduction or info.patch_size
    if not stride:
        return None
    return stride * (VIT_MIN_TOKENS if info.family == "vit" else CNN_MIN_MAP)


def default_image_size(name: str, preferred: int | None = None) -> int:
    """The image size used when none is given, per backbone.

    Without ``preferred``: the smallest size that is at least ``DEFAULT_IMAGE_SIZE`` (64) and gives
    the backbone an adequate grid (``resolution_warning`` stays silent): a ViT gets the smallest
    multiple of its patch size with >= 8x8 tokens (112 for dinov2_vits14, 128 for patch-16 ViTs);
    a CNN with total stride 32 keeps 64 px (a 2x2 final map). With ``preferred``: that size, lowered
    to a multiple of a ViT's patch size (the old rule). Explicit sizes are checked, never changed.
    """
    info = backbone_info(name)
    if preferred is None:
        return _default_size(info)
    size = preferred // info.patch_size * info.patch_size if info.patch_size else preferred
    return max(size, info.min_size)


def _default_size(info: BackboneInfo) -> int:
    size = max(DEFAULT_IMAGE_SIZE, _smallest_adequate_size(info) or 0)
    if info.patch_size:  # round up onto the patch grid
        size = -(-size // info.patch_size) * info.patch_size
    return max(size, info.min_size)


def resolution_warning(info: BackboneInfo, image_size: int) -> str | None:
    """A message when ``image_size`` gives backbone ``info`` too coarse a grid, else None.

    Too coarse: a ViT with fewer than 8x8 patch tokens, or a CNN whose final feature map is below
    2x2. The size itself is still allowed (``check_image_size`` decides that); this is advice, e.g.
    for ``warnings.warn`` before training. None also when the backbone's stride is unknown.
    """
    grid = info.grid(image_size)
    if grid is None:
        return None
    if info.family == "vit":
        if grid >= VIT_MIN_TOKENS:
            return None
        what = f"{grid}x{grid} patch tokens (patch size {info.patch_size}; fewer than {VIT_MIN_TOKENS}x{VIT_MIN_TOKENS})"
        reach = f"{VIT_MIN_TOKENS}x{VIT_MIN_TOKENS} tokens"
    else:
        if grid >= CNN_MIN_MAP:
            return None
        what = f"a {grid}x{grid} final feature map (total stride {info.reduction}; below {CNN_MIN_MAP}x{CNN_MIN_MAP})"
        reach = f"a {CNN_MIN_MAP}x{CNN_MIN_MAP} map of whole {info.reduction}-px cells"
    return (f"image size {image_size} px gives {info.name} only {what}: too little spatial detail, so scores "
            f"likely understate the backbone. {_smallest_adequate_size(info)} px is the smallest size giving {reach} "
            f"(the default image size for {info.name} is {_default_size(info)} px)")


# the largest input size accepted: every image is held in memory at this size (2048 px RGB: 12 MB
# each), and no backbone here was trained above 1024 px; larger sizes only exhaust memory
MAX_IMAGE_SIZE = 2048


def check_image_size(info: BackboneInfo, image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image size {image_size!r} for {info.name}: expected a positive integer")
    if image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"image size {image_size} is too large: expected at most {MAX_IMAGE_SIZE} px (every image "
                          f"is kept in memory at that size; {info.name}'s native size is {info.native_size} px)")
    if image_size < info.min_size:
        raise ConfigError(f"image size {image_size} is too small for {info.name}: expected >= {info.min_size}")
    if info.patch_size and image_size % info.patch_size:
        p = info.patch_size
        lower, upper = max(image_size // p * p, info.min_size), (image_size // p + 1) * p
        raise ConfigError(f"image size {image_size} does not fit {info.name}: expected a multiple of its "
                          f"patch size {p} (e.g. {lower} or {upper})")


# --------------------------------------------------------------------------- online check

_ONLINE: bool | None = None
_TRUE = {"1", "true", "yes", "on"}


def is_online() -> bool:
    """False when MEDPEFT_OFFLINE/HF_HUB_OFFLINE is set, else whether huggingface.co:443 answers (cached)."""
    global _ONLINE
    if os.environ.get("MEDPEFT_OFFLINE", "").lower() in _TRUE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    if _ONLINE is None:
        _ONLINE = _can_connect("huggingface.co", 443, 1.5)
    return _ONLINE


def _can_connect(host: str, port: int, timeout: float) -> bool:
    # in a thread, so a hanging DNS lookup cannot exceed the timeout either
    answered = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


# --------------------------------------------------------------------------- building

def backbone_segmenter(name: str) -> Callable[..., nn.Module] | None:
    """The backbone's own segmentation decoder factory (see ``BackboneSpec.segmenter``), or None."""
    spec = REGISTRY.get(name)
    return None if spec is None else spec.segmenter


def _resolve_spec(name: str) -> BackboneSpec:
    if not isinstance(name, str) or not name:
        raise unknown_name("backbone", repr(name), REGISTRY)
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if not timm.is_model(name):
        raise unknown_name("backbone", name, REGISTRY)
    # any other timm model: look at a weightless (meta) copy for family, patch size, mean/std
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False)
    except Exception:  # a constructor that needs real tensors
        probe = timm.create_model(name, pretrained=False)
    cfg = getattr(probe, "pretrained_cfg", {}) or {}
    family = backbone_family(probe)
    patch = None
    if family == "vit":
        patch_size = getattr(probe.patch_embed, "patch_size", None)
        patch = int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size) if patch_size else None
    return BackboneSpec(
        name, family, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
        int(cfg.get("input_size", (3, 224, 224))[-1]), patch_size=patch,
        min_size=(patch or 1) if family == "vit" else CNN_MIN_SIZE, reduction=_final_reduction(probe))


def _final_reduction(model: nn.Module) -> int | None:
    """Total stride of the model's last feature map from timm's feature_info, if it has one."""
    try:
        return int(model.feature_info[-1]["reduction"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _build(name: str, spec: BackboneSpec, num_classes: int, image_size: int, in_chans: int,
           pretrained: bool, timm_kwargs: dict) -> nn.Module:
    import timm

    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **spec.timm_kwargs}
    if spec.family == "vit":
        if name in REGISTRY:  # ours accept any multiple of the patch size at run time
            kwargs.update(img_size=image_size, dynamic_img_size=True)
        elif image_size != spec.native_size:
            kwargs["img_size"] = image_size
    kwargs.update(timm_kwargs)
    if spec.builder is not None:
        return spec.builder(**kwargs)
    return timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)


def _head_prefixes(model: nn.Module) -> set[str]:
    """Module names of the classifier (found by identity with get_classifier(), plus timm's cfg)."""
    prefixes = set()
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        prefixes |= {n for n, m in model.named_modules() if m is classifier and n}
    cfg_classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if cfg_classifier:
        prefixes |= {cfg_classifier} if isinstance(cfg_classifier, str) else set(cfg_classifier)
    return prefixes


def _is_head_key(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _fit_to_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resample a ViT pos_embed to the model's grid and adapt the first conv to in_chans."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    own = model.state_dict()
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape and hasattr(model, "patch_embed"):
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first_conv}.weight" if first_conv else None
    if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
        state[key] = adapt_input_conv(own[key].shape[1], state[key])
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str, keep_head: bool,
                assign: bool = False) -> None:
    """Strict load, except the head: dropped (fresh) unless keep_head, then it must fit too."""
    heads = _head_prefixes(model)
    if not keep_head:
        state = {k: v for k, v in state.items() if not _is_head_key(k, heads)}
    state = _fit_to_model(model, state)
    own = model.state_dict()
    missing = [k for k in own if k not in state and (keep_head or not _is_head_key(k, heads))]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
        hint = " (keep_head=True needs a classifier with num_classes outputs)" if keep_head and any(
            _is_head_key(k.split(" ")[0], heads) for k in missing + wrong) else ""
        raise ConfigError(f"weights {origin} do not fit {model.__class__.__name__}: "
                          f"{'; '.join(problems)}{hint}")
    model.load_state_dict(state, strict=False, assign=assign)


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _model_with_weights(build: Callable[[], nn.Module], state: dict[str, torch.Tensor], origin: str,
                        keep_head: bool, num_classes: int) -> nn.Module:
    """A model holding ``state`` (head fresh unless keep_head).

    The skeleton is built on the meta device and the weights are assigned, which skips the random
    init that would be overwritten anyway (seconds for a ViT on CPU). Anything left on meta (a
    buffer made at init, an unusual head) falls back to the ordinary build-then-copy.
    """
    try:
        with torch.device("meta"):
            skeleton = build()
    except Exception:  # a constructor that needs real tensors
        skeleton = None
    if skeleton is not None:
        _load_state(skeleton, state, origin, keep_head, assign=True)
        if not keep_head:
            skeleton.reset_classifier(num_classes)
        if not _has_meta_tensors(skeleton):
            return skeleton
    model = build()
    _load_state(model, state, origin, keep_head)
    if not keep_head:
        model.reset_classifier(num_classes)
    return model


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors/.pth/.pt/.bin file (nested "state_dict"/"model" accepted)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found: expected an existing .safetensors or .pth/.pt/.bin file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, weights_only=True, map_location="cpu")
        else:
            raise ConfigError(f"weights file {path}: unknown type {suffix!r}; expected .safetensors, .pth, .pt or .bin")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"weights file {path} could not be read ({type(exc).__name__}: {exc}); "
                          f"expected a state dict saved with safetensors or torch.save") from exc
    for nest in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(nest), dict):
            state = state[nest]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} holds no state dict: expected a mapping of names to tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def create_backbone(name: str, num_classes: int, image_size: int, weights: str | None = None,
                    pretrained: bool = True, in_chans: int = 3, *, keep_head: bool = False,
                    **timm_kwargs) -> tuple[nn.Module, BackboneInfo]:
    """Build backbone ``name`` with a fresh ``num_classes`` head for ``image_size`` px inputs.

    ``keep_head=True`` keeps the checkpoint's classifier instead of a fresh one (it must have
    ``num_classes`` outputs). Extra keyword arguments go to the timm constructor.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes {num_classes!r}: expected an integer >= 0")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"in_chans {in_chans!r}: expected an integer >= 1")
    spec = _resolve_spec(name)
    info = spec.info(name)
    check_image_size(info, image_size)

    def build(hub: bool = False) -> nn.Module:
        return _build(name, spec, num_classes, image_size, in_chans, hub, timm_kwargs)

    if weights is not None:
        path = Path(weights).expanduser()
        model = _model_with_weights(build, read_weights_file(path), str(path), keep_head, num_classes)
        info.weights_source, info.weights_sha256 = f"file:{path}", offline.sha256_file(path)
    elif spec.random_only or not pretrained:
        if keep_head:
            raise ConfigError(f"keep_head=True for {name} needs pretrained weights (got random init)")
        model = build()
        model.reset_classifier(num_classes)
    else:
        model = _pretrained(name, spec, info, build, num_classes, keep_head)
    return model, info


def _pretrained(name: str, spec: BackboneSpec, info: BackboneInfo, build: Callable[..., nn.Module],
                num_classes: int, keep_head: bool) -> nn.Module:
    tried = []
    if spec.builder is not None:  # not a timm hub model: its builder has no hub weights to give
        tried.append("no hub weights for this backbone")
    elif is_online():
        try:
            model = build(hub=True)
            hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
            if keep_head and hub_classes != num_classes:
                raise ConfigError(f"keep_head=True: the hub weights of {name} have {hub_classes} classes, "
                                  f"not num_classes={num_classes}")
            info.weights_source = "hub"
            if not keep_head:
                model.reset_classifier(num_classes)  # fresh even when num_classes matches the hub head
            return model
        except ConfigError:
            raise
        except Exception as exc:  # no network after all, missing hub entry, ...: try the next source
            _log.warning("hub weights for %s unavailable (%s: %s)", name, type(exc).__name__, exc)
            tried.append("hub download failed")
    else:
        tried.append("offline (MEDPEFT_OFFLINE/HF_HUB_OFFLINE set or huggingface.co unreachable)")
    if offline.has_offline_weights(name):
        loaded = offline.load_offline_weights(name)
        origin = f"{loaded.source_path} (converted: {loaded.cache_path})"
        model = _model_with_weights(build, loaded.state_dict, origin, keep_head, num_classes)
        info.weights_source = f"offline:{loaded.provider.pip_name.split('==')[0]}"
        info.weights_sha256 = loaded.provider.source_sha256
        return model
    offline_names = ", ".join(sorted(offline.PROVIDERS))
    raise ConfigError(f"no pretrained weights for backbone {name!r}: {'; '.join(tried)}. Pass --weights FILE "
                      f"(.safetensors/.pth), use internet access, pick an offline backbone ({offline_names}), "
                      f"or set pretrained=False for random init")
