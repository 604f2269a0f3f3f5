"""The corruption suites (issue 15, part 2): deterministic per seed, severity-monotone, masks and
boxes untouched, definitions checked against hand computations, and runs / sweeps / reports that
evaluate the test split under them after the clean test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medpeft.corruptions import SEVERITIES, SUITES, corrupt, get_suite
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.run import RunConfig, execute
from medpeft.train import TrainConfig
from toydata import make_toy


def smooth_images(channels: int, size: int = 96) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    base = 100 + 60 * torch.sin(xx / 7) * torch.cos(yy / 9) + 50 * (((yy - 20) ** 2 + (xx - 18) ** 2) < 90)
    image = base.clamp(0, 255).to(torch.uint8)[None, None]
    return torch.cat([image, image.flip(-1)]).repeat(1, channels, 1, 1)


CASES = [(suite, name) for suite, corruptions in SUITES.items() for name in corruptions]


@pytest.mark.parametrize("suite, name", CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_each_corruption_is_deterministic_and_grows_with_severity(suite, name):
    for channels in (1, 3):
        images = smooth_images(channels)
        out = [corrupt(images, name, s, suite, seed=0) for s in SEVERITIES]
        assert all(o.dtype == torch.uint8 and o.shape == images.shape for o in out)
        change = [(o.float() - images.float()).abs().mean().item() for o in out]
        assert all(a <= b + 1e-6 for a, b in zip(change, change[1:])), change  # severity-monotone
        assert change[-1] > change[0] and change[-1] > 0.3
        assert torch.equal(corrupt(images, name, 3, suite, seed=0), out[2])  # same seed, same images
    if name in ("gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise"):
        assert not torch.equal(corrupt(images, name, 3, suite, seed=1), out[2])  # the seed draws the noise


def test_definitions_match_hand_computations():
    images = smooth_images(1, size=48)
    x = images.float() / 255
    expected = ((x * 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # brightness down, factor 0.5 (xray sev 5)
    assert torch.equal(corrupt(images, "brightness_down", 5, "xray"), expected)
    gamma = ((x ** 1.6) * 255).round().to(torch.uint8)  # gamma_corr_up sev 5: x ** 1.6
    assert torch.equal(corrupt(images, "gamma_corr_up", 5, "xray"), gamma)
    mean = (x.mean(dim=(1, 2, 3), keepdim=True) * 255).round() / 255  # contrast: around the mean gray level
    contrast = ((mean + 0.4 * (x - mean)).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(corrupt(images, "contrast_down", 5, "xray"), contrast)
    from PIL import Image

    pil = Image.fromarray(images[0, 0].numpy())  # pixelate: PIL box filter down to 10 % and back (ultrasound 5)
    reference = np.asarray(pil.resize((4, 4), Image.BOX).resize((48, 48), Image.BOX))
    assert np.array_equal(corrupt(images, "pixelate", 5, "ultrasound")[0, 0].numpy(), reference)
    impulse = corrupt(images, "impulse_noise", 5, "ct_mr")  # 8 % of the values set to 0 or 255
    changed = (impulse != images)
    assert 0.05 < changed.float().mean().item() < 0.11
    assert set(impulse[changed].unique().tolist()) <= {0, 255}


def test_bad_names_and_severities_are_named():
    images = smooth_images(1, size=48)
    with pytest.raises(ConfigError, match="corruption suite 'mri' is not one of ultrasound, xray"):
        get_suite("mri")
    with pytest.raises(ConfigError, match="'gamma_corr_up' is not in the ultrasound suite"):
        corrupt(images, "gamma_corr_up", 1, "ultrasound")
    with pytest.raises(ConfigError, match="severity 6"):
        corrupt(images, "jpeg_compression", 6, "xray")
    with pytest.raises(ConfigError, match="corruption suite"):
        RunConfig(corruptions="mri")


def test_run_reports_every_corruption_and_severity_after_the_clean_test(tmp_path):
    toy = make_toy(tmp_path / "toy", per_class=16, size=32)
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off"),
                    train=TrainConfig(epochs=1, batch_size=8, seed=0), backbone="tiny_cnn", pretrained=False,
                    method="lora", n_boot=20, corruptions="ultrasound")
    metrics = execute(cfg, save=False)
    entry = metrics["corruptions"]
    assert entry["suite"] == "ultrasound" and entry["metric"] == "auroc"
    assert set(entry["results"]) == set(SUITES["ultrasound"])
    assert all(set(v) == {"1", "2", "3", "4", "5"} for v in entry["results"].values())
    assert entry["clean"] == metrics["test"]["auroc"]["value"]
    values = [entry["results"][n][str(s)]["auroc"]["value"] for n in entry["results"] for s in SEVERITIES]
    assert entry["mean"] == pytest.approx(np.mean(values))
    assert entry["relative"] == pytest.approx(entry["mean"] / entry["clean"])
    clean = execute(RunConfig.from_dict({**cfg.to_dict(), "corruptions": None}), save=False)
    assert clean["test"]["auroc"] == metrics["test"]["auroc"]  # the clean test is unchanged by the suite

    from medpeft.report_console import console, print_run_summary

    with console.capture() as captured:
        print_run_summary(metrics)
    text = " ".join(captured.get().split())  # rich wraps long lines at spaces
    assert f"relative robustness {entry['relative']:.4f}" in text
    worst = min(entry["per_corruption"], key=entry["per_corruption"].get)
    assert f"worst: {worst} {entry['per_corruption'][worst]:.4f}" in text


def test_sweep_report_has_a_robustness_table_and_plot(tmp_path):
    from medpeft.bench.grid import Experiment
    from medpeft.bench.report import build_report

    from test_benchmark import run_local, store_rows

    toy = make_toy(tmp_path / "toy", per_class=16, size=32)
    exp = Experiment.from_mapping(dict(data=[str(toy)], backbones=["tiny_cnn"], methods=["full", "lora"],
                                       fractions=[1.0], seeds=2, image_size=32, hpo={"trials": 1},
                                       train={"epochs": 1, "batch_size": 8}, n_boot=20,
                                       corruptions="xray")).validate()
    run_local(exp, tmp_path / "sweep", report=False)
    rows = store_rows(tmp_path / "sweep")
    assert all(bool(r["config"].get("corruptions")) == (r["kind"] == "final") for r in rows)
    report = build_report(tmp_path / "sweep")
    text = open(report["markdown"]).read()
    assert "## Robustness: the test split under corruptions" in text and "xray suite" in text
    assert any(p.endswith("_robustness.png") for p in report["plots"])
    finals = [r["result"]["metrics"]["corruptions"]["relative"] for r in rows
              if r["kind"] == "final" and r["method"] == "lora"]
    line = next(line for line in text.splitlines() if line.startswith("| ") and "| lora | 2 |" in line)
    assert f"| {np.mean(finals):.3f} [" in line
    # every corruption x severity: the mean over seeds of each run's stored value, with its CI
    import pandas as pd

    table = pd.read_csv(tmp_path / "sweep" / "report" / "corruptions.csv")
    lora = [r["result"]["metrics"] for r in rows if r["kind"] == "final" and r["method"] == "lora"]
    assert len(table) == 2 * len(SUITES["xray"]) * len(SEVERITIES)  # two methods
    for name in SUITES["xray"]:
        for severity in SEVERITIES:
            values = [m["corruptions"]["results"][name][str(severity)]["auroc"]["value"] for m in lora]
            row = table[(table.method == "lora") & (table.corruption == name) & (table.severity == severity)].iloc[0]
            assert row["seeds"] == 2 and row["mean"] == pytest.approx(np.mean(values))
            assert row["relative"] == pytest.approx(np.mean([v / m["test"]["auroc"]["value"]
                                                             for v, m in zip(values, lora)]))
            assert row["low"] <= row["mean"] <= row["high"]
    header = next(line for line in text.splitlines() if line.startswith("| method |") and "severity 5" in line)
    assert all(name in header for name in SUITES["xray"])
    line = next(line for line in text.splitlines() if line.startswith("| lora |") and line.count("|") ==
                header.count("|"))
    first = header.split("|")[2].strip()  # the first corruption column
    expected = np.mean([m["corruptions"]["results"][first][str(s)]["auroc"]["value"] for m in lora for s in SEVERITIES])
    assert line.split("|")[2].strip() == f"{expected:.4f}"
