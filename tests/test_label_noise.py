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


# ---------------------------------------------------------------------- noise-robust strategies


def test_gce_matches_its_definition_and_its_limits():
    from medpeft.strategies import gce_loss

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)[torch.arange(2), y]
    assert gce_loss(logits, y, q=0.7).item() == pytest.approx(((1 - p ** 0.7) / 0.7).mean().item())
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    assert gce_loss(logits, y, q=1e-4).item() == pytest.approx(ce, rel=1e-3)  # q -> 0: cross-entropy
    assert gce_loss(logits, y, q=1.0).item() == pytest.approx((1 - p).mean().item())  # q = 1: MAE


def test_cufit_trains_each_stage_on_what_the_previous_one_agrees_with():
    from medpeft.strategies import Cufit

    probe = torch.nn.Linear(4, 2)
    inter = torch.nn.Linear(4, 2)
    with torch.no_grad():  # A predicts class 0 everywhere, B class 1 everywhere
        probe.weight.zero_(), inter.weight.zero_()
        probe.bias.copy_(torch.tensor([5.0, 0.0])), inter.bias.copy_(torch.tensor([0.0, 5.0]))
    cufit = Cufit(probe, inter)
    x = torch.randn(4, 4)
    y = torch.tensor([0, 0, 1, 1])
    logits_c = torch.randn(4, 2, requires_grad=True)
    cufit.loss(logits_c, x, y).backward()
    # C learns only from the samples B agrees with (labels 1), B only from those A agrees with (labels 0)
    assert torch.all(logits_c.grad[:2] == 0) and torch.all(logits_c.grad[2:] != 0)
    assert cufit.kept == {"b": 2, "c": 2, "n": 4}
    ce_b = torch.nn.functional.cross_entropy(inter(x), y, reduction="none")
    expected_b = (torch.tensor([1.0, 1.0, 0.0, 0.0]) * ce_b).mean()
    inter.zero_grad()
    expected_b.backward()
    grad_expected = inter.bias.grad.clone()
    inter.zero_grad()
    cufit.loss(logits_c.detach(), x, y).backward()
    assert torch.allclose(inter.bias.grad, grad_expected)


def test_cufit_run_records_how_clean_each_stage_kept(toy, tmp_path):
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off", label_noise="symmetric:0.3"),
                    train=TrainConfig(epochs=2, batch_size=16, seed=0, strategy="cufit"), backbone="tiny_cnn",
                    pretrained=False, method="lora", n_boot=20)
    metrics = execute(cfg, out_dir=tmp_path / "run")
    record = metrics["curriculum"]
    n_noisy = metrics["split"]["label_noise"]["n_flipped_train"]
    assert record["n_train"] == metrics["n_train"] and record["n_noisy"] == n_noisy
    assert 0 <= record["stage_b_kept_noisy"] <= min(record["stage_b_kept"], n_noisy)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()[0]
    assert "cufit_kept_b" in history and "cufit_kept_c" in history
    # the saved model is module C alone: it loads like any run
    from medpeft.run import load_run

    assert load_run(tmp_path / "run").model is not None
    with pytest.raises(ConfigError, match="strategy 'cufit' applies to single-label classification"):
        from medpeft.strategies import check_strategy

        check_strategy("cufit", "segmentation")
