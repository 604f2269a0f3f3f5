"""The one interface every fine-tuning method implements.

A method is a small tuner (in the spirit of HF peft): a config dataclass plus an ``apply``
function that takes a timm model, injects its modules (if any) and marks exactly the
parameters it trains. Methods compose: ``lora+vpt_deep`` applies both, and the trainable
set is the union. The classification head is always trained and always saved.

Conventions the rest of medpeft relies on:
- ``apply_methods`` freezes everything first, then each method unfreezes what it trains.
- A normalisation layer updates its running statistics only if one of its own
  parameters is trainable; its buffers are then saved with the trained parameters.
- A method that declares ``mergeable=True`` changes layers only in ways the one merge walk
  (``merging.merge_methods``) can fold into the base weights, so inference costs nothing extra:
  a *wrapper layer* that replaces a layer and holds it (``get_base_layer``, ``merge``,
  ``unmerge``, ``get_delta_weight``: peft's tuner-layer protocol, which peft's layers already
  speak), an *attached module* beside a layer acting through a hook (``fold(op)``), or a *linear
  tap* of a patched ViT attention / MLP (``get_delta_weight(which)``). No merge knows another
  method's modules.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, unknown_name


@dataclass
class MethodConfig:
    """Base class of every method's options. Field names become CLI options ``--<method>-<field>``."""


@dataclass
class MethodSpec:
    name: str
    families: tuple[str, ...]  # backbone families it applies to: "cnn", "vit"
    config_cls: type
    apply: Callable[[nn.Module, MethodConfig], None]
    description: str
    default_lr: float = 1e-3
    mergeable: bool = False  # the merge walk can fold everything the method adds into base weights
    identity_at_init: bool = False  # adapted model == base model before training
    reference: str = ""
    # HPO knobs beyond the shared lr / weight decay / budget: {config field: choices}. Choices, not
    # ranges: these knobs are structural (sizes); the literature grids them (PETL_Vision: rank
    # {1,8,16,32}, prompts {5,10,50,100}). Declared at registration, so no method is searched on
    # lr and wd alone by omission ({} says so explicitly).
    search_space: dict = dataclasses.field(default_factory=dict)


REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    families: tuple[str, ...],
    config_cls: type = MethodConfig,
    *,
    description: str,
    default_lr: float = 1e-3,
    mergeable: bool = False,
    identity_at_init: bool = False,
    reference: str = "",
    search_space: dict,
):
    """Decorator registering ``apply(model, cfg)`` as method ``name``."""

    def wrap(apply):
        if name in REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(search_space) - fields)
        if unknown:  # a knob the config does not have would be searched in vain
            raise RuntimeError(f"method {name!r}: search_space names {unknown}, not fields of {config_cls.__name__}")
        REGISTRY[name] = MethodSpec(
            name, tuple(families), config_cls, apply, description, default_lr, mergeable, identity_at_init, reference,
            dict(search_space),
        )
        return apply

    return wrap


def list_methods() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in REGISTRY:
        raise unknown_name("method", name, REGISTRY)
    return REGISTRY[name]


def parse_method(spec: str) -> list[str]:
    """``"lora+vpt_deep"`` -> ``["lora", "vpt_deep"]`` with every name checked."""
    names = [part.strip() for part in spec.split("+") if part.strip()]
    if not names:
        raise ConfigError(f"empty method {spec!r}; expected a name like 'lora' or a hybrid like 'lora+ssf'")
    for name in names:
        get_method(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"method {spec!r} names a method twice")
    if len(names) > 1 and any(n in names for n in ("full", "linear", "decoder", "head")):
        raise ConfigError(f"method {spec!r}: 'full', 'linear', 'decoder' and 'head' are baselines and cannot be combined")
    return names


def build_configs(names: list[str], options: dict | None = None) -> dict[str, MethodConfig]:
    """Config per method from flat options ``{"lora_rank": 8, "lora_targets": "qv"}``.

    Options whose prefix names another method are ignored (a sweep shares one option dict);
    an option with a method's prefix that names no field of its config is an error.
    """
    options = dict(options or {})
    configs = {}
    for name in names:
        spec = get_method(name)
        fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
        kwargs = {}
        prefix = name + "_"
        for key, value in options.items():
            if value is None or not key.startswith(prefix):
                continue
            field_name = key[len(prefix):]
            if field_name not in fields:
                valid = ", ".join(prefix + f for f in fields) or "none"
                raise ConfigError(f"unknown option {key!r} for method {name!r}; valid options: {valid}")
            kwargs[field_name] = value
        try:
            configs[name] = spec.config_cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad options for method {name!r}: {err}") from None
    return configs


def config_to_dict(configs: dict[str, MethodConfig]) -> dict:
    return {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def apply_methods(model: nn.Module, names: list[str], configs: dict[str, MethodConfig], family: str) -> nn.Module:
    """Adapt ``model`` in place: freeze all, apply each method, train the head."""
    for name in names:
        spec = get_method(name)
        if family not in spec.families:
            raise ConfigError(
                f"method {name!r} does not apply to a {family.upper()} backbone; "
                f"it applies to: {', '.join(f.upper() for f in spec.families)}"
            )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        get_method(name).apply(model, configs[name])
    for param in head_parameters(model):
        param.requires_grad_(True)
    model.medpeft_methods = list(names)  # read by merge_methods
    return model


def is_mergeable(names: list[str]) -> bool:
    return all(get_method(n).mergeable for n in names)


# --------------------------------------------------------------------------- the layer protocols of merging


class MethodModule(nn.Module):
    """A module a method adds beside the model's own layers (side modules, shared factors); the
    merge walk removes every one once their effect is folded into the base weights."""


def is_wrapper_layer(module: nn.Module) -> bool:
    """A layer that replaced another and holds it: peft's tuner-layer protocol (``get_base_layer``,
    ``merge``, ``unmerge``), which peft's layers and medpeft's own wrappers share."""
    return callable(getattr(module, "get_base_layer", None)) and callable(getattr(module, "merge", None))


def layers_under(module: nn.Module):
    """The module, then each layer a wrapper holds, down to the plain layer."""
    yield module
    while is_wrapper_layer(module):
        inner = module.get_base_layer()
        if inner is module:
            return
        module = inner
        yield module


def base_layer(module: nn.Module) -> nn.Module:
    """The plain layer under any wrapper layers."""
    *_, plain = layers_under(module)
    return plain


# --------------------------------------------------------------------------- accounting / state

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in head_parameters(model))
    return {
        "total": total,
        "trainable": trainable,
        "trainable_without_head": trainable - head,
        "trainable_pct": 100.0 * trainable / max(total, 1),
    }


def _modules_with_trainable_stats(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            yield name, module


BN_STATS = ("frozen", "update")


def set_train_mode(model: nn.Module, training: bool = True, bn_stats: str = "frozen") -> None:
    """train()/eval(), with BatchNorm running statistics kept fixed during training.

    ``bn_stats="frozen"`` (default) keeps every BatchNorm layer in eval mode: measured on
    BreastMNIST with EfficientNet-Lite0 at 32 px, updating the statistics from batches of 32
    dropped the test AUROC of full fine-tuning from 0.83 to 0.59 and of BitFit from 0.82 to 0.64.
    ``"update"`` lets layers whose affine parameters are trained update their statistics too.
    """
    model.train(training)
    if training:
        trainable_bn = set() if bn_stats == "frozen" else {id(m) for _, m in _modules_with_trainable_stats(model)}
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in trainable_bn:
                module.eval()


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly what training changed: trainable parameters (head included) and the
    running statistics of normalisation layers whose parameters were trained."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for mod_name, module in _modules_with_trainable_stats(model):
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                state[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach()
    return state


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Load a ``trained_state_dict`` onto a freshly adapted model; every key must match."""
    expected = trained_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{source} does not match the adapted model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved with another method/backbone/options?"
        )
    for key, value in state.items():
        if expected[key].shape != value.shape:
            raise ConfigError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)


_LOADED = False


def _load_all() -> None:
    """Import the method modules once so their ``register_method`` calls run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import library  # noqa: F401  (imports every method module)
