"""Reparameterisation methods beyond LoRA, through HF peft: DoRA, LoHa, LoKr, OFT, VeRA.

Each learns a change of the targeted weights that is zero (or the identity rotation) at
init, so the adapted model starts as the base model, and folds into the weights after
training (peft's ``merge``). Targets are named as for LoRA: ViT ``qkv`` (default; the
whole fused qkv, since the q/v-only layer is LoRA's own), ``attn``, ``mlp``, ``all``;
CNN ``pw`` (1x1 convs, default) or ``conv`` (every non-grouped conv: depthwise/grouped
convs are skipped, their low-rank factors would outgrow the kernel, peft #2202/#2549).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .base import MethodConfig, register_method
from .lora import (
    CNN_TARGETS,
    VIT_TARGETS,
    LoraConfig,
    apply_lora_layers,
    inject_peft,
    resolve_targets,
)

PEFT_VIT_TARGETS = tuple(t for t in VIT_TARGETS if t != "qv")


def _family(model: nn.Module) -> str:
    from ..backbones import backbone_family

    return backbone_family(model)


def _auto_targets(model: nn.Module, targets: str, method: str) -> str:
    if targets == "auto":
        return "qkv" if _family(model) == "vit" else "pw"
    if targets == "qv":
        raise ConfigError(
            f"{method} on the q/v slices of a fused qkv is not supported (only LoRA has a q/v-only layer); "
            f"use --{method.lower()}-targets qkv, attn, mlp or all"
        )
    return targets


def _check_targets_value(targets: str) -> None:
    if targets not in ("auto",) + PEFT_VIT_TARGETS + CNN_TARGETS:
        raise ValueError(f"targets {targets!r} not one of auto, {', '.join(PEFT_VIT_TARGETS + CNN_TARGETS)}")


def _target_names(model: nn.Module, targets: str, method: str, rank: int | None = None) -> list[str]:
    _, names = resolve_targets(model, _auto_targets(model, targets, method), method)
    if rank is not None:
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d) and rank > min(module.in_channels, module.out_channels):
                raise ConfigError(
                    f"{method} rank {rank} exceeds the channels of conv {name!r} "
                    f"({module.in_channels}->{module.out_channels}); use a smaller --{method.lower()}-rank"
                )
    return names


# --------------------------------------------------------------------------- DoRA


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's options; targets auto = qkv (ViT) / pw (CNN)."""

    def __post_init__(self):
        super().__post_init__()
        if self.targets == "qv":
            raise ValueError("targets 'qv' is LoRA-only (fused q/v layer); use qkv, attn, mlp or all")


@register_method(
    "dora", ("cnn", "vit"), DoraConfig,
    search_space={'rank': [4, 8, 16], 'alpha': [8.0, 16.0, 32.0]},
    description="DoRA: weight = magnitude * direction, LoRA on the direction (peft use_dora); mergeable",
    default_lr=1e-3, mergeable=True, identity_at_init=True, reference="Liu et al. 2024 (DoRA)",
)
def apply_dora(model: nn.Module, cfg: DoraConfig) -> None:
    from .scaling import attached_hooks

    targets = _auto_targets(model, cfg.targets, "DoRA")
    for name in resolve_targets(model, targets, "DoRA")[1]:
        hooked = attached_hooks(model.get_submodule(name))
        if hooked:
            # peft's DoRA reads the raw weight for its norm: a hooked output would not merge back
            raise ConfigError(
                f"DoRA on {name!r}: {hooked[0].prefix} (applied before DoRA) already acts on this layer; "
                f"list DoRA first, e.g. 'dora+{hooked[0].prefix}'"
            )
    apply_lora_layers(model, dataclasses.replace(cfg, targets=targets), use_dora=True)


# --------------------------------------------------------------------------- LoHa / LoKr


@dataclass
class LycorisConfig(MethodConfig):
    rank: int = 8
    alpha: float = 8.0  # scale = alpha / rank (peft default alpha = rank)
    targets: str = "auto"

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        _check_targets_value(self.targets)


@register_method(
    "loha", ("cnn", "vit"), LycorisConfig,
    search_space={'rank': [4, 8, 16]},
    description="LoHa: weight change = Hadamard product of two low-rank products (peft); mergeable",
    default_lr=1e-3, mergeable=True, identity_at_init=True,
    reference="Hyeon-Woo et al. 2022 (FedPara); peft LoHa",
)
def apply_loha(model: nn.Module, cfg: LycorisConfig) -> None:
    import peft

    names = _target_names(model, cfg.targets, "LoHa", int(cfg.rank))
    inject_peft(model, peft.LoHaConfig(r=int(cfg.rank), alpha=float(cfg.alpha), target_modules=names))


@register_method(
    "lokr", ("cnn", "vit"), LycorisConfig,
    search_space={'rank': [4, 8, 16]},
    description="LoKr: weight change = Kronecker product of a small and a low-rank factor (peft); mergeable",
    default_lr=1e-3, mergeable=True, identity_at_init=True,
    reference="Yeh et al. 2024 (LyCORIS); peft LoKr",
)
def apply_lokr(model: nn.Module, cfg: LycorisConfig) -> None:
    import peft

    names = _target_names(model, cfg.targets, "LoKr", int(cfg.rank))
    inject_peft(model, peft.LoKrConfig(r=int(cfg.rank), alpha=float(cfg.alpha), target_modules=names))


# --------------------------------------------------------------------------- OFT


@dataclass
class OftConfig(MethodConfig):
    block_size: int = 8  # size of the orthogonal blocks; must divide every target's input size (x k*k for convs)
    targets: str = "auto"

    def __post_init__(self):
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        _check_targets_value(self.targets)


@register_method(
    "oft", ("cnn", "vit"), OftConfig,
    search_space={'block_size': [4, 8, 16]},
    description="OFT: block-diagonal orthogonal rotation of the weights (Cayley, identity at init; peft); mergeable",
    default_lr=1e-3, mergeable=True, identity_at_init=True,
    reference="Qiu et al. 2023 (OFT); peft OFT",
)
def apply_oft(model: nn.Module, cfg: OftConfig) -> None:
    import peft

    names = _target_names(model, cfg.targets, "OFT")
    block = int(cfg.block_size)
    for name in names:
        module = model.get_submodule(name)
        size = module.in_features if isinstance(module, nn.Linear) else (
            module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        if size % block:
            raise ConfigError(f"OFT block_size {block} does not divide the input size {size} of {name!r}; "
                              f"choose a --oft-block-size that divides it")
    inject_peft(model, peft.OFTConfig(r=0, oft_block_size=block, target_modules=names, module_dropout=0.0))


# --------------------------------------------------------------------------- VeRA


@dataclass
class VeraConfig(MethodConfig):
    rank: int = 256  # size of the shared frozen random projections (the paper's r)
    d_initial: float = 0.1  # init of the trainable scaling vector d (b starts at 0)
    targets: str = "qkv"  # ViT only: qkv, attn, mlp, all
    seed: int = 0  # PRNG key of the shared projections (same key -> same projections when reloading)

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.targets not in PEFT_VIT_TARGETS:
            raise ValueError(f"targets {self.targets!r} not one of {', '.join(PEFT_VIT_TARGETS)}")


@register_method(
    "vera", ("vit",), VeraConfig,
    search_space={'rank': [64, 256]},
    description="VeRA: frozen shared random low-rank projections, trained scaling vectors "
                "b (init 0) and d (peft); mergeable",
    default_lr=1e-2, mergeable=True, identity_at_init=True,
    reference="Kopiczko et al. 2024 (VeRA)",
)
def apply_vera(model: nn.Module, cfg: VeraConfig) -> None:
    import peft
    from peft.tuners.vera import VeraModel

    names = _target_names(model, cfg.targets, "VeRA")
    with warnings.catch_warnings():
        # the projections are not saved on purpose: they are regenerated from `seed` (CPU generator)
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
        config = peft.VeraConfig(r=int(cfg.rank), d_initial=float(cfg.d_initial), target_modules=names,
                                 projection_prng_key=int(cfg.seed), save_projection=False)
        inject_peft(model, config, tuner_cls=VeraModel)
