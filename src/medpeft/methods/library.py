"""Imports every method module so that each registers itself (see ``base.register_method``)."""
from . import adapters, baselines, fact, lora, prompts, selective  # noqa: F401
from . import cnn_adapters, orthogonal, reparam, scaling  # noqa: F401  (selective/reparam/BOFT/scaling/TSA methods)
