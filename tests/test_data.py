"""Data sources, splits, split files and label-scarcity subsets."""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.data import DataConfig, load_data, read_image, save_split, subset_train
from medpeft.data.splits import split_indices
from medpeft.errors import ConfigError, DataError

from conftest import SHARED_DATA

SHARED = SHARED_DATA  # the one place that knows where ../shared/data is (conftest; CI has it)
MEDMNIST_DIR = SHARED / "medmnist"
BUSI_DIR = SHARED / "Dataset_BUSI_with_GT"
needs_medmnist = pytest.mark.skipif(not (MEDMNIST_DIR / "breastmnist.npz").is_file(),
                                    reason=f"offline MedMNIST files not found in {MEDMNIST_DIR}")
needs_busi = pytest.mark.skipif(not BUSI_DIR.is_dir(), reason=f"BUSI not found at {BUSI_DIR}")


# ----------------------------------------------------------------------------- MedMNIST
@needs_medmnist
def test_breastmnist_official_split_task_and_classes():
    bundle = load_data(DataConfig(name="breastmnist", root=str(MEDMNIST_DIR), image_size=28))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (546, 78, 156)
    assert bundle.task == "binary"
    assert bundle.class_names == ["malignant", "normal, benign"]
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.shape == (546, 1, 28, 28)
    assert bundle.train.labels.dtype == torch.int64 and set(bundle.train.labels.tolist()) == {0, 1}
    assert bundle.split_info["kind"] == "official"
    # pixels are the file's pixels at the native size (no resize happened)
    with np.load(MEDMNIST_DIR / "breastmnist.npz") as npz:
        assert np.array_equal(bundle.test.images[:, 0].numpy(), npz["test_images"])
        assert np.array_equal(bundle.test.labels.numpy(), npz["test_labels"][:, 0])


@needs_medmnist
def test_pneumoniamnist_sizes_and_resize(monkeypatch):
    monkeypatch.setenv("MEDPEFT_DATA", str(MEDMNIST_DIR))  # default root comes from the environment
    bundle = load_data(DataConfig(name="PneumoniaMNIST", image_size=40))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (4708, 524, 624)
    assert bundle.class_names == ["normal", "pneumonia"]
    assert bundle.train.images.shape == (4708, 1, 40, 40)
    assert bundle.val.images.shape == (524, 1, 40, 40) and bundle.val.images.dtype == torch.uint8


def test_missing_medmnist_file_names_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPEFT_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="breastmnist", root=str(tmp_path), medmnist_size=64))
    assert str(tmp_path / "breastmnist_64.npz") in str(err.value)
    assert "zenodo" in str(err.value)  # says where to get it


def test_corrupt_medmnist_file_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPEFT_OFFLINE", "1")
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="breastmnist.npz"):
        load_data(DataConfig(name="breastmnist", root=str(tmp_path)))


def _fake_npz(path: Path, images_shape, labels_fn):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *images_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels_fn(rng, n)
    np.savez(path, **arrays)
    return arrays


def test_medmnist_rgb_and_multilabel_files(tmp_path):
    rgb = _fake_npz(tmp_path / "pathmnist.npz", (28, 28, 3), lambda rng, n: rng.integers(0, 9, (n, 1)))
    multi = _fake_npz(tmp_path / "chestmnist.npz", (28, 28), lambda rng, n: rng.integers(0, 2, (n, 14)))
    path_bundle = load_data(DataConfig(name="pathmnist", root=str(tmp_path), image_size=28))
    assert path_bundle.task == "multiclass" and path_bundle.num_classes == 9 and path_bundle.in_channels == 3
    assert torch.equal(path_bundle.val.images, torch.from_numpy(rgb["val_images"]).permute(0, 3, 1, 2))
    chest = load_data(DataConfig(name="chestmnist", root=str(tmp_path), image_size=14, fraction=0.5))
    assert chest.task == "multilabel" and chest.num_classes == 14 and chest.in_channels == 1
    assert chest.test.labels.dtype == torch.float32
    assert torch.equal(chest.test.labels, torch.from_numpy(multi["test_labels"]).float())
    assert len(chest.train) == 6 and chest.train.images.shape[1:] == (1, 14, 14)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as err:
        load_data(DataConfig(name="no_such_data_set_xyz"))
    message = str(err.value)
    assert "breastmnist" in message and "pneumoniamnist" in message and "CSV" in message and "folder" in message


# ----------------------------------------------------------------------------- subsets
def _labels(counts):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(123).permutation(labels)


def test_fractions_nested_stratified_and_at_least_one_per_class():
    labels = _labels([500, 120, 7])
    subsets = {f: set(subset_train(labels, fraction=f, seed=3).tolist()) for f in (0.01, 0.1, 0.5, 1.0)}
    assert subsets[0.01] <= subsets[0.1] <= subsets[0.5] <= subsets[1.0]
    assert subsets[1.0] == set(range(len(labels)))
    for fraction, chosen in subsets.items():
        per_class = Counter(labels[sorted(chosen)].tolist())
        for cls, n in enumerate([500, 120, 7]):
            assert per_class[cls] >= 1
            assert abs(per_class[cls] - fraction * n) <= 1, (fraction, cls, per_class[cls])


def test_subset_deterministic_by_seed():
    labels = _labels([300, 200])
    a = subset_train(labels, fraction=0.1, seed=0)
    assert np.array_equal(a, subset_train(labels, fraction=0.1, seed=0))
    assert not np.array_equal(a, subset_train(labels, fraction=0.1, seed=1))
    assert np.array_equal(subset_train(labels, shots=4, seed=5), subset_train(torch.tensor(labels), shots=4, seed=5))


def test_shots_per_class_and_nested():
    labels = _labels([50, 30, 10])
    five = subset_train(labels, shots=5, seed=0)
    ten = subset_train(labels, shots=10, seed=0)
    assert Counter(labels[five].tolist()) == {0: 5, 1: 5, 2: 5}
    assert set(five.tolist()) <= set(ten.tolist())


@pytest.mark.parametrize("bad", [0, 1.5, -1, float("nan")])
def test_bad_fraction_names_value(bad):
    with pytest.raises(ConfigError, match="fraction"):
        subset_train(_labels([10, 10]), fraction=bad)


def test_too_many_shots_names_class_and_count():
    with pytest.raises(ConfigError) as err:
        subset_train(_labels([50, 3]), shots=4, class_names=["benign", "malignant"])
    assert "malignant" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ConfigError, match="shots"):
        subset_train(_labels([5, 5]), shots=0)


def test_multilabel_fraction_nested_and_no_shots():
    labels = (np.random.default_rng(0).random((200, 4)) > 0.7).astype(np.float32)
    small, large = subset_train(labels, fraction=0.1, seed=2), subset_train(labels, fraction=0.4, seed=2)
    assert len(small) == 20 and len(large) == 80 and set(small.tolist()) <= set(large.tolist())
    with pytest.raises(ConfigError, match="multi-label"):
        subset_train(labels, shots=2)


@needs_medmnist
def test_load_data_subsets_train_only():
    full = load_data(DataConfig(name="breastmnist", root=str(MEDMNIST_DIR), image_size=28))
    part = load_data(DataConfig(name="breastmnist", root=str(MEDMNIST_DIR), image_size=28, fraction=0.1,
                                val_labels="full"))
    assert len(part.val) == 78 and len(part.test) == 156
    train_counts = Counter(full.train.labels.tolist())
    assert len(part.train) == sum(max(1, round(0.1 * n)) for n in train_counts.values())
    assert set(part.train.ids) <= set(full.train.ids)
    assert part.split_info["n_train_before"] == 546 and part.split_info["n_train_after"] == len(part.train)


# ----------------------------------------------------------------------------- splits
def test_stratified_split_deterministic_and_disjoint():
    keys = _labels([80, 20])
    a = split_indices(keys, None, (0.7, 0.15, 0.15), seed=0)
    b = split_indices(keys, None, (0.7, 0.15, 0.15), seed=0)
    c = split_indices(keys, None, (0.7, 0.15, 0.15), seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert Counter(keys[a[2]].tolist()) == {0: 12, 1: 3}  # 15% of each class


# ----------------------------------------------------------------------------- image folders
def _png(path: Path, value: int, size=(20, 12), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_image_folder_tiny_tree_excludes_masks(tmp_path):
    for cls in ("a", "b"):
        for i in range(6):
            _png(tmp_path / cls / f"{cls}{i}.png", 40 * i)
    _png(tmp_path / "a" / "a0_mask.png", 255)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    bundle = load_data(DataConfig(name=str(tmp_path), image_size=16, split_seed=0, near_duplicates="ignore"))
    ids = bundle.train.ids + bundle.val.ids + bundle.test.ids
    assert sorted(ids) == sorted([f"{c}/{c}{i}.png" for c in "ab" for i in range(6)])
    assert bundle.class_names == ["a", "b"] and bundle.task == "binary"
    assert bundle.train.images.shape[1:] == (1, 16, 16)
    assert bundle.split_info["kind"] == "stratified"
    # uniform images stay uniform after resizing: pixel values survive decoding and resizing
    for row, image_id in enumerate(bundle.train.ids):
        assert torch.all(bundle.train.images[row] == 40 * int(Path(image_id).stem[1:])), image_id


def test_image_folder_mixed_gray_and_rgb_becomes_rgb(tmp_path):
    for i in range(3):
        _png(tmp_path / "x" / f"{i}.png", 10)
        _png(tmp_path / "y" / f"{i}.png", 200, mode="RGB")
    bundle = load_data(DataConfig(name=str(tmp_path), image_size=8, near_duplicates="ignore"))
    assert bundle.in_channels == 3


def test_image_folder_errors(tmp_path):
    _png(tmp_path / "only" / "x.png", 1)
    with pytest.raises(DataError, match="at least 2"):
        load_data(DataConfig(name=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_data(DataConfig(name=str(tmp_path)))


def test_corrupt_image_named(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", 5)
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "b" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="broken.png"):
        load_data(DataConfig(name=str(tmp_path), image_size=8))


def test_read_image_modes(tmp_path):
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    deep, alpha = read_image(tmp_path / "deep.png"), read_image(tmp_path / "alpha.png")
    assert deep.dtype == np.uint8 and deep.shape == (4, 5) and int(deep.max()) == 255
    assert alpha.shape == (2, 3, 3) and alpha[0, 0].tolist() == [10, 20, 30]


@needs_busi
def test_busi_folder_without_masks():
    bundle = load_data(DataConfig(name=str(BUSI_DIR), image_size=32))
    ids = bundle.train.ids + bundle.val.ids + bundle.test.ids
    assert len(ids) == 780 and len(set(ids)) == 780
    assert not any("_mask" in i for i in ids)
    assert bundle.class_names == ["benign", "malignant", "normal"] and bundle.task == "multiclass"
    all_labels = torch.cat([bundle.train.labels, bundle.val.labels, bundle.test.labels])
    assert Counter(all_labels.tolist()) == {0: 437, 1: 210, 2: 133}
    assert bundle.train.images.shape[1:] == (3, 32, 32)  # 16 colour images make the set RGB


# ----------------------------------------------------------------------------- manifests
def _manifest(tmp_path: Path, rows, header=("path", "label"), name="m.csv") -> Path:
    path = tmp_path / name
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _images(tmp_path: Path, n: int) -> list[str]:
    """Distinct random textures: uniform images would (rightly) all be near-duplicates of each other."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def test_manifest_good_with_split_column(tmp_path):
    paths = _images(tmp_path, 9)
    rows = [(p, ["cat", "dog", "cow"][i % 3], ["train", "val", "test"][i // 3]) for i, p in enumerate(paths)]
    bundle = load_data(DataConfig(name=str(_manifest(tmp_path, rows, ("path", "label", "split"))), image_size=8))
    assert bundle.class_names == ["cat", "cow", "dog"] and bundle.task == "multiclass"
    assert bundle.train.ids == paths[:3] and bundle.val.ids == paths[3:6] and bundle.test.ids == paths[6:]
    assert bundle.train.labels.tolist() == [0, 2, 1]


def test_manifest_int_labels_sorted_numerically(tmp_path):
    paths = _images(tmp_path, 12)
    rows = [(p, [10, 2][i % 2]) for i, p in enumerate(paths)]
    bundle = load_data(DataConfig(name=str(_manifest(tmp_path, rows)), image_size=8))
    assert bundle.class_names == ["2", "10"]


def test_manifest_missing_column(tmp_path):
    paths = _images(tmp_path, 3)
    manifest = _manifest(tmp_path, [(p, "a") for p in paths], header=("file", "label"))
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name=str(manifest)))
    assert "'path'" in str(err.value) and "'file'" in str(err.value)


def test_manifest_unknown_split_value(tmp_path):
    paths = _images(tmp_path, 3)
    rows = [(paths[0], "a", "train"), (paths[1], "b", "holdout"), (paths[2], "a", "test")]
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name=str(_manifest(tmp_path, rows, ("path", "label", "split")))))
    assert "holdout" in str(err.value) and "line 3" in str(err.value)


@pytest.mark.parametrize("escape", ["../outside.png", "ABS", "LINK"])
def test_manifest_path_escaping_root(tmp_path, escape):
    root = tmp_path / "root"
    paths = _images(root, 4)
    outside = tmp_path / "outside.png"
    _png(outside, 9)
    if escape == "ABS":
        escape = str(outside)
    elif escape == "LINK":
        (root / "link.png").symlink_to(outside)
        escape = "link.png"
    rows = [(p, "ab"[i % 2]) for i, p in enumerate(paths)] + [(escape, "a")]
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name=str(_manifest(root, rows)), image_size=8))
    assert escape in str(err.value) and "line 6" in str(err.value)


def test_manifest_missing_file(tmp_path):
    paths = _images(tmp_path, 4)
    rows = [(p, "ab"[i % 2]) for i, p in enumerate(paths)] + [("img/gone.png", "a")]
    with pytest.raises(DataError, match="gone.png"):
        load_data(DataConfig(name=str(_manifest(tmp_path, rows)), image_size=8))


def test_manifest_multilabel(tmp_path):
    paths = _images(tmp_path, 10)
    rows = [(p, i % 2, int(i % 3 == 0)) for i, p in enumerate(paths)]
    cfg = DataConfig(name=str(_manifest(tmp_path, rows, ("path", "effusion", "nodule"))), image_size=8,
                     label_columns=["effusion", "nodule"])
    bundle = load_data(cfg)
    assert bundle.task == "multilabel" and bundle.class_names == ["effusion", "nodule"]
    assert bundle.train.labels.dtype == torch.float32 and bundle.train.labels.shape[1] == 2
    labels = torch.cat([bundle.train.labels, bundle.val.labels, bundle.test.labels])
    ids = bundle.train.ids + bundle.val.ids + bundle.test.ids
    for image_id, row in zip(ids, labels.tolist()):
        i = int(Path(image_id).stem)
        assert row == [i % 2, int(i % 3 == 0)]


def test_manifest_grouped_split_keeps_groups_together(tmp_path):
    paths = _images(tmp_path, 60)
    rows = [(p, "ab"[(i // 3) % 2], f"patient{i // 3}") for i, p in enumerate(paths)]  # 20 patients x 3
    manifest = _manifest(tmp_path, rows, ("path", "label", "patient"))
    bundle = load_data(DataConfig(name=str(manifest), image_size=8, group_column="patient"))
    patient = {p: i // 3 for i, p in enumerate(paths)}
    sides = [{patient[i] for i in s.ids} for s in (bundle.train, bundle.val, bundle.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert all(sides) and bundle.split_info["kind"] == "grouped"
    assert bundle.split_info["groups_on_two_sides"] == 0
    assert len(bundle.train) >= 36  # roughly 70%
    assert set(bundle.val.labels.tolist()) == {0, 1}  # stratified at the group level


# ----------------------------------------------------------------------------- split files
def test_split_file_round_trip(tmp_path):
    paths = _images(tmp_path, 30)
    manifest = _manifest(tmp_path, [(p, "ab"[i % 2]) for i, p in enumerate(paths)])
    first = load_data(DataConfig(name=str(manifest), image_size=8, split_seed=7, fraction=0.5))
    split_file = tmp_path / "split.json"
    save_split(first, split_file)
    saved = json.loads(split_file.read_text())
    assert len(saved["train"]) == first.split_info["n_train_before"]  # the whole training split
    again = load_data(DataConfig(name=str(manifest), image_size=8, split_seed=99, fraction=0.5,
                                 split_file=str(split_file)))
    assert again.val.ids == first.val.ids and again.test.ids == first.test.ids
    assert again.train.ids == first.train.ids  # same subset of the same split
    assert torch.equal(again.test.images, first.test.images)
    saved["test"].append("img/unknown.png")
    split_file.write_text(json.dumps(saved))
    with pytest.raises(DataError, match="unknown.png"):
        load_data(DataConfig(name=str(manifest), image_size=8, split_file=str(split_file)))


def test_folder_split_keeps_near_duplicates_on_one_side(tmp_path):
    """Re-cropped / rescaled copies (as in BUSI) must not straddle train/val/test."""
    rng = np.random.default_rng(1)
    originals = {}
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            # smooth random blobs: perceptual hashes see structure, not pixel noise
            base = rng.random((8, 8))
            img = Image.fromarray((base * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
            img.save(tmp_path / cls / f"{i}.png")
            originals[f"{cls}/{i}.png"] = img
    for name in ["a/0.png", "a/1.png", "b/2.png", "b/3.png"]:  # slightly cropped and rescaled twins
        twin = originals[name].crop((2, 2, 62, 61)).resize((70, 66), Image.BILINEAR)
        twin.save(tmp_path / name.replace(".png", "_copy.png"))
    grouped = load_data(DataConfig(name=str(tmp_path), image_size=32, split_seed=3))
    side = {i: s for s, part in (("train", grouped.train), ("val", grouped.val), ("test", grouped.test))
            for i in part.ids}
    for name in ["a/0.png", "a/1.png", "b/2.png", "b/3.png"]:
        assert side[name] == side[name.replace(".png", "_copy.png")], name
    assert grouped.split_info["kind"] == "grouped" and grouped.split_info["near_duplicates"] == "group"
    naive = load_data(DataConfig(name=str(tmp_path), image_size=32, split_seed=3, near_duplicates="ignore"))
    assert naive.split_info["kind"] == "stratified"
    with pytest.raises(ConfigError, match="near_duplicates"):
        load_data(DataConfig(name=str(tmp_path), image_size=32, near_duplicates="maybe"))
