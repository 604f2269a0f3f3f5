"""Forgetting of the pretrained representation (issue 16, part 4): linear CKA against its
definition and invariances; a frozen backbone has CKA 1 exactly, full fine-tuning moves it; the
probe on another set reports before / after."""
from __future__ import annotations

import numpy as np
import pytest

from medpeft.data.base import DataConfig
from medpeft.forgetting import linear_cka
from medpeft.run import RunConfig, execute
from medpeft.train import TrainConfig
from toydata import make_toy


def test_linear_cka_definition_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(50, 4))
    xc, yc = x - x.mean(0), y - y.mean(0)
    by_hand = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(by_hand)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)  # rotation, isotropic scale, shift
    assert linear_cka(x, rng.normal(size=(50, 6))) < 0.5
    with pytest.raises(ValueError, match="same >= 2 examples"):
        linear_cka(x, y[:10])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("forget") / "toy", per_class=20, size=32)


def run(toy, method, **extra):
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off"),
                    train=TrainConfig(epochs=2, batch_size=8, seed=0, lr=5e-3), backbone="tiny_cnn",
                    pretrained=False, method=method, n_boot=20, forgetting=True, **extra)
    return execute(cfg, save=False)["forgetting"]


def test_a_frozen_backbone_keeps_its_representation_and_full_fine_tuning_moves_it(toy, tmp_path):
    assert run(toy, "linear")["cka"] == pytest.approx(1.0, abs=1e-9)
    other = make_toy(tmp_path / "other", per_class=20, size=32)
    moved = run(toy, "full", forgetting_probe=str(other))
    assert moved["cka"] < 0.999
    probe = moved["probe"]
    assert set(probe) == {"data", "metric", "pretrained", "fine_tuned", "change"}
    assert probe["change"] == pytest.approx(probe["fine_tuned"] - probe["pretrained"])
    assert 0.0 <= probe["pretrained"] <= 1.0 and str(tmp_path) not in probe["data"]  # no absolute path recorded
