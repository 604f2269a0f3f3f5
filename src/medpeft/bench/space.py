"""Hyper-parameter search space per method.

Every method searches the same shared dimensions: the learning rate (log scale, a decade
either side of its default), the weight decay (log scale) and, when the experiment sets a
training budget, that budget (steps or epochs: half, once, twice); on top, the knobs each
method declares where it registers (``register_method(..., search_space=...)``: LoRA rank and
alpha, VPT prompt length, adapter width, partial k, ...). Hybrids (``lora+ssf``) search the
union of their parts' knobs.

A parameter is named ``lr``, ``weight_decay`` or ``<method>_<field>`` (the method-option name
``medpeft run`` uses), so a trial's parameters drop straight into a ``RunConfig``.
"""
from __future__ import annotations

import dataclasses

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

WEIGHT_DECAY = (1e-6, 1e-1)
TRAIN_PARAMS = ("lr", "weight_decay", "steps", "epochs")  # searched parameters that are TrainConfig fields
LR_SPAN = 10.0  # lr searched in [default / LR_SPAN, default * LR_SPAN]


def method_knobs(method: str) -> dict[str, list]:
    """``{option_name: choices}`` for a method or hybrid; the config default is always a choice."""
    from ..methods import get_method, parse_method

    knobs: dict[str, list] = {}
    for name in parse_method(method):
        fields = {f.name: f for f in dataclasses.fields(get_method(name).config_cls)}
        for knob, choices in get_method(name).search_space.items():
            default = fields[knob].default
            values = list(choices)
            if default is not dataclasses.MISSING and default not in values:
                values.append(default)
            knobs[f"{name}_{knob}"] = sorted(values) if all(isinstance(v, (int, float)) for v in values) else values
    return knobs


def default_lr(method: str) -> float:
    from ..methods import get_method, parse_method

    return float(get_method(parse_method(method)[0]).default_lr)


BUDGET_FACTORS = (0.5, 1.0, 2.0)  # the training budget searched around the experiment's own


def budget_choices(budget: tuple[str, int]) -> list[int]:
    return sorted({max(1, int(round(budget[1] * f))) for f in BUDGET_FACTORS})


def search_space(method: str, fixed: set[str] = frozenset(), backbone: str | None = None,
                 image_size: int | None = None, notes: list | None = None,
                 budget: tuple[str, int] | None = None) -> dict[str, BaseDistribution]:
    """Optuna distributions for a method; names in ``fixed`` (set by the user) are not searched.

    Given the backbone, knob values it cannot take (a LoRA rank above a layer's width, ...) are
    dropped once here instead of failing trial after trial; ``notes`` collects what was dropped.
    """
    lr = default_lr(method)
    space: dict[str, BaseDistribution] = {}
    if "lr" not in fixed:
        space["lr"] = FloatDistribution(lr / LR_SPAN, lr * LR_SPAN, log=True)
    if "weight_decay" not in fixed:
        space["weight_decay"] = FloatDistribution(*WEIGHT_DECAY, log=True)
    if budget is not None and "budget" not in fixed:
        space[budget[0]] = CategoricalDistribution(budget_choices(budget))
    for name, choices in method_knobs(method).items():
        if name in fixed:
            continue
        if backbone is not None:
            ok = [c for c in choices if feasible(backbone, image_size, method, name, c)]
            if len(ok) < len(choices) and notes is not None:
                notes.append(f"{method} on {backbone}: {name} {sorted(set(choices) - set(ok))} dropped from the "
                             "search (the backbone's layers cannot take them)")
            choices = ok or choices
        space[name] = CategoricalDistribution(choices)
    return space


_FEASIBLE: dict[tuple, bool] = {}


def feasible(backbone: str, image_size: int | None, method: str, option: str, value) -> bool:
    """Whether the method builds on the backbone with this one option changed (random weights, cached)."""
    from ..errors import ConfigError
    from ..run import build_model

    key = (backbone, image_size, method, option, value)
    if key not in _FEASIBLE:
        try:
            build_model(backbone, 2, image_size or 224, method, {option: value}, pretrained=False)
            _FEASIBLE[key] = True
        except ConfigError:
            _FEASIBLE[key] = False
    return _FEASIBLE[key]


def default_params(method: str, space: dict[str, BaseDistribution], weight_decay: float,
                   budget: tuple[str, int] | None = None) -> dict:
    """The method's own defaults expressed in the search space (trial 0 of every HPO)."""
    from ..methods import get_method, parse_method

    params = {}
    for name in space:
        if name == "lr":
            params[name] = default_lr(method)
        elif name == "weight_decay":
            params[name] = float(min(max(weight_decay, WEIGHT_DECAY[0]), WEIGHT_DECAY[1]))
        elif name in TRAIN_PARAMS:
            params[name] = int(budget[1])
        else:
            for part in parse_method(method):
                if name.startswith(part + "_"):
                    field_name = name[len(part) + 1:]
                    fields = {f.name: f for f in dataclasses.fields(get_method(part).config_cls)}
                    params[name] = fields[field_name].default
    return params


def split_params(params: dict) -> tuple[dict, dict]:
    """(train overrides {lr, weight_decay, steps|epochs}, method options {lora_rank: ...}) of a trial's parameters."""
    train = {k: v for k, v in params.items() if k in TRAIN_PARAMS}
    options = {k: v for k, v in params.items() if k not in train}
    return train, options
