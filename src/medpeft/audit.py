"""Data set audit: duplicates, near-duplicates, images in two classes, leakage across splits,
unreadable files, class balance, image sizes and modes; for segmentation data also the masks
(missing, orphan, unreadable, another size than the image, unexpected values, empty where a
lesion is expected, lesion area share).

Near-duplicates (perceptual hashes, the automatic threshold, grouping) come from the data
layer's ``medpeft.data.near_duplicates``, whose docstring explains the hash and the threshold.

Segmentation folders (``images/`` + ``masks/``, or BUSI's ``<stem>_mask*.png`` beside the images
with ``task="segmentation"``) are paired by ``medpeft.data.masks``, the loader's own rules: the
audit lists every problem the loader would stop at.

    report = audit_dataset("../shared/data/Dataset_BUSI_with_GT")
    print(report.summary_text()); report.to_json("audit.json")
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medpeft.data.base import DataBundle, ImageSet
from medpeft.data.masks import FOREGROUND_STRATA
from medpeft.errors import ConfigError, DataError
from medpeft.data.near_duplicates import (AUTO_Z, DEFAULT_THRESHOLD, HASH_BITS, THRESHOLD_CAP, ImageHashes, UnionFind,
                                          _hashes_of, check_threshold, compare_split_leakage, hash_images,
                                          inspect_files, near_pairs, resolve_threshold)


# ----------------------------------------------------------------------------- report
@dataclass
class AuditReport:
    source: str
    kind: str  # folder | manifest | bundle | imageset
    n_images: int
    class_names: list[str]
    threshold: int  # bits used; how it was chosen is in threshold_info
    splits: list[str]
    class_balance: dict[str, dict[str, int]]
    sizes: dict[str, Any]
    modes: dict[str, int]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    exact_duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)  # all groups of >1 image (exact ones included)
    cross_class: list[dict] = field(default_factory=list)
    cross_split: list[dict] = field(default_factory=list)
    split_leak: dict | None = None  # naive vs leak-free split, for sources without a split
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    threshold_info: dict = field(default_factory=dict)
    masks: dict | None = None  # segmentation: the mask checks (``audit_masks``)

    # --- counts
    @property
    def counts(self) -> dict[str, int]:
        return {
            "images": self.n_images,
            "unreadable": len(self.unreadable),
            "exact_duplicate_groups": len(self.exact_duplicates),
            "exact_duplicate_images": sum(len(g["files"]) for g in self.exact_duplicates),
            "near_duplicate_groups": len(self.near_duplicates),
            "near_duplicate_images": sum(len(g["files"]) for g in self.near_duplicates),
            "largest_group": max((len(g["files"]) for g in self.near_duplicates), default=0),
            "cross_class_groups": len(self.cross_class),
            "cross_split_groups": len(self.cross_split),
        }

    @property
    def has_splits(self) -> bool:
        return self.splits != ["all"]

    def problems(self) -> list[str]:
        """What ``--strict`` fails on: leakage across splits, an image in two classes, unreadable
        files, in a data set without a split any duplicate (a random split would leak it), and
        mask problems (``MASK_PROBLEMS``)."""
        c = self.counts
        found = []
        if c["cross_split_groups"]:
            found.append(f"{c['cross_split_groups']} duplicate/near-duplicate group(s) span two or more splits")
        if c["cross_class_groups"]:
            found.append(f"{c['cross_class_groups']} group(s) of identical or near-identical images carry "
                         "different labels")
        if c["unreadable"]:
            found.append(f"{c['unreadable']} unreadable file(s)")
        if not self.has_splits and c["near_duplicate_groups"]:
            found.append(f"{c['near_duplicate_groups']} duplicate/near-duplicate group(s) "
                         f"({c['exact_duplicate_groups']} exact) that an ungrouped random split would put "
                         "on both sides")
        return found + mask_problems(self.masks)

    # --- output
    def to_dict(self) -> dict:
        out = asdict(self)
        out["counts"] = self.counts
        out["problems"] = self.problems()
        return out

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            os.makedirs(folder, exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    def summary_text(self, max_list: int = 10) -> str:
        c = self.counts
        task = "segmentation " if self.masks is not None else ""
        lines = [f"Audit of {self.source} ({task}{self.kind}, {c['images']} images, {len(self.class_names)} classes, "
                 f"{'splits ' + '/'.join(self.splits) if self.has_splits else 'no split'})"]
        lines.append(f"  unreadable files: {c['unreadable']}")
        for item in self.unreadable[:max_list]:
            lines.append(f"    {item['file']}: {item['error']}")
        lines.append(f"  exact duplicates (same decoded pixels): {c['exact_duplicate_groups']} group(s), "
                     f"{c['exact_duplicate_images']} images")
        how = " (auto)" if self.threshold_info.get("requested") == "auto" else ""
        lines.append(f"  near-duplicate groups (<= {self.threshold}{how} of {HASH_BITS} hash bits, exact included): "
                     f"{c['near_duplicate_groups']} group(s), {c['near_duplicate_images']} images, "
                     f"largest {c['largest_group']}")
        lines.append(f"  images in two or more classes: {c['cross_class_groups']} group(s)")
        if self.has_splits:
            lines.append(f"  groups spanning splits (leakage): {c['cross_split_groups']}")
            within = Counter(g["splits"][0] for g in self.near_duplicates if len(g["splits"]) == 1)
            if within:
                lines.append("  groups within one split: " + ", ".join(f"{s} {n}" for s, n in sorted(within.items())))
        lines += ["    " + line for line in self.listing_lines(max_list)]
        lines.append("  class balance: " + "; ".join(
            f"{split}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            for split, counts in self.class_balance.items()))
        s = self.sizes
        if s.get("width"):
            lines.append(f"  image size: width {s['width']['min']}-{s['width']['max']} "
                         f"(median {s['width']['median']}), "
                         f"height {s['height']['min']}-{s['height']['max']} (median {s['height']['median']}), "
                         f"{s['distinct']} distinct sizes")
        lines.append("  modes: " + ", ".join(f"{k} {v}" for k, v in self.modes.items()))
        if self.split_leak:
            n, lf = self.split_leak["naive"], self.split_leak["leak_free"]
            lines.append(f"  split leak (seed {self.split_leak['seed']}, ratios "
                         f"{'/'.join(str(round(r, 2)) for r in self.split_leak['ratios'])}): a naive random split puts "
                         f"{n['test_with_twin_in_train']} of {n['sizes'][2]} test images next to a duplicate in train; "
                         f"a leak-free grouped split: {lf['test_with_twin_in_train']} of {lf['sizes'][2]}")
        lines += ["  " + line for line in mask_lines(self.masks, max_list)]
        for note in self.notes:
            lines.append(f"  note: {note}")
        problems = self.problems()
        lines.append("  verdict: " + ("; ".join(problems) if problems else "no leakage or duplicate found"))
        lines.append(f"  ({self.seconds:.1f} s)")
        return "\n".join(lines)

    def listing_lines(self, max_list: int = 10) -> list[str]:
        """The groups worth looking at, one line each: cross-class, cross-split, then the rest."""
        lines = []
        if self.cross_class:
            lines.append("images in two or more classes:")
            for g in self.cross_class[:max_list]:
                lines.append(f"  {' = '.join(g['files'])}  ({', '.join(g['classes'])}"
                             f"{', identical pixels' if g['exact'] else ''})")
        if self.cross_split:
            lines.append("groups spanning splits (leakage):")
            for g in self.cross_split[:max_list]:
                lines.append(f"  {' = '.join(g['files'])}  (splits {', '.join(g['splits'])})")
        rest = [g for g in self.near_duplicates if len(g["classes"]) == 1 and len(g["splits"]) == 1]
        if rest:
            lines.append("other duplicate / near-duplicate groups:")
            for g in rest[:max_list]:
                how = "identical pixels" if g["exact"] else f"max pairwise distance {g['max_distance']}"
                lines.append(f"  {' = '.join(g['files'])}  ({how})")
        shown = sum(min(len(x), max_list) for x in (self.cross_class, self.cross_split, rest))
        if shown < len(self.cross_class) + len(self.cross_split) + len(rest):
            lines.append("  ... (every group is in the JSON report)")
        return lines

    def print_rich(self, console=None, max_list: int = 10) -> None:
        """Tables on a rich console (falls back to the plain summary)."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # rich is a dependency, but the plain text is always available
            print(self.summary_text(max_list))
            return
        console = console or Console()
        c = self.counts
        task = "segmentation " if self.masks is not None else ""
        table = Table(title=f"Audit of {self.source} ({task}{self.kind})", show_header=True)
        table.add_column("check")
        table.add_column("found", justify="right")
        table.add_column("details")
        table.add_row("images", str(c["images"]), f"{len(self.class_names)} classes, "
                      + ("splits " + "/".join(self.splits) if self.has_splits else "no split"))
        table.add_row("unreadable files", str(c["unreadable"]), ", ".join(u["file"] for u in self.unreadable[:3]))
        table.add_row("exact duplicate groups", str(c["exact_duplicate_groups"]),
                      f"{c['exact_duplicate_images']} images")
        table.add_row("near-duplicate groups", str(c["near_duplicate_groups"]),
                      f"{c['near_duplicate_images']} images, largest {c['largest_group']} "
                      f"(<= {self.threshold} of {HASH_BITS} bits"
                      f"{', auto' if self.threshold_info.get('requested') == 'auto' else ''})")
        table.add_row("groups in two classes", str(c["cross_class_groups"]), "")
        if self.has_splits:
            table.add_row("groups across splits", str(c["cross_split_groups"]), "leakage between splits")
        if self.split_leak:
            n, lf = self.split_leak["naive"], self.split_leak["leak_free"]
            table.add_row("test images with a twin in train", f"{n['test_with_twin_in_train']} -> "
                          f"{lf['test_with_twin_in_train']}",
                          f"naive random split -> leak-free grouped split (of {n['sizes'][2]})")
        console.print(table)
        balance = Table(title="class balance", show_header=True)
        balance.add_column("split")
        for name in self.class_names:
            balance.add_column(name, justify="right")
        for split, counts in self.class_balance.items():
            balance.add_row(split, *[str(counts.get(n, 0)) for n in self.class_names])
        console.print(balance)
        for line in self.listing_lines(max_list) + mask_lines(self.masks, max_list):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        for line in self.summary_text(max_list).splitlines():
            if line.strip().startswith(("image size", "modes", "note", "verdict")):
                console.print(line.strip(), highlight=False, markup=False, soft_wrap=True)


def _label_names(labels: torch.Tensor, class_names: list[str]) -> list[str]:
    if labels.ndim == 2:  # multi-label: the positive names
        return ["+".join(n for n, v in zip(class_names, row) if v > 0.5) or "(none)" for row in labels.tolist()]
    return [class_names[int(v)] if 0 <= int(v) < len(class_names) else str(int(v)) for v in labels.tolist()]


def _size_stats(widths: list[int], heights: list[int]) -> dict:
    if not widths:
        return {}

    def stat(values):
        return {"min": int(min(values)), "median": float(statistics.median(values)), "max": int(max(values))}

    common = Counter(zip(widths, heights)).most_common(5)
    return {"width": stat(widths), "height": stat(heights), "distinct": len(set(zip(widths, heights))),
            "most_common": [{"width": w, "height": h, "count": n} for (w, h), n in common]}


def build_report(source: str, kind: str, ids: list[str], labels: list[str], splits: list[str],
                 hashes: ImageHashes, class_names: list[str], threshold: int | str,
                 sizes: dict | None = None, modes: dict | None = None,
                 errors: list[str | None] | None = None) -> AuditReport:
    """Group findings from per-image ids, labels, splits and hashes."""
    threshold, threshold_info = resolve_threshold(hashes, threshold)
    n = len(ids)
    pairs = near_pairs(hashes, threshold)
    uf = UnionFind(n)
    for i, j, _ in pairs:
        uf.union(i, j)
    members: dict[int, list[int]] = defaultdict(list)
    for i, root in enumerate(uf.roots()):
        members[root].append(i)
    split_order = list(dict.fromkeys(splits))

    def describe(rows: list[int]) -> dict:
        shas = {hashes.sha256[r] for r in rows}
        sub = rows[:200]  # groups are small; cap the pairwise check for pathological chains
        dist = max((hashes.distance(a, b) for k, a in enumerate(sub) for b in sub[k + 1:]), default=0)
        return {"files": [ids[r] for r in rows],
                "classes": sorted(set(labels[r] for r in rows)),
                "splits": [s for s in split_order if s in {splits[r] for r in rows}],
                "exact": len(shas) == 1, "max_distance": int(dist)}

    near = [describe(rows) for root, rows in sorted(members.items()) if len(rows) > 1]
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(hashes.sha256):
        if sha is not None:
            by_sha[sha].append(i)
    exact = [describe(rows) for rows in sorted(by_sha.values()) if len(rows) > 1]
    balance: dict[str, dict[str, int]] = {}
    for split in split_order:
        counts = Counter(labels[i] for i in range(n) if splits[i] == split)
        balance[split] = {name: counts.get(name, 0) for name in class_names}
        for other in sorted(set(counts) - set(class_names)):
            balance[split][other] = counts[other]
    unreadable = [{"file": ids[i], "error": e} for i, e in enumerate(errors or []) if e]
    notes = []
    bound = threshold_info.get("data_bound")
    if threshold_info["requested"] != "auto" and bound is not None and threshold > bound:
        notes.append(f"threshold {threshold} reaches into the distances of unrelated image pairs of this data set "
                     f"(median {threshold_info['random_pair_median']:g}, sd {threshold_info['random_pair_sd']:g}): "
                     f"expect false near-duplicates; 'auto' would use {min(THRESHOLD_CAP, bound)}")
    largest = max((len(rows) for rows in members.values()), default=0)
    if largest > max(20, 0.02 * n):
        notes.append(f"the largest near-duplicate group has {largest} images: groups may be chaining "
                     "unrelated images; consider a lower threshold")
    return AuditReport(
        threshold_info=threshold_info, notes=notes, source=source, kind=kind, n_images=n, class_names=list(class_names), threshold=threshold,
        splits=split_order, class_balance=balance, sizes=sizes or {}, modes=modes or {},
        unreadable=unreadable, exact_duplicates=exact, near_duplicates=near,
        cross_class=[g for g in near if len(g["classes"]) > 1],
        cross_split=[g for g in near if len(g["splits"]) > 1])


# ----------------------------------------------------------------------------- masks
# what --strict fails on, in report order: (key of the masks section, what the problem is)
MASK_PROBLEMS = (("missing", "image(s) without a mask"), ("orphan", "mask(s) without an image"),
                 ("unreadable", "unreadable mask(s)"), ("size_mismatch", "mask(s) of another size than their image"),
                 ("unexpected_values", "mask(s) with unexpected values"),
                 ("empty_where_lesion_expected", "empty mask(s) in a class that has lesions"))
NO_MASK = "(no usable mask)"  # stratum of images whose mask is missing or broken


def _relative(text: str | None, root: str) -> str | None:
    """A message without the data root's absolute path: reports name files relative to the root."""
    return text.replace(os.path.join(root, ""), "") if text else text


def _check_image_masks(root: str, image_id: str, mask_ids: list[str], size: tuple[int, int] | None,
                       num_classes: int) -> dict:
    """One image's mask files: per-file problems, the value set of each file and the foreground
    share of the merged mask (None when a file is unusable). Never raises: everything is listed."""
    from medpeft.data.masks import _show, _values, decode_mask, mask_indices

    found = {"unreadable": [], "size_mismatch": [], "unexpected_values": [], "value_sets": [], "fraction": None}
    merged = None
    for mask_id in mask_ids:
        try:
            pixels, jpeg, one_bit = decode_mask(os.path.join(root, mask_id))
        except DataError as exc:
            found["unreadable"].append({"file": mask_id, "error": _relative(str(exc), root)})
            continue
        # JPEG masks are thresholded: their raw values are compression noise, not worth listing
        values = "JPEG, threshold > 127" if jpeg else _show(_values(pixels))
        found["value_sets"].append(values)
        height, width = pixels.shape[:2]
        if size is not None and (width, height) != size:
            found["size_mismatch"].append({"file": mask_id, "image": image_id, "mask_size": [width, height],
                                           "image_size": list(size)})
        try:  # the loader's own value rules; the id keeps the message free of absolute paths
            mask = mask_indices(pixels, mask_id, jpeg, one_bit, num_classes)
        except DataError as exc:
            found["unexpected_values"].append({"file": mask_id, "values": values, "error": str(exc)})
            continue
        merged = mask if merged is None or merged.shape != mask.shape else np.maximum(merged, mask)
    if merged is not None and not found["unreadable"] and not found["unexpected_values"]:
        found["fraction"] = float(np.count_nonzero(merged)) / merged.size
    return found


def _lesion_classes(classes: list[str] | None, fractions: list[float | None],
                    given: list[str] | None) -> list[str]:
    """Classes whose images should show a lesion: ``given``, else those where most masks hold
    foreground (BUSI: benign, malignant; its normal masks are all empty). No classes: none, the
    foreground itself is the class."""
    if classes is None:
        if given:
            raise ConfigError("lesion classes need image classes (class sub-folders or a manifest 'label' "
                              "column); without them every image's class is whether its mask has foreground")
        return []
    if given is not None:
        unknown = sorted(set(given) - set(classes))
        if unknown:  # a typo would silently judge no class
            raise ConfigError(f"lesion classes {', '.join(unknown)} are not image classes of this data set; "
                              f"its classes: {', '.join(sorted(set(classes)))}")
        return sorted(given)
    seen: dict[str, list[bool]] = defaultdict(list)
    for name, fraction in zip(classes, fractions):
        if fraction is not None:
            seen[name].append(fraction > 0)
    return sorted(name for name, flags in seen.items() if sum(flags) > len(flags) / 2)


def _fraction_stats(fractions: list[float]) -> dict:
    if not fractions:
        return {"images": 0}
    return {"images": len(fractions), "min": round(min(fractions), 5),
            "median": round(float(statistics.median(fractions)), 5), "max": round(max(fractions), 5)}


def audit_masks(root: str, pairs: list[tuple[str, list[str]]], orphans: list[str], sizes: list, num_classes: int,
                classes: list[str] | None = None, lesion_classes: list[str] | None = None) -> tuple[dict, list[str]]:
    """(masks section of the report, stratum per image: "foreground" / "no foreground" / NO_MASK).
    ``pairs``: (image id, mask ids) as ``medpeft.data.masks`` pairs them (ids relative to root);
    ``sizes``: (width, height) of each image or None when unreadable; ``classes``: class name per
    image (class folders, manifest labels) or None."""
    from concurrent.futures import ThreadPoolExecutor

    def one(k):
        image_id, mask_ids = pairs[k]
        return _check_image_masks(root, image_id, mask_ids, sizes[k], num_classes)

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:  # decoding releases the GIL
        checks = list(pool.map(one, range(len(pairs))))
    fractions = [c["fraction"] for c in checks]
    lesion = _lesion_classes(classes, fractions, lesion_classes)
    empty = [pairs[k][0] for k, f in enumerate(fractions) if f == 0]
    section = {
        "mask_files": sum(len(m) for _, m in pairs) + len(orphans),
        "missing": [image for image, masks in pairs if not masks], "orphan": list(orphans),
        **{key: [item for c in checks for item in c[key]] for key in ("unreadable", "size_mismatch",
                                                                        "unexpected_values")},
        "empty": empty, "lesion_classes": lesion if classes is not None else None,
        "empty_where_lesion_expected": [pairs[k][0] for k, f in enumerate(fractions)
                                        if f == 0 and classes is not None and classes[k] in lesion],
        "value_sets": dict(Counter(v for c in checks for v in c["value_sets"]).most_common()),
        "foreground_fraction": _fraction_stats([f for f in fractions if f]),
    }
    section["counts"] = {key: len(section[key]) for key, _ in MASK_PROBLEMS} | {"empty": len(empty)}
    strata = [NO_MASK if f is None else FOREGROUND_STRATA[int(f > 0)] for f in fractions]
    return section, strata


def mask_problems(masks: dict | None) -> list[str]:
    """The mask findings that ``--strict`` fails on, one phrase each."""
    if not masks:
        return []
    return [f"{masks['counts'][key]} {what}" for key, what in MASK_PROBLEMS if masks["counts"][key]]


def mask_lines(masks: dict | None, max_list: int = 10) -> list[str]:
    """The masks section as summary lines (nothing for classification data)."""
    if masks is None:
        return []
    c = masks["counts"]
    lines = [f"masks ({masks['layout']} layout, {masks['mask_files']} mask files, mask classes "
             f"{'/'.join(masks['mask_classes'])}):"]
    for key, what in MASK_PROBLEMS[:-1]:
        lines.append(f"  {what}: {c[key]}")
        for item in masks[key][:max_list]:
            lines.append("    " + (item if isinstance(item, str) else _mask_item(item)))
    if masks["lesion_classes"] is None:
        lines.append(f"  empty masks: {c['empty']} (no image classes: empty masks are counted, not judged)")
    else:
        lines.append(f"  empty masks: {c['empty']}, of which in a class that has lesions "
                     f"({', '.join(masks['lesion_classes']) or 'none'}): {c['empty_where_lesion_expected']}")
        lines += ["    " + image for image in masks["empty_where_lesion_expected"][:max_list]]
    lines.append("  mask values: " + "; ".join(f"{{{v}}} {n}" for v, n in masks["value_sets"].items()))
    f = masks["foreground_fraction"]
    if f["images"]:
        lines.append(f"  lesion area share ({f['images']} images with foreground): min {f['min']:.4f}, "
                     f"median {f['median']:.4f}, max {f['max']:.4f}")
    return lines


def _mask_item(item: dict) -> str:
    if "mask_size" in item:
        return (f"{item['file']}: {item['mask_size'][0]}x{item['mask_size'][1]} px, its image {item['image']} "
                f"{item['image_size'][0]}x{item['image_size'][1]} px")
    return f"{item['file']}: {item['error']}"


# ----------------------------------------------------------------------------- sources
def _inside(rel: str, base: str, manifest: str, line: int, column: str) -> str:
    """The real path of a manifest entry; DataError when it leaves the data root."""
    real = os.path.realpath(rel if os.path.isabs(rel) else os.path.join(base, rel))
    if not rel or os.path.commonpath([real, base]) != base:
        raise DataError(f"{manifest} line {line}: {column} {rel!r} resolves outside the data root {base}; "
                        "manifest paths must be relative and stay inside the root")
    return real


def _read_manifest_rows(path: str, root: str | None) -> tuple[str, list[str], list[str], list[str], list[str],
                                                               list[str] | None]:
    """(data root, absolute files, ids, labels, splits, mask ids or None without a 'mask' column) of
    a CSV manifest; paths must stay inside the root."""
    import csv

    from medpeft.data.splits import SPLITS

    base = os.path.realpath(os.path.expanduser(root) if root else os.path.dirname(os.path.abspath(path)))
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = fields
            rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                    for row in reader if any((v or "").strip() for k, v in row.items() if k)]
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}; expected a UTF-8 CSV file") from None
    if "path" not in fields:
        raise DataError(f"manifest {path} has no column 'path'; columns found: {', '.join(fields) or 'none'}")
    if "label" in fields:  # an empty or NaN label is no class (the loaders stop at it too)
        from medpeft.data.manifest import check_missing_labels

        check_missing_labels(rows, path)
    files, ids, labels, splits, masks = [], [], [], [], []
    for line, row in rows:
        real = _inside(row["path"], base, path, line, "path")
        split = row.get("split", "").lower() or "all"
        if split not in (*SPLITS, "all"):
            raise DataError(f"{path} line {line}: split {row['split']!r} is not one of train, val, test")
        files.append(real)
        ids.append(os.path.relpath(real, base).replace(os.sep, "/"))
        labels.append(row.get("label", "") or "(none)")
        splits.append(split)
        mask = row.get("mask", "")  # empty: an image without a mask, which the mask audit lists
        masks.append(os.path.relpath(_inside(mask, base, path, line, "mask"), base).replace(os.sep, "/")
                     if mask else "")
    if not files:
        raise DataError(f"manifest {path} has no rows; expected a header and one row per image")
    return base, files, ids, labels, splits, (masks if "mask" in fields else None)


def _file_report(source: str, kind: str, files: list[str], ids: list[str], labels: list[str], splits: list[str],
                 class_names: list[str], threshold: int | str, leak_seed: int | None, root: str,
                 infos: list | None = None) -> AuditReport:
    infos = infos or inspect_files(files)
    hashes = _hashes_of(infos)
    ok = [i for i in infos if i.error is None]
    modes = dict(Counter(i.mode or "?" for i in ok).most_common())
    sizes = _size_stats([i.width for i in ok], [i.height for i in ok])
    report = build_report(source, kind, ids, labels, splits, hashes, class_names, threshold,
                          sizes=sizes, modes=modes, errors=[_relative(i.error, root) for i in infos])
    if leak_seed is not None and not report.has_splits and len(ok) >= 3:
        readable = [k for k, i in enumerate(infos) if i.error is None]
        sub = ImageHashes([hashes.sha256[k] for k in readable], hashes.phash[readable], hashes.dhash[readable])
        index = {name: c for c, name in enumerate(class_names)}
        try:
            report.split_leak = compare_split_leakage(sub, labels=np.array([index[labels[k]] for k in readable]),
                                                      seed=leak_seed, threshold=report.threshold)
        except DataError as exc:  # too few images or groups for a three-way split
            report.notes.append(f"no split comparison: {exc}")
    return report


def _segmentation_report(source: str, kind: str, root: str, pairs: list[tuple[str, list[str]]], orphans: list[str],
                         classes: list[str] | None, class_names: list[str] | None, splits: list[str],
                         threshold: int | str, leak_seed: int | None, mask_classes=None,
                         lesion_classes: list[str] | None = None, layout: str = "paired") -> AuditReport:
    """The images of (image id, mask ids) pairs audited like a classification folder - their class
    is the image class (``classes``) or, without one, whether the mask has foreground (what splits
    stratify on) - plus the masks section."""
    from medpeft.data.base import DataConfig
    from medpeft.data.masks import mask_class_names

    names = mask_class_names(DataConfig(mask_classes=mask_classes))
    ids = [image for image, _ in pairs]
    files = [os.path.join(root, image) for image in ids]
    infos = inspect_files(files)
    sizes = [None if i.error else (i.width, i.height) for i in infos]
    section, strata = audit_masks(root, pairs, orphans, sizes, len(names), classes, lesion_classes)
    if classes is None:
        classes, class_names = strata, [*FOREGROUND_STRATA] + ([NO_MASK] if NO_MASK in strata else [])
    report = _file_report(source, kind, files, ids, classes, splits, class_names, threshold, leak_seed, root, infos)
    report.masks = {"layout": layout, "mask_classes": names, **section}
    return report


def _folder_report(path: str, task: str | None, threshold: int | str, leak_seed: int | None,
                   mask_pattern: str | None, mask_classes, lesion_classes) -> AuditReport:
    """A folder: class sub-folders (masks matching mask_pattern skipped), or with task
    segmentation (auto: an images/ + masks/ folder) images and masks as ``medpeft.data.masks`` pairs them."""
    from medpeft.data.folder import scan_image_folder
    from medpeft.data.masks import _paired_dirs, detect_layout, match_beside_folder, match_paired_folder

    name = os.path.basename(os.path.normpath(path))
    paired = _paired_dirs(path) is not None
    if (task or ("segmentation" if paired else "classification")) == "classification":
        if paired:  # never audit masks/ as a class of images
            raise DataError(f"{path} holds images/ and masks/ sub-folders, a segmentation layout; audit it with "
                            "task segmentation (CLI: --task segmentation)")
        rel, label_idx, class_names = scan_image_folder(path, mask_pattern)
        files = [os.path.join(path, r) for r in rel]
        labels = [class_names[i] for i in label_idx]
        return _file_report(name, "folder", files, rel, labels, ["all"] * len(rel), class_names,
                            threshold, leak_seed, path)
    layout = detect_layout(path, mask_pattern)
    classes = class_names = None
    if layout == "paired":
        pairs, orphans = match_paired_folder(path)
    else:
        pairs, orphans, label_idx, class_names = match_beside_folder(path, mask_pattern)
        classes = [class_names[i] for i in label_idx] if class_names else None
    return _segmentation_report(name, "folder", path, pairs, orphans, classes, class_names, ["all"] * len(pairs),
                                threshold, leak_seed, mask_classes, lesion_classes, layout)


def _manifest_report(path: str, task: str | None, threshold: int | str, leak_seed: int | None, data_root: str | None,
                     mask_classes, lesion_classes) -> AuditReport:
    """A CSV manifest: path[,label][,split]; with a 'mask' column (or task segmentation) the masks too."""
    name = os.path.basename(os.path.normpath(path))
    base, files, ids, labels, splits, masks = _read_manifest_rows(path, data_root)
    if (task or ("segmentation" if masks is not None else "classification")) == "classification":
        return _file_report(name, "manifest", files, ids, labels, splits, sorted(set(labels)), threshold, leak_seed,
                            base)
    if masks is None:
        raise DataError(f"manifest {path} has no column 'mask'; a segmentation audit needs path,mask columns")
    pairs = [(image, [mask] if mask else []) for image, mask in zip(ids, masks)]
    classes = labels if any(label != "(none)" for label in labels) else None
    return _segmentation_report(name, "manifest", base, pairs, [], classes, sorted(set(labels)) if classes else None,
                                splits, threshold, leak_seed, mask_classes, lesion_classes, "manifest")


def audit_dataset(source, threshold: int | str = DEFAULT_THRESHOLD, data_root: str | None = None,
                  mask_pattern: str | None = "*_mask*", leak_seed: int | None = 0, task: str | None = None,
                  mask_classes=None, lesion_classes: list[str] | None = None) -> AuditReport:
    """Audit a DataBundle / ImageSet (in-memory images), an image folder (root/<class>/...) or a
    CSV manifest (path,label[,split]). Files are read directly, so unreadable ones are reported
    instead of stopping the audit. For sources without a split, ``leak_seed`` (None: skip) also
    compares a naive random split with a leak-free one.

    ``task`` (folders and manifests): None detects it (segmentation: an images/ + masks/ folder or
    a manifest with a 'mask' column); "segmentation" also checks BUSI-style masks beside the
    images. ``mask_classes``: names of the mask values for label maps (default binary);
    ``lesion_classes``: image classes whose masks must not be empty (default: the classes where
    most masks hold foreground)."""
    started = time.perf_counter()
    threshold = check_threshold(threshold)
    if task not in (None, "classification", "segmentation"):
        raise ConfigError(f"audit task {task!r} is not one of classification, segmentation")
    if isinstance(source, DataBundle):
        sets = [("train", source.train), ("val", source.val), ("test", source.test)]
        # labels are what splits stratify on: for segmentation the strata (image class or has-lesion),
        # not the mask classes
        names = source.split_info.get("strata") or source.class_names
        report = _memory_report(source.name, "bundle", sets, names, threshold)
        report.notes.append(f"hashed the in-memory images ({source.train.images.shape[-1]} px, already resized)")
    elif isinstance(source, ImageSet):
        names = [str(i) for i in range(int(source.labels.max()) + 1)] if source.labels.ndim == 1 and len(source) \
            else [str(i) for i in range(source.labels.shape[-1])]
        report = _memory_report("imageset", "imageset", [("all", source)], names, threshold)
    elif isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if not os.path.exists(path) and data_root:
            path = os.path.join(os.path.expanduser(data_root), path)
        if os.path.isdir(path):
            report = _folder_report(path, task, threshold, leak_seed, mask_pattern, mask_classes, lesion_classes)
        elif os.path.isfile(path) and path.lower().endswith(".csv"):
            report = _manifest_report(path, task, threshold, leak_seed, data_root, mask_classes, lesion_classes)
        else:
            raise DataError(f"cannot audit {os.fspath(source)}: not a folder of class sub-folders nor a CSV "
                            "manifest (give a MedMNIST name through the CLI, or a loaded DataBundle)")
    else:
        raise ConfigError(f"cannot audit a {type(source).__name__}; expected a DataBundle, an ImageSet, "
                          "a folder or a CSV manifest path")
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _memory_report(name: str, kind: str, sets: list[tuple[str, ImageSet]], class_names: list[str],
                   threshold: int | str) -> AuditReport:
    images = torch.cat([s.images for _, s in sets])
    ids = [i for _, s in sets for i in s.ids]
    labels = [n for _, s in sets for n in _label_names(s.labels, class_names)]
    splits = [split for split, s in sets for _ in range(len(s))]
    hashes = hash_images(images)
    h, w = images.shape[-2:]
    sizes = _size_stats([int(w)] * len(ids), [int(h)] * len(ids))
    modes = {("RGB" if s.images.shape[1] == 3 else "L"): 0 for _, s in sets}
    for _, s in sets:
        modes["RGB" if s.images.shape[1] == 3 else "L"] += len(s)
    return build_report(name, kind, ids, labels, splits, hashes, class_names, threshold, sizes=sizes, modes=modes)


# ----------------------------------------------------------------------------- CLI
def add_audit_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="check a data set for duplicates, near-duplicates, images in two classes and split leakage",
        description="Audit a data set: exact and near-duplicate images (perceptual hash), images in two classes, "
                    "duplicates across splits, unreadable files, class balance, image sizes and modes; for "
                    "segmentation data also the masks.")
    p.add_argument("data", help="a folder with one sub-folder per class, a segmentation folder (images/ + masks/), "
                                "a CSV manifest, or a MedMNIST name")
    p.add_argument("--task", choices=("classification", "segmentation"), default=None,
                   help="segmentation also checks the masks (missing, orphan, unreadable, size, values, empty); "
                        "default: segmentation for images/ + masks/ folders and manifests with a 'mask' column, "
                        "else classification (BUSI-style <name>_mask files beside the images need --task segmentation)")
    p.add_argument("--mask-classes", default=None,
                   help="segmentation: comma-separated names of the mask values 0..K-1 (0 = background) for "
                        "multi-class label maps (default: binary background,lesion)")
    p.add_argument("--lesion-classes", default=None,
                   help="segmentation: comma-separated image classes whose masks must not be empty (default: the "
                        "classes where most masks hold foreground, e.g. BUSI benign,malignant but not normal)")
    p.add_argument("--data-root", default=None, help="where MedMNIST files live / root of manifest paths")
    p.add_argument("--medmnist-size", type=int, choices=(28, 64, 128, 224), default=None,
                   help="MedMNIST file variant (default 28); the images are audited at that size")
    p.add_argument("--mask-pattern", default="*_mask*",
                   help="mask files beside the images: skipped as images, checked as masks with --task segmentation "
                        "(default *_mask*)")
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD,
                   help=f"near-duplicate threshold: Hamming distance of the {HASH_BITS}-bit pHash+dHash, or 'auto' "
                        f"(default: min({THRESHOLD_CAP}, median - {AUTO_Z:g} sd of random pairs of this data set); "
                        "0 = only hash-identical images")
    p.add_argument("--seed", type=int, default=0, help="seed of the naive-vs-leak-free split comparison")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--max-list", type=int, default=10, help="groups listed per finding in the summary")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when leakage across splits, images in two classes, duplicates in an "
                        "unsplit data set, unreadable files or (segmentation) mask problems are found")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args) -> int:
    """Run the audit for parsed CLI args; returns the exit status (1: --strict and problems)."""
    from medpeft.data.base import DataConfig
    from medpeft.data.registry import resolve_source

    kind, where = resolve_source(DataConfig(name=args.data, root=args.data_root))
    if kind == "medmnist":
        from medpeft.data.registry import load_data

        if args.task == "segmentation":
            raise ConfigError(f"MedMNIST {where} has no masks; a segmentation audit needs a folder or a manifest")

        size = args.medmnist_size or 28
        started = time.perf_counter()
        bundle = load_data(DataConfig(name=where, root=args.data_root, image_size=size,
                                      medmnist_size=args.medmnist_size))
        report = audit_dataset(bundle, threshold=args.threshold)
        report.seconds = round(time.perf_counter() - started, 3)
    else:
        root = args.data_root if kind == "manifest" else None
        lesion = [n.strip() for n in args.lesion_classes.split(",")] if args.lesion_classes else None
        report = audit_dataset(where, threshold=args.threshold, data_root=root, mask_pattern=args.mask_pattern,
                               leak_seed=args.seed, task=args.task, mask_classes=args.mask_classes,
                               lesion_classes=lesion)
    try:
        report.print_rich(max_list=args.max_list)
    except Exception:  # a console that rich cannot drive: plain text
        print(report.summary_text(args.max_list))
    if args.json:
        report.to_json(args.json)
        print(f"JSON report: {args.json}")
    problems = report.problems()
    if args.strict and problems:
        print("audit --strict failed: " + "; ".join(problems))
        return 1
    return 0
