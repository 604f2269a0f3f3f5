"""Synthetic training images (issue 18, part 3): they join the training split only, with the real
class names, and the run records them."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from toydata import make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("synth") / "toy", per_class=20, size=32)


def write_manifest(folder, labels):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i, label in enumerate(labels):
        Image.fromarray(np.full((32, 32), 30 * i % 255, np.uint8)).save(folder / f"s{i}.png")
        rows.append(f"s{i}.png,{label}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_synthetic_images_join_the_training_split_only(toy, tmp_path):
    manifest = write_manifest(tmp_path / "synth", ["lesion"] * 3 + ["normal"] * 2)
    real = load_data(DataConfig(name=str(toy), image_size=32, audit="off", fraction=0.5))
    mixed = load_data(DataConfig(name=str(toy), image_size=32, audit="off", fraction=0.5, synthetic=str(manifest)))
    assert len(mixed.train) == len(real.train) + 5
    assert mixed.val.ids == real.val.ids and mixed.test.ids == real.test.ids
    synthetic = [i for i, ident in enumerate(mixed.train.ids) if ident.startswith("synthetic/")]
    labels = [mixed.class_names[int(mixed.train.labels[i])] for i in synthetic]
    assert sorted(labels) == ["lesion"] * 3 + ["normal"] * 2
    assert mixed.split_info["synthetic"]["n_synthetic"] == 5
    only = load_data(DataConfig(name=str(toy), image_size=32, audit="off", synthetic=str(manifest), synthetic_only=True))
    assert len(only.train) == 5 and only.split_info["synthetic"]["n_real_train"] == 0


def test_unknown_synthetic_classes_are_named(toy, tmp_path):
    manifest = write_manifest(tmp_path / "bad", ["lesion", "tumour"])
    with pytest.raises(ConfigError, match=r"classes \['tumour'\] are not classes of the data"):
        load_data(DataConfig(name=str(toy), image_size=32, audit="off", synthetic=str(manifest)))
    with pytest.raises(ConfigError, match="synthetic_only needs"):
        load_data(DataConfig(name=str(toy), image_size=32, audit="off", synthetic_only=True))
