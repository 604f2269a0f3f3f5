"""Imports every method module so that each registers itself (see ``base.register_method``)."""
from . import adapters, baselines, fact, lora, prompts, selective  # noqa: F401
