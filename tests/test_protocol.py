"""The comparison protocol (issue 11): selection labels that follow the label budget,
cross-validated selection, seeds that vary the head, the same numbers on a cold and a warm
weight cache, equal tuning (every method searches the same shared dimensions, completes the
same number of trials, and averages its objective over two label subsets) and one
augmentation policy for every method.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from medpeft.bench.grid import Experiment
from medpeft.bench.space import search_space, split_params
from medpeft.bench.store import Store
from medpeft.bench.sweep import Sweep, RunOptions
from medpeft.cli import main
from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.run import RunConfig, build_model, execute
from medpeft.train import TrainConfig, plan_epochs, prepare_training, train_epoch

from test_benchmark import make_toy, run_local, store_rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy") / "toy", per_class=40)


def breast(root, **kw) -> DataConfig:
    return DataConfig(name="breastmnist", root=str(root), image_size=28, **kw)


# ---------------------------------------------------------------------- scarce validation


def test_validation_labels_follow_the_label_budget(medmnist_root):
    full = load_data(breast(medmnist_root, val_labels="full", fraction=0.01))
    one = load_data(breast(medmnist_root, fraction=0.01, subset_seed=3))
    ten = load_data(breast(medmnist_root, fraction=0.1, subset_seed=3))
    val_counts = Counter(full.val.labels.tolist())
    assert len(full.val) == 78 and len(full.test) == 156
    # the training rule on the validation split: per class round(f * n_c), at least one
    assert Counter(one.val.labels.tolist()) == {c: max(1, round(0.01 * n)) for c, n in val_counts.items()}
    assert Counter(ten.val.labels.tolist()) == {c: max(1, round(0.1 * n)) for c, n in val_counts.items()}
    assert len(one.val) <= 10 and set(one.val.ids) <= set(ten.val.ids) <= set(full.val.ids)  # nested
    assert one.test.ids == full.test.ids  # the test split is never subsampled
    other = load_data(breast(medmnist_root, fraction=0.1, subset_seed=4))
    assert set(other.val.ids) != set(ten.val.ids)  # seeded
    assert ten.split_info["val_labels"] == "follow" and ten.split_info["n_val_after"] == len(ten.val)


def test_shots_cap_validation_at_k_per_class(medmnist_root):
    part = load_data(breast(medmnist_root, shots=3))
    assert Counter(part.val.labels.tolist()) == {0: 3, 1: 3}


def test_bad_val_labels_is_named_before_loading(medmnist_root):
    with pytest.raises(ConfigError, match="val_labels 'some'.*follow, full"):
        load_data(breast(medmnist_root, val_labels="some", fraction=0.1))


def test_medpeft_run_at_one_percent_selects_with_at_most_ten_labels(medmnist_root, tmp_path):
    base = ["run", "--data", "breastmnist", "--data-root", str(medmnist_root), "--backbone", "tiny_cnn",
            "--no-pretrained", "--method", "lora", "--fraction", "0.01", "--image-size", "32", "--steps", "3",
            "--n-boot", "20", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "follow")]) == 0
    follow = json.loads((tmp_path / "follow" / "metrics.json").read_text())
    assert follow["n_val"] <= 10 and follow["selection"] == {"mode": "holdout", "val_labels": "follow",
                                                            "n_selection_labels": follow["n_val"]}
    assert main(base + ["--val-labels", "full", "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert full["n_val"] == 78 and full["selection"]["val_labels"] == "full"
    assert follow["n_train"] == full["n_train"] == 5 and follow["n_test"] == full["n_test"] == 156
    # the split file records the validation subset, so the run can be repeated with --split-file
    split = json.loads((tmp_path / "follow" / "split.json").read_text())
    assert len(split["val"]) == 78 and len(split["val_subset"]) == follow["n_val"]


# ---------------------------------------------------------------------- positive class


def test_breastmnist_sensitivity_is_the_recall_of_malignant(medmnist_root, tmp_path):
    base = ["run", "--data", "breastmnist", "--data-root", str(medmnist_root), "--backbone", "tiny_cnn",
            "--no-pretrained", "--method", "linear", "--image-size", "32", "--steps", "2", "--n-boot", "20",
            "--quiet", "--fraction", "0.1"]
    assert main(base + ["--out", str(tmp_path / "default")]) == 0
    assert main(base + ["--positive-class", "normal, benign", "--out", str(tmp_path / "swapped")]) == 0
    default = json.loads((tmp_path / "default" / "metrics.json").read_text())
    swapped = json.loads((tmp_path / "swapped" / "metrics.json").read_text())
    assert default["positive_class"] == "malignant" and swapped["positive_class"] == "normal, benign"
    assert default["test"]["sensitivity"]["value"] == swapped["test"]["specificity"]["value"]
    assert default["test"]["auroc"]["value"] == pytest.approx(swapped["test"]["auroc"]["value"])
    assert main(base + ["--positive-class", "cancer", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------- seeds and the weight cache


def _head(model):
    return torch.cat([p.detach().flatten() for p in model.get_classifier().parameters()])


def test_the_run_seed_initialises_the_head_and_nothing_else_of_the_backbone():
    a, *_ = build_model("tiny_cnn", 2, 32, "full", {}, pretrained=False, head_seed=0)
    b, *_ = build_model("tiny_cnn", 2, 32, "full", {}, pretrained=False, head_seed=1)
    again, *_ = build_model("tiny_cnn", 2, 32, "full", {}, pretrained=False, head_seed=0)
    assert not torch.equal(_head(a), _head(b)) and torch.equal(_head(a), _head(again))
    head = {id(p) for p in a.get_classifier().parameters()}
    trunk_a = [p for p in a.parameters() if id(p) not in head]
    trunk_b = [p for p, q in zip(b.parameters(), a.parameters()) if id(q) not in head]
    assert trunk_a and all(torch.equal(x, y) for x, y in zip(trunk_a, trunk_b))  # the base is the same


def test_cold_and_warm_weight_cache_give_identical_runs(medmnist_root, tmp_path, monkeypatch):
    """The first run on a fresh machine converts the offline weights; that must not move any number."""
    monkeypatch.setenv("MEDPEFT_CACHE", str(tmp_path / "cache"))
    data = DataConfig(name="breastmnist", root=str(medmnist_root), image_size=32, fraction=0.1)
    cfg = RunConfig(data=data, train=TrainConfig(steps=3, batch_size=16, seed=0), backbone="efficientnet_lite0",
                    method="full", n_boot=20)
    cold = execute(cfg, save=False)
    assert any((tmp_path / "cache").iterdir())  # the cold run did convert and cache the weights
    warm = execute(cfg, save=False)
    for split in ("val", "test"):
        assert {k: v["value"] for k, v in cold[split].items()} == {k: v["value"] for k, v in warm[split].items()}
    other_seed = execute(RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": 1}}),
                         save=False)
    assert other_seed["test"]["auroc"]["value"] != cold["test"]["auroc"]["value"]


# ---------------------------------------------------------------------- budgets, augmentation parity


def test_step_budget_sets_the_epochs_for_every_label_fraction():
    cfg = TrainConfig(steps=80, batch_size=16)
    assert plan_epochs(5, cfg) == (80, 1)  # 5 images: one step per epoch
    assert plan_epochs(55, cfg) == (27, 3)  # 55 images: 3 full batches (the last partial one dropped)
    assert plan_epochs(55, TrainConfig(epochs=4, batch_size=16)) == (4, 3)
    with pytest.raises(ConfigError, match="steps must be"):
        TrainConfig(steps=0)


def test_every_method_gets_the_same_augmentation(toy):
    bundle = load_data(DataConfig(name=str(toy), image_size=32, audit="off"))
    for method in ("linear", "lora", "full"):
        model, info, _, _ = build_model("tiny_cnn", 2, 32, method, {}, pretrained=False)
        setup = prepare_training(model, bundle, info.mean, info.std, TrainConfig(epochs=1), lr=1e-3)
        assert setup.augment_name == "light" and not setup.cache.active  # no feature cache under augmentation
    model, info, _, _ = build_model("tiny_cnn", 2, 32, "linear", {}, pretrained=False)
    setup = prepare_training(model, bundle, info.mean, info.std, TrainConfig(epochs=1, augment="none"), lr=1e-3)
    assert setup.cache.active  # augmentation off for all: the probe may cache its features


def test_head_lr_gives_the_head_its_own_rate_and_nothing_else(toy):
    """--head-lr: the head / decoder learns at its own rate (the schedule scales it like the rest),
    the adapted encoder parameters at lr; without it, one group at lr."""
    bundle = load_data(DataConfig(name=str(toy), image_size=32, audit="off"))
    model, info, _, _ = build_model("tiny_cnn", 2, 32, "lora", {}, pretrained=False)
    setup = prepare_training(model, bundle, info.mean, info.std, TrainConfig(epochs=1, head_lr=5e-3), lr=1e-4)
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = setup.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-4, 5e-3]
    assert {id(p) for p in groups[1]["params"]} == head and not head & {id(p) for p in groups[0]["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert {id(p) for p in setup.params} == trainable  # gradient clipping sees every trained tensor
    assert math.isfinite(train_epoch(setup, 2))  # steps run (and clip gradients) with two groups
    model, info, _, _ = build_model("tiny_cnn", 2, 32, "linear", {}, pretrained=False)  # the head alone
    setup = prepare_training(model, bundle, info.mean, info.std, TrainConfig(epochs=1, head_lr=5e-3), lr=1e-4)
    assert [g["initial_lr"] for g in setup.optimizer.param_groups] == [5e-3]
    setup = prepare_training(model, bundle, info.mean, info.std, TrainConfig(epochs=1), lr=1e-4)
    assert [g["initial_lr"] for g in setup.optimizer.param_groups] == [1e-4]
    with pytest.raises(ConfigError, match="head_lr must be a positive learning rate"):
        TrainConfig(head_lr=-1.0)


# ---------------------------------------------------------------------- cross-validated selection


class _Unreadable:
    """A validation split that fails the moment anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the validation split was read ({name})")

    def __len__(self):
        raise AssertionError("the validation split was read (len)")


def test_cv_selection_reads_no_validation_label_and_refits_to_the_chosen_epoch(toy):
    data = DataConfig(name=str(toy), image_size=32, audit="off", fraction=0.5)
    bundle = load_data(data)
    bundle.val = _Unreadable()
    cfg = RunConfig(data=data, train=TrainConfig(epochs=8, batch_size=8, select="cv:3", seed=0, monitor="acc"),
                    backbone="tiny_cnn", pretrained=False, method="lora", n_boot=20)
    metrics = execute(cfg, bundle=bundle, save=False)
    n_train = metrics["n_train"]
    assert metrics["selection"] == {"mode": "cv:3", "val_labels": None, "n_selection_labels": n_train}
    assert metrics["n_val"] == 0
    curve = metrics["curve"]
    epochs = plan_epochs(n_train, cfg.train)[0]
    assert len(curve) == epochs  # the pooled out-of-fold score of every epoch of the schedule
    scores = [s for _, s in curve]
    assert metrics["best_epoch"] == int(np.argmax(scores)) + 1 < epochs  # the first best epoch, not the last
    assert metrics["epochs_run"] == metrics["best_epoch"]  # the refit stops there
    assert metrics["best_val"] == max(scores) and not metrics["best_is_last"]
    assert metrics["val"]["acc"]["value"] == metrics["val"]["acc"]["value"]  # out-of-fold metrics exist


@pytest.mark.parametrize("select, message", [("cv:1", "K >= 2"), ("cv:x", "cv:K"), ("kfold", "holdout")])
def test_bad_selection_modes_are_named(select, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(select=select)


def test_cv_needs_k_labelled_images(toy):
    data = DataConfig(name=str(toy), image_size=32, audit="off", shots=1)
    cfg = RunConfig(data=data, train=TrainConfig(epochs=1, select="cv:5"), backbone="tiny_cnn", pretrained=False,
                    method="linear", n_boot=20)
    with pytest.raises(ConfigError, match="cv:5 needs at least 5 labelled training images, got 2"):
        execute(cfg, save=False)


# ---------------------------------------------------------------------- equal tuning


def test_every_method_searches_lr_weight_decay_and_the_step_budget():
    for method in ("full", "linear", "bitfit", "lora", "ssf"):
        space = search_space(method, backbone="tiny_cnn", image_size=32, budget=("steps", 80))
        assert {"lr", "weight_decay", "steps"} <= set(space)
        assert list(space["steps"].choices) == [40, 80, 160]
    lora = search_space("lora", backbone="tiny_cnn", image_size=32, budget=("steps", 80))
    assert {"lora_rank", "lora_alpha"} <= set(lora)  # method knobs on top
    train, options = split_params({"lr": 1e-3, "steps": 40, "lora_rank": 4})
    assert train == {"lr": 1e-3, "steps": 40} and options == {"lora_rank": 4}


def _sweep(toy, **overrides) -> Experiment:
    values = dict(data=[str(toy)], backbones=["tiny_cnn"], methods=["full", "lora", "linear"], fractions=[0.5, 1.0],
                  seeds=3, image_size=32, hpo={"trials": 3}, train={"steps": 6, "batch_size": 8}, n_boot=20)
    values.update(overrides)
    return Experiment.from_mapping(values).validate()


def test_trials_average_two_label_subsets_and_all_complete(toy, tmp_path):
    exp = _sweep(toy)
    sweep = Sweep(exp, RunOptions(out=tmp_path / "x"))
    scarce = next(c for c in exp.cells() if c.fraction == 0.5)
    whole = next(c for c in exp.cells() if c.fraction == 1.0)
    assert sweep.trial_subset_seeds(scarce) == [0, 1] and sweep.trial_subset_seeds(whole) == [0]

    run_local(exp, tmp_path / "sweep", report=False)
    rows = store_rows(tmp_path / "sweep")
    trials = [r for r in rows if r["kind"] == "trial"]
    # no pruning by default: every method completes the same number of trials
    per_cell = Counter(r["cell"] for r in trials if r["outcome"] == "complete")
    assert set(per_cell.values()) == {3} and len(per_cell) == 6
    for row in trials:
        metrics = row["result"]["metrics"]
        configs = row["result"].get("configs") or None
        if row["fraction"] < 1:
            parts = metrics["subset_values"]
            assert len(parts) == 2 and row["value"] == pytest.approx(sum(parts) / 2)
        else:
            assert "subset_values" not in metrics
        assert metrics["test"] is None and configs is None
    finals = [r for r in rows if r["kind"] == "final" and r["fraction"] < 1]
    subsets = {r["seed"]: r["result"]["metrics"]["subset_seed"] for r in finals}
    assert subsets == {0: 0, 1: 1, 2: 2}
    final = finals[0]["result"]["metrics"]
    assert final["selection"]["val_labels"] == "follow" and final["n_val"] < 24
    assert isinstance(final["best_is_last"], bool) and final["curve"] and final["curve"][-1][0] <= 12


def test_experiment_validates_the_protocol_settings(toy):
    for values, message in [({"val_labels": "all"}, "val_labels 'all'"), ({"margin": 0}, "margin 0"),
                            ({"hpo": {"trials": 2, "subsets": 0}}, "hpo_subsets = 0"),
                            ({"hpo": {"trials": 2, "prune": "yes"}}, "hpo.prune must be true or false")]:
        with pytest.raises(ConfigError, match=message):
            _sweep(toy, **values)


def test_coarse_resolution_is_a_note_of_the_sweep(toy):
    exp = _sweep(toy, backbones=["dinov2_vits14"], image_size=56)
    exp.cells()
    assert any("4x4 patch tokens" in note for note in exp.notes)


def test_store_keeps_trial_values_reproducible(toy, tmp_path):
    """Same experiment, same numbers: a second sweep gives the same trial values and choices."""
    exp = _sweep(toy, methods=["lora"], fractions=[0.5], seeds=2, hpo={"trials": 2})
    first = run_local(exp, tmp_path / "a", report=False)
    second = run_local(exp, tmp_path / "b", report=False)
    assert first["chosen"] == second["chosen"]
    values = lambda out: {r["key"]: r["value"] for r in store_rows(out)}  # noqa: E731
    assert values(tmp_path / "a") == values(tmp_path / "b")
    with Store.open_readonly(tmp_path / "a") as store:
        assert store.get_meta("experiment")["val_labels"] == "follow"


def test_every_method_declares_its_search_space_where_it_registers():
    from medpeft.methods import get_method, list_methods, register_method
    from medpeft.methods.base import MethodConfig

    for name in list_methods():
        spec = get_method(name)
        assert isinstance(spec.search_space, dict), name
        fields = {f.name for f in __import__("dataclasses").fields(spec.config_cls)}
        assert set(spec.search_space) <= fields, name
    assert get_method("lora").search_space["rank"] == [4, 8, 16, 32]
    with pytest.raises(TypeError, match="search_space"):  # forgetting it fails at import, not silently
        register_method("x_missing", ("cnn",), description="-")
    with pytest.raises(RuntimeError, match="not fields"):
        register_method("x_bad", ("cnn",), MethodConfig, description="-", search_space={"rank": [4]})(lambda m, c: None)
