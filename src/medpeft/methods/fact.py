"""FacT (Jie & Deng, AAAI 2023): factor-tuning. The weight increments of all ViT layers form one
tensor that is factorised with factors shared across blocks.

Every adapted matrix gets ``W += s * V M U`` with ``U`` (r x dim) and ``V`` (dim x r) shared by all
blocks and matrices, and a small r x r matrix ``M`` per (block, matrix):

- FacT-TT (``format="tt"``): each ``M`` is its own parameter (tensor-train).
- FacT-TK (``format="tk"``): ``M = C x_3 p`` from one shared r x r x r core ``C`` and a column
  ``p`` of a shared r x (depth * slots) factor (Tucker).

Matrices, as in the reference code: q, k and v (three slices of the fused ``qkv``) and ``proj``;
the MLP's ``fc1`` (hidden = k * dim) as k stacked dim x dim blocks and ``fc2`` as k side-by-side
blocks, so 4 + 2k slots per block (12 for mlp_ratio 4). ``V`` is zero-initialised (the delta is
zero at init); ``U`` and TT cores get nn.Linear's init, the TK core and factor xavier-uniform.
Dropout (0.1 in the reference code) acts between ``M`` and ``V`` during training only.

Parameters: TT 2 * dim * r + depth * (4 + 2k) * r^2; TK 2 * dim * r + r^3 + depth * (4 + 2k) * r.
The delta is linear in the input, so ``merge`` folds it into the weights exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import MethodConfig, MethodModule, register_method
from .vit_modules import (SharedRef, embed_dim, finite_float, like, patch_attention, patch_mlp, positive_int,
                          unit_dropout, vit_blocks)

FORMATS = ("tt", "tk")
ATTN_SLOTS = 4  # q, k, v, proj


@dataclass
class FactConfig(MethodConfig):
    format: str = "tt"  # "tt" (tensor-train) or "tk" (Tucker)
    rank: int = 8  # r
    scale: float = 1.0  # s (the reference configs use 0.01 ... 100 per data set)
    dropout: float = 0.1  # between the core and V, as in the reference code

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        self.rank = positive_int(self.rank, "rank")
        self.scale = finite_float(self.scale, "scale")
        self.dropout = unit_dropout(self.dropout, "dropout")


class FactFactors(MethodModule):
    """All FacT parameters of a model (``model.fact``); blocks reach it through ``FactTap``."""

    def __init__(self, fmt: str, dim: int, depth: int, mlp_chunks: int, rank: int, scale: float, dropout: float,
                 **factory):
        super().__init__()
        self.format, self.rank, self.scale, self.mlp_chunks = fmt, rank, scale, mlp_chunks
        self.slots = ATTN_SLOTS + 2 * mlp_chunks
        self.u = nn.Parameter(torch.empty(rank, dim, **factory))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # nn.Linear(dim, r) init
        self.v = nn.Parameter(torch.zeros(dim, rank, **factory))  # zero: no change at init
        if fmt == "tt":
            cores = torch.empty(depth, self.slots, rank, rank, **factory)
            fc2 = slice(ATTN_SLOTS + mlp_chunks, self.slots)
            cores.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank))  # nn.Linear(r, r) init
            # fc2's core is one Linear(k*r, r) in the reference code: fan-in k*r
            cores[:, fc2].uniform_(-1 / math.sqrt(mlp_chunks * rank), 1 / math.sqrt(mlp_chunks * rank))
            self.cores = nn.Parameter(cores)
        else:
            self.core = nn.Parameter(torch.empty(rank, rank, rank, **factory))
            self.factor = nn.Parameter(torch.empty(rank, depth * self.slots, **factory))
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.factor)
        self.dropout = nn.Dropout(dropout)

    def layer_cores(self, layer: int) -> torch.Tensor:
        """The (slots, r, r) matrices M of one block, in slot order q, k, v, proj, fc1..., fc2...."""
        if self.format == "tt":
            return self.cores[layer]
        p = self.factor[:, layer * self.slots:(layer + 1) * self.slots]
        return torch.einsum("abc,cs->sab", self.core, p)

    def _slots(self, which: str) -> slice:
        k = self.mlp_chunks
        return {"qkv": slice(0, 3), "proj": slice(3, 4), "fc1": slice(4, 4 + k), "fc2": slice(4 + k, 4 + 2 * k)}[which]

    def delta(self, layer: int, x: torch.Tensor, which: str) -> torch.Tensor:
        """s * (V M U) x for the Linear ``which`` of block ``layer``, computed through the factors."""
        m = self.layer_cores(layer)[self._slots(which)]  # (n, r, r)
        if which == "fc2":  # input = k chunks of dim, output = dim: sum over chunks
            u = x.reshape(*x.shape[:-1], self.mlp_chunks, -1) @ self.u.t()  # (..., k, r)
            z = torch.einsum("...nr,nqr->...q", u, m)
            return self.dropout(z) @ self.v.t() * self.scale
        u = x @ self.u.t()  # (..., r)
        z = torch.einsum("...r,nqr->...nq", u, m)  # one r-vector per output chunk
        out = self.dropout(z) @ self.v.t()  # (..., n, dim)
        return out.flatten(-2) * self.scale

    def weight_delta(self, layer: int, which: str) -> torch.Tensor:
        """The same increment as a weight matrix (out x in), for merging and tests."""
        blocks = [self.v @ m @ self.u for m in self.layer_cores(layer)[self._slots(which)]]
        return torch.cat(blocks, dim=1 if which == "fc2" else 0) * self.scale

    def extra_repr(self) -> str:
        return f"format={self.format}, rank={self.rank}, scale={self.scale}, slots={self.slots}"


class FactTap:
    """``linear_taps`` entry of one block's attention / MLP."""

    def __init__(self, factors: FactFactors, layer: int):
        self.factors, self.layer = SharedRef(factors), layer

    def __call__(self, x: torch.Tensor, which: str) -> torch.Tensor:
        return self.factors().delta(self.layer, x, which)

    def get_delta_weight(self, which: str) -> torch.Tensor:  # the linear-tap protocol of the merge walk
        return self.factors().weight_delta(self.layer, which)


def _weight_shape(module: nn.Module, name: str) -> tuple[int, int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ConfigError(f"FacT needs a Linear {name}, found {type(module).__name__}")
    return tuple(weight.shape)


@register_method(
    "fact", ("vit",), FactConfig, default_lr=1e-3, identity_at_init=True, reference="Jie & Deng 2023",
    search_space={'rank': [4, 8, 16], 'scale': [0.1, 1.0, 10.0]},
    mergeable=True,
    description="FacT: weight increments of qkv/proj/fc1/fc2 factorised with factors shared across blocks (TT or TK)",
)
def apply_fact(model: nn.Module, cfg: FactConfig) -> None:
    if hasattr(model, "fact"):
        raise ConfigError("method 'fact' is already applied to this model")
    blocks = vit_blocks(model, "fact")
    dim = embed_dim(model)
    chunks = set()
    for i, block in enumerate(blocks):
        attn, mlp = block.attn, block.mlp
        if attn.num_heads * attn.head_dim != dim or _weight_shape(attn.qkv, "qkv") != (3 * dim, dim):
            raise ConfigError(f"FacT expects square q/k/v/proj of width {dim}; block {i} differs")
        hidden, width = _weight_shape(mlp.fc1, "fc1")
        if width != dim or hidden % dim or _weight_shape(mlp.fc2, "fc2") != (dim, hidden):
            raise ConfigError(f"FacT expects an MLP hidden width that is a multiple of {dim}; block {i} has {hidden}")
        chunks.add(hidden // dim)
    if len(chunks) != 1:
        raise ConfigError(f"FacT expects one MLP width across blocks, found ratios {sorted(chunks)}")
    factors = FactFactors(cfg.format, dim, len(blocks), chunks.pop(), cfg.rank, cfg.scale, cfg.dropout, **like(model))
    model.fact = factors
    for i, block in enumerate(blocks):
        patch_attention(block.attn).linear_taps["fact"] = FactTap(factors, i)
        patch_mlp(block.mlp).linear_taps["fact"] = FactTap(factors, i)
