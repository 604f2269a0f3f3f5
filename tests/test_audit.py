"""Data set audit: hashes against definitions, robustness, findings, grouping, split leakage, CLI."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.audit import add_audit_parser, audit_dataset
from medpeft.data.near_duplicates import (THRESHOLD_CAP, ImageHashes, UnionFind, _dct_matrix, check_threshold,
                                          compare_split_leakage, dhash_from_thumbnails, hash_images, leak_free_groups,
                                          near_duplicate_groups, near_pairs, pair_distance_stats, perceptual_hash,
                                          phash_from_thumbnails, popcount64, resolve_threshold)
from medpeft.data.base import DataBundle, ImageSet
from medpeft.errors import ConfigError, DataError



def texture(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A smooth random grayscale image (like tissue at low frequency), uint8 (h, w)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((h // 15, w // 15)) * 255).astype(np.uint8))
    fine = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(np.float32)
    return np.clip(fine + rng.normal(0, 4, (h, w)), 0, 255).astype(np.uint8)


def distance(a, b) -> int:
    pa, da = perceptual_hash(a)
    pb, db = perceptual_hash(b)
    return bin(pa ^ pb).count("1") + bin(da ^ db).count("1")


def resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))


# ----------------------------------------------------------------------------- hashes
def test_dct_matrix_matches_scipy_orthonormal_dct():
    from scipy.fft import dctn

    x = np.random.default_rng(0).random((32, 32))
    d = _dct_matrix(32)
    np.testing.assert_allclose(d @ x @ d.T, dctn(x, type=2, norm="ortho"), atol=1e-10)
    np.testing.assert_allclose(d @ d.T, np.eye(32), atol=1e-12)


def test_phash_and_dhash_bits_by_definition():
    thumbs = np.random.default_rng(1).random((3, 32, 32))
    coeffs = np.stack([_dct_matrix(32) @ t @ _dct_matrix(32).T for t in thumbs])
    low = coeffs[:, :8, :8].reshape(3, 64)
    for k in range(3):
        bits = "".join("1" if v > np.median(low[k]) else "0" for v in low[k])
        assert int(phash_from_thumbnails(thumbs)[k]) == int(bits, 2)
    ramp = np.tile(np.arange(9.0), (8, 1))[None]  # every pixel brighter than its left neighbour
    assert int(dhash_from_thumbnails(ramp)[0]) == 2**64 - 1
    assert int(dhash_from_thumbnails(ramp[:, :, ::-1])[0]) == 0
    assert int(popcount64(np.array([2**64 - 1, 5], dtype=np.uint64))[0]) == 64


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_near_duplicate_hash_is_robust_to_rescaling_and_small_crops(seed):
    a = texture(seed)
    h, w = a.shape
    assert distance(a, resize(a, w // 2, h // 2)) <= 6
    assert distance(a, resize(a, int(w * 1.7), int(h * 1.7))) <= 6
    crop = a[4:h - 4, 5:w - 5]  # ~3% on every side
    assert distance(a, crop) <= THRESHOLD_CAP
    assert distance(a, resize(crop, w, h)) <= THRESHOLD_CAP
    noisy = np.clip(a + np.random.default_rng(9).normal(0, 6, a.shape), 0, 255).astype(np.uint8)
    assert distance(a, noisy) <= 6
    for other in range(10, 15):  # unrelated images are far apart
        assert distance(a, texture(other)) > 2 * THRESHOLD_CAP


def test_rgb_and_gray_of_the_same_pixels_hash_the_same():
    a = texture(3)
    rgb = np.repeat(a[..., None], 3, axis=2)
    assert perceptual_hash(a) == perceptual_hash(rgb)
    hashes = hash_images(torch.from_numpy(np.stack([a, a]))[:, None])
    assert hashes.sha256[0] == hashes.sha256[1]


def test_union_find_and_pairs():
    uf = UnionFind(5)
    uf.union(3, 1)
    uf.union(1, 4)
    assert uf.roots() == [0, 1, 2, 1, 1]
    h = ImageHashes(["a", "b", "a", None], np.array([0, 0, 2**64 - 1, 0], dtype=np.uint64),
                    np.array([0, 7, 0, 0], dtype=np.uint64))
    pairs = near_pairs(h, threshold=3)
    assert sorted(pairs) == [(0, 1, 3), (0, 2, 0)]  # exact pixels join even with distant hashes; None skipped
    with pytest.raises(ConfigError, match="threshold"):
        near_pairs(h, threshold=200)


def _alike_images(n=60, size=32):
    """Images that all look much alike (a shared scene plus a little of their own): like small
    chest X-rays, unrelated pairs are only a few bits apart."""
    base = texture(0).astype(np.float32)
    out = [np.clip(0.8 * base + 0.2 * texture(300 + i), 0, 255).astype(np.uint8) for i in range(n)]
    return torch.from_numpy(np.stack([resize(a, size, size) for a in out]))[:, None]


def test_auto_threshold_follows_the_data():
    alike = hash_images(_alike_images())
    stats = pair_distance_stats(alike)
    rows, cols = np.triu_indices(len(alike), 1)  # reference: every pair, by the definition
    dist = np.array([alike.distance(i, j) for i, j in zip(rows, cols)])
    median = np.median(dist)
    assert stats["median"] == median
    assert stats["sd"] == pytest.approx(1.4826 * np.median(np.abs(dist - median)), abs=1e-3)
    used, info = resolve_threshold(alike, "auto")
    assert used == max(0, int(np.floor(median - 4 * stats["sd"]))) < THRESHOLD_CAP
    assert info["requested"] == "auto" and info["used"] == used
    assert resolve_threshold(alike, 15)[0] == 15  # a number is used as given
    distinct = hash_images(torch.from_numpy(np.stack([resize(texture(50 + i), 32, 32) for i in range(40)]))[:, None])
    assert resolve_threshold(distinct, "auto")[0] == THRESHOLD_CAP  # unrelated images: the cap
    few = ImageHashes(["a", "b"], np.zeros(2, dtype=np.uint64), np.zeros(2, dtype=np.uint64))
    assert resolve_threshold(few)[0] == THRESHOLD_CAP
    assert check_threshold("auto") == "auto" and check_threshold("12") == 12
    for bad in ("x", -1, 129, 2.5, True):
        with pytest.raises(ConfigError, match="threshold"):
            check_threshold(bad)


def test_explicit_lenient_threshold_is_flagged_in_the_report():
    images = _alike_images()
    pool = ImageSet(images=images, labels=torch.arange(len(images)) % 2, ids=[str(i) for i in range(len(images))])
    lenient = audit_dataset(pool, threshold=THRESHOLD_CAP + 20)
    assert any("false near-duplicates" in note for note in lenient.notes)
    auto = audit_dataset(pool)
    assert auto.threshold < THRESHOLD_CAP and auto.counts["near_duplicate_groups"] < 5
    assert lenient.counts["largest_group"] > auto.counts["largest_group"]


# ----------------------------------------------------------------------------- file audits
def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def leaky_folder(tmp_path):
    root = tmp_path / "leaky"
    a, b, c = texture(0), texture(1), texture(2)
    save(root / "benign" / "a.png", a)
    save(root / "benign" / "a_copy.png", a)  # exact duplicate
    save(root / "benign" / "a_small.png", resize(a, 80, 60))  # near-duplicate
    save(root / "malignant" / "a_again.png", a[3:-3, 4:-4].copy())  # the same image in another class
    save(root / "benign" / "b.png", b)
    save(root / "malignant" / "c.png", np.repeat(c[..., None], 3, axis=2).copy())
    save(root / "benign" / "a_mask.png", a)  # masks are skipped
    for k in range(6):
        save(root / ("benign" if k % 2 else "malignant") / f"other{k}.png", texture(20 + k))
    data = (root / "benign" / "b.png").read_bytes()
    (root / "malignant" / "truncated.png").write_bytes(data[: len(data) // 2])
    return root


def test_folder_audit_finds_duplicates_cross_class_and_unreadable(leaky_folder):
    report = audit_dataset(str(leaky_folder))
    c = report.counts
    assert c["images"] == 13 and c["unreadable"] == 1
    assert report.unreadable[0]["file"] == "malignant/truncated.png"
    assert [g["files"] for g in report.exact_duplicates] == [["benign/a.png", "benign/a_copy.png"]]
    groups = [sorted(g["files"]) for g in report.near_duplicates]
    assert groups == [["benign/a.png", "benign/a_copy.png", "benign/a_small.png", "malignant/a_again.png"]]
    assert report.cross_class and report.cross_class[0]["classes"] == ["benign", "malignant"]
    assert report.class_balance == {"all": {"benign": 7, "malignant": 6}}
    assert report.modes == {"L": 11, "RGB": 1}
    assert report.sizes["width"] == {"min": 80, "median": 160.0, "max": 160}
    assert not report.has_splits and report.cross_split == []
    assert report.split_leak["leak_free"]["test_with_twin_in_train"] == 0
    problems = " ".join(report.problems())
    assert "different labels" in problems and "unreadable" in problems
    data = json.loads(report.to_json())
    assert data["counts"]["near_duplicate_groups"] == 1
    text = report.summary_text()
    assert "malignant/a_again.png" in text and "truncated.png" in text


def test_clean_folder_has_no_problems(tmp_path):
    for k in range(6):
        save(tmp_path / "clean" / ("x" if k % 2 else "y") / f"{k}.png", texture(40 + k))
    report = audit_dataset(str(tmp_path / "clean"))
    assert report.problems() == [] and report.counts["near_duplicate_groups"] == 0


def test_manifest_audit_reports_leakage_across_splits(tmp_path):
    root = tmp_path / "m"
    a, b = texture(5), texture(6)
    save(root / "img" / "1.png", a)
    save(root / "img" / "2.png", resize(a, 100, 75))
    save(root / "img" / "3.png", b)
    save(root / "img" / "4.png", texture(7))
    (root / "data.csv").write_text("path,label,split\nimg/1.png,x,train\nimg/2.png,x,test\n"
                                   "img/3.png,y,train\nimg/4.png,y,val\n")
    report = audit_dataset(str(root / "data.csv"))
    assert report.splits == ["train", "test", "val"]
    assert [g["files"] for g in report.cross_split] == [["img/1.png", "img/2.png"]]
    assert report.cross_split[0]["splits"] == ["train", "test"]
    assert report.split_leak is None and "span two or more splits" in report.problems()[0]
    (root / "bad.csv").write_text("path,label\n../outside.png,x\n")
    with pytest.raises(DataError, match="outside the data root"):
        audit_dataset(str(root / "bad.csv"))
    with pytest.raises(DataError, match="cannot audit"):
        audit_dataset(str(root / "nothing-here"))


def _set(arrays, labels, prefix, groups=None):
    images = torch.from_numpy(np.stack(arrays))[:, None]
    return ImageSet(images=images, labels=torch.tensor(labels), ids=[f"{prefix}/{i}" for i in range(len(arrays))],
                    groups=groups)


def test_bundle_audit_finds_near_duplicates_across_splits():
    a = resize(texture(1), 32, 32)
    near = resize(texture(1)[2:-2, 3:-3].copy(), 32, 32)
    train = _set([a, resize(texture(2), 32, 32), resize(texture(3), 32, 32)], [0, 1, 0], "train")
    val = _set([resize(texture(4), 32, 32)], [1], "val")
    test = _set([near, resize(texture(5), 32, 32)], [1, 0], "test")
    bundle = DataBundle("toy", "binary", ["neg", "pos"], train, val, test)
    report = audit_dataset(bundle)
    assert [g["files"] for g in report.cross_split] == [["train/0", "test/0"]]
    assert report.cross_class[0]["classes"] == ["neg", "pos"]
    assert report.class_balance == {"train": {"neg": 2, "pos": 1}, "val": {"neg": 0, "pos": 1},
                                    "test": {"neg": 1, "pos": 1}}
    assert near_duplicate_groups(bundle) == ["nd000000", "nd000001", "nd000002", "nd000003", "nd000000", "nd000005"]


# ----------------------------------------------------------------------------- leak-free splits
def _pool_with_twins(n_scenes=30, twins=2, size=32):
    arrays, labels = [], []
    for s in range(n_scenes):
        base = texture(100 + s)
        for t in range(twins):
            crop = base[t:base.shape[0] - t, t:base.shape[1] - t]
            arrays.append(resize(crop.copy(), size, size))
            labels.append(s % 2)
    return _set(arrays, labels, "pool")


def test_leak_free_groups_keep_twins_and_patients_together():
    pool = _pool_with_twins(n_scenes=6)
    groups = near_duplicate_groups(pool)
    assert groups == [f"nd{2 * (i // 2):06d}" for i in range(12)]
    patients = [f"p{i // 4}" for i in range(12)]  # images 0-3 one patient, 4-7 another...
    merged = leak_free_groups(pool, existing=patients)
    assert len(set(merged)) == 3 and merged[0] == merged[3] and merged[4] == merged[7]
    pool.groups = patients
    assert leak_free_groups(pool) == merged  # the ImageSet's own groups are the default
    with pytest.raises(DataError, match="existing groups"):
        leak_free_groups(pool, existing=["x"])


def test_grouped_split_with_leak_free_groups_has_no_twin_across():
    from medpeft.data.base import DataConfig
    from medpeft.data.splits import split_pool

    pool = _pool_with_twins()
    pool.groups = leak_free_groups(pool)
    train, val, test, info = split_pool(pool, DataConfig(val_ratio=0.2, test_ratio=0.2))
    assert info["groups_on_two_sides"] == 0
    sides = [set(s.ids) for s in (train, val, test)]
    for i in range(0, len(pool), 2):  # twins i, i+1 on the same side
        assert any({pool.ids[i], pool.ids[i + 1]} <= side for side in sides)


def test_compare_split_leakage_naive_leaks_leak_free_does_not():
    pool = _pool_with_twins(n_scenes=40)
    result = compare_split_leakage(pool, seed=0, val_ratio=0.2, test_ratio=0.2)
    assert result["n_groups"] == 40
    assert result["naive"]["test_with_twin_in_train"] > 0
    assert result["leak_free"]["test_with_twin_in_train"] == 0
    assert result["leak_free"]["val_with_twin_in_train"] == 0
    assert sum(result["naive"]["sizes"]) == sum(result["leak_free"]["sizes"]) == 80


# ----------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_audit_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_audit_json_and_strict(leaky_folder, tmp_path, capsys):
    out = tmp_path / "report" / "audit.json"
    assert _cli(["audit", str(leaky_folder), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["counts"]["exact_duplicate_groups"] == 1
    assert _cli(["audit", str(leaky_folder), "--strict"]) == 1
    assert "strict failed" in capsys.readouterr().out
    assert _cli(["audit", str(leaky_folder), "--strict", "--threshold", "0", "--mask-pattern", "*truncated*"]) == 1
    with pytest.raises(ConfigError, match="threshold"):
        audit_dataset(str(leaky_folder), threshold=-1)


@pytest.mark.slow
def test_busi_audit_finds_its_known_problems(busi_root):
    started = time.perf_counter()
    report = audit_dataset(str(busi_root))
    assert time.perf_counter() - started < 60
    c = report.counts
    assert c["images"] == 780 and c["unreadable"] == 0
    assert report.class_balance["all"] == {"benign": 437, "malignant": 210, "normal": 133}
    # the one pixel-identical pair is the image published in two classes
    assert [g["files"] for g in report.exact_duplicates] == [["benign/benign (433).png",
                                                              "malignant/malignant (145).png"]]
    assert any(g["files"] == ["benign/benign (399).png", "malignant/malignant (93).png"] for g in report.cross_class)
    assert 100 <= c["near_duplicate_groups"] <= 200 and c["cross_class_groups"] >= 5
    assert report.modes == {"L": 764, "RGB": 16}
    assert report.threshold == THRESHOLD_CAP  # auto keeps the cap on BUSI
    leak = report.split_leak
    assert leak["naive"]["test_with_twin_in_train"] > 10 and leak["leak_free"]["test_with_twin_in_train"] == 0


@pytest.mark.slow
def test_medmnist_official_splits_audit(medmnist_root):
    from medpeft.data import DataConfig, load_data

    pneumonia = audit_dataset(load_data(DataConfig(name="pneumoniamnist", root=str(medmnist_root), image_size=28)))
    # 28 px chest X-rays all look alike: auto falls far below the cap instead of chaining everything
    assert pneumonia.threshold <= 8 and pneumonia.counts["largest_group"] <= 5
    assert pneumonia.counts["exact_duplicate_groups"] >= 20
    breast = audit_dataset(load_data(DataConfig(name="breastmnist", root=str(medmnist_root), image_size=28)))
    # BreastMNIST is BUSI at 28 px: its official split inherits BUSI's near-duplicates across splits
    assert breast.threshold == THRESHOLD_CAP and breast.counts["cross_split_groups"] > 50
