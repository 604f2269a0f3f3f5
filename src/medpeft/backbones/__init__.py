"""Backbones: registry names -> timm models with a fresh head and the best available weights."""

from medpeft.backbones.registry import (
    REGISTRY,
    BackboneInfo,
    backbone_family,
    check_image_size,
    create_backbone,
    is_online,
    list_backbones,
    read_weights_file,
)

__all__ = ["REGISTRY", "BackboneInfo", "backbone_family", "check_image_size", "create_backbone", "is_online",
           "list_backbones", "read_weights_file"]
