"""Baselines: full fine-tuning and linear probing."""
from __future__ import annotations

from torch import nn

from .base import register_method


@register_method(
    "full", ("cnn", "vit"), description="full fine-tuning: every weight is trained", default_lr=1e-4,
    search_space={},
    mergeable=True, identity_at_init=True, reference="-",
)
def apply_full(model: nn.Module, cfg) -> None:
    for param in model.parameters():
        param.requires_grad_(True)


@register_method(
    "linear", ("cnn", "vit"), description="linear probing: only the classification head is trained",
    search_space={},
    default_lr=1e-2, mergeable=True, identity_at_init=True, reference="-",
)
def apply_linear(model: nn.Module, cfg) -> None:
    """Nothing besides the head (which apply_methods always trains)."""


@register_method(
    "decoder", ("cnn", "vit"), description="the frozen backbone under a trained task head: for segmentation the "
    "decoder alone (the analogue of linear probing); for classification the same as linear",
    search_space={},
    default_lr=1e-3, mergeable=True, identity_at_init=True, reference="-",
)
def apply_decoder(model: nn.Module, cfg) -> None:
    """Nothing besides the head/decoder (which is always trained)."""


@register_method(
    "head", ("cnn", "vit"), description="the frozen backbone under a trained task head: for detection the "
    "feature pyramid and detection head alone (the analogue of linear probing); otherwise the same as decoder",
    search_space={},
    default_lr=1e-3, mergeable=True, identity_at_init=True, reference="-",
)
def apply_head(model: nn.Module, cfg) -> None:
    """Nothing besides the task head (which is always trained)."""
