"""Bottleneck adapters for ViTs: Houlsby (sequential, after attention and MLP), Pfeiffer (after
the MLP only) and AdaptFormer (parallel to the MLP).

Adapter: ``delta(h) = scale * up(act(dropout?(down(h))))``, down: dim -> r, up: r -> dim.
``up`` is zero-initialised (weights and bias), ``down`` gets nn.Linear's kaiming-uniform init
(AdaptFormer's "lora" init), so every adapted model equals the base model at init.

- ``adapter`` (Houlsby et al. 2019): ``h = h + delta(h)`` on the attention output and on the
  MLP output, before the residual add; GELU. Houlsby also trained the LayerNorms; here only
  the adapters are trained (as in PETL_Vision) - combine with ``norm`` tuning for that.
- ``pfeiffer`` (Pfeiffer et al. 2021): the same adapter after the MLP only.
- ``adaptformer`` (Chen et al. 2022): ``x = x' + MLP(LN(x')) + s * up(relu(down(LN(x'))))`` with
  the block's own LN (norm2), s = 0.1, dropout 0.1 after the ReLU as in its code.

With LayerScale (DINOv2) the adapter output joins its branch before LayerScale, like the MLP
output it sits next to (PETL_Vision does the same).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import MethodConfig, register_method
from .vit_modules import attach, embed_dim, finite_float, like, patch_block, positive_int, unit_dropout, vit_blocks


@dataclass
class AdapterConfig(MethodConfig):
    dim: int = 8  # bottleneck width r
    scale: float = 1.0  # multiplies the adapter output
    dropout: float = 0.0  # after the activation

    def __post_init__(self):
        self.dim = positive_int(self.dim, "dim")
        self.scale = finite_float(self.scale, "scale")
        self.dropout = unit_dropout(self.dropout, "dropout")


@dataclass
class AdaptFormerConfig(AdapterConfig):
    scale: float = 0.1
    dropout: float = 0.1


class BottleneckAdapter(nn.Module):
    """Returns only the adapter's contribution; the caller adds it (sequential or parallel)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, activation: type[nn.Module], dropout: float = 0.0,
                 **factory):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, **factory)
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, **factory)
        self.scale = float(scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(self.dropout(self.act(self.down(h)))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _attach_adapters(model: nn.Module, method: str, cfg: AdapterConfig, slots: tuple[str, ...],
                     activation: type[nn.Module]) -> None:
    dim = embed_dim(model)
    factory = like(model)
    for i, block in enumerate(vit_blocks(model, method)):
        block = patch_block(block)
        for slot in slots:
            adapter = BottleneckAdapter(dim, cfg.dim, cfg.scale, activation, cfg.dropout, **factory)
            attach(getattr(block, slot), method, adapter, f"block {i} ({slot})")


@register_method(
    "adapter", ("vit",), AdapterConfig, default_lr=1e-3, identity_at_init=True, reference="Houlsby et al. 2019",
    search_space={'dim': [4, 8, 16, 32], 'scale': [0.1, 1.0]},
    description="Houlsby adapter: sequential bottleneck after attention and after the MLP of every block",
)
def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> None:
    _attach_adapters(model, "adapter", cfg, ("after_attn", "after_mlp"), nn.GELU)


@register_method(
    "pfeiffer", ("vit",), AdapterConfig, default_lr=1e-3, identity_at_init=True, reference="Pfeiffer et al. 2021",
    search_space={'dim': [4, 8, 16, 32], 'scale': [0.1, 1.0]},
    description="Pfeiffer adapter: sequential bottleneck after the MLP of every block",
)
def apply_pfeiffer(model: nn.Module, cfg: AdapterConfig) -> None:
    _attach_adapters(model, "pfeiffer", cfg, ("after_mlp",), nn.GELU)


@register_method(
    "adaptformer", ("vit",), AdaptFormerConfig, default_lr=1e-3, identity_at_init=True, reference="Chen et al. 2022",
    search_space={'dim': [4, 8, 16, 32], 'scale': [0.01, 0.1, 1.0]},
    description="AdaptFormer: parallel bottleneck next to the MLP, fed norm2(x), scaled by s",
)
def apply_adaptformer(model: nn.Module, cfg: AdaptFormerConfig) -> None:
    _attach_adapters(model, "adaptformer", cfg, ("parallel_mlp",), nn.ReLU)
