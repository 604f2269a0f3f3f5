"""Split groups a folder data set documents itself, so related images never sit on two sides of a split.

Images of one patient, study or video sequence are near-copies of each other: a split that puts
some in training and others in test measures memory, not generalisation. Manifests carry groups
in a column and DICOM files in their headers; an image folder can carry them in one of two files
at its top level (read in this order):

- ``groups.csv`` with columns ``path,group`` (``path`` relative to the folder, as the image's id);
- a ``README.txt`` with a frame-range table, as CVC-ClinicDB's own ("1 to 25 | 1": frames 1-25 are
  sequence 1), for images named by their frame number (``images/17.jpg`` is frame 17).

Group values are hashed like manifest groups (they may be patient ids); an image the file does not
name is its own group.
"""
from __future__ import annotations

import csv
import os
import re

from medpeft.errors import DataError

GROUPS_FILE = "groups.csv"
README_FILE = "README.txt"
# "|     1 to  25    |   1   |" and "1 to 25 | 1": first frame, last frame, sequence
_RANGE = re.compile(r"^\W*(\d+)\s+to\s+(\d+)\s*\|\s*(\d+)\s*\|?\s*$")


def folder_groups(root: str, ids: list[str]) -> tuple[list[str] | None, str | None]:
    """(one group per image id, where the groups came from) or (None, None) when the folder has neither file."""
    path = os.path.join(root, GROUPS_FILE)
    if os.path.isfile(path):
        return _groups_from_csv(path, ids), GROUPS_FILE
    path = os.path.join(root, README_FILE)
    if os.path.isfile(path):
        ranges = frame_ranges(path)
        if ranges:
            return _groups_from_ranges(ranges, ids), f"{README_FILE} frame ranges"
    return None, None


def frame_ranges(path: str) -> list[tuple[int, int, str]]:
    """(first, last, sequence) rows of a README's frame-range table; [] when it has none."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        rows = [m.groups() for m in map(_RANGE.match, fh) if m]
    ranges = [(int(a), int(b), s) for a, b, s in rows]
    for first, last, seq in ranges:
        if first > last:
            raise DataError(f"{path}: frame range {first} to {last} (sequence {seq}) runs backwards")
    return ranges


def _groups_from_ranges(ranges, ids: list[str]) -> list[str]:
    groups = []
    for image_id in ids:
        stem = os.path.splitext(os.path.basename(image_id))[0]
        seq = next((s for first, last, s in ranges if stem.isdigit() and first <= int(stem) <= last), None)
        groups.append(f"sequence-{seq}" if seq is not None else f"image-{image_id}")
    return groups


def _groups_from_csv(path: str, ids: list[str]) -> list[str]:
    from medpeft.data.manifest import _hash_group

    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "group"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: expected columns path,group; missing {sorted(missing)} "
                            f"(found {reader.fieldnames})")
        table = {}
        for line, row in enumerate(reader, start=2):
            key = (row["path"] or "").strip().replace("\\", "/")
            group = (row["group"] or "").strip()
            if not key or not group:
                raise DataError(f"{path}, line {line}: empty path or group")
            if table.setdefault(key, group) != group:
                raise DataError(f"{path}, line {line}: {key!r} is given two groups")
    known = set(ids)
    stray = sorted(set(table) - known)
    if stray:
        raise DataError(f"{path}: {len(stray)} path(s) name no image of the folder, e.g. {stray[0]!r}; "
                        f"paths are relative to the folder, like {ids[0]!r}")
    return [_hash_group(table[i]) if i in table else f"image-{i}" for i in ids]
