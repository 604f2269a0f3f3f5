"""medpeft winner (issue 19): the choice reads validation only (a poisoned test column), ties go
to the cheapest, the trainable budget is honoured, and --train reproduces a final run exactly."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from medpeft.bench.store import Store
from medpeft.cli import main
from medpeft.errors import ConfigError
from medpeft.winner import choose, validation_records, winners
from toydata import make_toy


def rec(method, val, trainable, seconds=1.0, seed=0):
    return {"cell": "c", "data": "d", "backbone": "b", "method": method, "fraction": 1.0, "seed": seed, "val": val,
            "trainable": trainable, "trainable_pct": trainable / 10.0, "train_seconds": seconds, "config": {},
            "key": f"{method}{seed}"}


def test_ties_go_to_the_cheapest_and_the_budget_is_honoured():
    records = [rec("full", 0.90, 1000), rec("lora", 0.89, 50), rec("bitfit", 0.80, 5), rec("ssf", 0.895, 50, 0.5)]
    cell = choose(records, lower_is_better=False, tie=0.02)[0]
    assert cell["tied"] == ["full", "ssf", "lora"]  # within 0.02 of the best validation mean, best first
    assert cell["winner"]["method"] == "ssf"  # fewest parameters (50, like lora), then the faster
    capped = choose(records, lower_is_better=False, tie=0.001, max_trainable=10.0)[0]
    assert capped["winner"]["method"] == "ssf"  # full (100 %) is over the budget
    assert [e["excluded"] is not None for e in capped["ranking"]] == [False, False, False, True]
    loss = choose([rec("full", 0.30, 1000), rec("lora", 0.50, 50)], lower_is_better=True, tie=0.05)[0]
    assert loss["winner"]["method"] == "full"  # a loss: lower is better


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from medpeft.bench.grid import Experiment

    from test_benchmark import run_local

    root = tmp_path_factory.mktemp("winner")
    toy = make_toy(root / "toy", per_class=20, size=32)
    exp = Experiment.from_mapping(dict(data=[str(toy)], backbones=["tiny_cnn"], methods=["full", "linear", "lora"],
                                       fractions=[1.0], seeds=2, image_size=32, hpo={"trials": 0},
                                       train={"epochs": 2, "batch_size": 8}, n_boot=20)).validate()
    run_local(exp, root / "sweep", report=False)
    return root / "sweep"


class Poisoned(dict):
    def __getitem__(self, key):
        raise AssertionError("the choice read a test metric")

    get = items = values = keys = __iter__ = __getitem__


def test_the_choice_never_reads_test_scores(sweep, monkeypatch):
    real = Store.rows

    def rows(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        for row in out:
            metrics = (row.get("result") or {}).get("metrics")
            if metrics:
                metrics["test"] = Poisoned()
        return out

    monkeypatch.setattr(Store, "rows", rows)
    with Store.open_readonly(sweep) as store:
        cells = choose(validation_records(store), lower_is_better=False, tie=0.02)
    assert len(cells) == 1 and cells[0]["winner"]["method"] in ("full", "linear", "lora")


def test_train_reproduces_the_winning_final_run(sweep, tmp_path, capsys):
    result = winners(sweep)
    cell = result["cells"][0]
    assert main(["winner", str(sweep), "--train", "--out", str(tmp_path / "model")]) == 2  # where is the data?
    assert "give --data-root FOLDER" in capsys.readouterr().err
    assert main(["winner", str(sweep), "--train", "--out", str(tmp_path / "model"), "--card",
                 "--data-root", str(sweep.parent)]) == 0
    printed = capsys.readouterr().out
    assert "(not used)" in printed and f"winner {cell['winner']['method']}" in printed
    stored = cell["winner"]["runs"][0]
    with Store.open_readonly(sweep) as store:
        row = next(r for r in store.rows(kind="final") if r["key"] == stored["key"])
    sweep_test = row["result"]["metrics"]["test"]["auroc"]["value"]
    again = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert again["test"]["auroc"]["value"] == sweep_test  # same configuration and seed, same number
    saved = yaml.safe_load((tmp_path / "model" / "config.yaml").read_text())
    for section in ("train", "method", "backbone", "method_options", "n_boot"):
        assert saved[section] == stored["config"][section]
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert "## Chosen by a comparison" in card and cell["winner"]["method"] in card
    assert json.loads((tmp_path / "model" / "winner.json").read_text())["chosen_on"] == "validation"


def test_missing_or_empty_sweeps_are_named(tmp_path):
    with pytest.raises(ConfigError, match="holds no results store"):
        winners(tmp_path)
    assert main(["winner", str(tmp_path), "--card"]) == 2
    assert math.isnan(choose([rec("x", None, 1)], False, 0.02)[0]["ranking"][0]["val_mean"])


def test_a_committed_gzipped_store_is_read(sweep, tmp_path):
    import gzip
    import shutil

    packed = tmp_path / "committed"
    packed.mkdir()
    with open(sweep / "results.db", "rb") as src, gzip.open(packed / "results.db.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    a, b = winners(sweep), winners(packed)
    assert [c["winner"]["method"] for c in a["cells"]] == [c["winner"]["method"] for c in b["cells"]]


def test_failed_or_old_sweeps_give_a_clear_message(sweep, tmp_path):
    import shutil
    import sqlite3

    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(sweep / "results.db", failed / "results.db")
    with sqlite3.connect(failed / "results.db") as conn:
        conn.execute("UPDATE runs SET status = 'failed' WHERE kind = 'final'")
    with pytest.raises(ConfigError, match=r"no finished final run \(6 failed"):
        winners(failed)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(sweep / "results.db", old / "results.db")
    with sqlite3.connect(old / "results.db") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'experiment'")
    with pytest.raises(ConfigError, match="records no experiment"):
        winners(old)
