"""End-to-end runs: run folder contents, determinism, save/load/merge of the trained model, CLI errors."""
import csv
import json

import numpy as np
import pytest
import torch

from medpeft.cli import main
from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.run import RunConfig, execute, load_run
from medpeft.train import TrainConfig, predict_images


def tiny_config(root, method="lora", backbone="tiny_cnn", seed=0, **train):
    return RunConfig(
        data=DataConfig(name="breastmnist", root=str(root), image_size=32, fraction=0.5, subset_seed=seed),
        train=TrainConfig(epochs=train.pop("epochs", 2), batch_size=32, seed=seed, **train),
        backbone=backbone, method=method, n_boot=200,
    )


@pytest.fixture(scope="module")
def tiny_run(medmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(medmnist_root)
    return cfg, execute(cfg, out_dir=out), out


def test_run_folder_has_config_metrics_history_adapter(tiny_run):
    cfg, metrics, out = tiny_run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.json", "history.csv", "adapter.safetensors",
                                               "test_predictions.csv"}
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("acc", "balanced_acc", "f1", "sensitivity", "specificity", "auroc"):
            m = saved[split][name]
            assert m["low"] <= m["high"] and 0 <= m["value"] <= 1
    p = saved["params"]
    assert 0 < p["trainable"] < p["total"] and abs(p["trainable_pct"] - 100 * p["trainable"] / p["total"]) < 1e-9
    assert saved["train_seconds"] > 0 and saved["peak_rss_mb"] > 0 and saved["adapter_bytes"] > 0
    # fraction 0.5 of train, and of validation (selection labels follow the budget); test untouched
    assert 272 <= saved["n_train"] <= 274 and 38 <= saved["n_val"] <= 40 and saved["n_test"] == 156
    assert saved["selection"] == {"mode": "holdout", "val_labels": "follow", "n_selection_labels": saved["n_val"]}
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # config.yaml reproduces the run config; an absolute data root is not written (privacy, see
    # medpeft.data.privacy): given back, the config is the run's own
    import yaml
    from medpeft.data.privacy import public_run_config
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written == public_run_config(cfg.to_dict())
    assert RunConfig.from_dict({**written, "data": {**written["data"], "root": cfg.data.root}}) == cfg


def test_same_seed_same_numbers(tiny_run, medmnist_root):
    cfg, first, _ = tiny_run
    second = execute(tiny_config(medmnist_root), save=False)
    assert second["test"] == first["test"] and second["val"] == first["val"]
    other = execute(tiny_config(medmnist_root, seed=1), save=False)
    assert other["test"] != first["test"]


def test_saved_adapter_reproduces_test_predictions(tiny_run, medmnist_root):
    cfg, metrics, out = tiny_run
    bundle = load_data(cfg.data)
    saved = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in csv.DictReader(open(out / "test_predictions.csv"))])
    loaded = load_run(out)
    probs = predict_images(loaded.model, bundle.test, loaded.mean, loaded.std, "binary", 2)
    np.testing.assert_allclose(probs, saved, atol=1e-6)
    merged = load_run(out, merge=True)
    probs_merged = predict_images(merged.model, bundle.test, merged.mean, merged.std, "binary", 2)
    np.testing.assert_allclose(probs_merged, saved, atol=1e-4)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())


def test_best_state_is_a_copy_not_the_live_model(medmnist_root, tmp_path):
    """With a too-high lr later epochs get worse on val; the evaluated state must be the best epoch's."""
    cfg = tiny_config(medmnist_root, method="full", epochs=5, lr=0.05, patience=10)
    metrics = execute(cfg, out_dir=tmp_path)
    history = list(csv.DictReader(open(tmp_path / "history.csv")))
    val_auroc = [float(r["val_auroc"]) for r in history]
    best = metrics["best_epoch"]
    assert best == 1 + int(np.argmax(val_auroc))
    assert best < len(history), "scenario must end worse than its best epoch, else the test proves nothing"
    # the reported validation metric is that of the restored best state, not of the last epoch
    assert metrics["val"]["auroc"]["value"] == pytest.approx(val_auroc[best - 1], abs=1e-9)
    assert metrics["val"]["auroc"]["value"] != pytest.approx(val_auroc[-1], abs=1e-9)


def test_cli_run_and_predict(medmnist_root, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["run", "--data", "breastmnist", "--data-root", str(medmnist_root), "--backbone", "tiny_vit",
                 "--method", "bitfit", "--image-size", "16", "--epochs", "1", "--n-boot", "50", "--out", str(out),
                 "--quiet"])
    assert code == 0 and (out / "metrics.json").is_file()
    from PIL import Image
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype("uint8")).save(img)
    assert main(["predict", str(out), str(img), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert rows[0]["prediction"] in ("malignant", "normal, benign") and abs(
        float(rows[0]["p_malignant"]) + float(rows[0]["p_normal, benign"]) - 1) < 1e-5


def test_cli_export_writes_a_plain_backbone_with_its_preprocessing(tiny_run, medmnist_root, tmp_path):
    """The merged export loads into the bare backbone (no method modules) and predicts what the run predicts."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from medpeft.backbones import create_backbone

    cfg, _, out = tiny_run
    target = tmp_path / "merged.safetensors"
    assert main(["export", str(out), str(target)]) == 0
    with safe_open(str(target), framework="pt") as fh:
        meta = fh.metadata()
    loaded = load_run(out)
    assert json.loads(meta["class_names"]) == loaded.class_names and meta["backbone"] == "tiny_cnn"
    assert int(meta["image_size"]) == 32 and tuple(json.loads(meta["mean"])) == loaded.mean
    plain, _ = create_backbone("tiny_cnn", num_classes=2, image_size=32, pretrained=False)
    plain.load_state_dict(load_file(str(target)), strict=True)  # every key, nothing extra
    bundle = load_data(cfg.data)
    expected = predict_images(loaded.model, bundle.test, loaded.mean, loaded.std, "binary", 2)
    got = predict_images(plain.eval(), bundle.test, tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])),
                         "binary", 2)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cli_export_refuses_a_method_that_cannot_merge(medmnist_root, tmp_path, capsys):
    out = tmp_path / "adapter_run"
    execute(RunConfig(data=DataConfig(name="breastmnist", root=str(medmnist_root), image_size=16, fraction=0.1),
                      train=TrainConfig(epochs=1), backbone="tiny_vit", method="adapter", n_boot=20), out_dir=out)
    code = main(["export", str(out), str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "'adapter' cannot be merged" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--data", "nosuchmnist"], "nosuchmnist"),
    (["--backbone", "nosuchnet"], "efficientnet_lite0"),
    (["--method", "nosuchmethod"], "lora"),
    (["--fraction", "1.5"], "1.5"),
    (["--fraction", "0"], "fraction"),
    (["--shots", "10000"], "10000"),
    (["--backbone", "dinov2_vits14", "--image-size", "30"], "14"),
    (["--data-root", "/nonexistent/root"], "/nonexistent/root"),
    (["--method", "lora", "--lora-rank", "0"], "rank"),
])
def test_cli_errors_name_the_bad_value(argv, expected, medmnist_root, capsys, tmp_path):
    base = ["run", "--data", "breastmnist", "--data-root", str(medmnist_root), "--backbone", "tiny_cnn",
            "--image-size", "32", "--epochs", "1", "--quiet", "--out", str(tmp_path / "o")]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_run_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="bogus"):
        RunConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="epochz"):
        RunConfig.from_dict({"train": {"epochz": 3}})


def test_run_records_its_split_and_split_file_reproduces_it(tiny_run, medmnist_root):
    cfg, first, out = tiny_run
    recorded = json.loads((out / "split.json").read_text())
    assert len(recorded["train"]) == 546 and len(recorded["val"]) == 78 and len(recorded["test"]) == 156
    assert len(recorded["train_subset"]) == first["n_train"]  # the label subset, inside the training split
    assert set(recorded["train_subset"]) <= set(recorded["train"])
    again = tiny_config(medmnist_root)
    again.data.split_file = str(out / "split.json")
    second = execute(again, save=False)
    for key in ("train_ids_sha256", "train_subset_ids_sha256", "val_ids_sha256", "test_ids_sha256"):
        assert second["split"][key] == first["split"][key]
    assert second["test"] == first["test"]
