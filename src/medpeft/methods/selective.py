"""Selective methods: train a chosen subset of the existing weights (nothing is added,
so "merging" is a no-op and the saved state is a plain subset of the backbone's weights)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .base import NORM_TYPES, MethodConfig, register_method


def _family(model: nn.Module) -> str:
    from ..backbones import backbone_family

    return backbone_family(model)


def _train(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(True)


@register_method(
    "bitfit", ("cnn", "vit"), description="BitFit: every bias term (+ head)", default_lr=5e-3,
    search_space={},
    mergeable=True, identity_at_init=True, reference="Ben Zaken et al. 2022",
)
def apply_bitfit(model: nn.Module, cfg) -> None:
    for name, param in model.named_parameters():
        if name == "bias" or name.endswith(".bias"):
            param.requires_grad_(True)


# --------------------------------------------------------------------------- partial (last k blocks)


def cnn_stages(model: nn.Module) -> list[nn.Module]:
    """The stages of a timm CNN in forward order: ResNet layer1..4, EfficientNet/MobileNet
    ``blocks`` (one Sequential per stage), ConvNeXt/RegNet-like ``stages``."""
    layers = [getattr(model, f"layer{i}") for i in range(1, 5)
              if isinstance(getattr(model, f"layer{i}", None), nn.Module)]
    if layers:
        return layers
    for attr in ("blocks", "stages"):
        container = getattr(model, attr, None)
        if isinstance(container, nn.Module) and len(list(container.children())):
            return list(container.children())
    raise ConfigError(
        f"cannot find the stages of {type(model).__name__}: expected ResNet layer1..layer4, "
        "EfficientNet-style `blocks` or `stages`"
    )


# modules after the last stage that belong to the feature extractor (EfficientNet conv_head/bn2, ...)
_CNN_TOP_MODULES = ("conv_head", "bn2", "norm_pre", "final_conv")
_VIT_TOP_MODULES = ("norm", "fc_norm")


@dataclass
class PartialConfig(MethodConfig):
    k: int = 1  # number of last blocks (ViT) / stages (CNN) that are trained

    def __post_init__(self):
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1 (k=0 is linear probing: use method 'linear'), got {self.k}")


@register_method(
    "partial", ("cnn", "vit"), PartialConfig,
    search_space={'k': [1, 2, 4]},
    description="partial fine-tuning: the last k blocks (ViT) / stages (CNN), the top norm/conv and the head",
    default_lr=1e-4, mergeable=True, identity_at_init=True,
    reference="Yosinski et al. 2014",
)
def apply_partial(model: nn.Module, cfg: PartialConfig) -> None:
    k = int(cfg.k)
    if _family(model) == "vit":
        units, unit_name, top = list(model.blocks.children()), "blocks", _VIT_TOP_MODULES
    else:
        units, unit_name, top = cnn_stages(model), "stages", _CNN_TOP_MODULES
    if k > len(units):
        raise ConfigError(
            f"partial_k={k} exceeds the {len(units)} {unit_name} of this backbone; expected 1..{len(units)}"
        )
    for unit in units[-k:]:
        _train(unit)
    for name in top:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            _train(module)


# --------------------------------------------------------------------------- norm tuning


@register_method(
    "norm", ("cnn", "vit"),
    search_space={},
    description="norm tuning: affine weight/bias of every LayerNorm/BatchNorm/GroupNorm (+ head); "
                "trained BatchNorms also update and save their running statistics",
    default_lr=1e-3, mergeable=True, identity_at_init=True,
    reference="Basu et al. 2023",
)
def apply_norm(model: nn.Module, cfg) -> None:
    found = False
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
                found = True
    if not found:
        raise ConfigError(f"norm tuning: {type(model).__name__} has no normalisation layer with affine parameters")


# --------------------------------------------------------------------------- attention tuning


def vit_attention_modules(model: nn.Module) -> list[nn.Module]:
    attns = [block.attn for block in model.blocks.children() if isinstance(getattr(block, "attn", None), nn.Module)]
    if not attns:
        raise ConfigError(f"{type(model).__name__} has no transformer blocks with an `attn` module")
    return attns


@register_method(
    "attention", ("vit",),
    search_space={},
    description="attention tuning: every weight and bias of the self-attention layers "
                "(qkv and output projection) + head",
    default_lr=1e-4, mergeable=True, identity_at_init=True,
    reference="Touvron et al. 2022 (Three things everyone should know about ViTs)",
)
def apply_attention(model: nn.Module, cfg) -> None:
    for attn in vit_attention_modules(model):
        _train(attn)
