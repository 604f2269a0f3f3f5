"""BOFT: orthogonal fine-tuning with a butterfly-factorised rotation (Liu et al. 2024).

The targeted weight W (out x in; a conv's kernel flattened to out x in*k*k) becomes
``W' = diag(s) · W · Rᵀ`` with R = M_{m-1} ··· M_0, a product of m sparse orthogonal
factors. Factor i is block-diagonal in b x b orthogonal blocks (Cayley transform of a
skew-symmetric matrix) after a butterfly permutation that pairs half-blocks 2^i blocks
apart, so m = log2(in/b) factors reach every input dimension with only
m · (in/b) · b(b-1)/2 angles. With m = 1 it is OFT (block-diagonal rotation) plus the
output scale s. R = I and s = 1 at init (identity), and W' folds into the weight (merge).

Own code: HF peft's BOFT builds factors m > 1 only with its CUDA extension and otherwise
silently falls back to m = 1; here every factor is plain torch on any device. The numbers
are checked against peft's formula in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from .base import MethodConfig, register_method
from .lora import _set_module
from .reparam import _check_targets_value, _target_names


@dataclass
class BoftConfig(MethodConfig):
    block_size: int = 4  # b: size of the orthogonal blocks (even when factors > 1)
    factors: int = 2  # m: butterfly factors; 1 = block-diagonal OFT
    targets: str = "auto"  # as LoRA's: ViT qkv (default) / attn / mlp / all; CNN pw (default) / conv

    def __post_init__(self):
        if int(self.block_size) < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if int(self.factors) < 1:
            raise ValueError(f"factors must be >= 1, got {self.factors}")
        if int(self.factors) > 1 and int(self.block_size) % 2:
            raise ValueError(f"block_size must be even when factors > 1 (half-blocks are exchanged), "
                             f"got {self.block_size}")
        _check_targets_value(self.targets)


def butterfly_permutation(size: int, block: int, level: int) -> torch.Tensor:
    """Index permutation of butterfly factor ``level``: within each group of block·2^level
    entries, the half-blocks at even positions come first, then those at odd positions, so a
    block of the permuted vector joins two half-blocks 2^level blocks apart. Level 0 is the
    identity."""
    if level == 0:
        return torch.arange(size)
    half, group = block // 2, block * 2 ** level
    chunks = torch.arange(group // half)
    order = torch.cat([chunks[0::2], chunks[1::2]])
    within = (order[:, None] * half + torch.arange(half)[None, :]).reshape(-1)
    return (torch.arange(0, size, group)[:, None] + within[None, :]).reshape(-1)


class BoftLayer(nn.Module):
    """Wraps a Linear or an ungrouped Conv2d; forward = the base layer with W' (its hooks kept)."""

    def __init__(self, base: nn.Module, block_size: int, factors: int, name: str):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"BOFT on {name!r}: grouped convolutions are not supported")
        self.base = base
        size = base.weight[0].numel()  # in_features, or in_channels * kh * kw
        span = block_size * 2 ** (factors - 1)
        if size % span:
            raise ConfigError(
                f"BOFT on {name!r}: input size {size} is not a multiple of block_size x 2^(factors-1) = {span}; "
                f"choose a --boft-block-size / --boft-factors that divides it")
        self.size, self.block, self.factors = size, block_size, factors
        self.register_buffer("perms", torch.stack([butterfly_permutation(size, block_size, i)
                                                   for i in range(factors)]), persistent=False)
        self.register_buffer("inverse_perms", torch.argsort(self.perms, dim=1), persistent=False)
        rows, cols = torch.triu_indices(block_size, block_size, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        # the free entries of each block's skew-symmetric generator: zero = identity rotation
        self.boft_angles = nn.Parameter(torch.zeros(factors, size // block_size, len(rows)))
        self.boft_scale = nn.Parameter(torch.ones(base.weight.shape[0]))
        self.merged = False

    @property
    def weight(self):  # timm code sometimes reads .weight / .bias of the layers it owns
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def blocks(self) -> torch.Tensor:
        """The orthogonal b x b blocks of every factor, (m, size/b, b, b): Cayley transforms
        Q = (I - S)(I + S)^-1 of the skew-symmetric S built from the free angles."""
        m, nblocks, _ = self.boft_angles.shape
        skew = self.boft_angles.new_zeros(m, nblocks, self.block, self.block)
        skew[..., self.rows, self.cols] = self.boft_angles
        skew = skew - skew.transpose(-1, -2)
        eye = torch.eye(self.block, dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye + skew, eye - skew, left=False)

    def rotate_inputs(self, weight: torch.Tensor) -> torch.Tensor:
        """W·Rᵀ for a (rows, size) matrix, R = M_{m-1} ··· M_0, M_i = P_i Q_i P_iᵀ (P[j, perm[j]] = 1).

        Factor by factor without building R: W·M_iᵀ = ((W·P_i)·Q_iᵀ)·P_iᵀ, where W·P_i permutes
        the columns by the inverse permutation, ·Q_iᵀ is a batched b x b product per block and
        ·P_iᵀ permutes back: O(rows · size · b) per factor instead of O(rows · size²).
        """
        rows = weight.shape[0]
        for perm, inverse, q in zip(self.perms, self.inverse_perms, self.blocks()):
            x = weight[:, inverse].reshape(rows, -1, self.block)
            weight = torch.einsum("nkj,kij->nki", x, q).reshape(rows, self.size)[:, perm]
        return weight

    def rotation(self) -> torch.Tensor:
        """R as a dense (size x size) matrix (for checks; training never builds it)."""
        eye = torch.eye(self.size, dtype=self.boft_angles.dtype, device=self.boft_angles.device)
        return self.rotate_inputs(eye).t()

    def adapted_weight(self) -> torch.Tensor:
        weight = self.base.weight
        flat = weight.reshape(weight.shape[0], -1).float()
        flat = self.rotate_inputs(flat) * self.boft_scale.float()[:, None]
        return flat.reshape(weight.shape).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return functional_call(self.base, {"weight": self.adapted_weight()}, (x,))

    # the tuner-layer protocol of the merge walk (peft's names)
    def get_base_layer(self) -> nn.Module:
        return self.base

    def get_delta_weight(self) -> torch.Tensor:
        """W' - W (not additive in any factor: valid for the current base weight)."""
        return self.adapted_weight() - self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight.copy_(self.adapted_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W = (W' / s) R: R is orthogonal, so W' = (W R^T) s inverts exactly (up to rounding)."""
        if self.merged:
            weight = self.base.weight
            flat = weight.reshape(weight.shape[0], -1).float() / self.boft_scale.float()[:, None]
            self.base.weight.copy_((flat @ self.rotation()).reshape(weight.shape).to(weight.dtype))
            self.merged = False


@register_method(
    "boft", ("cnn", "vit"), BoftConfig,
    search_space={'block_size': [2, 4], 'factors': [1, 2]},  # span b*2^(m-1) <= 8 divides every target of both backbones
    description="BOFT: butterfly-factorised orthogonal rotation of the weights' inputs + output scale; mergeable",
    default_lr=1e-3, mergeable=True, identity_at_init=True,
    reference="Liu et al. 2024 (BOFT, Parameter-efficient orthogonal finetuning via butterfly factorization)",
)
def apply_boft(model: nn.Module, cfg: BoftConfig) -> None:
    for name in _target_names(model, cfg.targets, "BOFT"):
        layer = BoftLayer(model.get_submodule(name), int(cfg.block_size), int(cfg.factors), name)
        _set_module(model, name, layer)
