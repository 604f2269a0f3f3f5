"""External test sets: another data source of the same task and label space, read whole.

A model chosen on its home validation split is evaluated once on each external set, after the
home test (``run.execute``); nothing here is read before training ends. What an external set is:

* a folder or a CSV manifest: every image it holds (a manifest's split column is ignored: the
  whole set is the external test);
* a MedMNIST name: its official test split.

The label space must be the home one: the same class names in the same order (classification,
detection) or the same mask classes (segmentation). A manifest is the mapping tool: write the
home class names in its label column. Images load at the run's image size; a channel count
other than the home set's is converted (RGB -> grayscale by ITU-R 601 luma, grayscale -> RGB by
repetition) and said in the record.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from medpeft.data.base import DataConfig, ImageSet
from medpeft.errors import ConfigError, DataError

LUMA = (0.299, 0.587, 0.114)


@dataclass
class ExternalSet:
    name: str  # the key of metrics.json's "external" entry: the folder / file / MedMNIST name
    images: ImageSet
    notes: list[str]


def external_name(source: str) -> str:
    base = os.path.basename(os.path.normpath(str(source)))
    return os.path.splitext(base)[0] if base.lower().endswith(".csv") else base


def check_external_names(sources: list[str]) -> list[str]:
    """The record keys of the external sets; ConfigError when two would share one."""
    names = [external_name(s) for s in sources]
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise ConfigError(f"external test sets {sorted(seen)} are named twice; give each a distinct folder or "
                          "file name (the name keys metrics.json's 'external' entry)")
    return names


def _mismatch(name: str, found: list[str], expected: list[str], task: str = "classification") -> ConfigError:
    how = {"detection": "name the class of boxes drawn from masks with mask_classes (e.g. --mask-classes "
                        f"{','.join(expected)}) or give a box file (CSV path,x0,y0,x1,y1,label) with the run's "
                        "names",
           "segmentation": "give mask_classes with the run's names"}.get(
        task, "map its labels with a CSV manifest (path,label) that uses the run's class names")
    return ConfigError(f"external test set {name!r} has classes {list(found)}; the run's are {list(expected)}. "
                       f"An external set needs the same label space (the same names in the same order): {how}")


def check_class_names(name: str, found: list[str], expected: list[str], task: str = "classification") -> None:
    """ConfigError unless the external set ``name``'s class names equal the run's, in order."""
    if list(found) != list(expected):
        raise _mismatch(name, found, expected, task)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 1:
        weights = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous()


def load_external(home: DataConfig, source: str, class_names: list[str], channels: int) -> ExternalSet:
    """Read ``source`` whole with the home run's data options, checked against its label space."""
    from medpeft.data.registry import check_data_config, resolve_source

    cfg = dataclasses.replace(home, name=str(source), fraction=None, shots=None, split_file=None, split_seed=0)
    check_data_config(cfg)
    kind, where = resolve_source(cfg)
    if home.task == "segmentation":
        from medpeft.data.masks import load_segmentation

        source_set = load_segmentation(kind, where, cfg)
        pool, names = source_set.pool, source_set.class_names
    elif home.task == "detection":
        from medpeft.data.detection import load_detection

        source_set = load_detection(kind, where, cfg)
        pool, names = source_set.pool, source_set.class_names
    elif kind == "medmnist":
        from medpeft.data.medmnist_source import load_medmnist

        bundle = load_medmnist(where, cfg)
        pool, names = bundle.test, bundle.class_names
    elif kind == "folder":
        from medpeft.data.folder import load_image_folder

        _, _, names, pool = load_image_folder(where, cfg)
    else:
        from medpeft.data.manifest import load_manifest

        manifest = load_manifest(where, cfg)
        pool, names = manifest.pool, manifest.class_names
    name = external_name(source)
    check_class_names(name, names, class_names, home.task)
    if len(pool) == 0:
        raise DataError(f"external test set {name!r} holds no images")
    notes = []
    if pool.images.shape[1] != channels:
        notes.append(f"{pool.images.shape[1]}-channel images converted to {channels} channel(s) like the home set")
        pool.images = convert_channels(pool.images, channels)
    return ExternalSet(name=name, images=pool, notes=notes)
