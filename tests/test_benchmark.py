"""``medpeft benchmark``: grid validation, HPO determinism, the test split never read during
selection, the results store under SIGKILL + --resume, and the report's numbers.

Everything runs on a toy image folder (two classes, 16 px) with the tiny random-weight
backbones and one torch thread per job, so a whole sweep takes seconds.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from medpeft.bench.executors import LocalExecutor
from medpeft.bench.grid import Experiment, load_experiment_file
from medpeft.bench.hpo import HpoSettings, PruningReporter, TrialRecord, sample_params, visible_history
from medpeft.bench.jobs import BundleCache
from medpeft.bench.report import pareto_front
from medpeft.bench.space import default_params, search_space
from medpeft.bench.store import Store, config_key
from medpeft.bench.sweep import RunOptions, Sweep, run_sweep
from medpeft.cli import main
from medpeft.errors import ConfigError
from medpeft.methods import get_method, list_methods
from medpeft.stats import mean_std_ci, paired_test
from toydata import make_toy  # noqa: F401 - test_protocol imports it from here

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    return make_toy(tmp_path_factory.mktemp("toy") / "toy")


def toy_experiment(data: Path, **overrides) -> Experiment:
    values = dict(data=[str(data)], backbones=["tiny_cnn", "tiny_vit"], methods=["full", "lora"],
                  fractions=[0.5, 1.0], seeds=2, image_size={"tiny_cnn": 32, "tiny_vit": 16},
                  hpo={"trials": 2, "prune_min_epochs": 1}, train={"epochs": 2, "batch_size": 16}, n_boot=50)
    values.update(overrides)
    return Experiment.from_mapping(values).validate()


def run_local(exp: Experiment, out: Path, cache: BundleCache | None = None, **opts) -> dict:
    executor = LocalExecutor(cache=cache or BundleCache(), threads=1)
    return run_sweep(exp, RunOptions(out=out, **opts), executor=executor)


def store_rows(out: Path) -> list[dict]:
    with Store.open_readonly(out) as store:
        return store.rows()


def comparable(rows: list[dict]) -> dict:
    """key -> what must be identical between two sweeps of the same experiment."""
    out = {}
    for row in rows:
        metrics = (row.get("result") or {}).get("metrics") or {}
        out[row["key"]] = {
            "kind": row["kind"], "cell": row["cell"], "seed": row["seed"], "trial": row["trial"],
            "status": row["status"], "outcome": row["outcome"], "value": row["value"], "params": row["params"],
            "test": {k: v["value"] for k, v in (metrics.get("test") or {}).items()},
            "val": {k: v["value"] for k, v in (metrics.get("val") or {}).items()},
            "intermediate": (row.get("result") or {}).get("intermediate"),
        }
    return out


def assert_same_results(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        assert {k: v for k, v in x.items() if k not in ("value", "test", "val")} == \
               {k: v for k, v in y.items() if k not in ("value", "test", "val")}, key
        assert (x["value"] is None) == (y["value"] is None)
        if x["value"] is not None:
            assert x["value"] == pytest.approx(y["value"], abs=1e-9)
        for split in ("val", "test"):
            assert x[split].keys() == y[split].keys()
            for name in x[split]:
                assert x[split][name] == pytest.approx(y[split][name], abs=1e-9, nan_ok=True)


@pytest.fixture(scope="session")
def reference_sweep(toy_data, tmp_path_factory):
    """The toy sweep run once, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("reference")
    exp = toy_experiment(toy_data)
    cache = BundleCache()
    summary = run_local(exp, out, cache=cache)
    # one data load per (image size, fraction, subset seed), shared by methods and trials:
    # 2 backbone sizes x (fraction 0.5: seeds 0 and 1; fraction 1: no subset)
    assert cache.loads == 2 * (2 + 1)
    return exp, out, summary


# ---------------------------------------------------------------------- grid and validation


@pytest.mark.parametrize("values, message", [
    ({"dataset": ["x"]}, "unknown key(s) ['dataset']"),
    ({"hpo": {"trails": 3}}, "unknown key(s) ['trails'] in 'hpo'"),
    ({"fractions": [0.1, 1.5]}, "fractions entry 1.5 is not in (0, 1]"),
    ({"fractions": ["ten"]}, "fractions entry 'ten' is not a number"),
    ({"seeds": [0, -1]}, "seeds entry -1 must be an integer >= 0"),
    ({"seeds": 0}, "seeds = 0"),
    ({"methods": ["lora", "lorra"]}, "unknown method 'lorra'"),
    ({"backbones": ["resnet_999"]}, "unknown backbone 'resnet_999'"),
    ({"train": {"seed": 3}}, "seeds come from 'seeds'"),
    ({"train": {"epochs": "ten"}}, "train.epochs = 'ten' should be of type int"),
    ({"train": {"monitor": "auc"}}, "monitor 'auc' is not a classification metric"),
    ({"hpo": {"trials": -1}}, "hpo_trials = -1 must be >= 0"),
    ({"image_size": 30, "backbones": ["tiny_vit"]}, "multiple of its patch size 4"),
    ({"image_size": {"tiny_cnn": 32}, "backbones": ["tiny_cnn", "tiny_vit"]}, "missing ['tiny_vit']"),
    ({"method_options": {"lora_rnk": 4}}, "unknown option 'lora_rnk' for method 'lora'"),
    ({"method_options": {"foo_bar": 4}}, "method_options key 'foo_bar' names no method"),
    ({"data": ["no_such_dataset"]}, "unknown data set 'no_such_dataset'"),
    ({"data_options": {"val_ration": 0.1}}, "unknown key(s) ['val_ration'] in 'data_options'"),
    ({"data_options": {"fraction": 0.1}}, "the sweep sets name, root"),  # from 'fractions', per cell
    ({"data_options": {"val_ratio": 0.6, "test_ratio": 0.5}}, "val_ratio + test_ratio must be < 1"),
])
def test_experiment_errors_name_the_key_and_value(values, message, toy_data):
    base = {"data": [str(toy_data)], "backbones": ["tiny_cnn"], "image_size": 32}
    with pytest.raises(ConfigError) as err:
        Experiment.from_mapping({**base, **values}).validate()
    assert message in str(err.value)


def test_data_options_reach_every_run_of_the_sweep(toy_data):
    """The literature's 80/10/10 split of Kvasir-SEG is a data option every run (trial or final) must use."""
    from medpeft.bench.grid import Cell

    exp = Experiment.from_mapping({"data": [str(toy_data)], "backbones": ["tiny_cnn"], "image_size": 32,
                                   "fractions": [0.5], "data_options": {"val_ratio": 0.1, "test_ratio": 0.1}}).validate()
    sweep = Sweep(exp, RunOptions(out="unused-out"))
    config = sweep.run_config(Cell(str(toy_data), "tiny_cnn", "lora", 0.5, 32), seed=3, params={}, n_boot=10)
    assert (config["data"]["val_ratio"], config["data"]["test_ratio"]) == (0.1, 0.1)
    assert config["data"]["fraction"] == 0.5 and config["data"]["subset_seed"] == 3  # still the sweep's own
    plain = sweep.run_config(Cell(str(toy_data), "tiny_cnn", "lora", 0.5, 32), seed=3, params={}, n_boot=10)
    assert plain == config  # deterministic: the same store key on resume
    exp.data_options = {}
    default = Sweep(exp.validate(), RunOptions(out="unused-out"))
    assert default.run_config(Cell(str(toy_data), "tiny_cnn", "lora", 0.5, 32), 3, {}, 10)["data"]["val_ratio"] == 0.15


def test_default_image_size_is_fitted_per_backbone_and_recorded(toy_data):
    """The README's two-backbone command gives no --image-size: each backbone gets a size it accepts."""
    exp = Experiment.from_mapping({"data": [str(toy_data)], "backbones": ["tiny_cnn", "dinov2_vits14"]}).validate()
    assert exp.size_for("tiny_cnn") == 64 and exp.size_for("dinov2_vits14") == 112  # 8x8 tokens
    assert exp.to_dict()["image_size"] == {"tiny_cnn": 64, "dinov2_vits14": 112}  # what the store and report show
    with pytest.raises(ConfigError, match="image size 64 does not fit dinov2_vits14"):  # explicit sizes are checked
        Experiment.from_mapping({"data": [str(toy_data)], "backbones": ["dinov2_vits14"], "image_size": 64}).validate()


def test_yaml_file_round_trip_and_cli_error(tmp_path, toy_data, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": str(toy_data), "backbones": "tiny_cnn", "methods": ["linear", "lora"],
                                    "fractions": "0.5,1", "seeds": 2, "image_size": 32, "hpo": {"trials": 1},
                                    "out": str(tmp_path / "o")}))
    values, run = load_experiment_file(path)
    exp = Experiment.from_mapping(values).validate()
    assert exp.fractions == [0.5, 1.0] and exp.seeds == [0, 1] and run == {"out": str(tmp_path / "o")}
    assert [c.id.split("|", 1)[1] for c in exp.cells()] == [
        "tiny_cnn|linear|0.5", "tiny_cnn|lora|0.5", "tiny_cnn|linear|1", "tiny_cnn|lora|1"]
    assert main(["benchmark", "--config", str(path), "--dry-run"]) == 0
    assert "4 cells x (1 HPO trials + 2 seeds) = 12 jobs" in capsys.readouterr().out
    path.write_text("data: [x\n")
    assert main(["benchmark", "--config", str(path)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"data": str(toy_data), "backbones": "tiny_cnn", "image_size": 32,
                                    "fractions": [2]}))
    assert main(["benchmark", "--config", str(path), "--dry-run"]) == 2
    assert "fractions entry 2 is not in (0, 1]" in capsys.readouterr().err


def test_all_expands_per_family_with_notes(toy_data):
    exp = toy_experiment(toy_data, methods="all", fractions=[1.0])
    cells = exp.cells()
    cnn = {c.method for c in cells if c.backbone == "tiny_cnn"}
    vit = {c.method for c in cells if c.backbone == "tiny_vit"}
    for name in list_methods():
        families = get_method(name).families
        assert (name in cnn) == ("cnn" in families)
        assert (name in vit) == ("vit" in families)
    vit_only = [m for m in list_methods() if get_method(m).families == ("vit",)]
    assert vit_only, "expected some ViT-only methods (VPT, prefix, adapters)"
    for name in vit_only:
        assert any(note.startswith(f"{name} skipped on tiny_cnn (CNN)") for note in exp.notes)
    # the fraction is outermost after data and backbone: one data subset serves all methods in a row
    assert [c.backbone for c in cells] == sorted(c.backbone for c in cells)


# ---------------------------------------------------------------------- search space and HPO


def test_search_space_covers_every_method():
    for name in list_methods():
        space = search_space(name)
        assert {"lr", "weight_decay"} <= set(space)
        lr = get_method(name).default_lr
        assert space["lr"].low == pytest.approx(lr / 10) and space["lr"].high == pytest.approx(lr * 10)
        defaults = default_params(name, space, 1e-4)
        for key, value in defaults.items():  # trial 0 (the defaults) lies inside the space
            assert space[key]._contains(space[key].to_internal_repr(value)), (name, key, value)
    assert {"lora_rank", "lora_alpha"} <= set(search_space("lora"))
    assert "vpt_deep_num_tokens" in search_space("vpt_deep")
    assert "partial_k" in search_space("partial")
    assert set(search_space("lora+ssf")) >= {"lora_rank"}
    assert "lora_rank" not in search_space("lora", fixed={"lora_rank"})  # a user-fixed option is not searched


def _record(number, params, space, value, state="complete", intermediate=None, attrs=None):
    from medpeft.bench.hpo import space_to_json

    return TrialRecord(number, params, space_to_json(space), state, value, intermediate or {}, attrs or {})


def test_sampling_is_deterministic_given_the_history():
    space = search_space("lora")
    settings = HpoSettings(seed=3, startup_trials=2)
    defaults = default_params("lora", space, 1e-4)
    assert sample_params(space, [], 0, settings, "cell", defaults) == defaults
    history = [_record(0, defaults, space, 0.7)]
    first = sample_params(space, history, 1, settings, "cell", defaults)
    assert first == sample_params(space, history, 1, settings, "cell", defaults)
    assert first != sample_params(space, history, 1, settings, "other-cell", defaults)
    for n in range(1, 6):  # grow a history; TPE takes over after the startup trials
        params = sample_params(space, history, n, settings, "cell", defaults)
        assert set(params) == set(space)
        history.append(_record(n, params, space, 0.5 + 0.05 * n))
    replay = sample_params(space, history, 6, settings, "cell", defaults)
    assert replay == sample_params(space, [TrialRecord.from_dict(json.loads(json.dumps(t.to_dict())))
                                           for t in history], 6, settings, "cell", defaults)
    # batches: trial n learns only from the earlier batches
    assert [t.number for t in visible_history(history, 5, parallel=2)] == [0, 1, 2, 3]
    assert [t.number for t in visible_history(history, 4, parallel=2)] == [0, 1, 2, 3]
    assert [t.number for t in visible_history(history, 3, parallel=2)] == [0, 1]


def test_successive_halving_prunes_on_validation_per_epoch():
    space = search_space("full")
    settings = HpoSettings(prune_min_epochs=1, reduction_factor=3)
    # three earlier trials reached rung 0 (epoch 1) with these scores, and rung 1 (epoch 3)
    history = [_record(i, {"lr": 1e-4, "weight_decay": 1e-4}, space, v, intermediate={1: r0, 3: v},
                       attrs={"completed_rung_0": r0, "completed_rung_1": v})
               for i, (r0, v) in enumerate([(0.6, 0.7), (0.8, 0.9), (0.7, 0.75)])]
    weak = PruningReporter(history, {}, settings, "auroc")
    with pytest.raises(optuna.TrialPruned):  # 0.65 at epoch 1 is not in the top third of {0.6, 0.8, 0.7, 0.65}
        weak(1, {"val_auroc": 0.65})
    strong = PruningReporter(history, {}, settings, "auroc")
    strong(1, {"val_auroc": 0.85})  # the best at rung 0: promoted
    strong(2, {"val_auroc": 0.1})  # no rung at epoch 2: never pruned there
    with pytest.raises(optuna.TrialPruned):
        strong(3, {"val_auroc": 0.8})  # rung 1: 0.8 < 0.9, the top third of 4
    assert strong.intermediate == {1: 0.85, 2: 0.1, 3: 0.8}
    # a NaN AUROC (one class in validation) falls back to accuracy, as the trainer's selection does
    nan = PruningReporter(history, {}, settings, "auroc")
    nan(1, {"val_auroc": float("nan"), "val_acc": 0.95})
    assert nan.intermediate[1] == 0.95


class _PoisonedSplit:
    """A test split that fails the moment anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_hpo_and_selection_never_read_the_test_split(toy_data, tmp_path):
    from medpeft.data import load_data

    def poisoned(cfg):
        bundle = load_data(cfg)
        bundle.test = _PoisonedSplit()
        return bundle

    exp = toy_experiment(toy_data, backbones=["tiny_cnn"], image_size=32, methods=["lora", "linear"],
                         fractions=[1.0], seeds=1, hpo={"trials": 4, "prune_min_epochs": 1})
    summary = run_local(exp, tmp_path / "poisoned", cache=BundleCache(loader=poisoned), report=False)
    rows = store_rows(tmp_path / "poisoned")
    trials = [r for r in rows if r["kind"] == "trial"]
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(trials) == 8 and all(r["status"] == "done" for r in trials)
    assert all(r["result"]["metrics"] is None or r["result"]["metrics"]["test"] is None for r in trials)
    # the poison works: the final runs, which must test, fail on it
    assert finals and all(r["status"] == "failed" and "the test split was read" in r["error"] for r in finals)
    # and the same HPO on the real test split chooses the same configurations from the same trial values
    clean = run_local(exp, tmp_path / "clean", report=False)
    assert clean["chosen"] == summary["chosen"]
    clean_trials = {r["key"]: r["value"] for r in store_rows(tmp_path / "clean") if r["kind"] == "trial"}
    assert clean_trials == {r["key"]: r["value"] for r in trials}


# ---------------------------------------------------------------------- store and resume


def test_store_keys_statuses_and_locking(tmp_path):
    config = {"train": {"epochs": 2, "threads": 4}, "data": {"name": "x"}}
    assert config_key("final", config) == config_key("final", {"train": {"epochs": 2, "threads": 1},
                                                               "data": {"name": "x"}})  # threads do not count
    assert config_key("final", config) != config_key("final", {"train": {"epochs": 3}, "data": {"name": "x"}})
    assert config_key("trial", config, {"trial": 0}) != config_key("trial", config, {"trial": 1})
    store = Store(tmp_path)
    with pytest.raises(ConfigError, match="in use by another running sweep"):
        Store(tmp_path)
    cell = {"id": "d|b|m|1", "data": "d", "backbone": "b", "method": "m", "fraction": 1.0}
    job = {"key": "k1", "kind": "final", "cell": cell, "seed": 0, "config": config}
    store.mark_running(job)
    assert store.get("k1")["status"] == "running"
    store.record({"key": "k1", "status": "done", "outcome": "complete", "value": 0.5, "metrics": {"a": 1}})
    with pytest.raises(RuntimeError, match="already done"):
        store.mark_running(job)  # a finished run is never started twice
    with pytest.raises(RuntimeError, match="not marked running"):
        store.record({"key": "k1", "status": "done"})
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    Store(tmp_path).close()  # the lock went with the first store


def test_resume_runs_only_what_is_missing(toy_data, tmp_path, reference_sweep):
    exp, ref_out, ref_summary = reference_sweep
    out = tmp_path / "chunks"
    first = run_local(exp, out, max_jobs=7, report=False)
    assert first["ran"] == 7 and not first["complete"]
    with pytest.raises(ConfigError, match="pass --resume"):
        run_local(exp, out)
    changed = toy_experiment(toy_data, train={"epochs": 3, "batch_size": 16})
    with pytest.raises(ConfigError, match="train"):
        run_local(changed, out, resume=True)
    # a row left 'running' by a dead process is run again, done rows are not
    with sqlite3.connect(out / "results.db") as conn:
        victim = conn.execute("SELECT key FROM runs WHERE status = 'done' ORDER BY rowid DESC LIMIT 1").fetchone()[0]
        conn.execute("UPDATE runs SET status = 'running' WHERE key = ?", (victim,))
    second = run_local(exp, out, resume=True)
    assert second["complete"] and second["reused"] == 6 and second["ran"] == ref_summary["jobs_total"] - 6
    rows = store_rows(out)
    assert {r["key"]: r["attempts"] for r in rows}[victim] == 2
    assert_same_results(comparable(rows), comparable(store_rows(ref_out)))
    third = run_local(exp, out, resume=True, report=False)
    assert third["ran"] == 0 and third["complete"]
    # the grid may grow on resume: one more HPO trial per cell; finals re-run only where the choice changed
    more = toy_experiment(toy_data, hpo={"trials": 3, "prune_min_epochs": 1})
    grown = run_local(more, out, resume=True)
    changed = [c for c, v in grown["chosen"].items() if v["params"] != third["chosen"][c]["params"]]
    assert grown["ran"] == 8 + 2 * len(changed)
    assert all(row["n"] == 2 for row in grown["report"]["summary"])  # only the current choice's finals


def _count(db: Path, status: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = ?", (status,)).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkill_then_resume_gives_the_uninterrupted_results(tmp_path, reference_sweep):
    exp, ref_out, ref_summary = reference_sweep
    from medpeft.bench.cli import _as_mapping

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(_as_mapping(exp)))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medpeft.cli", "benchmark", "--config", str(config), "--out", str(out),
           "--threads", "1", "--no-report"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    db = out / "results.db"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _count(db, "done") >= 5 and _count(db, "running") == 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the sweep ended before it was killed: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    total = ref_summary["jobs_total"]
    done_at_kill = _count(db, "done")
    half_written = [r["key"] for r in store_rows(out) if r["status"] == "running"]
    assert 5 <= done_at_kill < total
    resumed = subprocess.run(cmd + ["--resume", "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = store_rows(out)
    assert len(rows) == total and all(r["status"] == "done" for r in rows)
    slots = [(r["cell"], r["kind"], r["trial"] if r["kind"] == "trial" else r["seed"]) for r in rows]
    assert len(set(slots)) == len(slots)  # no run twice
    attempts = {r["key"]: r["attempts"] for r in rows}
    assert all(attempts[k] == 2 for k in half_written)  # the half-written run was redone
    assert sum(a > 1 for a in attempts.values()) == len(half_written)  # and nothing finished was repeated
    assert_same_results(comparable(rows), comparable(store_rows(ref_out)))


# ---------------------------------------------------------------------- report


def test_report_numbers_match_the_definitions(reference_sweep):
    exp, out, summary = reference_sweep
    report = summary["report"]
    rows = [r for r in store_rows(out) if r["kind"] == "final"]
    by = {}
    for r in rows:
        by.setdefault((r["backbone"], r["method"], r["fraction"]), {})[r["seed"]] = \
            r["result"]["metrics"]["test"]["auroc"]["value"]
    assert len(report["summary"]) == len(by) == 8
    for row in report["summary"]:
        values = by[(row["backbone"], row["method"], row["fraction"])]
        ref = mean_std_ci([values[s] for s in sorted(values)])
        assert row["mean"] == pytest.approx(ref["mean"]) and row["std"] == pytest.approx(ref["std"], nan_ok=True)
        assert row["low"] == pytest.approx(max(ref["low"], 0), nan_ok=True)
        assert row["n"] == 2 and 0 < row["trainable_pct"] <= 100 and row["adapter_bytes"] > 0
        if row["method"] == "full":
            assert row["delta"] is None
        else:
            full = by[(row["backbone"], "full", row["fraction"])]
            test = paired_test([values[s] for s in (0, 1)], [full[s] for s in (0, 1)])
            assert row["delta"] == pytest.approx(test["mean_diff"]) and row["p_t"] == test["t_pvalue"]
        group = sorted((r["mean"] for r in report["summary"]
                        if (r["backbone"], r["fraction"]) == (row["backbone"], row["fraction"])), reverse=True)
        assert group[row["rank"] - 1] == row["mean"]
    md = Path(report["markdown"]).read_text()
    html = Path(report["html"]).read_text()
    assert "| method | f=0.5 | f=1 | trainable % |" in md and "Does PEFT beat full fine-tuning?" in md
    curves = [p for p in report["plots"] if p.endswith("_learning_curves.png")]
    assert len(curves) == 2 * 2  # learning curves per backbone x fraction
    assert len(report["plots"]) - len(curves) == 2 * (1 + 2)  # per backbone: metric vs fraction + Pareto per fraction
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("data:image/png;base64,") == len(report["plots"]) and 'src="http' not in html
    csv_rows = Path(report["dir"], "runs.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(store_rows(out))
    # medpeft report rebuilds the same from the store alone
    assert main(["report", str(out), "--export", "csv,parquet", "--quiet"]) == 0
    import pandas as pd

    from_csv = pd.read_csv(Path(report["dir"], "runs.csv"))
    from_parquet = pd.read_parquet(Path(report["dir"], "runs.parquet"))
    assert list(from_parquet.columns) == list(from_csv.columns) and len(from_parquet) == len(from_csv)
    assert sorted(from_parquet["key"]) == sorted(from_csv["key"])
    assert np.allclose(from_parquet.sort_values("key")["value"].astype(float),
                       from_csv.sort_values("key")["value"].astype(float), equal_nan=True)


def test_pareto_front():
    rows = [{"m": "a", "trainable_pct": 100, "mean": 0.9}, {"m": "b", "trainable_pct": 1, "mean": 0.85},
            {"m": "c", "trainable_pct": 5, "mean": 0.80}, {"m": "d", "trainable_pct": 0.1, "mean": 0.7},
            {"m": "e", "trainable_pct": 50, "mean": 0.9}]
    assert sorted(r["m"] for r in pareto_front(rows)) == ["b", "d", "e"]


def test_leaderboard_and_report_from_the_cli(reference_sweep, capsys):
    _, out, _ = reference_sweep
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "leaderboard: toy - tiny_cnn" in text and "leaderboard: toy - tiny_vit" in text
    assert main(["report", str(out / "nowhere")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_pruning_rungs_are_units_of_the_epoch_budget_when_tiny_fractions_stretch_epochs():
    """A 5-image subset trained for 6 epochs x min_steps is stretched to 40 one-step epochs: the
    rungs must still sit at 1/6, 2/6, ... of the training, not at its first optimizer steps."""
    space = search_space("full")
    settings = HpoSettings(prune_min_epochs=2, reduction_factor=3)
    history = [_record(i, {"lr": 1e-4, "weight_decay": 1e-4}, space, v, intermediate={2: v},
                       attrs={"completed_rung_0": v}) for i, v in enumerate([0.6, 0.9, 0.7])]
    reporter = PruningReporter(history, {}, settings, "auroc", budget_epochs=6)
    for epoch in range(1, 14):  # 0.1 is far below the rung value 0.9 but epochs 1-13 are < 2/6 of 40
        reporter(epoch, {"val_auroc": 0.1 if epoch != 5 else 0.5, "epochs_total": 40})
    assert reporter.intermediate == {1: 0.1}  # epoch 7 = unit 1 (7 * 6 // 40)
    assert reporter.best_score == 0.5  # the trial's value counts every epoch, reported or not
    with pytest.raises(optuna.TrialPruned, match="budget unit 2"):
        reporter(14, {"val_auroc": 0.65, "epochs_total": 40})  # unit 2 = rung 0: 0.65 < 0.9, pruned
    # without the stretch (epochs_total = budget) a unit is an epoch, as before
    plain = PruningReporter(history, {}, settings, "auroc", budget_epochs=6)
    plain(1, {"val_auroc": 0.1, "epochs_total": 6})
    assert plain.intermediate == {1: 0.1}


def test_preflight_checks_the_medmnist_file_variant_the_sweep_reads(medmnist_root):
    """medmnist_size decides which file is read: a missing variant fails before any job starts."""
    exp = Experiment.from_mapping(dict(data=["breastmnist"], data_root=str(medmnist_root), medmnist_size=224,
                                       backbones=["tiny_cnn"], methods=["linear"], fractions=[1.0], seeds=1,
                                       image_size=32))
    if (medmnist_root / "breastmnist_224.npz").is_file():
        pytest.skip("this machine has the 224 px file")
    with pytest.raises(ConfigError, match="breastmnist_224.npz"):
        exp.validate()
