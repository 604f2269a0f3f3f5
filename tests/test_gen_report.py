"""The synthetic-data study report (medpeft generator report): generator rows aggregate over seeds,
downstream runs pair with the real-only reference by seed, and the statistics are the protocol's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from medpeft import gen_report, stats
from medpeft.errors import ConfigError


def _generator(folder, method, fraction, seed, fd):
    folder.mkdir(parents=True)
    (folder / "generator.json").write_text(json.dumps({"method": method, "fraction": fraction, "seed": seed,
                                                       "trainable": 100, "train_seconds": 2.0}))
    (folder / "eval.json").write_text(json.dumps({"feature_space": "dinov2_vits14", "fd": fd, "kid": 0.01,
                                                  "precision": 0.5, "recall": 0.4,
                                                  "memorisation": {"flagged_fraction": 0.0}}))
    (folder / "synth").mkdir()
    (folder / "synth" / "manifest.csv").write_text("path,label\n")
    return folder / "synth" / "manifest.csv"


def _run(folder, seed, auroc, fraction=0.1, manifest=None):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"seed": seed, "test": {"auroc": {"value": auroc}}}))
    data = {"name": "breastmnist", "fraction": fraction, "synthetic": str(manifest) if manifest else None}
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": data}))


@pytest.fixture
def study(tmp_path):
    real = [0.70, 0.72, 0.68, 0.75]
    lora = [0.74, 0.77, 0.71, 0.80]  # about +0.04 every seed
    full = [0.71, 0.71, 0.69, 0.74]  # about equal
    for seed in range(4):
        m_lora = _generator(tmp_path / f"lora_s{seed}", "lora", 0.1, seed, fd=100.0 + seed)
        m_full = _generator(tmp_path / f"full_s{seed}", "full", 0.1, seed, fd=200.0)
        _run(tmp_path / f"lora_s{seed}" / "downstream", seed, lora[seed], manifest=m_lora)
        _run(tmp_path / f"full_s{seed}" / "downstream", seed, full[seed], manifest=m_full)
        _run(tmp_path / f"real_s{seed}", seed, real[seed])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "generator.json").write_text(json.dumps({"method": "pretrain"}))  # not a row
    return tmp_path, real, lora, full


def test_generator_rows_aggregate_over_seeds(study):
    root, *_ = study
    generators, _ = gen_report.collect(root)
    rows = {r["generator"]: r for r in gen_report.generator_table(generators)}
    assert set(rows) == {"lora @ 10 %", "full @ 10 %"}  # the pre-trained source is not an adaptation
    assert rows["lora @ 10 %"]["seeds"] == 4
    assert rows["lora @ 10 %"]["fd"] == f"{np.mean([100, 101, 102, 103]):.4g} ± {np.std([100, 101, 102, 103], ddof=1):.2g}"


def test_downstream_pairs_on_seed_with_the_protocol_statistics(study):
    root, real, lora, full = study
    _, runs = gen_report.collect(root)
    rows = {r["group"]: r for r in gen_report.downstream_table(runs, "auroc", margin=0.02)}
    assert rows["real only"]["verdict"] == "reference" and rows["real only"]["delta"] is None
    d = np.subtract(lora, real)
    assert rows["lora @ 10 %"]["delta"] == pytest.approx(d.mean())
    p_lora, p_full = stats.paired_test(lora, real)["t_pvalue"], stats.paired_test(full, real)["t_pvalue"]
    assert [rows["lora @ 10 %"]["p_holm"], rows["full @ 10 %"]["p_holm"]] == pytest.approx(
        stats.holm([p_lora, p_full]))
    assert rows["lora @ 10 %"]["verdict"] == "better"
    assert rows["full @ 10 %"]["tost_p"] == pytest.approx(stats.tost_paired(full, real, 0.02)["p"])
    report = gen_report.write_report(root)
    text = report.read_text()
    assert "lora @ 10 %" in text and "**better**" in text and "real only" in text
    assert (root / "report" / "downstream.csv").read_text().count("\n") == 4  # header + 3 groups


def test_bad_input_names_the_problem(study, tmp_path_factory):
    root, *_ = study
    _run(root / "real_again", 0, 0.5)  # a second real-only run with seed 0 at 10 %
    with pytest.raises(ConfigError, match="two runs of real only at label fraction 0.1 with seed 0"):
        gen_report.write_report(root)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ConfigError, match="no generator folders"):
        gen_report.write_report(empty)
    _, runs = gen_report.collect(study[0])
    with pytest.raises(ConfigError, match="has no test 'dice'"):
        gen_report.downstream_table(runs, "dice")


def test_cli_writes_the_report(study):
    from medpeft.cli import main

    root, *_ = study
    assert main(["generator", "report", str(root), "--margin", "0.05"]) == 0
    assert "TOST within ±0.05" in (root / "report" / "report.md").read_text()
