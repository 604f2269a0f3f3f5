"""Injected label noise (issue 16, part 1): the definitions' rates, seeded draws, clean test
labels, noisy validation by default, the recorded flips, bad specs named."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.data.noise import noisy_labels, parse_label_noise, transition_matrix
from medpeft.errors import ConfigError
from medpeft.run import RunConfig, execute
from medpeft.train import TrainConfig
from toydata import make_toy


def test_transition_matrices_follow_their_definitions():
    sym = transition_matrix("symmetric", 0.3, 4)
    assert np.allclose(np.diag(sym), 0.7) and np.allclose(sym[0, 1:], 0.1) and np.allclose(sym.sum(1), 1)
    pair = transition_matrix("asymmetric", 0.2, 3)
    assert pair[0, 1] == pytest.approx(0.2) and pair[2, 0] == pytest.approx(0.2) and pair[0, 2] == 0


def test_noise_rates_match_the_matrix_on_a_large_draw():
    labels = torch.arange(20_000) % 2
    rng = np.random.default_rng(0)
    matrix = np.array([[0.9, 0.1], [0.4, 0.6]])
    noisy = noisy_labels(labels, matrix, rng)
    for i in (0, 1):
        observed = (noisy[labels == i] != i).float().mean().item()
        assert observed == pytest.approx(1 - matrix[i, i], abs=0.015)  # within ~4 binomial SEs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("noise") / "toy", per_class=60, size=16)


def test_training_and_validation_labels_flip_the_test_never(toy):
    clean = load_data(DataConfig(name=str(toy), image_size=16, audit="off"))
    noisy = load_data(DataConfig(name=str(toy), image_size=16, audit="off", label_noise="symmetric:0.4"))
    assert torch.equal(clean.test.labels, noisy.test.labels)
    flipped = {(s, i) for s, i, _, _ in noisy.label_noise["flipped"]}
    for split in ("train", "val"):
        a, b = getattr(clean, split), getattr(noisy, split)
        changed = {(split, i) for i, x, y in zip(a.ids, a.labels, b.labels) if x != y}
        assert changed == {f for f in flipped if f[0] == split}  # the record is exactly the flips
    summary = noisy.split_info["label_noise"]
    assert summary["validation"] == "noisy" and 0.2 < summary["rate_train"] < 0.6
    again = load_data(DataConfig(name=str(toy), image_size=16, audit="off", label_noise="symmetric:0.4"))
    assert torch.equal(again.train.labels, noisy.train.labels)  # seeded
    other = load_data(DataConfig(name=str(toy), image_size=16, audit="off", label_noise="symmetric:0.4",
                                 noise_seed=1))
    assert not torch.equal(other.train.labels, noisy.train.labels)
    kept = load_data(DataConfig(name=str(toy), image_size=16, audit="off", label_noise="symmetric:0.4",
                                clean_validation=True))
    assert torch.equal(kept.val.labels, clean.val.labels) and kept.split_info["label_noise"]["validation"] == "clean"


def test_run_folder_lists_the_flipped_labels(toy, tmp_path):
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off", label_noise="asymmetric:0.3"),
                    train=TrainConfig(epochs=1, batch_size=16, seed=0), backbone="tiny_cnn", pretrained=False,
                    method="lora", n_boot=20)
    metrics = execute(cfg, out_dir=tmp_path / "run")
    with open(tmp_path / "run" / "noisy_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    summary = metrics["split"]["label_noise"]
    assert len(rows) == summary["n_flipped_train"] + summary["n_flipped_val"] > 0
    assert all(r["clean_label"] != r["noisy_label"] for r in rows)


@pytest.mark.parametrize("spec, message", [
    ("gaussian:0.2", "expected symmetric:R"), ("symmetric:1.2", "rate must be in"),
    ("symmetric:x", "is not a number"), ("matrix:[[0.5,0.4],[0,1]]", "rows sum to 1")])
def test_bad_noise_specs_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_label_noise(spec)


def test_noise_needs_classification_labels(tmp_path):
    with pytest.raises(ConfigError, match="label_noise applies to classification"):
        load_data(DataConfig(name=str(tmp_path), task="segmentation", label_noise="symmetric:0.2"))


def test_sweep_draws_noise_per_seed_and_the_report_states_it(toy, tmp_path):
    from medpeft.bench.grid import Experiment
    from medpeft.bench.report import build_report

    from test_benchmark import run_local, store_rows

    exp = Experiment.from_mapping(dict(data=[str(toy)], backbones=["tiny_cnn"], methods=["linear"], fractions=[1.0],
                                       seeds=2, image_size=32, hpo={"trials": 0}, train={"epochs": 1, "batch_size": 16},
                                       n_boot=20, data_options={"label_noise": "symmetric:0.3"})).validate()
    run_local(exp, tmp_path / "sweep", report=False)
    finals = [r for r in store_rows(tmp_path / "sweep") if r["kind"] == "final"]
    assert sorted(r["config"]["data"]["noise_seed"] for r in finals) == [0, 1]
    counts = {r["result"]["metrics"]["split"]["label_noise"]["n_flipped_train"] for r in finals}
    assert all(c > 0 for c in counts)
    text = open(build_report(tmp_path / "sweep")["markdown"]).read()
    assert "label noise: symmetric:0.3 on the training labels, validation labels as noisy" in text
