"""Calibration (ECE/MCE/Brier/NLL, temperature and Platt scaling), operating points, and their
path through run -> adapter -> predict / calibrate."""
import csv
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from medpeft.calibration import (apply_calibration, calibration_metrics, calibration_metrics_with_ci,
                                 check_operating_point, choose_threshold, fit_platt, fit_temperature,
                                 metrics_at_threshold, parse_operating_point)
from medpeft.cli import main
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError, DataError
from medpeft.run import RunConfig, execute, load_run
from medpeft.train import TrainConfig


# ---------------------------------------------------------------------- metrics by hand


def test_multiclass_metrics_match_a_hand_computed_fixture():
    probs = np.array([[0.72, 0.18, 0.10],   # label 0, top 0.72 right
                      [0.25, 0.65, 0.10],   # label 0, top 0.65 wrong
                      [0.10, 0.76, 0.14],   # label 1, top 0.76 right
                      [0.30, 0.15, 0.55]])  # label 1, top 0.55 wrong
    y = np.array([0, 0, 1, 1])
    m = calibration_metrics(y, probs)  # 15 bins: every image in its own bin
    # ECE = sum over images of |correct - confidence| / n when each bin holds one image
    assert m["ece"] == pytest.approx((0.28 + 0.65 + 0.24 + 0.55) / 4)
    assert m["mce"] == pytest.approx(0.65)
    # Brier, multi-class: squared error of the probability vector against the one-hot label, summed over classes
    brier = [(0.72 - 1) ** 2 + 0.18 ** 2 + 0.10 ** 2, (0.25 - 1) ** 2 + 0.65 ** 2 + 0.10 ** 2,
             0.10 ** 2 + (0.76 - 1) ** 2 + 0.14 ** 2, 0.30 ** 2 + (0.15 - 1) ** 2 + 0.55 ** 2]
    assert brier == pytest.approx([0.1208, 0.995, 0.0872, 1.115])
    assert m["brier"] == pytest.approx(0.5795)
    assert m["nll"] == pytest.approx(-(math.log(0.72) + math.log(0.25) + math.log(0.76) + math.log(0.15)) / 4)
    # 10 bins: 0.72 and 0.76 share (0.7, 0.8]: acc 1, mean confidence 0.74, gap 0.26 weighted 2/4
    m10 = calibration_metrics(y, probs, n_bins=10)
    assert m10["ece"] == pytest.approx((0.55 + 0.65 + 2 * 0.26) / 4)
    assert m10["mce"] == pytest.approx(0.65)


def test_binary_metrics_match_a_hand_computed_fixture():
    p1 = np.array([0.9, 0.3, 0.35, 0.18])
    y = np.array([1, 0, 1, 0])
    for probs in (p1, np.stack([1 - p1, p1], axis=1)):  # a [N] score is P(class 1)
        m = calibration_metrics(y, probs)
        # top-label confidences 0.9 right, 0.7 right, 0.65 wrong, 0.82 right, each alone in its bin
        assert m["ece"] == pytest.approx((0.1 + 0.3 + 0.65 + 0.18) / 4)
        assert m["mce"] == pytest.approx(0.65)
        assert m["brier"] == pytest.approx((0.01 + 0.09 + 0.4225 + 0.0324) / 4)  # binary Brier: (p1 - y)^2
        assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.35) + math.log(0.82)) / 4)


def test_bootstrap_intervals_bracket_the_value_and_repeat():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], 200)
    y = rng.integers(0, 3, 200)
    a = calibration_metrics_with_ci(y, p, n_boot=300, seed=4)
    assert a == calibration_metrics_with_ci(y, p, n_boot=300, seed=4)
    for name, m in a.items():
        assert m["value"] == pytest.approx(calibration_metrics(y, p)[name])
        assert m["low"] <= m["value"] <= m["high"]


# ---------------------------------------------------------------------- fitting


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_nll():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (6000, 4))
    y = np.array([rng.choice(4, p=row) for row in _softmax(logits)])  # labels drawn from the true probabilities
    overconfident = _softmax(2.5 * logits)  # the model's logits are 2.5x too large: T = 2.5 undoes it
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(2.5, rel=0.06)
    after = apply_calibration(overconfident, {"method": "temperature", "params": {"temperature": t}})
    before_m, after_m = calibration_metrics(y, overconfident), calibration_metrics(y, after)
    assert after_m["nll"] < before_m["nll"] - 0.05 and after_m["ece"] < before_m["ece"] / 3
    assert (after.argmax(1) == overconfident.argmax(1)).all()  # monotone: the argmax never changes


def test_platt_scaling_recovers_slope_and_intercept():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.5, 8000)
    y = rng.random(8000) < 1 / (1 + np.exp(-(2.0 * x - 0.5)))  # true P(positive) = sigmoid(2x - 0.5)
    raw = 1 / (1 + np.exp(-x))  # the model's probability: right ranking, wrong scale
    a, b = fit_platt(y, raw)
    assert a == pytest.approx(2.0, abs=0.12) and b == pytest.approx(-0.5, abs=0.1)
    cal = {"method": "platt", "params": {"a": a, "b": b, "positive_index": 1}}
    before = calibration_metrics(y.astype(int), raw)
    after = calibration_metrics(y.astype(int), apply_calibration(np.stack([1 - raw, raw], 1), cal))
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    # the positive class may be class 0 (BreastMNIST: malignant): the map works on that column
    swapped = apply_calibration(np.stack([raw, 1 - raw], 1), {**cal, "params": {**cal["params"], "positive_index": 0}})
    np.testing.assert_allclose(swapped[:, 0], apply_calibration(np.stack([1 - raw, raw], 1), cal)[:, 1])


def test_platt_stays_finite_on_a_separable_validation_split():
    a, b = fit_platt(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.8, 0.3, 0.1]))
    assert np.isfinite([a, b]).all() and a > 0


def test_too_few_validation_images_leave_the_probabilities_uncalibrated():
    from medpeft.calibration import compute_entries, fit_calibration

    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])  # 2 positives: Platt's two parameters would fit noise
    p1 = np.array([0.9, 0.8, 0.3, 0.1, 0.2, 0.4, 0.35, 0.15])
    cal, note = fit_calibration("binary", y, p1)
    assert cal == {"method": "none", "params": {}} and "2 positive and 6 negative" in note
    assert fit_calibration("binary", y, p1, force=True)[0]["method"] == "platt"
    probs = np.stack([1 - p1, p1], 1)
    entries = compute_entries("binary", ["neg", "pos"], 1, y, probs, y, probs, 50, 0, operating_point="youden")
    assert entries["calibration"]["method"] == "none"
    assert entries["calibration"]["test"]["after"] == entries["calibration"]["test"]["before"]
    assert entries["operating_point"]["calibrated"] is False and "calibrated" not in entries["operating_point"]["rule"]
    from medpeft.calibration import adapter_metadata

    assert "calibration" not in adapter_metadata(entries) and "operating_point" in adapter_metadata(entries)
    assert fit_calibration("multiclass", [0, 1, 2] * 3, np.full((9, 3), 1 / 3))[0]["method"] == "none"


# ---------------------------------------------------------------------- operating point


@pytest.mark.parametrize("seed", range(5))
def test_threshold_meets_the_target_on_validation_and_is_the_best_that_does(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(20, bool), np.zeros(37, bool)]
    s = np.clip(np.where(y, rng.normal(0.6, 0.2, 57), rng.normal(0.4, 0.2, 57)), 0, 1).round(2)  # ties on purpose

    def sens(t):
        return ((s >= t) & y).sum() / y.sum()

    def spec(t):
        return ((s < t) & ~y).sum() / (~y).sum()

    candidates = np.unique(s)
    t = choose_threshold(y, s, "sensitivity", 0.95)
    assert sens(t) >= 0.95  # 19 of 20 positives at least
    assert all(sens(c) < 0.95 for c in candidates if c > t)  # the largest threshold that meets it
    t = choose_threshold(y, s, "specificity", 0.9)
    assert spec(t) >= 0.9
    assert all(spec(c) < 0.9 for c in candidates if c < t)  # the smallest threshold that meets it
    t = choose_threshold(y, s, "youden", None)
    best = max(sens(c) + spec(c) for c in candidates)
    assert sens(t) + spec(t) == pytest.approx(best)
    m = metrics_at_threshold(y, s, t, n_boot=100)
    assert m["sensitivity"]["value"] == pytest.approx(sens(t)) and m["counts"]["tp"] == ((s >= t) & y).sum()
    assert m["ppv"]["value"] == pytest.approx(((s >= t) & y).sum() / (s >= t).sum())


def test_threshold_target_of_one_and_exact_fractions():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.1, 0.05])
    assert choose_threshold(y, s, "sensitivity", 1.0) == 0.2  # the lowest positive score: all four caught
    assert choose_threshold(y, s, "sensitivity", 0.75) == 0.4  # 3/4 = 0.75 exactly counts as meeting 0.75
    assert choose_threshold(y, s, "specificity", 1.0) == 0.8  # just above the highest negative (0.7)
    t = choose_threshold(y, s, "specificity", 1.0)
    assert metrics_at_threshold(y, s, t, n_boot=10)["specificity"]["value"] == 1.0
    with pytest.raises(DataError, match="0 positive"):
        choose_threshold(np.zeros(4, bool), s[:4], "sensitivity", 0.9)


def test_operating_point_parsing_and_task_errors():
    assert parse_operating_point("sensitivity=0.95") == ("sensitivity", 0.95)
    assert parse_operating_point("Specificity=0.9") == ("specificity", 0.9)
    assert parse_operating_point("youden") == ("youden", None)
    for bad in ("sensitivity=1.5", "sensitivity=abc", "accuracy=0.9", "sensitivity", "0.95"):
        with pytest.raises(ConfigError, match="operating point"):
            parse_operating_point(bad)
    with pytest.raises(ConfigError, match="binary classification only.*multiclass with 3 classes"):
        check_operating_point("sensitivity=0.9", "multiclass", 3)
    with pytest.raises(ConfigError, match="binary classification only.*segmentation"):
        check_operating_point("youden", "segmentation", 2)
    with pytest.raises(ConfigError, match="calibration 'maybe'"):
        RunConfig(backbone="tiny_cnn", calibration="maybe")


# ---------------------------------------------------------------------- runs end to end


def _config(root, **kw):
    return RunConfig(data=DataConfig(name="breastmnist", root=str(root), image_size=32, fraction=0.5, audit="off"),
                     train=TrainConfig(epochs=2, batch_size=32, seed=0), backbone="tiny_cnn", method="lora",
                     n_boot=50, **kw)


@pytest.fixture(scope="module")
def binary_run(medmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("calrun") / "run"
    cfg = _config(medmnist_root, operating_point="sensitivity=0.9")
    return cfg, execute(cfg, out_dir=out), out


@pytest.fixture(scope="module")
def images(medmnist_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    data = np.load(medmnist_root / "breastmnist.npz")
    paths = []
    for i in range(6):
        path = folder / f"test{i}.png"
        Image.fromarray(data["test_images"][i]).save(path)
        paths.append(str(path))
    return paths


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _logit(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def test_run_records_calibration_and_operating_point(binary_run):
    cfg, metrics, out = binary_run
    saved = json.loads((out / "metrics.json").read_text())
    cal, op = saved["calibration"], saved["operating_point"]
    assert cal["method"] == "platt" and cal["fitted_on"] == "validation" and cal["n_fit"] == saved["n_val"]
    for split in ("val", "test"):
        for when in ("before", "after"):
            for name in ("ece", "mce", "brier", "nll"):
                m = cal[split][when][name]
                assert m["low"] <= m["value"] <= m["high"] or m["low"] <= m["high"]
    # the "before" numbers are those of the saved predictions
    rows = list(csv.DictReader(open(out / "test_predictions.csv")))
    probs = np.array([[float(r["p_malignant"]), float(r["p_normal, benign"])] for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    assert cal["test"]["before"]["ece"]["value"] == pytest.approx(calibration_metrics(labels, probs)["ece"], abs=1e-6)
    # BreastMNIST's positive class is malignant (index 0): sensitivity and the threshold follow it
    assert op["target"] == "sensitivity=0.9" and op["positive_class"] == "malignant" and op["positive_index"] == 0
    assert op["val"]["sensitivity"]["value"] >= 0.9 and op["calibrated"] is True
    assert set(op["test"]) >= {"sensitivity", "specificity", "ppv", "npv", "counts"}
    assert (out / "val_predictions.csv").is_file() and (out / "reliability.png").stat().st_size > 1000
    assert yaml_config(out)["operating_point"] == "sensitivity=0.9"
    meta = load_run(out).metadata
    assert json.loads(meta["calibration"])["params"] == cal["params"]
    assert json.loads(meta["operating_point"])["threshold"] == op["threshold"]


def yaml_config(out):
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())


def test_default_config_keeps_store_keys_of_earlier_sweeps():
    cfg = RunConfig(backbone="tiny_cnn")
    assert "calibration" not in cfg.to_dict() and "operating_point" not in cfg.to_dict()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_predict_applies_calibration_and_threshold(binary_run, images, tmp_path, capsys):
    from medpeft.data.base import ImageSet
    from medpeft.data.io import load_images
    from medpeft.train import predict_images

    import torch

    _, metrics, out = binary_run
    loaded = load_run(out)
    stacked = load_images(images, loaded.image_size, None)
    raw = predict_images(loaded.model, ImageSet(stacked, torch.zeros(len(images), dtype=torch.long), images),
                         loaded.mean, loaded.std, "binary", 2).astype(np.float64)
    params, t = metrics["calibration"]["params"], metrics["operating_point"]["threshold"]
    by_hand = _sigmoid(params["a"] * _logit(raw[:, 0]) + params["b"])  # P(malignant), column 0
    capsys.readouterr()
    assert main(["predict", str(out), *images, "--out", str(tmp_path / "p.csv")]) == 0
    assert "calibrated (platt" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    got = np.array([float(r["p_malignant"]) for r in rows])
    np.testing.assert_allclose(got, by_hand, atol=1e-6)
    np.testing.assert_allclose([float(r["p_normal, benign"]) for r in rows], 1 - by_hand, atol=1e-6)
    assert [r["decision"] for r in rows] == ["malignant" if p >= t else "normal, benign" for p in by_hand]
    assert all(float(r["threshold"]) == pytest.approx(t) for r in rows)
    # --uncalibrated: the raw probabilities, the same decisions (made on what the threshold was chosen on)
    assert main(["predict", str(out), *images, "--uncalibrated", "--out", str(tmp_path / "u.csv")]) == 0
    rows_u = list(csv.DictReader(open(tmp_path / "u.csv")))
    np.testing.assert_allclose([float(r["p_malignant"]) for r in rows_u], raw[:, 0], atol=1e-6)
    assert [r["decision"] for r in rows_u] == [r["decision"] for r in rows]


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_calibrate_writes_only_its_files_and_predict_follows_it(binary_run, images, tmp_path, capsys):
    _, metrics, out = binary_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    (run / "reliability.png").unlink()
    before = _snapshot(run)
    assert main(["calibrate", str(run), "--operating-point", "youden"]) == 0
    text = capsys.readouterr().out
    assert "ECE" in text and "test after" in text and "youden" in text
    after = _snapshot(run)
    assert set(after) - set(before) == {"calibration.json", "reliability.png"}
    assert {k: after[k] for k in before} == before  # nothing else touched
    side = json.loads((run / "calibration.json").read_text())
    assert side["calibration"]["params"] == pytest.approx(metrics["calibration"]["params"], rel=1e-4)  # CSV: 8 digits
    assert side["operating_point"]["target"] == "youden"
    # predict now takes calibration.json: the youden threshold
    assert main(["predict", str(run), images[0], "--out", str(tmp_path / "p.csv")]) == 0
    assert "from calibration.json" in capsys.readouterr().err
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    assert float(row["threshold"]) == pytest.approx(side["operating_point"]["threshold"])
    # a calibration.json of another adapter is refused, not silently applied
    side["adapter_sha256"] = "0" * 64
    (run / "calibration.json").write_text(json.dumps(side))
    assert main(["predict", str(run), images[0]]) == 2
    assert "computed for another adapter.safetensors" in capsys.readouterr().err


def test_calibrate_predicts_again_when_the_run_lacks_validation_predictions(binary_run, medmnist_root, tmp_path):
    from medpeft.calibration_cli import calibrate_run

    _, metrics, out = binary_run
    run = tmp_path / "old"
    shutil.copytree(out, run)
    (run / "val_predictions.csv").unlink()
    (run / "test_predictions.csv").unlink()
    import argparse

    content = calibrate_run(run, args=argparse.Namespace(weights=None, data_root=str(medmnist_root)))
    assert content["predictions"].startswith("predicted again")
    assert content["calibration"]["params"] == pytest.approx(metrics["calibration"]["params"], abs=1e-4)
    assert content["operating_point"]["threshold"] == pytest.approx(metrics["operating_point"]["threshold"], abs=1e-5)
    assert not (run / "val_predictions.csv").exists()


def test_calibrate_refuses_segmentation_and_non_runs(tmp_path, capsys):
    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "metrics.json").write_text(json.dumps({"task": "segmentation"}))
    (seg / "adapter.safetensors").write_bytes(b"x")
    assert main(["calibrate", str(seg)]) == 2
    assert "segmentation run: calibration and operating points apply to image-level classification" \
        in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "nothing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def make_three_classes(root, per_class=30):
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.normal(60 + 60 * k, 25, (16, 16))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def test_multiclass_run_uses_temperature_and_refuses_an_operating_point(tmp_path, capsys):
    data = make_three_classes(tmp_path / "three")
    base = dict(data=DataConfig(name=str(data), image_size=32, audit="off"), train=TrainConfig(epochs=2, batch_size=16),
                backbone="tiny_cnn", method="lora", n_boot=30)
    epochs = []
    with pytest.raises(ConfigError, match="binary classification only"):
        execute(RunConfig(**base, operating_point="sensitivity=0.9"), out_dir=tmp_path / "never",
                progress=lambda epoch, row: epochs.append(epoch))
    assert epochs == [] and not (tmp_path / "never").exists()  # refused before training
    out = tmp_path / "mc"
    metrics = execute(RunConfig(**base), out_dir=out)
    cal = metrics["calibration"]
    assert cal["method"] == "temperature" and 0.05 <= cal["params"]["temperature"] <= 20
    from medpeft.calibration import read_prediction_csv

    _, val_y, val_p = read_prediction_csv(out / "val_predictions.csv", metrics["class_names"])
    assert cal["params"]["temperature"] == pytest.approx(fit_temperature(val_y, val_p), rel=1e-4)  # fitted on val
    assert cal["val"]["after"]["nll"]["value"] <= cal["val"]["before"]["nll"]["value"] + 1e-9
    assert metrics["operating_point"] is None
    img = str(data / "b" / "03.png")
    loaded = load_run(out)
    from medpeft.data.base import ImageSet
    from medpeft.data.io import load_images
    from medpeft.train import predict_images
    import torch

    raw = predict_images(loaded.model, ImageSet(load_images([img], 32, None), torch.zeros(1, dtype=torch.long), [img]),
                         loaded.mean, loaded.std, "multiclass", 3).astype(np.float64)
    by_hand = _softmax(np.log(raw) / cal["params"]["temperature"])
    capsys.readouterr()
    assert main(["predict", str(out), img]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    np.testing.assert_allclose([row["p_a"], row["p_b"], row["p_c"]], by_hand[0], atol=1e-6)
    assert "decision" not in row
    assert main(["calibrate", str(out), "--operating-point", "youden"]) == 2
    assert "binary classification only" in capsys.readouterr().err


# ---------------------------------------------------------------------- the benchmark report


def test_runs_csv_summary_and_report_compare_calibration_with_full(tmp_path):
    import pandas as pd

    from medpeft.bench.report import build_report
    from medpeft.bench.store import Store

    def entry(ece_raw, ece_cal, brier_cal):
        ci = lambda v: {"value": v, "low": v - 0.01, "high": v + 0.01}  # noqa: E731
        return {"method": "platt", "params": {"a": 1.0, "b": 0.0, "positive_index": 1},
                "test": {"before": {"ece": ci(ece_raw), "brier": ci(0.2)},
                         "after": {"ece": ci(ece_cal), "brier": ci(brier_cal)}}}

    ece = {"full": ([0.20, 0.22], [0.06, 0.08]), "lora": ([0.10, 0.12], [0.05, 0.05]),
           "bitfit": ([0.08, 0.10], [0.07, 0.09])}
    with Store(tmp_path) as store:
        store.set_meta("experiment", {"data": ["toy"], "backbones": ["bb"], "fractions": [0.1], "seeds": [0, 1],
                                      "train": {"monitor": "auroc"}})
        n = 0
        for method, (raw, cal) in ece.items():
            for seed in (0, 1):
                n += 1
                cell = {"id": f"toy|bb|{method}|0.1", "data": "toy", "backbone": "bb", "method": method,
                        "fraction": 0.1}
                store.mark_running({"key": f"k{n}", "kind": "final", "cell": cell, "seed": seed, "trial": None,
                                    "params": {}, "config": {}})
                metrics = {"test": {"auroc": {"value": 0.8}}, "params": {"trainable": 1, "trainable_pct": 1.0},
                           "monitor": "auroc", "calibration": entry(raw[seed], cal[seed], 0.15)}
                store.record({"key": f"k{n}", "status": "done", "outcome": "complete", "value": 0.8,
                              "metrics": metrics, "seconds": 1.0, "worker": "w"})
    build_report(tmp_path)
    report = tmp_path / "report"
    runs = pd.read_csv(report / "runs.csv")
    assert {"calibration", "test_ece_raw", "test_ece_cal", "test_ece_cal_low", "test_brier_cal"} <= set(runs.columns)
    lora = runs[runs.method == "lora"].sort_values("seed")
    assert lora["test_ece_cal"].tolist() == [0.05, 0.05] and lora["test_ece_raw"].tolist() == [0.10, 0.12]
    summary = pd.read_csv(report / "summary.csv").set_index("method")
    assert summary.loc["full", "ece_raw"] == pytest.approx(0.21) and summary.loc["lora", "ece"] == pytest.approx(0.05)
    text = (report / "report.md").read_text()
    assert "## Calibration: PEFT vs full fine-tuning" in text
    assert "lower ECE than full fine-tuning in 1 of 1 cell(s) before calibration and in 0 of 1 after" in text
    assert "| toy | bb | 0.1 | 0.210 | 0.070 | 0.100 | 2/2 | 1/2 | bitfit (0.090) |" in text
