"""Prompt methods for ViTs: VPT-shallow, VPT-deep (Jia et al. 2022) and prefix tuning (Li & Liang 2021).

VPT: p learnable tokens go into the sequence right after the prefix (CLS/register) tokens.
Shallow: inserted once at the input of block 0 and carried through all blocks. Deep: block 0
inserts them, every later block replaces the previous block's prompt outputs with its own new
tokens. The last block removes them, so the final norm and the head's pooling (CLS token or
average over patch tokens) see exactly the tokens of the base model. Prompts are initialised
uniform(-v, v) with v = sqrt(6 / (3 * patch_area + dim)) as in the VPT code.

Prefix tuning: p learnable key and value vectors per attention layer (one set per head,
concatenated in front of the keys/values); queries are unchanged, so the sequence length is
unchanged. Optionally reparameterised as in Li & Liang: one shared MLP
(Linear(dim, 512) - tanh - Linear(512, depth * 2 * dim)) maps a p x dim embedding to every
layer's prefixes. Not mergeable.

Neither is identity at init: prompts and prefixes take part in attention from the first step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import MethodConfig, register_method
from .vit_modules import (SharedRef, embed_dim, flag, like, patch_attention, patch_block, positive_int, unit_dropout,
                          vit_blocks, vpt_init_bound)


# --------------------------------------------------------------------------- VPT


@dataclass
class VptConfig(MethodConfig):
    num_tokens: int = 10  # prompt tokens p (per block for vpt_deep)
    dropout: float = 0.0  # dropout on the prompt tokens (VPT's prompt dropout)

    def __post_init__(self):
        self.num_tokens = positive_int(self.num_tokens, "num_tokens")
        self.dropout = unit_dropout(self.dropout, "dropout")


class PromptTokens(nn.Module):
    """p learnable tokens placed after the first ``offset`` tokens (mode "insert" or "replace")."""

    def __init__(self, num_tokens: int, dim: int, bound: float, offset: int, mode: str, dropout: float = 0.0,
                 **factory):
        super().__init__()
        if mode not in ("insert", "replace"):
            raise ValueError(f"mode {mode!r}")
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim, **factory).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.offset = offset
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.tokens.shape[0]
        prompts = self.dropout(self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1))
        skip = p if self.mode == "replace" else 0
        return torch.cat([x[:, :self.offset], prompts, x[:, self.offset + skip:]], dim=1)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens.shape[0]}, offset={self.offset}, mode={self.mode}"


def _apply_vpt(model: nn.Module, cfg: VptConfig, deep: bool, method: str) -> None:
    blocks = [patch_block(b) for b in vit_blocks(model, method)]
    if any(b.prompt is not None or b.prompt_exit for b in blocks):
        raise ConfigError(f"method {method!r}: the model already carries visual prompts "
                          "(vpt_shallow and vpt_deep cannot be combined)")
    dim = embed_dim(model)
    bound = vpt_init_bound(model, dim)
    offset = int(getattr(model, "num_prefix_tokens", 1))  # after CLS (and register) tokens
    for i, block in enumerate(blocks if deep else blocks[:1]):
        block.prompt = PromptTokens(cfg.num_tokens, dim, bound, offset, "insert" if i == 0 else "replace",
                                    cfg.dropout, **like(model))
    blocks[-1].prompt_exit = (offset, cfg.num_tokens)


@register_method(
    "vpt_shallow", ("vit",), VptConfig, default_lr=1e-3, identity_at_init=False, reference="Jia et al. 2022",
    search_space={'num_tokens': [5, 10, 20, 50]},
    description="VPT-shallow: p learnable prompt tokens inserted after CLS at the input of block 0",
)
def apply_vpt_shallow(model: nn.Module, cfg: VptConfig) -> None:
    _apply_vpt(model, cfg, deep=False, method="vpt_shallow")


@register_method(
    "vpt_deep", ("vit",), VptConfig, default_lr=1e-3, identity_at_init=False, reference="Jia et al. 2022",
    search_space={'num_tokens': [5, 10, 20, 50]},
    description="VPT-deep: p new learnable prompt tokens at the input of every block",
)
def apply_vpt_deep(model: nn.Module, cfg: VptConfig) -> None:
    _apply_vpt(model, cfg, deep=True, method="vpt_deep")


# --------------------------------------------------------------------------- prefix tuning


@dataclass
class PrefixConfig(MethodConfig):
    num_tokens: int = 10  # prefix length p per attention layer
    reparam: bool = False  # Li & Liang's MLP reparameterisation of the prefixes
    reparam_hidden: int = 512  # hidden width of that MLP

    def __post_init__(self):
        self.num_tokens = positive_int(self.num_tokens, "num_tokens")
        self.reparam = flag(self.reparam, "reparam")
        self.reparam_hidden = positive_int(self.reparam_hidden, "reparam_hidden")


class PrefixKV(nn.Module):
    """Key and value prefixes of one attention layer, stored (p, heads * head_dim)."""

    def __init__(self, num_tokens: int, num_heads: int, head_dim: int, bound: float, **factory):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        shape = (num_tokens, num_heads * head_dim)
        self.key = nn.Parameter(torch.empty(shape, **factory).uniform_(-bound, bound))
        self.value = nn.Parameter(torch.empty(shape, **factory).uniform_(-bound, bound))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _per_head(self.key, self.num_heads), _per_head(self.value, self.num_heads)


def _per_head(flat: torch.Tensor, num_heads: int) -> torch.Tensor:
    p, width = flat.shape
    return flat.reshape(p, num_heads, width // num_heads).transpose(0, 1)


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterisation: prefixes of all layers = MLP(embedding), shared MLP."""

    def __init__(self, num_tokens: int, dim: int, width: int, depth: int, hidden: int, **factory):
        super().__init__()
        self.width, self.depth = width, depth
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim, **factory))  # nn.Embedding's N(0, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.Tanh(),
                                 nn.Linear(hidden, depth * 2 * width, **factory))

    def layer_prefixes(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlp[1](self.mlp[0](self.embedding))
        out_layer = self.mlp[2]
        rows = slice(layer * 2 * self.width, (layer + 1) * 2 * self.width)  # only this layer's outputs
        kv = nn.functional.linear(hidden, out_layer.weight[rows], out_layer.bias[rows])
        return kv[:, :self.width], kv[:, self.width:]


class EncodedPrefix:
    """The prefix slot of one attention layer when prefixes come from the shared ``PrefixEncoder``."""

    def __init__(self, encoder: PrefixEncoder, layer: int, num_heads: int):
        self.encoder, self.layer, self.num_heads = SharedRef(encoder), layer, num_heads

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = self.encoder().layer_prefixes(self.layer)
        return _per_head(key, self.num_heads), _per_head(value, self.num_heads)


@register_method(
    "prefix", ("vit",), PrefixConfig, default_lr=1e-3, identity_at_init=False, reference="Li & Liang 2021",
    search_space={'num_tokens': [5, 10, 20, 50]},
    description="prefix tuning: p learnable key/value prefixes in every attention layer",
)
def apply_prefix(model: nn.Module, cfg: PrefixConfig) -> None:
    blocks = vit_blocks(model, "prefix")
    attns = [patch_attention(b.attn) for b in blocks]
    if any(a.prefix is not None for a in attns):
        raise ConfigError("method 'prefix': the attention layers already carry prefixes")
    widths = {a.num_heads * a.head_dim for a in attns}
    if len(widths) != 1:
        raise ConfigError(f"method 'prefix' expects one attention width across blocks, found {sorted(widths)}")
    width = widths.pop()
    factory = like(model)
    if cfg.reparam:
        encoder = PrefixEncoder(cfg.num_tokens, embed_dim(model), width, len(attns), cfg.reparam_hidden, **factory)
        model.prefix_encoder = encoder
        for i, attn in enumerate(attns):
            attn.prefix = EncodedPrefix(encoder, i, attn.num_heads)
        return
    bound = vpt_init_bound(model, width)  # small uniform init, as VPT's prompts
    for attn in attns:
        attn.prefix = PrefixKV(cfg.num_tokens, attn.num_heads, attn.head_dim, bound, **factory)
