"""External test sets (issue 15, part 1): evaluated once, after training and the home test, by
the model chosen on home validation; checked before training; never read by selection or HPO;
reported per run (metrics.json), per sweep (runs.csv columns) and in the report (in-domain vs
external with the paired drop over seeds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medpeft.data.external as external_module
import medpeft.run as run_module
from medpeft.data.base import DataConfig
from medpeft.data.external import convert_channels, load_external
from medpeft.errors import ConfigError
from medpeft.run import RunConfig, execute
from medpeft.train import TrainConfig
from toydata import make_toy


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("home") / "hospital_a", per_class=20)


@pytest.fixture(scope="module")
def away(tmp_path_factory):
    """The same classes from 'another scanner': brighter, lower contrast, RGB files."""
    root = tmp_path_factory.mktemp("away") / "hospital_b"
    rng = np.random.default_rng(5)
    for name in ("normal", "lesion"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            img = rng.normal(130, 20, (16, 16))
            if name == "lesion":
                x, y = rng.integers(1, 10, 2)
                img[y:y + 5, x:x + 5] += 50
            gray = np.clip(img, 0, 255).astype(np.uint8)
            Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(root / name / f"{i:03d}.png")
    return root


def config(home, externals, **train) -> RunConfig:
    return RunConfig(data=DataConfig(name=str(home), image_size=32, audit="off"),
                     train=TrainConfig(**{"epochs": 2, "batch_size": 8, "seed": 0, **train}), backbone="tiny_cnn",
                     pretrained=False, method="lora", n_boot=20, external_test=[str(e) for e in externals])


def test_external_set_is_read_only_after_training_and_the_home_test(home, away, monkeypatch):
    events = []
    real_train, real_load = run_module.train_model, external_module.load_external

    def train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        events.append("trained")
        return result

    def poisoned(*args, **kwargs):  # raises on any access before training has ended
        assert events == ["trained"], "the external set was read before training ended"
        events.append("external")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_model", train)
    monkeypatch.setattr(external_module, "load_external", poisoned)
    metrics = execute(config(home, [away]), save=False)
    assert events == ["trained", "external"]
    entry = metrics["external"]["hospital_b"]
    assert set(entry["auroc"]) >= {"value", "low", "high"} and entry["n_images"] == 24
    assert entry["notes"] == ["3-channel images converted to 1 channel(s) like the home set"]
    # the home test is unchanged by evaluating an external set
    plain = execute(config(home, []), save=False)
    assert plain["test"]["auroc"] == metrics["test"]["auroc"] and "external" not in plain


def test_runs_without_testing_never_touch_external_sets(home, away, monkeypatch):
    def poisoned(*args, **kwargs):
        raise AssertionError("read an external set without testing")

    monkeypatch.setattr(external_module, "load_external", poisoned)
    metrics = execute(config(home, [away]), save=False, evaluate_test=False)  # an HPO trial
    assert metrics["test"] is None and "external" not in metrics


def test_external_errors_come_before_training(home, away, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "train_model", lambda *a, **k: pytest.fail("trained before the check"))
    other = tmp_path / "three_classes"
    for name in ("a", "b", "c"):
        (other / name).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(other / name / "x.png")
    with pytest.raises(ConfigError, match=r"external test set 'three_classes' has classes \['a', 'b', 'c'\]; "
                                          r"the run's are \['lesion', 'normal'\]"):
        execute(config(home, [other]), save=False)
    with pytest.raises(ConfigError, match="named twice"):
        execute(config(home, [away, tmp_path / "x" / "hospital_b"]), save=False)
    with pytest.raises(ConfigError, match="unknown data set"):
        execute(config(home, [tmp_path / "nowhere"]), save=False)
    with pytest.raises(ConfigError, match="external_test"):
        RunConfig(external_test=[""])


def test_channel_conversion_and_label_space_of_a_manifest(home, tmp_path):
    rgb = torch.tensor([[[[255]], [[0]], [[0]]], [[[10]], [[200]], [[30]]]], dtype=torch.uint8)
    gray = convert_channels(rgb, 1)
    expected = np.round(np.array([255 * 0.299, 10 * 0.299 + 200 * 0.587 + 30 * 0.114]))
    assert gray.shape == (2, 1, 1, 1) and gray.flatten().tolist() == expected.tolist()
    assert convert_channels(gray, 3).shape == (2, 3, 1, 1)
    # a manifest maps another set's files onto the run's class names
    files = sorted(Path(home).glob("lesion/*.png"))[:3] + sorted(Path(home).glob("normal/*.png"))[:3]
    rows = ["path,label"] + [f"{f},{'lesion' if f.parent.name == 'lesion' else 'normal'}" for f in files]
    manifest = tmp_path / "mapped.csv"
    manifest.write_text("\n".join(rows) + "\n")
    ext = load_external(DataConfig(name="x", image_size=32, root="/"), str(manifest), ["lesion", "normal"], 1)
    assert ext.name == "mapped" and len(ext.images) == 6 and ext.notes == []


def test_segmentation_run_reports_external_dice(tmp_path):
    from test_segmentation import make_seg_folder

    make_seg_folder(tmp_path / "kvasir_like", n=16, size=32)
    make_seg_folder(tmp_path / "cvc_like", n=8, size=40)
    cfg = RunConfig(data=DataConfig(name=str(tmp_path / "kvasir_like"), task="segmentation", image_size=32,
                                    audit="off"),
                    train=TrainConfig(steps=2, batch_size=8, seed=0), backbone="tiny_cnn", pretrained=False,
                    method="lora", n_boot=20, external_test=[str(tmp_path / "cvc_like")])
    out = tmp_path / "run"
    execute(cfg, out_dir=out)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["external"]["cvc_like"]["dice"]) >= {"value", "low", "high"}
    assert saved["external"]["cvc_like"]["n_images"] == 8


def test_sweep_evaluates_finals_only_and_reports_the_drop(home, away, tmp_path):
    from medpeft.bench.grid import Experiment
    from medpeft.bench.report import build_report

    from test_benchmark import run_local, store_rows

    exp = Experiment.from_mapping(dict(data=[str(home)], backbones=["tiny_cnn"], methods=["full", "lora"],
                                       fractions=[1.0], seeds=2, image_size=32, hpo={"trials": 1},
                                       train={"epochs": 1, "batch_size": 8}, n_boot=20,
                                       external_test=[str(away)])).validate()
    summary = run_local(exp, tmp_path / "sweep", report=False)
    assert summary["store"]["failed"] == 0
    rows = store_rows(tmp_path / "sweep")
    for row in rows:
        has = "external" in ((row.get("result") or {}).get("metrics") or {})
        assert has == (row["kind"] == "final"), row["kind"]
        assert bool(row["config"].get("external_test")) == (row["kind"] == "final")
    report = build_report(tmp_path / "sweep")
    text = open(report["markdown"]).read()
    assert "## Shift: in-domain vs external test sets" in text
    finals = [r for r in rows if r["kind"] == "final" and r["method"] == "lora"]
    home_mean = np.mean([r["result"]["metrics"]["test"]["auroc"]["value"] for r in finals])
    away_vals = [r["result"]["metrics"]["external"]["hospital_b"]["auroc"]["value"] for r in finals]
    line = next(line for line in text.splitlines() if "| lora | hospital_b |" in line)
    assert f"| {home_mean:.4f} | {np.mean(away_vals):.4f} | {np.mean(away_vals) - home_mean:+.4f} [" in line
    csv = (tmp_path / "sweep" / "report" / "runs.csv").read_text().splitlines()[0]
    assert "external_hospital_b_auroc" in csv


# ---------------------------------------------------------------------- style alignment


def test_histogram_matching_gives_the_target_the_source_histogram():
    from medpeft.align import SourceStyle, match_histograms

    rng = np.random.default_rng(0)
    source = torch.from_numpy(rng.integers(100, 200, (6, 1, 32, 32)).astype(np.uint8))  # levels 100..199
    target = torch.from_numpy(rng.integers(0, 50, (2, 1, 32, 32)).astype(np.uint8))  # a darker scanner: 0..49
    style = SourceStyle.from_images(source)
    matched = match_histograms(target, style)
    for image in matched:
        cdf = np.cumsum(np.bincount(image.numpy().ravel(), minlength=256)) / image.numel()
        assert np.abs(cdf - style.cdf[0]).max() < 0.03  # the source CDF, up to one grey level's share
        assert 98 <= int(image.min()) and int(image.max()) <= 200
    # order is kept: a brighter target pixel never maps below a darker one
    flat_t, flat_m = target[0, 0].flatten().numpy(), matched[0, 0].flatten().numpy()
    order = np.argsort(flat_t, kind="stable")
    assert np.all(np.diff(flat_m[order].astype(int)) >= 0)


def test_fda_swaps_the_low_frequency_amplitude_and_keeps_the_phase():
    from medpeft.align import SourceStyle, fda

    rng = np.random.default_rng(1)
    source = torch.from_numpy(rng.integers(150, 220, (4, 1, 32, 32)).astype(np.uint8))
    target = torch.from_numpy(rng.integers(20, 90, (2, 1, 32, 32)).astype(np.uint8))
    style = SourceStyle.from_images(source)
    out = fda(target, style, beta=0.05)
    # the DC term (mean brightness) now is the source's; high frequencies (the content) are the target's
    assert abs(out.float().mean() - source.float().mean()) < 3
    high = lambda x: x.float() - torch.nn.functional.avg_pool2d(x.float(), 5, 1, 2)  # noqa: E731
    assert torch.corrcoef(torch.stack([high(out).flatten(), high(target).flatten()]))[0, 1] > 0.8


def test_aligned_external_evaluations_sit_beside_the_raw_one(home, away):
    metrics = execute(RunConfig.from_dict({**config(home, [away]).to_dict(), "align": ["histogram", "fda"]}),
                      save=False)
    assert set(metrics["external"]) == {"hospital_b", "hospital_b+histogram", "hospital_b+fda"}
    assert metrics["external"]["hospital_b+fda"]["aligned"] == "fda"
    with pytest.raises(ConfigError, match="give --external-test too"):
        RunConfig(align=["histogram"])
    with pytest.raises(ConfigError, match="align 'cyclegan' is not one of histogram, fda"):
        RunConfig(align=["cyclegan"], external_test=["x"])


def test_run_summary_prints_each_external_set_beside_the_home_test(home, away, monkeypatch):
    from medpeft.report_console import console, print_run_summary

    metrics = execute(RunConfig.from_dict({**config(home, [away]).to_dict(), "align": ["histogram"]}),
                      save=False)
    monkeypatch.setattr(console, "width", 250)  # one line per row: no wrapped cells
    with console.capture() as captured:
        print_run_summary(metrics)
    text = captured.get()
    assert "hospital_b (95% CI)" in text and "hospital_b+histogram (95% CI)" in text
    auroc = metrics["external"]["hospital_b+histogram"]["auroc"]
    row = next(line for line in text.splitlines() if line.strip("│ ").startswith("auroc"))
    assert row.count("[") == 4  # validation, test and the two external columns
    assert row.rstrip(" │").endswith(f"{auroc['value']:.4f} [{auroc['low']:.4f}, {auroc['high']:.4f}]")


# ---------------------------------------------------------------------- DANN


def test_gradient_reversal_flips_the_gradient_exactly():
    from medpeft.adapt import grad_reverse, reversal_coefficient

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, dtype=torch.float64)
    (grad_reverse(x, 0.7) * weights).sum().backward()
    assert torch.equal(x.grad, -0.7 * weights)  # forward identity, backward -coeff x the gradient
    assert torch.equal(grad_reverse(x, 0.7), x)
    # the autograd Jacobian is -coeff times the forward's (numerical) Jacobian, the identity
    jacobian = torch.autograd.functional.jacobian(lambda t: grad_reverse(t, 0.7), x.detach())
    assert torch.equal(jacobian, -0.7 * torch.eye(12, dtype=torch.float64).view(4, 3, 4, 3))
    assert reversal_coefficient(0.0) == 0.0 and reversal_coefficient(1.0) == pytest.approx(0.99991, abs=1e-5)


def test_dann_run_adapts_the_backbone_and_leaves_no_hook(home, away, tmp_path):
    cfg = RunConfig.from_dict({**config(home, [away]).to_dict(),
                               "train": {**config(home, []).to_dict()["train"], "adapt": "dann",
                                         "target_unlabelled": str(away)}})
    out = tmp_path / "run"
    metrics = execute(cfg, out_dir=out)
    assert metrics["adapt"] == {"method": "dann", "target": "hospital_b", "n_target_images": 24, "weight": 1.0}
    history = (out / "history.csv").read_text().splitlines()
    assert "domain_loss" in history[0]
    execute(config(home, [away]), out_dir=tmp_path / "plain")
    adapted = (out / "test_predictions.csv").read_text()
    assert adapted != (tmp_path / "plain" / "test_predictions.csv").read_text()  # the adaptation changed the model
    from medpeft.run import load_run

    loaded = load_run(out)
    hooks = [m for m in loaded.model.modules() if m._forward_hooks]
    assert not hooks  # the domain classifier's feature hook is gone: the saved model merges and exports
    saved = (out / "config.yaml").read_text()
    assert "target_unlabelled" in saved and str(tmp_path) not in saved  # no absolute path recorded


def test_dann_inputs_are_checked_before_training(home, tmp_path):
    with pytest.raises(ConfigError, match="adapt dann needs target_unlabelled"):
        TrainConfig(adapt="dann")
    (tmp_path / "empty").mkdir()
    cfg = config(home, [])
    cfg.train = TrainConfig(epochs=1, adapt="dann", target_unlabelled=str(tmp_path / "empty"))
    from medpeft.errors import DataError

    with pytest.raises(DataError, match="holds no images"):
        execute(cfg, save=False)
