"""Image folders: ``root/<class>/<images>`` (sub-folders inside a class folder are searched too).

Classes are the sorted sub-folder names; files matching ``mask_pattern`` (segmentation masks
such as BUSI's ``*_mask.png``) and non-image files are skipped.

Positive class (binary folders): there is no clinical default, so without ``--positive-class``
it is index 1, the second sub-folder name in sorted order (``benign``/``malignant`` happens to
give ``malignant``; ``malignant``/``normal`` would give ``normal``: name it explicitly).
"""
from __future__ import annotations

import fnmatch
import os

import torch

from medpeft.data.base import DataConfig, ImageSet
from medpeft.data.io import IMAGE_EXTENSIONS, is_image_file, load_images_hashed
from medpeft.errors import DataError


def scan_image_folder(root: str, mask_pattern: str | None = "*_mask*") -> tuple[list[str], list[int], list[str]]:
    """(relative paths, class indices, class names) of every image under root/<class>/."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(class_names) < 2:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and is_image_file(e.name))
        hint = f" ({loose} image(s) lie directly in it)" if loose else ""
        raise DataError(f"image folder {root} has {len(class_names)} class sub-folder(s){hint}; expected "
                        "one sub-folder per class, at least 2, e.g. root/benign/*.png and root/malignant/*.png")
    paths, labels = [], []
    for index, name in enumerate(class_names):
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in files:
                if not is_image_file(file):
                    continue
                if mask_pattern and fnmatch.fnmatch(file, mask_pattern):
                    continue
                found.append(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
        if not found:
            raise DataError(f"class folder {os.path.join(root, name)} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}; excluded: {mask_pattern!r}); "
                            "add images or remove the folder")
        found.sort()
        paths += found
        labels += [index] * len(found)
    return paths, labels, class_names


def _dicom_groups(files: list[str]) -> list[str] | None:
    """Hashed patient (else study) ids of DICOM files as split groups: no patient on two sides."""
    if not any(f.lower().endswith(".dcm") for f in files):
        return None
    from medpeft.data.dicom import dicom_split_groups

    return dicom_split_groups(files)


def load_image_folder(root: str, cfg: DataConfig) -> tuple[str, str, list[str], ImageSet]:
    """Read every image of the folder into one pool (splitting happens in the registry)."""
    rel_paths, labels, class_names = scan_image_folder(root, cfg.mask_pattern)
    files = [os.path.join(root, p) for p in rel_paths]
    images, hashes = load_images_hashed(files, cfg.image_size, cfg.dicom_window)
    groups = _dicom_groups(files)
    if groups is None:  # a groups.csv or README frame-range table of the folder (patients, sequences)
        from medpeft.data.groups import folder_groups

        groups = folder_groups(root, rel_paths)[0]
    pool = ImageSet(images=images, labels=torch.tensor(labels, dtype=torch.int64), ids=rel_paths, groups=groups,
                    files=files, file_hashes=hashes)
    task = "binary" if len(class_names) == 2 else "multiclass"
    name = os.path.basename(os.path.normpath(root))
    return name, task, class_names, pool
