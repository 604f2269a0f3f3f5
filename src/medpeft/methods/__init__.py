"""Fine-tuning methods: one registry, one interface (see ``base``)."""
from .base import (
    MethodConfig,
    MethodSpec,
    apply_methods,
    build_configs,
    config_to_dict,
    count_parameters,
    get_method,
    is_mergeable,
    list_methods,
    load_trained_state,
    parse_method,
    register_method,
    set_train_mode,
    trained_state_dict,
)
from .merging import merge_methods

__all__ = [
    "MethodConfig", "MethodSpec", "apply_methods", "build_configs", "config_to_dict",
    "count_parameters", "get_method", "is_mergeable", "list_methods", "load_trained_state", "merge_methods",
    "parse_method", "register_method", "set_train_mode", "trained_state_dict",
]
