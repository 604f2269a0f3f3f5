"""Selective methods: train a chosen subset of the existing weights."""
from __future__ import annotations

from torch import nn

from .base import register_method
from .baselines import _nothing_to_merge


@register_method(
    "bitfit", ("cnn", "vit"), description="BitFit: every bias term (+ head)", default_lr=5e-3,
    merge=_nothing_to_merge, reference="Ben Zaken et al. 2022",
)
def apply_bitfit(model: nn.Module, cfg) -> None:
    for name, param in model.named_parameters():
        if name == "bias" or name.endswith(".bias"):
            param.requires_grad_(True)
