"""``--mlflow URI``: a local MLflow file store holds the run (params, per-epoch and final metrics,
the run folder as artefacts); a sweep logs one nested run per job; nothing changes (config.yaml,
the store's keys) and mlflow is not even imported when the option is off.
"""
from __future__ import annotations

import sys

import pytest

from medpeft.bench.executors import LocalExecutor
from medpeft.bench.grid import Experiment
from medpeft.bench.jobs import BundleCache
from medpeft.bench.store import Store
from medpeft.bench.sweep import RunOptions, run_sweep
from medpeft.cli import main
from toydata import make_toy

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("track") / "toy", per_class=20)


def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.resolve().as_uri())


def runs_of(store, experiment="medpeft"):
    c = client(store)
    found = c.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {store}"
    return c, c.search_runs([found.experiment_id])


def run_argv(toy, out, *extra):
    return ["run", "--data", str(toy), "--backbone", "tiny_cnn", "--image-size", "32", "--method", "lora",
            "--epochs", "2", "--batch-size", "16", "--n-boot", "20", "--audit", "off", "--out", str(out), "--quiet",
            *extra]


def test_run_logs_params_epoch_and_final_metrics_and_the_run_folder(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # file:./mlruns is relative to the working directory
    assert main(run_argv(toy, tmp_path / "tracked", "--mlflow", "file:./mlruns")) == 0
    c, runs = runs_of(tmp_path / "mlruns")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    params = run.data.params
    assert params["backbone"] == "tiny_cnn" and params["method"] == "lora" and params["train.epochs"] == "2"
    assert params["data.image_size"] == "32" and params["data.name"] == "toy"  # as config.yaml: relative
    assert not [v for v in params.values() if v.startswith("/")]  # no absolute path (they name users and sites)
    assert run.data.tags["medpeft.kind"] == "run"
    # per epoch: train loss, learning rate, validation metrics, at steps 1 and 2
    for name in ("train_loss", "lr", "val_auroc"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, name)] == [1, 2], name
    # final: test value with its CI bounds, the selected validation metrics, cost
    metrics = run.data.metrics
    for name in ("test_auroc", "test_auroc_low", "test_auroc_high", "selected_val_auroc", "best_epoch",
                 "params_trainable_pct", "train_seconds"):
        assert name in metrics, name
    assert metrics["test_auroc_low"] <= metrics["test_auroc"] <= metrics["test_auroc_high"]
    artefacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.csv", "adapter.safetensors"} <= artefacts
    # the run folder is the same as without tracking: the URI is not part of the run config
    assert main(run_argv(toy, tmp_path / "plain")) == 0
    assert (tmp_path / "tracked" / "config.yaml").read_text() == (tmp_path / "plain" / "config.yaml").read_text()


def test_off_means_no_mlflow_import(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any import of mlflow would now fail
    assert main(run_argv(toy, tmp_path / "run")) == 0


def test_missing_mlflow_or_a_bad_store_is_a_clear_error_before_training(toy, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    code = main(run_argv(toy, tmp_path / "r1", "--mlflow", f"file:{tmp_path / 'afile'}"))
    err = capsys.readouterr().err
    assert code == 2 and "a file store is a folder" in err and not (tmp_path / "r1").exists()
    monkeypatch.setitem(sys.modules, "mlflow", None)
    code = main(run_argv(toy, tmp_path / "r2", "--mlflow", f"file:{tmp_path / 'mlruns'}"))
    err = capsys.readouterr().err
    assert code == 2 and "pip install" in err and "mlflow" in err and not (tmp_path / "r2").exists()


def sweep(toy, out, mlflow=None):
    exp = Experiment.from_mapping(dict(data=[str(toy)], backbones=["tiny_cnn"], methods=["lora"], fractions=[1.0],
                                       seeds=1, image_size=32, hpo={"trials": 1}, train={"epochs": 2, "batch_size": 16},
                                       n_boot=20, data_options={"audit": "off"})).validate()
    executor = LocalExecutor(cache=BundleCache(), threads=1)
    return run_sweep(exp, RunOptions(out=out, mlflow=mlflow, report=False), executor=executor)


def test_sweep_logs_every_job_under_a_parent_and_keeps_the_store_keys(toy, tmp_path):
    store = tmp_path / "mlruns"
    tracked = sweep(toy, tmp_path / "tracked", mlflow=f"file:{store}")
    assert tracked["ran"] == 2 and tracked["store"]["done"] == 2
    c, runs = runs_of(store)
    parents = [r for r in runs if r.data.tags.get("medpeft.kind") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("medpeft.kind") in ("trial", "final")]
    assert len(parents) == 1 and len(jobs) == 2 and len(runs) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs)
    assert sorted(r.data.tags["medpeft.kind"] for r in jobs) == ["final", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    trial = next(r for r in jobs if r.data.tags["medpeft.kind"] == "trial")
    final = next(r for r in jobs if r.data.tags["medpeft.kind"] == "final")
    assert trial.data.tags["medpeft.trial"] == "0" and final.data.tags["medpeft.seed"] == "0"
    assert "objective" in trial.data.metrics and "test_auroc" not in trial.data.metrics  # trials never test
    assert [m.step for m in c.get_metric_history(trial.info.run_id, "train_loss")] == [1, 2]
    assert {"test_auroc", "test_auroc_low", "test_auroc_high"} <= set(final.data.metrics)
    assert "metrics.json" in {a.path for a in c.list_artifacts(final.info.run_id)}
    assert parents[0].data.metrics["jobs_done"] == 2
    for run in runs:
        assert not [v for v in run.data.params.values() if v.startswith("/") or '"/' in v], run.data.tags
    # the same sweep without tracking: the same jobs under the same keys
    plain = sweep(toy, tmp_path / "plain")
    assert plain["ran"] == 2
    with Store.open_readonly(tmp_path / "tracked") as a, Store.open_readonly(tmp_path / "plain") as b:
        keys_a = sorted(r["key"] for r in a.rows())
        keys_b = sorted(r["key"] for r in b.rows())
        configs_a = sorted(str(r["config"]) for r in a.rows())
        configs_b = sorted(str(r["config"]) for r in b.rows())
    assert keys_a == keys_b and len(keys_a) == 2 and configs_a == configs_b


def test_ray_workers_log_their_own_jobs(toy, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    import os

    store = tmp_path / "mlruns"
    code = main(["benchmark", "--data", str(toy), "--backbones", "tiny_cnn", "--methods", "lora", "--fractions", "1",
                 "--seeds", "1", "--image-size", "32", "--hpo-trials", "1", "--epochs", "1", "--batch-size", "16",
                 "--n-boot", "20", "--data-option", "audit='off'", "--no-report", "--quiet", "--executor", "ray",
                 "--ray-num-cpus", "1", "--out", str(tmp_path / "sweep"), "--mlflow", f"file:{store}",
                 "--mlflow-experiment", "ray-sweep"])
    captured = capsys.readouterr()
    assert code == 0, (captured.out + captured.err)[-2000:]
    assert not ray.is_initialized()
    _, runs = runs_of(store, "ray-sweep")
    jobs = [r for r in runs if r.data.tags.get("medpeft.kind") in ("trial", "final")]
    assert len(jobs) == 2 and all(r.info.status == "FINISHED" for r in jobs)
    workers = {r.data.tags["medpeft.worker"] for r in jobs}
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)  # logged by the Ray worker that trained it
