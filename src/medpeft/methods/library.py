"""Imports every method module so that each registers itself (see ``base.register_method``)."""
from . import baselines, lora, selective  # noqa: F401
