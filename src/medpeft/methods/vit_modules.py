"""Shared machinery of the ViT-side methods (VPT, prefix tuning, adapters, FacT), PETL_Vision style.

Methods do not rewrite the ViT. They *patch* timm's ``Block`` / ``Attention`` / ``Mlp`` in place:
the module's class is swapped for a subclass whose forward has slots where methods attach
modules. Names in the state dict stay those of timm, so base weights load unchanged, and
several methods attach to one block at once: hybrids (adapter+prefix, lora+vpt_deep,
lora+adaptformer) are configuration, not new code.

Slots of a patched block (all empty unless a method fills them):

- ``block.prompt``: a ``PromptTokens`` inserted after the prefix (CLS/register) tokens at the
  block's input (mode "insert") or replacing the previous block's prompt outputs ("replace").
- ``block.prompt_exit``: ``(offset, count)`` of prompt tokens removed from the block's output
  (the last block), so the final norm and pooling see exactly the tokens of the base model.
- ``block.after_attn`` / ``block.after_mlp`` (ModuleDicts): sequential adapters on the branch
  output, ``h = h + adapter(h)``, before LayerScale / drop-path / the residual add.
- ``block.parallel_attn`` / ``block.parallel_mlp`` (ModuleDicts): parallel adapters fed the
  branch input ``norm(x)``; their output is added to the branch output.
- ``attn.prefix``: a callable returning key and value prefixes, each (heads, p, head_dim).
- ``attn.linear_taps`` / ``mlp.linear_taps`` (plain dicts): callables ``tap(x, which)`` that
  return an additive delta for the Linear ``which`` in ("qkv", "proj", "fc1", "fc2") given its
  input ``x`` (FacT).

The patched attention still calls ``self.qkv(x)`` / ``self.proj(x)`` and the patched MLP
``self.fc1`` / ``self.fc2``, so methods that replace those Linear layers (LoRA, DoRA, IA3, ...)
compose with everything here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp as _Mlp
from timm.layers.attention import Attention as _Attention
from timm.models.vision_transformer import Block as _Block
from torch import nn

from ..errors import ConfigError

_SLOTS = ("after_attn", "parallel_attn", "after_mlp", "parallel_mlp")


# --------------------------------------------------------------------------- patched classes


class MedpeftBlock(_Block):
    """timm ``Block`` with method slots (see the module docstring); same math when they are empty."""

    def _enter_prompts(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prompt is None else self.prompt(x)

    def _exit_prompts(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt_exit is None:
            return x
        offset, count = self.prompt_exit
        return torch.cat([x[:, :offset], x[:, offset + count:]], dim=1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None and (self.prompt is not None or self.prompt_exit):
            raise NotImplementedError("visual prompts change the sequence length; an attention mask cannot be used")
        x = self._enter_prompts(x)
        h = self.norm1(x)
        branch = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        branch = _add_adapters(branch, h, self.after_attn, self.parallel_attn)
        x = x + self.drop_path1(self.ls1(branch))
        h = self.norm2(x)
        branch = self.mlp(h)
        branch = _add_adapters(branch, h, self.after_mlp, self.parallel_mlp)
        x = x + self.drop_path2(self.ls2(branch))
        return self._exit_prompts(x)


def _add_adapters(branch: torch.Tensor, branch_input: torch.Tensor, sequential: nn.ModuleDict,
                  parallel: nn.ModuleDict) -> torch.Tensor:
    out = branch
    for adapter in sequential.values():  # applied in the order the methods were applied
        out = out + adapter(out)
    for adapter in parallel.values():
        out = out + adapter(branch_input)
    return out


class MedpeftAttention(_Attention):
    """timm ``Attention`` with key/value prefixes and additive taps on ``qkv`` / ``proj``.

    Always computes attention with ``F.scaled_dot_product_attention`` (timm's fused path).
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x)
        for tap in self.linear_taps.values():
            qkv = qkv + tap(x, "qkv")
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        prefix = self.prefix
        if prefix is not None:
            if is_causal:
                raise NotImplementedError("prefix tuning with causal attention is not supported")
            key, value = prefix()  # (heads, p, head_dim): learned, not passed through k_norm
            k = torch.cat([key.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([value.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
            attn_mask = _mask_with_prefix(attn_mask, key.shape[1])
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        out = self.proj(x)
        for tap in self.linear_taps.values():
            out = out + tap(x, "proj")
        return self.proj_drop(out)


def _mask_with_prefix(attn_mask: torch.Tensor | None, num_prefix: int) -> torch.Tensor | None:
    """Every query may attend to every prefix: extend a (..., N, N) mask to (..., N, p + N)."""
    if attn_mask is None:
        return None
    shape = (*attn_mask.shape[:-1], num_prefix)
    pad = attn_mask.new_ones(shape) if attn_mask.dtype == torch.bool else attn_mask.new_zeros(shape)
    return torch.cat([pad, attn_mask], dim=-1)


class MedpeftMlp(_Mlp):
    """timm ``Mlp`` with additive taps on ``fc1`` / ``fc2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        for tap in self.linear_taps.values():
            h = h + tap(x, "fc1")
        h = self.drop1(self.act(h))
        h = self.norm(h)
        out = self.fc2(h)
        for tap in self.linear_taps.values():
            out = out + tap(h, "fc2")
        return self.drop2(out)


# --------------------------------------------------------------------------- patching

_PATCHED = {MedpeftBlock: _Block, MedpeftAttention: _Attention, MedpeftMlp: _Mlp}


def vit_blocks(model: nn.Module, method: str) -> list[nn.Module]:
    """The model's transformer blocks, checked to be timm ``Block`` (or already patched ones)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or not hasattr(model, "patch_embed"):
        raise ConfigError(f"method {method!r} needs a timm VisionTransformer (with .patch_embed and .blocks)")
    found = list(blocks.children())
    for i, block in enumerate(found):
        if type(block) not in (_Block, MedpeftBlock):
            raise ConfigError(f"method {method!r} supports timm ViT blocks of type Block; "
                              f"block {i} is {type(block).__name__}")
    if not found:
        raise ConfigError(f"method {method!r}: the model has no transformer blocks")
    return found


def patch_block(block: nn.Module) -> MedpeftBlock:
    if type(block) is MedpeftBlock:
        return block
    if type(block) is not _Block:
        raise ConfigError(f"cannot attach ViT methods to a {type(block).__name__}; expected timm Block")
    block.__class__ = MedpeftBlock
    for slot in _SLOTS:
        setattr(block, slot, nn.ModuleDict())
    block.prompt = None
    block.prompt_exit = None
    return block


def patch_attention(attn: nn.Module) -> MedpeftAttention:
    if type(attn) is MedpeftAttention:
        return attn
    if type(attn) is not _Attention:
        raise ConfigError(f"cannot attach ViT methods to attention {type(attn).__name__}; expected timm Attention")
    attn.__class__ = MedpeftAttention
    attn.prefix = None
    attn.linear_taps = {}
    return attn


def patch_mlp(mlp: nn.Module) -> MedpeftMlp:
    if type(mlp) is MedpeftMlp:
        return mlp
    if type(mlp) is not _Mlp or getattr(mlp, "use_conv", False):
        raise ConfigError(f"cannot attach ViT methods to MLP {type(mlp).__name__}; expected timm Mlp")
    mlp.__class__ = MedpeftMlp
    mlp.linear_taps = {}
    return mlp


def attach(slot_dict: nn.ModuleDict, name: str, module: nn.Module, where: str) -> None:
    if name in slot_dict:
        raise ConfigError(f"method {name!r} is already attached to {where}; apply each method once")
    slot_dict[name] = module


def unpatch_unused(model: nn.Module) -> None:
    """Give patched modules whose slots are all empty their timm class back (after a merge)."""
    for module in model.modules():
        cls = type(module)
        if cls is MedpeftBlock:
            if any(len(getattr(module, s)) for s in _SLOTS) or module.prompt is not None or module.prompt_exit:
                continue
            for slot in _SLOTS + ("prompt", "prompt_exit"):
                delattr(module, slot)
        elif cls is MedpeftAttention:
            if module.prefix is not None or module.linear_taps:
                continue
            del module.prefix, module.linear_taps
        elif cls is MedpeftMlp:
            if module.linear_taps:
                continue
            del module.linear_taps
        else:
            continue
        module.__class__ = _PATCHED[cls]


# --------------------------------------------------------------------------- helpers


def like(model: nn.Module) -> dict:
    """device/dtype for new parameters: those of the backbone's weights."""
    ref = next(model.parameters())
    return {"device": ref.device, "dtype": ref.dtype}


def embed_dim(model: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not dim:
        raise ConfigError("cannot find the ViT's embedding width (model.embed_dim)")
    return int(dim)


def patch_area(model: nn.Module) -> int:
    size = getattr(model.patch_embed, "patch_size", 16)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]) * int(size[1])


def vpt_init_bound(model: nn.Module, dim: int) -> float:
    """VPT's xavier-uniform bound for prompt tokens: sqrt(6 / (3 * patch_area + dim)) (Jia et al. 2022)."""
    return math.sqrt(6.0 / float(3 * patch_area(model) + dim))


class SharedRef:
    """Holds a module without registering it as a child (it is registered once, on the model).

    Lets per-layer hooks reach factors shared across blocks (FacT U/V, the prefix MLP) without
    duplicating them in ``state_dict``; ``deepcopy`` of the whole model keeps the sharing.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self) -> nn.Module:
        return self.module



# --------------------------------------------------------------------------- config checks
# (ConfigError is a ValueError: build_configs reports it with the method's name)


def positive_int(value, name: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}") from None
    if isinstance(value, bool) or out < 1 or (isinstance(value, float) and out != value):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return out


def finite_float(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return out


def unit_dropout(value, name: str) -> float:
    out = finite_float(value, name)
    if not 0.0 <= out < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    return out


def flag(value, name: str) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if value not in (True, False, 0, 1):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return bool(value)
