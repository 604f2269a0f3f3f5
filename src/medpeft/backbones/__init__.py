"""Backbones: registry names -> timm models with a fresh head and the best available weights."""

from medpeft.backbones.registry import (
    REGISTRY,
    BackboneInfo,
    backbone_family,
    backbone_info,
    check_image_size,
    create_backbone,
    default_image_size,
    is_online,
    list_backbones,
    read_weights_file,
    resolution_warning,
)

__all__ = ["REGISTRY", "BackboneInfo", "backbone_family", "backbone_info", "check_image_size", "create_backbone",
           "default_image_size", "is_online", "list_backbones", "read_weights_file",
           "resolution_warning"]
