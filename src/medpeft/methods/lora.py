"""LoRA (Hu et al. 2022): W + (alpha/r) * B A with B zero-initialised, so training starts
at the pretrained model; mergeable into W after training.

Where HF peft supports the layer (nn.Linear, non-grouped nn.Conv2d) it is used directly.
timm ViTs fuse q, k and v into one ``qkv`` Linear (peft #691): LoRA on the q and v slices
only (the MED-PEFT recipe) needs its own layer, ``FusedQKVLoRA``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import MethodConfig, register_method

VIT_TARGETS = ("qv", "qkv", "attn", "mlp", "all")
CNN_TARGETS = ("pw", "conv")


@dataclass
class LoraConfig(MethodConfig):
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    # ViT: qv (q and v slices of the fused qkv), qkv, attn (qkv+proj), mlp (fc1+fc2), all.
    # CNN: pw (1x1 convs), conv (every non-grouped conv). auto: qv on ViTs, pw on CNNs.
    targets: str = "auto"

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= float(self.dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.targets not in ("auto",) + VIT_TARGETS + CNN_TARGETS:
            raise ValueError(f"targets {self.targets!r} not one of auto, {', '.join(VIT_TARGETS + CNN_TARGETS)}")


class FusedQKVLoRA(nn.Module):
    """LoRA on chosen slices (q, k, v) of a fused ``qkv`` Linear; other slices untouched."""

    def __init__(self, base: nn.Linear, slots: str, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.out_features % 3:
            raise ConfigError(f"fused qkv layer has {base.out_features} outputs, expected a multiple of 3")
        self.base = base
        self.slots = slots  # e.g. "qv"
        self.dim = base.out_features // 3
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.merged = False
        for slot in slots:
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # same init as peft / the LoRA paper code
            self.lora_A[slot] = nn.Parameter(a)
            self.lora_B[slot] = nn.Parameter(torch.zeros(self.dim, rank))

    @property
    def weight(self):  # timm code sometimes reads qkv.weight (dtype/device checks)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def _delta(self, x: torch.Tensor, slot: str) -> torch.Tensor:
        return (x @ self.lora_A[slot].t()) @ self.lora_B[slot].t() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        xd = self.dropout(x)
        parts = []
        for i, slot in enumerate("qkv"):
            chunk = out[..., i * self.dim:(i + 1) * self.dim]
            parts.append(chunk + self._delta(xd, slot) if slot in self.slots else chunk)
        return torch.cat(parts, dim=-1)

    # the tuner-layer protocol of the merge walk (peft's names)
    def get_base_layer(self) -> nn.Linear:
        return self.base

    def get_delta_weight(self) -> torch.Tensor:
        """The change of the fused weight, (3 * dim, in): B A * scale on the adapted slices, 0 elsewhere."""
        parts = [(self.lora_B[slot] @ self.lora_A[slot]) * self.scale if slot in self.slots
                 else self.base.weight.new_zeros(self.dim, self.base.in_features) for slot in "qkv"]
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.get_delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.get_delta_weight().to(self.base.weight.dtype)
            self.merged = False


def resolve_targets(model: nn.Module, targets: str, method: str = "LoRA") -> tuple[str, list[str]]:
    """Which module names LoRA (or another low-rank method) goes on; "qv" needs the fused-qkv layer."""
    from ..backbones import backbone_family

    family = backbone_family(model)
    if targets == "auto":
        targets = "qv" if family == "vit" else "pw"
    allowed = VIT_TARGETS if family == "vit" else CNN_TARGETS
    if targets not in allowed:
        raise ConfigError(
            f"{method} targets {targets!r} do not apply to a {family.upper()}; expected one of {', '.join(allowed)}"
        )
    head = model.get_classifier()
    names = []
    for name, module in model.named_modules():
        if module is head:
            continue
        if family == "vit":
            leaf = name.rsplit(".", 1)[-1]
            wanted = {
                "qv": ("qkv",), "qkv": ("qkv",), "attn": ("qkv", "proj"), "mlp": ("fc1", "fc2"),
                "all": ("qkv", "proj", "fc1", "fc2"),
            }[targets]
            if isinstance(module, nn.Linear) and leaf in wanted and ".blocks." in f".{name}":
                names.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            # grouped / depthwise convs are skipped: low-rank factors of a depthwise kernel
            # cost more than the kernel itself (peft #2202, #2549); so is a pointwise conv that
            # reads the RGB image itself (LiteMedSAM's stem: 3 input channels, below any rank)
            if targets == "conv" or (module.kernel_size == (1, 1) and module.in_channels > 4):
                names.append(name)
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2"):
            # the attention and MLP layers of a hybrid conv/attention encoder (TinyViT in
            # LiteMedSAM): pointwise maps too; its qkv interleaves heads, so it is adapted whole
            names.append(name)
    if not names:
        raise ConfigError(f"{method} targets {targets!r} match no layer of this backbone")
    return targets, names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def inject_peft(model: nn.Module, peft_config, tuner_cls=None) -> None:
    """Inject a peft tuner into a plain (timm) model and train its new (adapter) parameters.

    peft freezes every parameter that is not its own while injecting; whatever an earlier
    method of a hybrid marked trainable (``ssf+lora``, ``bitfit+lora``) is restored.
    ``tuner_cls`` injects with a tuner class directly (VeRA: shared projections are not
    accepted by ``inject_adapter_in_model``).
    """
    from peft import inject_adapter_in_model

    before = {id(p): p.requires_grad for p in model.parameters()}
    if tuner_cls is None:
        inject_adapter_in_model(peft_config, model)
    else:
        tuner_cls(model, peft_config, adapter_name="default")
    for param in model.parameters():
        param.requires_grad_(before.get(id(param), True))


def apply_lora_layers(model: nn.Module, cfg: LoraConfig, use_dora: bool = False) -> None:
    targets, names = resolve_targets(model, cfg.targets)
    if targets == "qv":
        if use_dora:
            raise ConfigError("DoRA on q/v slices of a fused qkv is not supported; use targets qkv, attn, mlp or all")
        for name in names:
            layer = FusedQKVLoRA(model.get_submodule(name), "qv", int(cfg.rank), float(cfg.alpha), float(cfg.dropout))
            _set_module(model, name, layer)
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.requires_grad_(True)
        return
    import peft

    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d) and int(cfg.rank) > min(module.in_channels, module.out_channels):
            raise ConfigError(
                f"LoRA rank {cfg.rank} exceeds the channels of conv {name!r} "
                f"({module.in_channels}->{module.out_channels}); use a smaller --lora-rank"
            )
    config = peft.LoraConfig(
        r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
        target_modules=names, use_dora=use_dora, bias="none",
    )
    inject_peft(model, config)


@register_method(
    "lora", ("cnn", "vit"), LoraConfig, description="LoRA: low-rank B·A added to weights (B zero-init), mergeable",
    search_space={'rank': [4, 8, 16, 32], 'alpha': [8.0, 16.0, 32.0], 'dropout': [0.0, 0.1]},
    default_lr=1e-3, mergeable=True, identity_at_init=True, reference="Hu et al. 2022",
)
def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    apply_lora_layers(model, cfg)
