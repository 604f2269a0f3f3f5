"""Scaling methods: SSF (scale & shift features) and (IA)^3 (learned rescaling vectors).

Both act on the *output* (or input) of existing layers. Instead of replacing the layer
(which would rename its weights and hide it from other methods, e.g. LoRA looking for
``qkv``), each method attaches a small module beside the layer (``attn.ssf_qkv`` next to
``attn.qkv``) and connects it with a forward hook. The base layer keeps its name and
weights, so these methods compose with LoRA/BitFit in either order, and the merge walk
(``merging.py``) folds each vector into the layer found at the recorded path.
(DoRA normalises the raw weight, so it refuses layers already hooked: write ``dora+ssf``.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import MethodConfig, MethodModule, base_layer, is_wrapper_layer, register_method

# --------------------------------------------------------------------------- attaching modules with hooks


class AttachedModule(MethodModule):
    """A module that acts on an existing op (at ``target_path``) through a forward hook."""

    prefix = "attached"  # attribute name beside the op: f"{prefix}_{leaf}" (see ``attach``)

    def __init__(self, target_path: str):
        super().__init__()
        self.target_path = target_path

    def on_output(self, module: nn.Module, args, output):
        return self(output)

    def on_input(self, module: nn.Module, args):
        return (self(args[0]), *args[1:])

    @torch.no_grad()
    def fold(self, op: nn.Module) -> None:
        """Fold this module into the base op's weights (merge)."""
        raise NotImplementedError


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def attach(model: nn.Module, target_path: str, side: AttachedModule, *, hook_on: nn.Module | None = None,
           on_input: bool = False) -> None:
    """Register ``side`` beside the op at ``target_path`` and hook it to ``hook_on`` (default: the op).

    The side module lives on the nearest ancestor that is not a container: inside an
    ``nn.Sequential`` (ResNet ``downsample``, stems) it would be run as one more layer.
    """
    parts = target_path.split(".")
    cut = len(parts) - 1
    while cut > 0 and isinstance(model.get_submodule(".".join(parts[:cut])), _CONTAINERS):
        cut -= 1
    parent = model.get_submodule(".".join(parts[:cut])) if cut else model
    if isinstance(parent, _CONTAINERS):
        raise ConfigError(f"{side.prefix}: cannot attach to {target_path!r}: the model itself is a "
                          f"{type(parent).__name__}; wrap it in a module")
    name = f"{side.prefix}_{'_'.join(parts[cut:])}"
    if hasattr(parent, name):
        raise ConfigError(f"{side.prefix}: {target_path!r} already has {name!r}; was the method applied twice?")
    parent.add_module(name, side)
    hooked = hook_on if hook_on is not None else model.get_submodule(target_path)
    if on_input:
        hooked.register_forward_pre_hook(side.on_input)
    else:
        hooked.register_forward_hook(side.on_output)


def base_op(module: nn.Module) -> nn.Module:
    """The plain layer under LoRA-style wrappers (peft tuner layers, FusedQKVLoRA, BoftLayer)."""
    return base_layer(module)


def iter_ops(model: nn.Module, prefix: str = ""):
    """(path, module) of the model's layers, a LoRA-wrapped layer as one unit (the wrapper,
    not its factors) and without the modules attached by these methods."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, MethodModule):
            continue
        yield path, child
        if not is_wrapper_layer(child):
            yield from iter_ops(child, path + ".")


def attached_hooks(module: nn.Module) -> list[AttachedModule]:
    """The attached modules acting on ``module`` through its hooks."""
    fns = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return [fn.__self__ for fn in fns if isinstance(getattr(fn, "__self__", None), AttachedModule)]


def remove_hooks(model: nn.Module, side: nn.Module) -> None:
    # hooks are found by their bound method rather than kept handles: handles would point
    # into the original model after a deepcopy
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "__self__", None) is side:
                    del hooks[key]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)


def _channel_dim(op: nn.Module) -> int:
    """Where the channels of the op's output are: 1 for NCHW maps (convs, BN, GN, LayerNorm2d), else last."""
    if isinstance(op, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) or "2d" in type(op).__name__.lower():
        return 1
    return -1


def _broadcast(vec: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == -1 or dim == x.ndim - 1:
        return vec
    shape = [1] * x.ndim
    shape[dim] = -1
    return vec.view(shape)


@torch.no_grad()
def _fold_output_affine(op: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    """op(x) -> scale * op(x) + shift, for ops whose outputs are per-channel affine in
    ``weight`` rows (Linear, Conv: output channel = dim 0) or per-channel affine norms."""
    weight = getattr(op, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"cannot fold a scale into {type(op).__name__}: it has no weight")
    scale = scale.to(weight.dtype)
    weight.mul_(_broadcast(scale, weight, 0) if weight.ndim > 1 else scale)
    bias = getattr(op, "bias", None)
    if bias is not None:
        bias.mul_(scale)
        if shift is not None:
            bias.add_(shift.to(bias.dtype))
    elif shift is not None and bool(torch.any(shift != 0)):
        # the op had no bias: the shift becomes one (the only case where merging adds a tensor)
        op.bias = nn.Parameter(shift.detach().clone().to(weight.dtype), requires_grad=False)


# --------------------------------------------------------------------------- SSF


class ScaleShift(AttachedModule):
    """y = gamma * x + beta per channel; gamma=1, beta=0 at init (identity)."""

    prefix = "ssf"

    def __init__(self, target_path: str, channels: int, channel_dim: int):
        super().__init__(target_path)
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))  # not named "bias": BitFit must not pick it up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _broadcast(self.scale, x, self.channel_dim) + _broadcast(self.shift, x, self.channel_dim)

    def fold(self, op: nn.Module) -> None:
        _fold_output_affine(op, self.scale.detach(), self.shift.detach())


VIT_SSF_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _out_channels(op: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if isinstance(getattr(op, attr, None), int):
            return getattr(op, attr)
    if isinstance(op, nn.LayerNorm):
        return int(op.normalized_shape[-1])
    raise ConfigError(f"cannot tell the output channels of {type(op).__name__}")


def _has_affine(op: nn.Module) -> bool:
    return isinstance(getattr(op, "weight", None), torch.Tensor)


def ssf_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, op) pairs SSF goes after.

    ViT (as in the SSF paper's code): patch-embedding projection, in every block norm1,
    qkv, proj, norm2, fc1, fc2, and the final norm. CNN: after every normalisation layer
    with affine parameters (BatchNorm, GroupNorm, LayerNorm2d), before its activation.
    Every conv in timm CNNs is followed by such a norm, and SSF right after a conv would
    be the same per-channel affine map as SSF after its (frozen) BN, so one per pair.
    """
    from ..backbones import backbone_family
    from .base import NORM_TYPES

    head = model.get_classifier()
    sites = []
    if backbone_family(model) == "vit":
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if isinstance(proj, nn.Conv2d):
            sites.append(("patch_embed.proj", proj))
        for i, block in enumerate(model.blocks.children()):
            for rel in VIT_SSF_SITES:
                try:
                    op = block.get_submodule(rel)
                except AttributeError:
                    continue
                if _has_affine(base_op(op)) or not isinstance(op, NORM_TYPES):
                    sites.append((f"blocks.{i}.{rel}", op))
        for name in ("norm", "fc_norm"):
            op = getattr(model, name, None)
            if isinstance(op, NORM_TYPES) and _has_affine(op):
                sites.append((name, op))
    else:
        for name, op in iter_ops(model):
            if isinstance(op, NORM_TYPES) and _has_affine(op) and op is not head:
                sites.append((name, op))
    if not sites:
        raise ConfigError(f"SSF finds no layer to scale and shift in {type(model).__name__}")
    return sites


@register_method(
    "ssf", ("cnn", "vit"),
    search_space={},
    description="SSF: per-channel scale (init 1) and shift (init 0) after each op "
                "(ViT: patch embed, norm1, qkv, proj, norm2, fc1, fc2, final norm; CNN: every BN/norm); mergeable",
    default_lr=5e-3, mergeable=True, identity_at_init=True,
    reference="Lian et al. 2022",
)
def apply_ssf(model: nn.Module, cfg) -> None:
    for path, op in ssf_sites(model):
        plain = base_op(op)
        side = ScaleShift(path, _out_channels(plain), _channel_dim(plain))
        side.to(device=plain.weight.device, dtype=plain.weight.dtype)
        act = getattr(plain, "act", None)
        if isinstance(act, nn.Module) and isinstance(plain, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
            # timm's BatchNormAct2d / GroupNormAct apply their activation inside: SSF goes before it
            attach(model, path, side, hook_on=act, on_input=True)
        else:
            attach(model, path, side)
        for param in side.parameters():
            param.requires_grad_(True)


# --------------------------------------------------------------------------- (IA)^3


class KVScale(AttachedModule):
    """(IA)^3 l_k and l_v on a fused qkv output: the q slice is left alone."""

    prefix = "ia3"

    def __init__(self, target_path: str, dim: int):
        super().__init__(target_path)
        self.dim = dim
        self.scale_k = nn.Parameter(torch.ones(dim))
        self.scale_v = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.dim, dtype=self.scale_k.dtype, device=self.scale_k.device)
        return x * torch.cat([ones, self.scale_k, self.scale_v])

    def fold(self, op: nn.Module) -> None:
        ones = torch.ones(self.dim, dtype=self.scale_k.dtype, device=self.scale_k.device)
        _fold_output_affine(op, torch.cat([ones, self.scale_k.detach(), self.scale_v.detach()]), None)


class InputScale(AttachedModule):
    """(IA)^3 l_ff on the input of fc2 (the MLP's intermediate activations)."""

    prefix = "ia3"

    def __init__(self, target_path: str, channels: int):
        super().__init__(target_path)
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    @torch.no_grad()
    def fold(self, op: nn.Module) -> None:
        op.weight.mul_(self.scale.detach().to(op.weight.dtype))  # scales the columns of W


class OutputScale(AttachedModule):
    """(IA)^3 on a conv's output channels (CNN variant)."""

    prefix = "ia3"

    def __init__(self, target_path: str, channels: int):
        super().__init__(target_path)
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _broadcast(self.scale, x, 1)

    def fold(self, op: nn.Module) -> None:
        _fold_output_affine(op, self.scale.detach(), None)


IA3_CNN_TARGETS = ("pw", "conv")


@dataclass
class IA3Config(MethodConfig):
    # ViT: always l_k, l_v (k/v slices of the fused qkv) and l_ff (input of fc2), as in the paper.
    # CNN: output channels of the 1x1 convs (pw) or of every conv (conv); depthwise convs included for conv.
    cnn_targets: str = "pw"

    def __post_init__(self):
        if self.cnn_targets not in IA3_CNN_TARGETS:
            raise ValueError(f"cnn_targets {self.cnn_targets!r} not one of {', '.join(IA3_CNN_TARGETS)}")


@register_method(
    "ia3", ("cnn", "vit"), IA3Config,
    search_space={},
    description="(IA)^3: learned vectors (init 1) rescaling keys, values and MLP activations (ViT) "
                "or the output channels of 1x1 convs (CNN); mergeable",
    default_lr=3e-3, mergeable=True, identity_at_init=True, reference="Liu et al. 2022",
)
def apply_ia3(model: nn.Module, cfg: IA3Config) -> None:
    from ..backbones import backbone_family

    sides: list[AttachedModule] = []
    if backbone_family(model) == "vit":
        for i, block in enumerate(model.blocks.children()):
            qkv = base_op(block.attn.qkv)
            if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
                raise ConfigError(f"(IA)^3 expects a fused qkv Linear (dim -> 3*dim) in block {i}, "
                                  f"found {type(qkv).__name__}")
            side = KVScale(f"blocks.{i}.attn.qkv", qkv.in_features)
            attach(model, side.target_path, side)
            sides.append(side)
            fc2 = base_op(block.mlp.fc2)
            side = InputScale(f"blocks.{i}.mlp.fc2", fc2.in_features)
            attach(model, side.target_path, side, on_input=True)
            sides.append(side)
    else:
        head = model.get_classifier()
        for name, module in list(iter_ops(model)):
            conv = base_op(module)
            if (isinstance(conv, nn.Conv2d) and conv is not head
                    and (cfg.cnn_targets == "conv" or conv.kernel_size == (1, 1))):
                side = OutputScale(name, conv.out_channels)
                attach(model, name, side)
                sides.append(side)
        if not sides:
            raise ConfigError(f"(IA)^3 finds no conv matching cnn_targets={cfg.cnn_targets!r}")
    for side in sides:
        weight = base_op(model.get_submodule(side.target_path)).weight
        side.to(device=weight.device, dtype=weight.dtype)
        for param in side.parameters():
            param.requires_grad_(True)
