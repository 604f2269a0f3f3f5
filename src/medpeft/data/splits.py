"""Train/val/test splits, split files, and label-scarcity subsets of the training split.

Everything here is deterministic given its seed. Subsets are *nested*: for one seed, the
subset for a smaller fraction (or fewer shots) is contained in the subset for a larger one,
because each class gets one fixed seeded permutation and a subset is a prefix of it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch

from medpeft.data.base import DataBundle, DataConfig, ImageSet
from medpeft.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
SPLIT_FILE_FORMAT = "medpeft-split/1"


# ----------------------------------------------------------------------------- helpers
def ids_sha256(ids: Sequence[str]) -> str:
    """Fingerprint of a set of ids (order-free), to tell two runs used the same split."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def stratum_keys(labels) -> np.ndarray:
    """One integer per row to stratify on: the class, or for multi-label rows the rarest
    positive label (all-negative rows get their own key)."""
    labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim == 1:
        return labels.astype(np.int64)
    positives = labels > 0.5
    frequency = positives.sum(axis=0)
    # rarest first: among a row's positive labels pick the one with the smallest frequency
    cost = np.where(positives, frequency[None, :], np.iinfo(np.int64).max)
    keys = cost.argmin(axis=1).astype(np.int64)
    keys[~positives.any(axis=1)] = labels.shape[1]
    return keys


def check_ratios(val_ratio, test_ratio) -> None:
    for name, value in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < float(value) < 1:
            raise ConfigError(f"{name} must be a number with 0 < {name} < 1, got {value!r}")
    if float(val_ratio) + float(test_ratio) >= 1:
        raise ConfigError(f"val_ratio + test_ratio must be < 1 (training needs images), "
                          f"got {val_ratio} + {test_ratio}")


def _counts_for(n: int, ratios: Sequence[float]) -> list[int]:
    """How many of n items go to each part; part 0 (train) takes the rest and keeps >= 1."""
    counts = [0] + [int(math.floor(n * r + 0.5)) for r in ratios[1:]]
    counts[0] = n - sum(counts[1:])
    while counts[0] < 1 and n >= 1:
        largest = max(range(1, len(counts)), key=lambda i: (counts[i], -i))
        counts[largest] -= 1
        counts[0] += 1
    return counts


def split_indices(keys: np.ndarray, groups: Sequence[str] | None, ratios: Sequence[float],
                  seed: int) -> list[np.ndarray]:
    """Split rows into len(ratios) parts, stratified by ``keys``; with ``groups`` no group is
    cut across parts. Returns sorted index arrays."""
    keys = np.asarray(keys)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in ratios]
    if groups is None:
        for key in np.unique(keys):
            rows = rng.permutation(np.flatnonzero(keys == key))
            start = 0
            for part, count in enumerate(_counts_for(len(rows), ratios)):
                parts[part].extend(rows[start:start + count].tolist())
                start += count
    else:
        parts = _grouped_parts(keys, list(groups), ratios, rng)
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def _grouped_parts(keys, groups, ratios, rng) -> list[list[int]]:
    """Greedy: groups (largest first, seeded order among equal sizes) go to the part that is
    furthest behind its target for the group's majority label."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for row, group in enumerate(groups):
        rows_of[group].append(row)
    names = sorted(rows_of)
    if len(names) < len(ratios):
        raise DataError(f"a grouped split into {len(ratios)} parts needs at least {len(ratios)} "
                        f"groups, found {len(names)}")
    majority = {}
    for name in names:
        counts = Counter(keys[rows_of[name]].tolist())
        majority[name] = min(counts, key=lambda k: (-counts[k], k))
    rows_per_stratum = Counter()
    for name in names:
        rows_per_stratum[majority[name]] += len(rows_of[name])
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda n: -len(rows_of[n]))  # stable: seeded order among equal sizes
    filled = defaultdict(float)
    assigned: list[list[str]] = [[] for _ in ratios]
    for name in order:
        stratum = majority[name]
        total = rows_per_stratum[stratum]

        def behind(part: int) -> tuple[float, int]:
            target = ratios[part] * total
            return ((target - filled[part, stratum]) / target if target > 0 else -math.inf, -part)

        part = max(range(len(ratios)), key=behind)
        assigned[part].append(name)
        filled[part, stratum] += len(rows_of[name])
    # every part must get something: move the smallest group out of the part with most groups
    for part in range(len(ratios)):
        if not assigned[part]:
            donor = max(range(len(ratios)), key=lambda p: (len(assigned[p]), -p))
            smallest = min(assigned[donor], key=lambda n: (len(rows_of[n]), n))
            assigned[donor].remove(smallest)
            assigned[part].append(smallest)
    return [[row for name in part for row in rows_of[name]] for part in assigned]


# ----------------------------------------------------------------------------- splitting
def concat_sets(sets: Sequence[ImageSet]) -> ImageSet:
    groups = None
    if all(s.groups is not None for s in sets):
        groups = [g for s in sets for g in s.groups]
    masks = torch.cat([s.masks for s in sets]) if all(s.masks is not None for s in sets) else None
    boxes = None
    if all(s.boxes is not None for s in sets):  # padded to the longest box list
        most = max(s.boxes.shape[1] for s in sets)
        boxes = torch.cat([torch.nn.functional.pad(s.boxes, (0, 0, 0, most - s.boxes.shape[1]), value=float("nan"))
                           for s in sets])
    return ImageSet(images=torch.cat([s.images for s in sets]), labels=torch.cat([s.labels for s in sets]),
                    ids=[i for s in sets for i in s.ids], groups=groups, masks=masks, boxes=boxes)


def split_info_for(kind: str, train: ImageSet, val: ImageSet, test: ImageSet, **extra) -> dict:
    info = {"kind": kind, **extra,
            "sizes": {"train": len(train), "val": len(val), "test": len(test)},
            "train_ids_sha256": ids_sha256(train.ids),
            "val_ids_sha256": ids_sha256(val.ids),
            "test_ids_sha256": ids_sha256(test.ids)}
    if train.groups is not None and val.groups is not None and test.groups is not None:
        sides = [set(s.groups) for s in (train, val, test)]
        info["groups_on_two_sides"] = len((sides[0] & sides[1]) | (sides[0] & sides[2]) | (sides[1] & sides[2]))
    return info


def split_pool(pool: ImageSet, cfg: DataConfig) -> tuple[ImageSet, ImageSet, ImageSet, dict]:
    """Stratified (or grouped, when the pool has groups) train/val/test split by cfg.split_seed."""
    check_ratios(cfg.val_ratio, cfg.test_ratio)
    if len(pool) < 3:
        raise DataError(f"cannot split {len(pool)} images into train/val/test; need at least 3")
    ratios = (1.0 - cfg.val_ratio - cfg.test_ratio, cfg.val_ratio, cfg.test_ratio)
    parts = split_indices(stratum_keys(pool.labels), pool.groups, ratios, cfg.split_seed)
    train, val, test = (pool.subset(p) for p in parts)
    kind = "stratified" if pool.groups is None else "grouped"
    info = split_info_for(kind, train, val, test, seed=cfg.split_seed,
                          val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio)
    return train, val, test, info


# ----------------------------------------------------------------------------- split files
def save_split(bundle: DataBundle, path: str | os.PathLike) -> None:
    """Write the split's ids as JSON. ``train`` and ``val`` hold the whole splits even when a
    fraction/shots subset was taken (the subsets are in ``train_subset`` / ``val_subset``), so a
    reloaded split plus the same subset options gives the same subsets again."""
    full_train = getattr(bundle, "_full_train_ids", None) or list(bundle.train.ids)
    full_val = getattr(bundle, "_full_val_ids", None) or list(bundle.val.ids)
    payload = {"format": SPLIT_FILE_FORMAT, "name": bundle.name,
               "train": list(full_train), "val": list(full_val), "test": list(bundle.test.ids)}
    if getattr(bundle, "_full_train_ids", None) is not None:
        payload["train_subset"] = list(bundle.train.ids)
    if getattr(bundle, "_full_val_ids", None) is not None:
        payload["val_subset"] = list(bundle.val.ids)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")


def read_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}; expected JSON written by save_split") from None
    if not isinstance(payload, dict):
        raise DataError(f"split file {path}: expected a JSON object with lists 'train', 'val', 'test'")
    splits = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        ids = payload.get(split)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise DataError(f"split file {path}: {split!r} must be a non-empty list of image ids, "
                            f"got {type(ids).__name__}")
        for image_id in ids:
            if image_id in seen:
                raise DataError(f"split file {path}: id {image_id!r} is in both {seen[image_id]!r} "
                                f"and {split!r} (or twice in one)")
            seen[image_id] = split
        splits[split] = ids
    return splits


def assign_from_split_file(pool: ImageSet, path: str | os.PathLike) -> tuple[ImageSet, ImageSet, ImageSet, dict]:
    """Rebuild train/val/test from a split file; each split keeps the file's id order."""
    splits = read_split_file(path)
    where = {image_id: row for row, image_id in enumerate(pool.ids)}
    unknown = [i for split in SPLITS for i in splits[split] if i not in where]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5])
        raise DataError(f"split file {os.fspath(path)}: {len(unknown)} id(s) not in the data set "
                        f"(first: {shown}); the split file must come from the same data")
    parts = [[where[i] for i in splits[split]] for split in SPLITS]
    unassigned = len(pool) - sum(len(p) for p in parts)
    if unassigned:
        warnings.warn(f"split file {os.fspath(path)} does not list {unassigned} image(s) of the data set; "
                      "they are left out of every split", stacklevel=2)
    train, val, test = (pool.subset(p) for p in parts)
    from medpeft.data.privacy import public_path

    info = split_info_for("file", train, val, test, file=public_path(os.fspath(path)), unassigned=unassigned)
    return train, val, test, info


# ----------------------------------------------------------------------------- scarcity
def _check_fraction(fraction) -> float:
    if isinstance(fraction, str):
        try:
            fraction = float(fraction)
        except ValueError:
            raise ConfigError(f"fraction must be a number with 0 < fraction <= 1, got {fraction!r}") from None
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < float(fraction) <= 1:
        raise ConfigError(f"fraction must be a number with 0 < fraction <= 1, got {fraction!r}")
    return float(fraction)


def _check_shots(shots) -> int:
    if isinstance(shots, bool) or not isinstance(shots, Integral) or int(shots) < 1:
        raise ConfigError(f"shots must be a whole number >= 1 (images per class), got {shots!r}")
    return int(shots)


def check_subset_options(fraction, shots) -> None:
    """ConfigError for a bad fraction/shots value or for both given at once."""
    if fraction is not None and shots is not None:
        raise ConfigError(f"give either fraction ({fraction}) or shots ({shots}), not both")
    if fraction is not None:
        _check_fraction(fraction)
    if shots is not None:
        _check_shots(shots)


def subset_train(labels, fraction: float | None = None, shots: int | None = None, seed: int = 0,
                 class_names: Sequence[str] | None = None) -> np.ndarray:
    """Sorted row indices of a label-scarce subset of the training labels.

    fraction f: per class round(f * n_c) rows, at least one. shots k: k rows per class.
    Both are prefixes of one seeded permutation per class, so subsets are nested.
    Multi-label labels (2D): fraction only, as a prefix of one seeded permutation of all rows.
    """
    labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels)
    n = labels.shape[0]
    check_subset_options(fraction, shots)
    if fraction is None and shots is None:
        return np.arange(n, dtype=np.int64)
    fraction = None if fraction is None else _check_fraction(fraction)
    shots = None if shots is None else _check_shots(shots)
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        if shots is not None:
            raise ConfigError("shots (k images per class) is not defined for multi-label data; "
                              "use fraction instead")
        take = max(1, int(math.floor(fraction * n + 0.5)))
        return np.sort(rng.permutation(n)[:take]).astype(np.int64)
    chosen = []
    for cls in np.unique(labels):  # sorted: the permutation of class c never depends on f or k
        rows = rng.permutation(np.flatnonzero(labels == cls))
        if shots is not None:
            if shots > len(rows):
                name = class_names[int(cls)] if class_names is not None and 0 <= cls < len(class_names) else cls
                raise ConfigError(f"shots={shots} but class {name!r} has only {len(rows)} training "
                                  f"image(s); use shots <= {len(rows)}")
            take = shots
        else:
            take = max(1, int(math.floor(fraction * len(rows) + 0.5)))
        chosen.append(rows[:take])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


VAL_LABELS = ("follow", "full")


def apply_subset(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """Replace bundle.train by its fraction/shots subset and record it; with
    ``cfg.val_labels == "follow"`` the validation split is subsampled by the same rule (stratified,
    at least one per class, nested, seeded), so selection uses no more labels than the budget
    allows. The test split is never touched."""
    if cfg.val_labels not in VAL_LABELS:
        raise ConfigError(f"val_labels {cfg.val_labels!r} is not one of {', '.join(VAL_LABELS)}")
    bundle.split_info["val_labels"] = cfg.val_labels
    if cfg.fraction is None and cfg.shots is None:
        return bundle
    before = len(bundle.train)
    index = subset_train(bundle.train.labels, fraction=cfg.fraction, shots=cfg.shots,
                         seed=cfg.subset_seed, class_names=bundle.class_names)
    full_ids = list(bundle.train.ids)
    rest = np.setdiff1d(np.arange(before), np.asarray(index, dtype=np.int64))
    unlabelled = bundle.train.subset(rest)
    unlabelled.labels = torch.full_like(unlabelled.labels, -1)  # unlabelled: nothing may read them
    bundle.unlabelled = unlabelled
    bundle.train = bundle.train.subset(index)
    # kept outside split_info (which goes into configs): lets save_split write the whole split
    bundle._full_train_ids = full_ids
    bundle.split_info.update({
        "fraction": None if cfg.fraction is None else float(cfg.fraction),
        "shots": cfg.shots, "subset_seed": cfg.subset_seed,
        "n_train_before": before, "n_train_after": len(bundle.train),
        "train_subset_ids_sha256": ids_sha256(bundle.train.ids),
    })
    if cfg.val_labels == "follow":
        val_before = len(bundle.val)
        shots = None if cfg.shots is None else min(cfg.shots, _smallest_class(bundle.val.labels))
        # its own stream: the validation subset must not mirror the training subset's draw
        keep = subset_train(bundle.val.labels, fraction=cfg.fraction, shots=shots,
                            seed=cfg.subset_seed + VAL_SUBSET_SEED_OFFSET, class_names=bundle.class_names)
        bundle._full_val_ids = list(bundle.val.ids)
        bundle.val = bundle.val.subset(keep)
        bundle.split_info.update({"n_val_before": val_before, "n_val_after": len(bundle.val),
                                  "val_subset_ids_sha256": ids_sha256(bundle.val.ids)})
    return bundle


VAL_SUBSET_SEED_OFFSET = 1_000_003


def _smallest_class(labels) -> int:
    labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or labels.size == 0:
        return 1
    counts = np.bincount(labels)
    return int(counts[counts > 0].min())


# ----------------------------------------------------------------------------- before training
def check_splits(bundle: DataBundle, need_val: bool = True, need_test: bool = True) -> list[str]:
    """An empty split the run needs is a DataError naming it; a test (or validation) split of a
    classification task that lacks a class gets a warning (AUROC, sensitivity or specificity of
    the missing class are undefined: NaN in the metrics). Returns the warnings given."""
    needed = [("train", bundle.train)] + [("val", bundle.val)] * need_val + [("test", bundle.test)] * need_test
    for split, part in needed:
        if len(part) == 0:
            raise DataError(f"the {split} split of {bundle.name} is empty (0 images; splits: train "
                            f"{len(bundle.train)}, val {len(bundle.val)}, test {len(bundle.test)}); every split a "
                            "run uses needs images: give more data, other split ratios or a split file")
    given = []
    if bundle.task not in ("binary", "multiclass", "multilabel"):
        return given
    for split, part in needed[1:]:
        labels = part.labels.numpy()
        if bundle.task == "multilabel":
            constant = [name for k, name in enumerate(bundle.class_names) if len(np.unique(labels[:, k])) < 2]
            if constant:
                given.append(f"the {split} split of {bundle.name} ({len(part)} images) has label(s) "
                             f"{', '.join(constant)} all positive or all negative: their AUROC is undefined (NaN)")
            continue
        present = Counter(int(v) for v in labels)
        missing = [name for k, name in enumerate(bundle.class_names) if k not in present]
        if missing:
            held = ", ".join(f"{bundle.class_names[k]} {n}" for k, n in sorted(present.items()))
            given.append(f"the {split} split of {bundle.name} ({len(part)} images: {held}) has no image of class(es) "
                         f"{', '.join(missing)}: its AUROC{' (and sensitivity or specificity)' * (bundle.task == 'binary')} "
                         "is undefined (NaN); give more data or other split ratios")
    for message in given:
        warnings.warn(message, stacklevel=2)
    return given
