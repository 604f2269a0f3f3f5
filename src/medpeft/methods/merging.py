"""One merge walk for every method: fold what the methods added into the base weights.

Methods change a layer in three ways, each with one small protocol (``base.py``):

- a *wrapper layer* replaces the layer and holds it (peft's tuner layers, ``FusedQKVLoRA``,
  ``BoftLayer``): ``get_base_layer()``, ``merge()`` folds its change into the base weights;
- an *attached module* sits beside the layer and acts on it through a hook (SSF, (IA)^3, TSA):
  ``fold(op)``;
- a *linear tap* of a patched ViT attention / MLP adds ``tap(x, which)`` after the Linear
  ``which`` has run (FacT): ``get_delta_weight(which)``.

The walk folds from the inside out, which is the order the forward pass applies them in: hooks
on the plain layer under a wrapper act before the wrapper's change is added, the wrapper's
change next, hooks on the wrapper after that, and taps last (they are added to the output of
the whole layer, hooks included). So the result does not depend on the order the methods were
listed in, and no method's merge knows another method's modules.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import MethodModule, base_layer, get_method, is_wrapper_layer, layers_under
from .scaling import AttachedModule, attached_hooks, remove_hooks
from .vit_modules import MedpeftAttention, MedpeftMlp, unpatch_unused

_TAPPED = {MedpeftAttention: ("qkv", "proj"), MedpeftMlp: ("fc1", "fc2")}


def merge_methods(model: nn.Module) -> nn.Module:
    """Fold every method applied to ``model`` into its base weights (in place); refuses, changing
    nothing, when one of them cannot be merged."""
    names = list(getattr(model, "medpeft_methods", []))
    refused = [name for name in names if not get_method(name).mergeable]
    if refused:
        raise ConfigError(f"method {refused[0]!r} cannot be merged into the backbone weights "
                          f"(it adds computation no weight can absorb); export it unmerged")
    merge_layers(methods_owner(model))
    model.medpeft_merged = True
    return model


def methods_owner(model: nn.Module) -> nn.Module:
    """The module the methods were applied to (the paths their side modules name are relative to
    it): the model itself, or the encoder inside a segmentation / detection model."""
    for module in model.modules():
        if "medpeft_methods" in vars(module):
            return module
    return model


def merge_layers(model: nn.Module) -> None:
    """The walk itself (no method names needed): wrappers, hooks and taps folded, side modules removed."""
    changed = [(path, module) for path, module in _ops(model) if is_wrapper_layer(module) or attached_hooks(module)]
    tapped = _tapped_linears(model)
    for path, module in changed + [(path, m) for path, m, _ in tapped]:  # check all before changing anything
        _check_foreign_hooks(module, path)
    for path, module in changed:
        _replace(model, path, _collapse(model, module))
    for path, _, (owner, leaf) in tapped:
        linear = getattr(owner, leaf)
        for tap in owner.linear_taps.values():
            delta = tap.get_delta_weight(leaf)
            linear.weight.data += delta.to(linear.weight.dtype)
    for owner in {id(o): o for _, _, (o, _) in tapped}.values():
        owner.linear_taps.clear()
    _remove_method_modules(model)
    unpatch_unused(model)


def _ops(model: nn.Module, prefix: str = ""):
    """(path, module) of the model's layers, a wrapper as one unit (not the base it holds)."""
    for name, child in model.named_children():
        if isinstance(child, MethodModule):
            continue
        path = f"{prefix}{name}"
        yield path, child
        if not is_wrapper_layer(child):
            yield from _ops(child, path + ".")


@torch.no_grad()
def _collapse(model: nn.Module, module: nn.Module) -> nn.Module:
    """The plain layer with the wrapper's change and the hooks of both folded into its weights."""
    plain = module
    if is_wrapper_layer(module):
        plain = _collapse(model, module.get_base_layer())
        module.merge()
    for side in attached_hooks(module):  # forward hooks in the order they run, then input hooks
        remove_hooks(model, side)
        # a side folds into the layer it names; its hook may sit elsewhere (SSF on a BatchNormAct
        # hooks the activation inside it, before which the norm's output is scaled)
        target = model.get_submodule(side.target_path)
        side.fold(plain if target is module else base_layer(target))
    return plain


def _tapped_linears(model: nn.Module) -> list[tuple[str, nn.Module, tuple[nn.Module, str]]]:
    """(path, layer, (owner, leaf)) of every Linear that a linear tap adds to."""
    found = []
    for path, owner in model.named_modules():
        leaves = _TAPPED.get(type(owner))
        if leaves and owner.linear_taps:
            found += [(f"{path}.{leaf}", getattr(owner, leaf), (owner, leaf)) for leaf in leaves]
    return found


def _check_foreign_hooks(module: nn.Module, path: str) -> None:
    """A hook that is not a method's acts on the layer's output after its weights: folding a delta
    into those weights would put the delta under that hook, so refuse (before changing anything)."""
    for layer in layers_under(module):
        hooks = list(layer._forward_hooks.values()) + list(layer._forward_pre_hooks.values())
        foreign = [fn for fn in hooks if not isinstance(getattr(fn, "__self__", None), AttachedModule)]
        if foreign:
            raise ConfigError(f"cannot merge into {path!r}: it carries a forward hook that is not a medpeft "
                              f"method's ({foreign[0]!r}); remove that hook first")


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)


def _remove_method_modules(model: nn.Module) -> None:
    for path, module in list(model.named_modules()):
        if path and isinstance(module, MethodModule):
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if getattr(parent, leaf, None) is module:  # not already removed with an enclosing one
                delattr(parent, leaf)
