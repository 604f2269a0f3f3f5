"""FixMatch (issue 17, part 2): the threshold decides which unlabelled images count, the pool is
the unlabelled rest of the training split (never validation / test), and runs record it."""
from __future__ import annotations

import pytest
import torch

from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.run import RunConfig, execute
from medpeft.semi import fixmatch_loss
from medpeft.train import TrainConfig
from toydata import make_toy


def test_no_pseudo_label_below_the_threshold_counts():
    weak = torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 5.0]])  # confident 0, unsure, confident 1
    strong = torch.zeros(3, 2, requires_grad=True)
    loss, used = fixmatch_loss(weak, strong, threshold=0.95)
    loss.backward()
    assert used == 2 and torch.all(strong.grad[1] == 0) and torch.all(strong.grad[[0, 2]] != 0)
    assert loss.item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item() / 3)  # CE of uniform logits
    nothing, none_used = fixmatch_loss(weak, torch.zeros(3, 2), threshold=0.9999)
    assert none_used == 0 and nothing.item() == 0.0


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("semi") / "toy", per_class=40, size=32)


def test_the_pool_is_the_unlabelled_rest_of_the_training_split(toy):
    bundle = load_data(DataConfig(name=str(toy), image_size=32, audit="off", fraction=0.25))
    full = load_data(DataConfig(name=str(toy), image_size=32, audit="off"))
    pool = set(bundle.unlabelled.ids)
    assert pool == set(full.train.ids) - set(bundle.train.ids)
    assert not pool & (set(full.val.ids) | set(full.test.ids))
    assert torch.all(bundle.unlabelled.labels == -1)  # blanked: nothing can read them
    assert full.unlabelled is None  # no label budget, no pool


def test_fixmatch_run_records_its_pool_and_pseudo_label_rate(toy, tmp_path):
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off", fraction=0.25),
                    train=TrainConfig(epochs=2, batch_size=8, seed=0, semi="fixmatch", semi_threshold=0.5),
                    backbone="tiny_cnn", pretrained=False, method="lora", n_boot=20)
    metrics = execute(cfg, out_dir=tmp_path / "run")
    assert metrics["semi"]["method"] == "fixmatch" and metrics["semi"]["n_unlabelled"] > 0
    header = (tmp_path / "run" / "history.csv").read_text().splitlines()[0]
    assert "pseudo_label_rate" in header
    plain = execute(RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "semi": "none"}}),
                    out_dir=tmp_path / "plain")
    assert (tmp_path / "run" / "test_predictions.csv").read_text() != \
        (tmp_path / "plain" / "test_predictions.csv").read_text()  # the unlabelled loss changed the model
    assert plain["semi"] is None
    with pytest.raises(ConfigError, match="needs unlabelled images: train with --fraction"):
        execute(RunConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "fraction": None}}),
                save=False)


def test_pseudo_labels_keep_only_confident_predictions():
    import numpy as np

    from medpeft.data.base import ImageSet
    from medpeft.semi import pseudo_labelled

    pool = ImageSet(images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), labels=torch.full((4,), -1),
                    ids=["a", "b", "c", "d"])
    probabilities = np.array([[0.97, 0.03], [0.6, 0.4], [0.01, 0.99], [0.5, 0.5]])
    chosen = pseudo_labelled(pool, probabilities, 0.95)
    assert chosen.ids == ["a", "c"] and chosen.labels.tolist() == [0, 1]


def test_self_training_rounds_train_on_pseudo_labels_and_test_once(toy, tmp_path, monkeypatch):
    import medpeft.run as run_module

    calls = []
    real = run_module.train_model

    def counting(model, bundle, *args, evaluate_test=True, **kwargs):
        calls.append((len(bundle.train), evaluate_test))
        return real(model, bundle, *args, evaluate_test=evaluate_test, **kwargs)

    monkeypatch.setattr(run_module, "train_model", counting)
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off", fraction=0.25),
                    train=TrainConfig(epochs=1, batch_size=8, seed=0, semi="selftrain", semi_threshold=0.5,
                                      semi_rounds=2), backbone="tiny_cnn", pretrained=False, method="lora", n_boot=20)
    metrics = execute(cfg, save=False)
    rounds = metrics["semi"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["pseudo_labelled"] == r["pool"] for r in rounds)
    labelled = calls[0][0]
    assert calls == [(labelled, False), (labelled + rounds[0]["pseudo_labelled"], False),
                     (labelled + rounds[1]["pseudo_labelled"], True)]  # only the last round reads test
