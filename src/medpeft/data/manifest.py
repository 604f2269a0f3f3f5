"""CSV manifests: ``path,label[,split][,group]`` (or ``path`` plus 0/1 label columns).

Paths are relative to the manifest's folder, or to ``cfg.root`` when given, and must stay
inside that root: ``..``, absolute paths elsewhere and symlinks pointing out are refused.

Segmentation (``task: segmentation``): an extra ``mask`` column gives each image's mask file,
checked like ``path``; ``label`` becomes optional (the split stratum). Read by ``data/masks.py``;
classification manifests ignore the column.

Positive class (binary manifests): there is no clinical default, so without ``--positive-class``
it is index 1, the second class name in the manifest's class order; name it explicitly.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass

import torch

from medpeft.data.base import DataConfig, ImageSet
from medpeft.data.io import load_images_hashed
from medpeft.data.splits import SPLITS
from medpeft.errors import DataError

_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}


@dataclass
class Manifest:
    name: str
    task: str
    class_names: list[str]
    pool: ImageSet
    split: list[str] | None  # per row "train"/"val"/"test" when the manifest has a split column
    root: str


def _hash_group(value: str) -> str:
    # groups are often patient ids: keep only a hash in memory and in anything written out
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]


def _read_rows(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = []
            for row in reader:
                if not any((v or "").strip() for k, v in row.items() if k is not None):
                    continue  # blank line
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}; expected a UTF-8 CSV file") from None
    return columns, rows


def _require(columns: list[str], needed: list[str], path: str) -> None:
    for column in needed:
        if column not in columns:
            raise DataError(f"manifest {path} has no column {column!r}; columns found: "
                            f"{', '.join(repr(c) for c in columns) or 'none'}")


def _inside(root_real: str, rel: str, where: str) -> str:
    """Absolute path of ``rel`` under root, refusing anything that resolves outside root."""
    if not rel:
        raise DataError(f"{where}: empty path")
    candidate = rel if os.path.isabs(rel) else os.path.join(root_real, rel)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real, root_real]) != root_real:
        raise DataError(f"{where}: path {rel!r} resolves outside the data root {root_real}; "
                        "manifest paths must be relative and stay inside the root")
    return real


def manifest_files(rows, root_real: str, path: str, column: str = "path") -> tuple[list[str], list[str]]:
    """(absolute files, ids relative to the root) of one path column (``path``, or ``mask`` for
    segmentation): every entry non-empty, inside the root and an existing file; images once each."""
    what = "" if column == "path" else f"{column} "
    files, ids, seen = [], [], {}
    for line, row in rows:
        where = f"{path} line {line}" + (f", column {column!r}" if what else "")
        real = _inside(root_real, row[column], where)
        image_id = os.path.relpath(real, root_real).replace(os.sep, "/")
        if column == "path" and image_id in seen:
            raise DataError(f"{where}: {row['path']!r} is listed twice (first on line {seen[image_id]}); "
                            "each image must appear once")
        seen[image_id] = line
        files.append(real)
        ids.append(image_id)
    missing = [(line, row[column]) for (line, row), f in zip(rows, files) if not os.path.isfile(f)]
    if missing:
        shown = "; ".join(f"line {line}: {p}" for line, p in missing[:5])
        raise DataError(f"manifest {path}: {len(missing)} listed {what}file(s) do not exist under {root_real} "
                        f"({shown})")
    return files, ids


def manifest_split(rows, columns: list[str], path: str) -> list[str] | None:
    """The split column's values (train/val/test per row), or None without a split column."""
    if "split" not in columns:
        return None
    split = []
    for line, row in rows:
        value = row["split"].lower()
        if value not in SPLITS:
            raise DataError(f"{path} line {line}: split {row['split']!r} is not one of train, val, test")
        split.append(value)
    return split


def manifest_groups(rows, group_column: str | None, path: str) -> list[str] | None:
    """Hashed group (patient) ids per row, or None without a group column."""
    if not group_column:
        return None
    groups = []
    for line, row in rows:
        if not row[group_column]:
            raise DataError(f"{path} line {line}: empty {group_column!r}; every row needs a group")
        groups.append(_hash_group(row[group_column]))
    return groups


# spellings of a missing value (pandas, R, Excel exports): never a class of their own
MISSING_LABELS = {"nan", "na", "n/a", "null", "none", "<na>", "#n/a", "?", "-"}


def check_missing_labels(rows, path: str, column: str = "label") -> None:
    """DataError naming the lines whose label is empty or a missing-value marker (NaN, NA, null...)."""
    bad = [(line, row.get(column, "")) for line, row in rows
           if not row.get(column, "") or row.get(column, "").strip().lower() in MISSING_LABELS]
    if bad:
        shown = ", ".join(f"line {line} ({value!r})" for line, value in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(f"{path}: {len(bad)} row(s) have no {column}: {shown}; every row needs a class label "
                        "(a missing value such as NaN is not a class): fill them in or drop the rows")


def _labels(rows, cfg: DataConfig, path: str):
    if cfg.label_columns:
        matrix = []
        for line, row in rows:
            values = []
            for column in cfg.label_columns:
                value = row[column].lower()
                if value not in _TRUE and value not in _FALSE:
                    raise DataError(f"{path} line {line}: column {column!r} has {row[column]!r}; "
                                    "multi-label columns must hold 0 or 1")
                values.append(1.0 if value in _TRUE else 0.0)
            matrix.append(values)
        return "multilabel", list(cfg.label_columns), torch.tensor(matrix, dtype=torch.float32)
    check_missing_labels(rows, path)  # empty, NaN, NA, ...: every such row named
    raw = [row["label"] for _, row in rows]
    try:
        numeric = {value: int(value) for value in set(raw)}
        names = [str(v) for v in sorted(set(numeric.values()))]
        index = {str(v): i for i, v in enumerate(sorted(set(numeric.values())))}
        labels = [index[str(numeric[v])] for v in raw]
    except ValueError:  # not all integers: string labels, sorted as strings
        names = sorted(set(raw))
        index = {name: i for i, name in enumerate(names)}
        labels = [index[v] for v in raw]
    if len(names) < 2:
        raise DataError(f"manifest {path} has only one label value ({names[0]!r}); need at least 2 classes")
    task = "binary" if len(names) == 2 else "multiclass"
    return task, names, torch.tensor(labels, dtype=torch.int64)


def check_manifest(path: str, cfg: DataConfig) -> tuple:
    """Everything about a manifest but its pixels (rows, columns, files, split, groups, labels):
    (root, files, ids, split, groups, task, class names, labels). DataError naming the row."""
    columns, rows = _read_rows(path)
    if not rows:
        raise DataError(f"manifest {path} has no rows; expected a header and one row per image")
    needed = ["path"] + (list(cfg.label_columns) if cfg.label_columns else ["label"])
    if cfg.group_column:
        needed.append(cfg.group_column)
    _require(columns, needed, path)
    group_column = cfg.group_column or ("group" if "group" in columns else None)

    root = os.path.expanduser(cfg.root) if cfg.root else os.path.dirname(os.path.abspath(path))
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise DataError(f"data root of manifest {path} is not a folder: {root}")
    files, ids = manifest_files(rows, root_real, path)
    split = manifest_split(rows, columns, path)
    groups = manifest_groups(rows, group_column, path)
    task, class_names, labels = _labels(rows, cfg, path)
    return root_real, files, ids, split, groups, task, class_names, labels


def load_manifest(path: str, cfg: DataConfig) -> Manifest:
    root_real, files, ids, split, groups, task, class_names, labels = check_manifest(path, cfg)
    images, hashes = load_images_hashed(files, cfg.image_size, cfg.dicom_window)
    if groups is None:
        from medpeft.data.folder import _dicom_groups

        groups = _dicom_groups(files)
    pool = ImageSet(images=images, labels=labels, ids=ids, groups=groups, files=files, file_hashes=hashes)
    name = os.path.splitext(os.path.basename(path))[0]
    return Manifest(name=name, task=task, class_names=class_names, pool=pool, split=split, root=root_real)
