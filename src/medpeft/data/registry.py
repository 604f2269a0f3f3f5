"""``load_data``: one entry point for every data source.

Dispatch on ``cfg.name``: a MedMNIST flag -> official npz files; a folder -> image folder
of class sub-folders; a ``*.csv`` file -> manifest (``task: segmentation``: images with masks,
read by ``masks.py``). Then the split (official, from the
manifest, from a split file, or stratified/grouped by seed) and the label-scarcity subset.
"""
from __future__ import annotations

import os
import warnings
from numbers import Integral
from typing import NamedTuple

from medpeft.data.base import DataBundle, DataConfig
from medpeft.data.folder import load_image_folder
from medpeft.data.manifest import load_manifest
from medpeft.data.medmnist_source import load_medmnist, medmnist_3d_names, medmnist_names
from medpeft.data.splits import (VAL_LABELS, apply_subset, assign_from_split_file, check_ratios, check_subset_options, concat_sets,
                                 split_indices, split_info_for, split_pool, stratum_keys)
from medpeft.errors import ConfigError, DataError
from medpeft.metrics import resolve_positive_class

TASKS = ("classification", "segmentation", "detection")  # medpeft.tasks.TASKS (not imported here: it imports the data layer)


def _candidates(name: str, root: str | None) -> list[str]:
    """The name as given, then relative to cfg.root (so --data-root + a folder name works)."""
    paths = [os.path.expanduser(name)]
    if root and not os.path.isabs(paths[0]):
        paths.append(os.path.join(os.path.expanduser(root), paths[0]))
    return paths


def resolve_source(cfg: DataConfig) -> tuple[str, str]:
    """(kind, flag or path) for cfg.name, or ConfigError listing what is accepted."""
    from medpeft.data.privacy import check_recorded

    check_recorded(cfg.name, cfg.root, cfg.split_file)  # a config.yaml written without full paths
    name = str(cfg.name or "").strip()
    if name.lower() in medmnist_names():
        return "medmnist", name.lower()
    if name.lower() in medmnist_3d_names():
        raise ConfigError(f"data set {name!r} is a 3D MedMNIST volume set; medpeft handles 2D images. "
                          f"2D MedMNIST names: {', '.join(medmnist_names())}")
    for path in _candidates(name, cfg.root):
        if os.path.isdir(path):
            return "folder", path
        if os.path.isfile(path) and path.lower().endswith(".csv"):
            return "manifest", path
    if name.lower().endswith(".csv"):
        raise DataError(f"manifest not found: {name}" + (f" (nor under data root {cfg.root})" if cfg.root else ""))
    raise ConfigError(f"unknown data set {name!r} (no such folder or file). Accepted: a MedMNIST name "
                      f"({', '.join(medmnist_names())}), a folder with one sub-folder of images per class, "
                      "or a CSV manifest (*.csv) with columns path,label[,split][,group]")


def check_data_config(cfg: DataConfig) -> None:
    if cfg.task not in TASKS:
        raise ConfigError(f"task {cfg.task!r} is not one of {', '.join(TASKS)}")
    size = cfg.image_size
    if isinstance(size, bool) or not isinstance(size, Integral) or size < 1:
        raise ConfigError(f"image_size must be a whole number >= 1 (pixels, square), got {size!r}")
    from medpeft.backbones.registry import MAX_IMAGE_SIZE

    if size > MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size {size} is too large: expected at most {MAX_IMAGE_SIZE} px (every image is "
                          "kept in memory at that size)")
    from medpeft.data.io import parse_window

    parse_window(cfg.dicom_window)  # a malformed window fails even for data without DICOM files
    # checked before any image is read, so a typo fails in milliseconds, not after loading
    if cfg.near_duplicates not in ("group", "ignore"):
        raise ConfigError(f"near_duplicates {cfg.near_duplicates!r} is not one of group, ignore")
    if cfg.audit not in ("warn", "strict", "off"):
        raise ConfigError(f"audit {cfg.audit!r} is not one of warn, strict, off")
    check_ratios(cfg.val_ratio, cfg.test_ratio)
    check_subset_options(cfg.fraction, cfg.shots)
    from medpeft.data.noise import parse_label_noise

    parse_label_noise(cfg.label_noise)  # a malformed spec fails before any image is read
    if cfg.label_noise and cfg.task != "classification":
        raise ConfigError(f"label_noise applies to classification labels; task {cfg.task!r} has none to flip")
    if not isinstance(cfg.clean_validation, bool):
        raise ConfigError(f"clean_validation must be true or false, got {cfg.clean_validation!r}")
    if isinstance(cfg.box_min_size, bool) or not isinstance(cfg.box_min_size, Integral) or cfg.box_min_size < 1:
        raise ConfigError(f"box_min_size must be a whole number of pixels >= 1, got {cfg.box_min_size!r}")
    if cfg.val_labels not in VAL_LABELS:
        raise ConfigError(f"val_labels {cfg.val_labels!r} is not one of {', '.join(VAL_LABELS)} (follow: validation "
                          "subsampled like the training labels; full: every validation label)")


class CheckedSource(NamedTuple):
    kind: str  # as resolve_source
    where: str
    class_names: list[str] | None  # where the files list them (class folders, a box file, mask classes)


def check_source(cfg: DataConfig) -> CheckedSource:
    """What can be checked without decoding an image (``benchmark --dry-run`` and every sweep
    before its first job): the MedMNIST file is there or can be downloaded; a folder has its
    class sub-folders with images (segmentation: every image its mask); a manifest's rows, labels
    and files exist. DataError/ConfigError naming the problem. The class names come from the same
    read (None where only decoding the set tells: a manifest's labels, MedMNIST, masks), so an
    external set's label space is checked against the run's without reading its files twice."""
    check_data_config(cfg)
    kind, where = resolve_source(cfg)
    names = None
    if cfg.task == "detection":  # reading the box file checks every box and image file (no decoding)
        from medpeft.data.detection import read_annotations

        names = list(read_annotations(kind, where, cfg)[0].class_names)
    elif cfg.task == "segmentation":
        from medpeft.data import masks

        if kind == "medmnist":
            masks.load_segmentation(kind, where, cfg)  # ConfigError: MedMNIST has no masks
        elif kind == "folder":
            if masks.detect_layout(where, cfg.mask_pattern) == "paired":
                masks.scan_paired_folder(where)
            else:
                masks.scan_beside_folder(where, cfg.mask_pattern)
        else:
            from medpeft.data.manifest import _read_rows, _require, manifest_files

            columns, rows = _read_rows(where)
            if not rows:
                raise DataError(f"manifest {where} has no rows; expected a header and one row per image")
            _require(columns, ["path", "mask"], where)
            root = os.path.realpath(os.path.expanduser(cfg.root) if cfg.root else os.path.dirname(os.path.abspath(where)))
            manifest_files(rows, root, where)
            manifest_files(rows, root, where, column="mask")
    elif kind == "medmnist":
        from medpeft.data.medmnist_source import medmnist_file

        medmnist_file(where, cfg)
    elif kind == "folder":
        from medpeft.data.folder import scan_image_folder

        names = list(scan_image_folder(where, cfg.mask_pattern)[2])
    else:
        from medpeft.data.manifest import check_manifest

        check_manifest(where, cfg)
    return CheckedSource(kind, where, names)


def load_data(cfg: DataConfig) -> DataBundle:
    """Load, split and subset the data described by cfg; images are uint8 at cfg.image_size."""
    check_data_config(cfg)
    kind, where = resolve_source(cfg)
    if cfg.task == "segmentation":  # images with masks: data/masks.py reads them, the split is shared
        from medpeft.data.masks import load_segmentation

        source = load_segmentation(kind, where, cfg)
        bundle = _split_bundle(source.name, "segmentation", source.class_names, source.pool, source.split, cfg)
        bundle.split_info.update(strata=source.strata_names, layout=source.layout)
    elif cfg.task == "detection":  # images with boxes: data/detection.py reads them, the split is shared
        from medpeft.data.detection import STRATA, load_detection

        source = load_detection(kind, where, cfg)
        bundle = _split_bundle(source.name, "detection", source.class_names, source.pool, source.split, cfg)
        bundle.split_info.update(strata=list(STRATA), layout=source.layout, box_corrections=source.corrections)
    elif kind == "medmnist":
        bundle = load_medmnist(where, cfg)
        if cfg.split_file:
            pool = concat_sets([bundle.train, bundle.val, bundle.test])
            bundle.train, bundle.val, bundle.test, bundle.split_info = assign_from_split_file(pool, cfg.split_file)
    elif kind == "folder":
        name, task, class_names, pool = load_image_folder(where, cfg)
        bundle = _split_bundle(name, task, class_names, pool, None, cfg)
    else:
        manifest = load_manifest(where, cfg)
        bundle = _split_bundle(manifest.name, manifest.task, manifest.class_names, manifest.pool,
                               manifest.split, cfg)
    bundle.split_info["source"] = kind
    apply_subset(bundle, cfg)
    if cfg.label_noise:
        from medpeft.data.noise import apply_label_noise

        apply_label_noise(bundle, cfg.label_noise, cfg.subset_seed if cfg.noise_seed is None else cfg.noise_seed,
                          cfg.clean_validation)
    if cfg.synthetic:  # after the label budget and the noise: synthetic images are extra, and clean
        from medpeft.data.synthetic import add_synthetic

        add_synthetic(bundle, cfg)
    elif cfg.synthetic_only:
        raise ConfigError("synthetic_only needs a synthetic manifest (--synthetic)")
    return bundle


def _with_near_duplicate_groups(pool, cfg: DataConfig):
    """Near-duplicate clusters (and existing patient groups) become split groups, so no
    near-duplicate pair can sit on two sides of an automatic split."""
    if cfg.near_duplicates == "ignore":
        return pool
    from medpeft.data.near_duplicates import hash_files, leak_free_groups

    # hashed from the files when the loader kept them: the same groups, hence the same split, at every
    # image size (hashes of resized copies differ slightly from size to size); the loader hashed the
    # pixels it decoded, so no file is read a second time
    source = pool if pool.files is None else hash_files(pool.files, known=pool.file_hashes)
    groups = leak_free_groups(source, threshold=cfg.near_duplicate_threshold, existing=pool.groups)
    if pool.groups is None and len(set(groups)) == len(groups):
        return pool  # no near-duplicates: the plain stratified split applies
    pool.groups = groups
    return pool


def _split_bundle(name, task, class_names, pool, given_split, cfg: DataConfig) -> DataBundle:
    if cfg.split_file:
        train, val, test, info = assign_from_split_file(pool, cfg.split_file)
    elif given_split is not None:
        train, val, test, info = _given_split(pool, given_split, cfg)
    else:
        train, val, test, info = split_pool(_with_near_duplicate_groups(pool, cfg), cfg)
        info["near_duplicates"] = cfg.near_duplicates
    return DataBundle(name=name, task=task, class_names=class_names, train=train, val=val, test=test,
                      split_info=info, positive_class=resolve_positive_class(class_names, task, cfg.positive_class, None))


def _given_split(pool, given_split: list[str], cfg: DataConfig):
    """The manifest's own split column; a missing val split is carved out of train."""
    rows = {s: [i for i, v in enumerate(given_split) if v == s] for s in ("train", "val", "test")}
    for split in ("train", "test"):
        if not rows[split]:
            raise DataError(f"the manifest's split column has no {split!r} rows; give train and test rows "
                            "(val is optional) or drop the split column for an automatic split")
    extra = {}
    if not rows["val"]:
        check_ratios(cfg.val_ratio, cfg.test_ratio)
        train_pool = pool.subset(rows["train"])
        keep, carved = split_indices(stratum_keys(train_pool.labels), train_pool.groups,
                                     (1.0 - cfg.val_ratio, cfg.val_ratio), cfg.split_seed)
        rows["val"] = [rows["train"][i] for i in carved]
        rows["train"] = [rows["train"][i] for i in keep]
        extra = {"val_from_train": cfg.val_ratio, "seed": cfg.split_seed}
    train, val, test = (pool.subset(rows[s]) for s in ("train", "val", "test"))
    info = split_info_for("official", train, val, test, origin="manifest split column", **extra)
    if info.get("groups_on_two_sides"):
        warnings.warn(f"the manifest's split puts {info['groups_on_two_sides']} group(s) on more than one "
                      "side of train/val/test; scores may be inflated by leakage", stacklevel=3)
    return train, val, test, info
