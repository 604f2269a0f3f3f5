"""Continual fine-tuning (issue 16, part 3): the transfer summaries against their definitions,
site- and task-incremental sequences, replay, the per-task heads, and errors named."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medpeft.cli import main
from medpeft.continual import run_continual, summarize
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.run import RunConfig
from medpeft.train import TrainConfig
from toydata import make_toy


def test_transfer_summaries_follow_their_definitions():
    site = [[0.5, 0.4, 0.6],   # before training
            [0.9, 0.6, 0.6],   # after task 1
            [0.8, 0.9, 0.7],   # after task 2
            [0.7, 0.8, 0.95]]  # after task 3
    s = summarize(site, "site")
    assert s["average"] == pytest.approx((0.7 + 0.8 + 0.95) / 3)
    assert s["bwt"] == pytest.approx(((0.7 - 0.9) + (0.8 - 0.9)) / 2)
    assert s["fwt"] == pytest.approx(((0.6 - 0.4) + (0.7 - 0.6)) / 2)
    task = [[0.9, None], [0.85, 0.8]]
    t = summarize(task, "task")
    assert t["bwt"] == pytest.approx(-0.05) and t["fwt"] is None and t["average"] == pytest.approx(0.825)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    return make_toy(root / "site_a", per_class=16, size=32), make_toy(root / "site_b", per_class=12, size=32)


def three_classes(root):
    rng = np.random.default_rng(3)
    for k, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            img = rng.normal(80 + 40 * k, 20, (32, 32))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def config() -> RunConfig:
    return RunConfig(data=DataConfig(name="x", image_size=32, audit="off"),
                     train=TrainConfig(epochs=1, batch_size=8, seed=0), backbone="tiny_cnn", pretrained=False,
                     method="lora", n_boot=20)


def test_site_incremental_sequence_with_replay(sites, tmp_path):
    record = run_continual(config(), [str(s) for s in sites], mode="site", replay=4, out=tmp_path / "out")
    assert len(record["matrix"]) == 3 and all(len(row) == 2 for row in record["matrix"])
    assert record["matrix_rows"][0] == "before training"
    assert record["bwt"] == pytest.approx(record["matrix"][2][0] - record["matrix"][1][0])
    second = record["steps"][1]
    from medpeft.data import load_data

    plain_b = load_data(DataConfig(name=str(sites[1]), image_size=32, audit="off"))
    assert second["n_train"] == len(plain_b.train) + 4  # 4 images of task 1 rehearsed
    saved = json.loads((tmp_path / "out" / "continual.json").read_text())
    assert saved["matrix"] == record["matrix"] and str(tmp_path) not in json.dumps(saved["sequence"])


def test_task_incremental_keeps_a_head_per_task(sites, tmp_path):
    other = three_classes(tmp_path / "three")
    record = run_continual(config(), [str(sites[0]), str(other)], mode="task")
    assert record["matrix"][0][1] is None and record["matrix"][1][1] is not None  # no head before its task
    assert record["fwt"] is None and record["bwt"] == pytest.approx(record["matrix"][1][0] - record["matrix"][0][0])


def test_bad_sequences_are_named(sites, tmp_path):
    other = three_classes(tmp_path / "three")
    with pytest.raises(ConfigError, match="site-incremental: .* has classes"):
        run_continual(config(), [str(sites[0]), str(other)], mode="site")
    with pytest.raises(ConfigError, match="at least two data sets"):
        run_continual(config(), [str(sites[0])])
    with pytest.raises(ConfigError, match="--replay applies to site-incremental"):
        run_continual(config(), [str(sites[0]), str(other)], mode="task", replay=3)


def test_continual_command_writes_the_matrix(sites, tmp_path, capsys):
    code = main(["continual", "--sequence", f"{sites[0]},{sites[1]}", "--backbone", "tiny_cnn", "--no-pretrained",
                 "--epochs", "1", "--image-size", "32", "--audit", "off", "--n-boot", "20", "--quiet",
                 "--out", str(tmp_path / "cl")])
    assert code == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    saved = json.loads((tmp_path / "cl" / "continual.json").read_text())
    assert saved["mode"] == "site" and saved["method"] == "lora" and len(saved["matrix"]) == 3
    assert printed["matrix"] == saved["matrix"] and printed["bwt"] == saved["bwt"]
