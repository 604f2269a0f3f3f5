"""TSA: task-specific residual adapters for CNNs (Li, Liu & Bilen, CVPR 2022).

Each chosen conv gets a parallel 1x1 conv ``alpha`` (same stride), added to its output:
``y = conv(x) + alpha * x``. Choices, following the paper's code (VICO-UoE/URL, residual
"matrix" adapters) where it applies:

- which convs: the spatial (k x k, k > 1) convs inside the stages, as the paper does on
  ResNet (``convs="spatial"``); ``convs="all"`` adds the 1x1 convs of the stages. Stem and
  head convs are left alone, as in the paper.
- depthwise/grouped convs get a grouped 1x1 (``groups`` as the conv): per-channel
  scaling for depthwise convs, so the adapter never mixes channels the conv keeps apart
  (EfficientNet's only spatial convs are depthwise).
- init: zeros (default), so the adapted model starts exactly as the base model; the
  paper's ``eye`` init (identity x 1e-4) is available as ``init="eye"``.
- the 1x1 reads the input pixel under the kernel's centre tap (same padding as the conv).
  For the usual "same"-padded convs this is exactly the paper's strided 1x1; it makes the
  adapter fold into the conv's centre tap, so TSA is mergeable for every conv, including
  TF-"same" (dynamically padded) ones.
- the paper's pre-classifier alignment (beta) is not included: the head is trained anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import MethodConfig, register_method
from .scaling import AttachedModule, attach, base_op
from .selective import cnn_stages

TSA_CONVS = ("spatial", "all")
TSA_INITS = ("zero", "eye")


def _centre_tap(conv: nn.Conv2d) -> tuple[int, int]:
    return ((conv.kernel_size[0] - 1) // 2, (conv.kernel_size[1] - 1) // 2)


def _input_under_centre_tap(conv: nn.Conv2d, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The input pixels that the conv's centre tap multiplies, one per output position."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same

    if isinstance(conv, Conv2dSame):  # TF "same": padding computed from the input size
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    else:
        pads = conv._reversed_padding_repeated_twice
        if any(pads):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pads, mode=mode)
    (th, tw), (dh, dw), (sh, sw) = _centre_tap(conv), conv.dilation, conv.stride
    oh, ow = th * dh, tw * dw
    return x[..., oh: oh + (out_hw[0] - 1) * sh + 1: sh, ow: ow + (out_hw[1] - 1) * sw + 1: sw]


class ResidualAdapter(AttachedModule):
    """alpha: a (grouped) 1x1 conv in parallel to the conv at ``target_path``."""

    prefix = "tsa"

    def __init__(self, target_path: str, conv: nn.Conv2d, init: str):
        super().__init__(target_path)
        self.groups = conv.groups
        alpha = torch.zeros(conv.out_channels, conv.in_channels // conv.groups, 1, 1)
        if init == "eye":
            # the paper: identity matrix x 1e-4 (for grouped convs, identity within each group)
            per_group_out = conv.out_channels // conv.groups
            for o in range(conv.out_channels):
                i = o % per_group_out
                if i < alpha.shape[1]:
                    alpha[o, i] = 1e-4
        self.alpha = nn.Parameter(alpha)

    def on_output(self, module: nn.Module, args, output):
        x = _input_under_centre_tap(base_op(module), args[0], tuple(output.shape[-2:]))
        return output + F.conv2d(x, self.alpha.to(x.dtype), groups=self.groups)

    @torch.no_grad()
    def fold(self, op: nn.Module) -> None:
        th, tw = _centre_tap(op)
        op.weight[:, :, th, tw] += self.alpha[:, :, 0, 0].to(op.weight.dtype)


@dataclass
class TsaConfig(MethodConfig):
    convs: str = "spatial"  # spatial: k x k convs (k > 1) of the stages, as in the paper; all: also 1x1 convs
    init: str = "zero"  # zero: exact identity at init; eye: the paper's 1e-4 * identity

    def __post_init__(self):
        if self.convs not in TSA_CONVS:
            raise ValueError(f"convs {self.convs!r} not one of {', '.join(TSA_CONVS)}")
        if self.init not in TSA_INITS:
            raise ValueError(f"init {self.init!r} not one of {', '.join(TSA_INITS)}")


def tsa_targets(model: nn.Module, convs: str) -> list[tuple[str, nn.Conv2d]]:
    stage_ids = {id(stage) for stage in cnn_stages(model)}
    from .scaling import iter_ops

    targets, in_stage = [], set()
    for name, module in iter_ops(model):
        if id(module) in stage_ids:
            in_stage.add(name)
        inside = any(name.startswith(stage + ".") for stage in in_stage)
        conv = base_op(module)
        if inside and isinstance(conv, nn.Conv2d) and (convs == "all" or conv.kernel_size != (1, 1)):
            targets.append((name, conv))
    if not targets:
        raise ConfigError(f"TSA finds no conv (convs={convs!r}) inside the stages of {type(model).__name__}")
    return targets


@register_method(
    "tsa", ("cnn",), TsaConfig,
    search_space={},
    description="TSA: residual 1x1 conv adapters in parallel to the stages' spatial convs "
                "(per-channel for depthwise convs), zero-init; mergeable into the centre tap",
    default_lr=1e-3, mergeable=True, identity_at_init=True,
    reference="Li, Liu & Bilen 2022 (Cross-domain few-shot learning with task-specific adapters)",
)
def apply_tsa(model: nn.Module, cfg: TsaConfig) -> None:
    for name, conv in tsa_targets(model, cfg.convs):
        side = ResidualAdapter(name, conv, cfg.init).to(device=conv.weight.device, dtype=conv.weight.dtype)
        attach(model, name, side)
        side.alpha.requires_grad_(True)
