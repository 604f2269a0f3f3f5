"""``medpeft export RUN model.onnx``: merged (LoRA) and unmerged (adapter) models, the preprocessing
metadata, onnxruntime parity < 1e-4 checked by the command itself, a dynamic batch axis, and an
output location that is checked first and never overwritten without --overwrite.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from medpeft.cli import main
from medpeft.data.base import DataConfig
from medpeft.run import RunConfig, execute, load_run
from medpeft.train import TrainConfig
from toydata import make_toy

ort = pytest.importorskip("onnxruntime")

from medpeft.onnx_export import read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("onnx") / "toy", per_class=24, size=32)


def train_run(toy, out, backbone, method, task="classification", **train):
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off", task=task),
                    train=TrainConfig(**{"epochs": 1, "batch_size": 16, "seed": 0, **train}), backbone=backbone,
                    method=method, n_boot=10)
    execute(cfg, out_dir=out)
    return out


@pytest.fixture(scope="module")
def lora_run(toy, tmp_path_factory):
    return train_run(toy, tmp_path_factory.mktemp("r") / "lora", "tiny_cnn", "lora")


def max_diff(output: str) -> float:
    found = re.search(r"max abs diff of the logits ([0-9.e+-]+)", output)
    assert found, output
    return float(found.group(1))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_run_exports_merged_with_metadata_and_parity(lora_run, toy, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    # config.yaml records the data folder relative to a root it does not record: --data-root gives it
    assert main(["export", str(lora_run), str(target), "--data-root", str(toy.parent)]) == 0
    out = capsys.readouterr().out
    assert "merged lora into the backbone weights" in out and "test image(s) of toy" in out
    assert max_diff(out) < 1e-4 and target.is_file()
    meta = read_metadata(target)
    loaded = load_run(lora_run)
    assert meta["merged"] == "true" and meta["task"] == "binary" and meta["backbone"] == "tiny_cnn"
    assert int(meta["image_size"]) == 32 and json.loads(meta["class_names"]) == loaded.class_names
    assert json.loads(meta["mean"]) == pytest.approx(list(loaded.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(loaded.std))
    assert meta["medpeft_version"] and "positive_class" in meta and "(pixel / 255 - mean) / std" in meta["input"]
    # any batch size (dynamic axis), same logits as the run's own (unmerged) model
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            expected = loaded.model(x).numpy()
        assert got.shape == (n, 2) and np.abs(got - expected).max() < 1e-4


def test_adapter_run_exports_unmerged_and_says_so(toy, tmp_path, capsys):
    run = train_run(toy, tmp_path / "adapter", "tiny_vit", "adapter")
    target = tmp_path / "adapter.onnx"
    assert main(["export", str(run), str(target)]) == 0
    out = capsys.readouterr().out
    assert "exported unmerged" in out and "'adapter' cannot be merged" in out
    assert max_diff(out) < 1e-4 and read_metadata(target)["merged"] == "false"


def test_segmentation_run_exports_with_a_fixed_size_input(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "discs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:32, :32]
    for i in range(16):
        cy, cx = rng.integers(10, 22, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        Image.fromarray(np.clip(rng.normal(90, 20, (32, 32)) + 110 * disc, 0, 255).astype(np.uint8)).save(
            root / "images" / f"{i:03d}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"{i:03d}.png")
    cfg = RunConfig(data=DataConfig(name=str(root), task="segmentation", image_size=32, audit="off"),
                    train=TrainConfig(steps=2, batch_size=8), backbone="tiny_cnn", method="lora", n_boot=10)
    execute(cfg, out_dir=tmp_path / "seg")
    target = tmp_path / "seg.onnx"
    assert main(["export", str(tmp_path / "seg"), str(target), "--check-images", "3", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert max_diff(out) < 1e-4 and "test image(s) of discs" in out
    assert read_metadata(target)["task"] == "segmentation"
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert got.shape == (2, 2, 32, 32)


def test_never_overwrites_the_adapter_or_an_existing_file(lora_run, tmp_path, capsys):
    adapter = lora_run / "adapter.safetensors"
    before = sha(adapter)
    for argv in (["export", str(lora_run), str(adapter)],
                 ["export", str(lora_run), str(adapter), "--overwrite"],
                 ["export", str(adapter), str(adapter), "--overwrite"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "trained adapter" in err and "Traceback" not in err
        assert sha(adapter) == before  # byte-identical
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    code = main(["export", str(lora_run), str(existing)])
    assert code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert main(["export", str(lora_run), str(existing), "--overwrite"]) == 0
    assert read_metadata(existing)["task"] == "binary"
    merged = tmp_path / "merged.safetensors"
    merged.write_bytes(b"keep me too")
    assert main(["export", str(lora_run), str(merged)]) == 2 and merged.read_bytes() == b"keep me too"
    capsys.readouterr()


@pytest.mark.parametrize("name, message", [
    ("missing/model.onnx", "does not exist"),
    ("model.pt", "expected a .onnx"),
])
def test_bad_output_location_is_a_clear_error_before_any_work(lora_run, tmp_path, capsys, monkeypatch, name, message):
    import medpeft.run

    def no_loading(*args, **kwargs):
        raise AssertionError("the run was loaded before the output location was checked")

    monkeypatch.setattr(medpeft.run, "load_run", no_loading)
    code = main(["export", str(lora_run), str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()


def test_random_inputs_when_the_data_is_gone_and_failed_parity_writes_nothing(lora_run, tmp_path, capsys,
                                                                               monkeypatch):
    lone = tmp_path / "lone.safetensors"
    shutil.copy(lora_run / "adapter.safetensors", lone)  # no run folder, no data: random inputs, and it says so
    assert main(["export", str(lone), str(tmp_path / "a.onnx"), "--check-images", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 random input(s)" in out and max_diff(out) < 1e-4
    import medpeft.onnx_export

    monkeypatch.setattr(medpeft.onnx_export, "parity", lambda *a: 0.5)
    assert main(["export", str(lora_run), str(tmp_path / "b.onnx")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and not (tmp_path / "b.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]  # no temporary left behind


def test_box_prompted_runs_are_refused(lora_run, tmp_path, capsys, monkeypatch):
    import medpeft.run

    real = medpeft.run.load_run

    def prompted(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.metadata = {**loaded.metadata, "prompt": "box"}
        return loaded

    monkeypatch.setattr(medpeft.run, "load_run", prompted)
    code = main(["export", str(lora_run), str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "box prompts" in err and not (tmp_path / "m.onnx").exists()
