"""Issue 13, part 7 (hardening): bad or unusual input that used to end in a traceback deep inside
torch, a silent wrong answer or lost data. Each test reproduces one case and checks that it is
now a clear error (naming the file, field or value and what was expected) or correct behaviour.

Everything runs on small synthetic data (tiny_cnn, one epoch) except the memory test, which
audits one synthetic 12000 x 12000 PNG in a child process and bounds its peak memory.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medpeft.cli import main
from medpeft.data import load_data
from medpeft.data.base import DataBundle, DataConfig, ImageSet
from medpeft.errors import ConfigError, DataError
from medpeft.run import RunConfig, execute, load_run
from medpeft.train import TrainConfig

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------- fixtures


def make_folder(root: Path, per_class: int = 12, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(90 + 60 * c, 25, (size, size))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{name}{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("hospital-x") / "toy")


def toy_config(toy: Path, **kw) -> RunConfig:
    return RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off"),
                     train=TrainConfig(epochs=1, batch_size=8, threads=1), backbone="tiny_cnn", method="lora",
                     n_boot=20, **kw)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A tiny_cnn backbone checkpoint unlike the default (random) one."""
    from safetensors.torch import save_file

    from medpeft.backbones import create_backbone

    model, _ = create_backbone("tiny_cnn", 2, 32, pretrained=False)
    gen = torch.Generator().manual_seed(5)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=gen) if v.dim() > 1 else v  # conv weights only
             for k, v in model.state_dict().items() if not k.startswith("classifier")}
    path = tmp_path_factory.mktemp("weights") / "site-weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def weights_run(toy, weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "with-weights"
    metrics = execute(toy_config(toy, weights=str(weights_file)), out_dir=out)
    return out, metrics


@pytest.fixture(scope="module")
def plain_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "plain"
    execute(toy_config(toy), out_dir=out)
    return out


def run_argv(toy: Path, out: Path, *extra) -> list[str]:
    return ["run", "--data", str(toy), "--backbone", "tiny_cnn", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--n-boot", "20", "--audit", "off", "--threads", "1", "--quiet",
            "--out", str(out), *extra]


def cli_error(argv, capsys) -> str:
    """Run the CLI, expect exit code 2 and one clean error line; return stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    return err


# ---------------------------------------------------------------------- predict / export: the weights trained on


def test_adapter_records_weights_and_load_run_uses_or_refuses(weights_run, weights_file, plain_run, tmp_path):
    out, _ = weights_run
    from safetensors import safe_open

    with safe_open(str(out / "adapter.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    from medpeft.backbones.offline import sha256_file

    assert meta["weights_file"] == "site-weights.safetensors" and meta["weights_sha256"] == sha256_file(weights_file)
    # without the file: refused, naming the file needed (it used to load the default backbone silently)
    with pytest.raises(ConfigError, match="site-weights.safetensors"):
        load_run(out)
    # another file: refused by its checksum
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in load_file(str(weights_file)).items()},
              str(other))
    with pytest.raises(ConfigError, match="sha256"):
        load_run(out, weights=str(other))
    # the right file loads (that it predicts as in training: the next test)
    assert load_run(out, weights=str(weights_file)).metadata["pretrained"] == "true"
    # a run trained without a weights file refuses one
    with pytest.raises(ConfigError, match="drop --weights"):
        load_run(plain_run, weights=str(weights_file))


def test_predict_with_the_trained_weights_reproduces_the_test_predictions(weights_run, weights_file, toy, capsys):
    out, _ = weights_run
    rows = list(csv.DictReader(open(out / "test_predictions.csv")))
    files = [str(toy / r["id"]) for r in rows]
    err = cli_error(["predict", str(out), *files], capsys)
    assert "site-weights.safetensors" in err and "--weights" in err
    assert main(["predict", str(out), *files, "--weights", str(weights_file), "--uncalibrated"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    names = [k for k in rows[0] if k.startswith("p_")]
    np.testing.assert_allclose([[p[k] for k in names] for p in printed],
                               [[float(r[k]) for k in names] for r in rows], atol=1e-5)


# ---------------------------------------------------------------------- run --out


def test_run_out_into_a_run_folder_or_a_user_folder_is_refused_before_training(plain_run, toy, tmp_path, capsys,
                                                                              monkeypatch):
    before = {p.name: p.read_bytes() for p in plain_run.iterdir() if p.is_file()}
    user = tmp_path / "my-notes"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    a_file = tmp_path / "report.pdf"
    a_file.write_text("not a folder")
    import medpeft.run as run_module

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the output location was checked")

    monkeypatch.setattr(run_module, "execute", no_training)
    assert "--overwrite" in cli_error(run_argv(toy, plain_run), capsys)
    assert "not empty" in cli_error(run_argv(toy, user), capsys)
    assert "is a file" in cli_error(run_argv(toy, a_file), capsys)
    assert "is a file" in cli_error(run_argv(toy, a_file / "run"), capsys)
    assert {p.name: p.read_bytes() for p in plain_run.iterdir() if p.is_file()} == before
    assert (user / "notes.txt").read_text() == "keep me" and a_file.read_text() == "not a folder"
    monkeypatch.undo()
    # --overwrite replaces the run files; an empty or new folder needs nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(run_argv(toy, empty)) == 0
    assert main(run_argv(toy, empty, "--overwrite")) == 0
    assert (empty / "metrics.json").is_file()


def test_a_sweep_can_still_write_into_its_existing_run_folder(toy, tmp_path):
    """The benchmark writes its run folders through execute(out_dir=...): a re-run job (after a
    crash) finds its folder and must still write it."""
    out = tmp_path / "runs" / "job"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")  # left by a killed job
    metrics = execute(toy_config(toy), out_dir=out)
    assert json.loads((out / "metrics.json").read_text())["n_train"] == metrics["n_train"]


# ---------------------------------------------------------------------- labels and splits


def test_manifest_nan_or_empty_label_names_the_rows(toy, tmp_path, capsys):
    rows = [(f"{c}/{c}{i:02d}.png", str(k)) for k, c in enumerate(("benign", "malignant")) for i in range(12)]
    for bad in ("NaN", ""):
        manifest = toy / f"labels-{bad or 'empty'}.csv"
        edited = list(rows)
        edited[3] = (edited[3][0], bad)
        edited[17] = (edited[17][0], bad)
        manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in edited))
        with pytest.raises(DataError, match=r"line 5 .*line 19"):
            load_data(DataConfig(name=str(manifest), image_size=32))  # NaN used to become a third class
        err = cli_error(["audit", str(manifest)], capsys)  # an empty label used to become a class of the audit
        assert "line 5" in err and "line 19" in err


def test_one_class_test_split_warns_naming_the_split_and_class():
    from medpeft.data.splits import check_splits

    def part(labels):
        return ImageSet(torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8), torch.tensor(labels), [str(i) for i in
                                                                                                   range(len(labels))])

    bundle = DataBundle("toy", "binary", ["benign", "malignant"], part([0, 1, 0, 1]), part([0, 1]), part([0, 0, 0]))
    with pytest.warns(UserWarning, match=r"test split of toy \(3 images: benign 3\) has no image of class.*malignant"):
        check_splits(bundle)
    empty = DataBundle("toy", "binary", ["benign", "malignant"], part([0, 1, 0, 1]), part([0, 1]), part([]))
    with pytest.raises(DataError, match="test split of toy is empty"):
        check_splits(empty)


def write_npz(root: Path, labels=None, channels=None, n_test=12) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 12), ("test", n_test)):
        shape = (n, 28, 28) if channels is None else (n, 28, 28, channels)
        arrays[f"{split}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    if labels is not None:
        arrays["train_labels"][:len(labels), 0] = labels
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "breastmnist.npz", **arrays)
    return root


@pytest.mark.parametrize("kind, match", [
    ("labels", r"train_labels holds 2 label\(s\) outside the 2 classes 0..1.*row 0: 7, row 1: -1"),
    ("rgba", r"train_images has 4 channels per pixel"),
    ("empty", r"the test split is empty"),
])
def test_npz_bad_labels_channels_or_empty_split_are_named_errors(kind, match, tmp_path, capsys):
    root = write_npz(tmp_path / kind, labels=[7, -1] if kind == "labels" else None,
                     channels=4 if kind == "rgba" else None, n_test=0 if kind == "empty" else 12)
    with pytest.raises(DataError, match=match):
        load_data(DataConfig(name="breastmnist", root=str(root), image_size=32))
    err = cli_error(["run", "--data", "breastmnist", "--data-root", str(root), "--backbone", "tiny_cnn",
                     "--image-size", "32", "--epochs", "1", "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert "breastmnist.npz" in err


def test_rgba_and_cmyk_image_files_are_read_as_rgb(tmp_path):
    from medpeft.data.io import read_image

    rgba = tmp_path / "a.png"
    Image.new("RGBA", (10, 8), (10, 20, 30, 0)).save(rgba)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (10, 8), (0, 50, 100, 0)).save(cmyk)
    for path in (rgba, cmyk):
        assert read_image(path).shape == (8, 10, 3)


# ---------------------------------------------------------------------- images over the pixel budget


def huge_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height (grayscale) with almost no data: PIL refuses it on
    opening, as it would a real one (a real 20000 x 20000 PNG takes seconds to write)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_named_error_in_run_and_predict(plain_run, toy, tmp_path, capsys):
    from medpeft.data.io import read_image

    bomb = huge_png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DataError, match=r"bomb.png has 400,000,000 pixels, over the pixel budget of 178,956,970"):
        read_image(bomb)
    err = cli_error(["predict", str(plain_run), str(bomb)], capsys)
    assert "bomb.png" in err and "pixel budget" in err
    data = tmp_path / "data"
    make_folder(data, per_class=6)
    huge_png_header(data / "malignant" / "huge.png", 20000, 20000)
    err = cli_error(run_argv(data, tmp_path / "o"), capsys)
    assert "huge.png" in err and "pixel budget" in err


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize("extra, expected", [
    (["--image-size", "100000"], "at most 2048"),
    (["--lr", "-1"], "lr must be a positive learning rate"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--patience", "-1"], "patience must be a whole number >= 1"),
    (["--threads", "0"], "threads must be a whole number >= 1"),
    (["--window", "abc"], "window 'abc'"),
    (["--method", "linear", "--lora-rank", "4"], "--lora-rank is an option of method 'lora'"),
    (["--weight-decay", "-0.1"], "weight_decay must be a number >= 0"),
])
def test_bad_run_options_are_named_errors(extra, expected, toy, tmp_path, capsys, monkeypatch):
    import medpeft.run as run_module

    def no_training(*args, **kwargs):  # every one of these must fail before any training
        raise AssertionError("training started")

    monkeypatch.setattr(run_module, "train_model", no_training)
    assert expected in cli_error(run_argv(toy, tmp_path / "o", *extra), capsys)


def test_methods_num_classes_zero_is_refused(capsys):
    assert "--num-classes 0" in cli_error(["methods", "--num-classes", "0", "--backbone", "tiny_cnn"], capsys)


@pytest.mark.parametrize("text, expected", [
    ("train: {epochs: three}\n", "epochs must be a whole number >= 1 (training epochs), got 'three'"),
    ("train: {epochs: 1.7}\n", "got 1.7"),
    ("train: {epochs: true}\n", "got True"),
    ("train: {patience: -1}\n", "patience"),
    ("- data\n- train\n", "must be a mapping"),
    ("train: [1, 2]\n", "'train' must be a mapping"),
])
def test_bad_yaml_run_config_is_a_named_error(text, expected, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert expected in cli_error(["run", "--config", str(path), "--out", str(tmp_path / "o")], capsys)


@pytest.mark.parametrize("field, value", [("epochs", True), ("epochs", "3"), ("epochs", 2.5), ("batch_size", 0),
                                          ("min_steps", -1), ("steps", 0), ("lr", 0.0), ("head_lr", -1e-3),
                                          ("warmup_epochs", -1.0), ("grad_clip", -1.0), ("max_minutes", 0),
                                          ("amp", "yes"), ("device", "cuda0"), ("seed", 1.5)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_a_gpu_index_the_machine_lacks_is_a_named_error(monkeypatch):
    from medpeft.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"'cuda:3': this machine has 1 CUDA GPU"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_train_config_accepts_what_it_always_accepted():
    for kw in ({}, {"lr": 1e-3, "head_lr": 1e-2}, {"device": "cpu"}, {"device": "cuda:1"}, {"epochs": np.int64(3)},
               {"grad_clip": None}, {"threads": 2}, {"steps": 40, "min_steps": 0}, {"epochs": 2.0}):
        TrainConfig(**kw)


def test_benchmark_dry_run_checks_the_data(tmp_path, capsys):
    err = cli_error(["benchmark", "--data", "breastmnist", "--data-root", str(tmp_path / "nowhere"), "--backbones",
                     "tiny_cnn", "--methods", "linear", "--seeds", "1", "--dry-run"], capsys)
    assert "breastmnist.npz" in err
    empty_class = make_folder(tmp_path / "folder", per_class=2)
    for f in (empty_class / "malignant").iterdir():
        f.unlink()
    err = cli_error(["benchmark", "--data", str(empty_class), "--backbones", "tiny_cnn", "--methods", "linear",
                     "--seeds", "1", "--dry-run"], capsys)
    assert "holds no images" in err
    err = cli_error(["benchmark", "--data", "breastmnist", "--backbones", "tiny_cnn", "--threads", "0",
                     "--dry-run"], capsys)
    assert "--threads 0" in err


# ---------------------------------------------------------------------- sweeps, stores and reports


def sweep_argv(data: Path, out: Path) -> list[str]:
    return ["benchmark", "--data", str(data), "--backbones", "tiny_cnn", "--methods", "linear", "--seeds", "1",
            "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--n-boot", "20", "--threads", "1",
            "--out", str(out), "--quiet"]


def test_a_sweep_whose_jobs_all_failed_exits_nonzero(tmp_path, capsys):
    data = make_folder(tmp_path / "site-data", per_class=6)
    (data / "benign" / "benign03.png").write_bytes(b"not a png")  # every job fails loading it
    code = main(sweep_argv(data, tmp_path / "sweep"))
    out = capsys.readouterr().out
    assert code == 1, out
    assert "1 of the 1 job(s) run this time failed" in out and "benign03.png" in out
    assert str(data) not in out.replace("\n", "")  # the error is quoted as the store keeps it: no absolute path


@pytest.fixture(scope="module")
def sweep(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps") / "sweep"
    assert main(sweep_argv(toy, out)) == 0
    return out


def test_sweep_outputs_hold_no_absolute_data_path(sweep, toy):
    secret = str(toy.parent)  # .../hospital-x0
    assert secret.encode() not in (sweep / "results.db").read_bytes()
    for name in ("runs.csv", "summary.csv", "report.md"):
        text = (sweep / "report" / name).read_text()
        assert secret not in text, name
    written = [p for p in (sweep / "runs").rglob("*") if p.suffix in (".yaml", ".json", ".csv")]
    assert written and not [p.name for p in written if secret in p.read_text()]
    runs = list(csv.DictReader(open(sweep / "report" / "runs.csv")))
    assert runs and all(r["data"].startswith("<redacted>/toy#") for r in runs)
    summary = list(csv.DictReader(open(sweep / "report" / "summary.csv")))
    assert summary and summary[0]["data"] == runs[0]["data"]
    # the cell ids of the rows and of the sweep's meta agree (the report matches them)
    with sqlite3.connect(sweep / "results.db") as conn:
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        cells = {row[0] for row in conn.execute("SELECT cell FROM runs")}
    conn.close()
    assert set(meta["last_sweep"]["chosen"]) == cells and meta["experiment"]["data"] == [runs[0]["data"]]


def test_report_metric_bogus_fails_before_writing_anything(sweep, capsys):
    report = sweep / "report" / "report.md"
    before = report.read_bytes()
    err = cli_error(["report", str(sweep), "--metric", "bogus"], capsys)
    assert "'bogus'" in err and "auroc" in err
    assert report.read_bytes() == before


def test_report_on_a_corrupt_or_foreign_database_is_refused_unchanged(tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.db").write_bytes(os.urandom(4096))
    assert "not a readable SQLite results store" in cli_error(["report", str(corrupt)], capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "results.db") as conn:
        conn.execute("CREATE TABLE patients (id TEXT, name TEXT)")
        conn.execute("INSERT INTO patients VALUES ('1', 'Doe')")
    conn.close()
    before = (foreign / "results.db").read_bytes()
    err = cli_error(["report", str(foreign)], capsys)
    assert "not a medpeft results store" in err and "patients" in err
    assert (foreign / "results.db").read_bytes() == before
    assert sorted(p.name for p in foreign.iterdir()) == ["results.db"]
    from medpeft.bench.store import Store

    with pytest.raises(ConfigError, match="not a medpeft results store"):  # nor does a sweep write into it
        Store(foreign)
    assert (foreign / "results.db").read_bytes() == before


def test_predict_out_into_a_missing_folder_is_a_named_error(plain_run, toy, tmp_path, capsys):
    image = str(next((toy / "benign").iterdir()))
    err = cli_error(["predict", str(plain_run), image, "--out", str(tmp_path / "missing" / "p.csv")], capsys)
    assert "missing" in err and "does not exist" in err


# ---------------------------------------------------------------------- memory


AUDIT_PEAK = """
import sys
sys.path.insert(0, {src!r})
import medpeft.data.near_duplicates as nd
from medpeft.audit import audit_dataset
if {full}:
    nd.LARGE_IMAGE_PIXELS = 10 ** 12  # the old path: every image decoded in full

def status_kb(field):  # this process's own memory (ru_maxrss would carry the parent's peak over fork + exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])

start = status_kb("VmRSS")  # resident now
report = audit_dataset({folder!r})
peak = status_kb("VmHWM")  # the peak resident size of this process
print((peak - start) / 1024, report.sizes["width"]["max"], report.counts["unreadable"])
"""


def audit_peak_mb(folder: Path, full: bool = False) -> tuple[float, int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", AUDIT_PEAK.format(src=str(SRC), folder=str(folder), full=full)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak, width, unreadable = done.stdout.split()
    return float(peak), int(width), int(unreadable)


def test_audit_of_a_large_compressible_png_stays_within_memory(tmp_path):
    folder = tmp_path / "scans"
    make_folder(folder, per_class=3)
    big = Image.new("RGB", (12000, 12000), (40, 60, 80))  # ~450 KB as PNG, 432 MB decoded
    big.paste((200, 120, 50), (2000, 3000, 2700, 3900))
    big.save(folder / "benign" / "large.png")
    del big
    assert (folder / "benign" / "large.png").stat().st_size < 1_000_000
    peak, width, unreadable = audit_peak_mb(folder)
    assert width == 12000 and unreadable == 0  # its size is reported, it is hashed
    # the decoded image (12000 x 12000 x 4 bytes in PIL) plus bands, one large image at a time
    # (the full decode in float on 8 threads took 4.7 GB above the start)
    assert peak < 900, f"audit took {peak:.0f} MB above its start"


def test_reduced_hashing_gives_the_same_pixel_sha_and_close_perceptual_hashes(tmp_path, monkeypatch):
    import medpeft.data.near_duplicates as nd

    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (12, 20), dtype=np.uint8)).resize((1030, 600), Image.BICUBIC)
    arrays = {"L": np.asarray(base), "RGB": np.stack([np.asarray(base)] * 2 + [255 - np.asarray(base)], -1),
              "gray-RGB": np.stack([np.asarray(base)] * 3, -1)}
    for name, array in arrays.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(array).save(path)
        full = nd.inspect_file(str(path))
        monkeypatch.setattr(nd, "LARGE_IMAGE_PIXELS", 1000)
        monkeypatch.setattr(nd, "REDUCED_SIDE", 256)
        reduced = nd.inspect_file(str(path))
        monkeypatch.undo()
        assert reduced.sha256 == full.sha256 == nd.pixel_sha256(array if name != "gray-RGB" else array[..., 0])
        assert (reduced.width, reduced.height, reduced.mode) == (full.width, full.height, full.mode) == (1030, 600,
                                                                                                          full.mode)
        distance = bin(full.phash ^ reduced.phash).count("1") + bin(full.dhash ^ reduced.dhash).count("1")
        assert distance <= 4, (name, distance)


# ---------------------------------------------------------------------- privacy


def test_run_outputs_hold_no_absolute_data_path_unless_asked(weights_run, toy, weights_file, tmp_path, monkeypatch):
    out, metrics = weights_run
    secret = str(toy.parent)
    for path in out.iterdir():
        if path.suffix in (".yaml", ".json", ".csv"):
            assert secret not in path.read_text(), path.name
    assert str(weights_file.parent) not in (out / "config.yaml").read_text() + (out / "metrics.json").read_text()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["name"] == "toy" and config["data"]["root"].startswith("<redacted>/hospital-x")
    assert config["weights"].startswith("<redacted>/site-weights.safetensors#")
    # run again from it: a clear error saying what to give, never a silent other data set
    with pytest.raises(ConfigError, match="data root was not recorded.*data.root"):
        execute(RunConfig.from_dict({**config, "weights": None}), out_dir=tmp_path / "again")
    with pytest.raises(ConfigError, match="weights file was not recorded"):
        execute(RunConfig.from_dict(config), out_dir=tmp_path / "again")
    again = RunConfig.from_dict({**config, "weights": str(weights_file),
                                 "data": {**config["data"], "root": str(toy.parent)}})
    assert again.data.name == "toy" and load_data(again.data).num_classes == 2
    # opt-in: full paths
    monkeypatch.setenv("MEDPEFT_RECORD_PATHS", "1")
    full = tmp_path / "full"
    execute(toy_config(toy), out_dir=full)
    assert yaml.safe_load((full / "config.yaml").read_text())["data"]["name"] == str(toy)


def test_audit_json_names_files_relative_to_the_data_root(tmp_path):
    data = make_folder(tmp_path / "st-marys" / "scans", per_class=4)
    (data / "benign" / "broken.png").write_bytes(b"not a png")
    huge_png_header(data / "malignant" / "huge.png", 20000, 20000)
    from medpeft.audit import audit_dataset

    report = audit_dataset(str(data))
    text = report.to_json(tmp_path / "audit.json")
    assert sorted(u["file"] for u in report.unreadable) == ["benign/broken.png", "malignant/huge.png"]
    assert "pixel budget" in text and "st-marys" not in text


def test_medmnist_and_split_file_paths_are_not_recorded(tmp_path):
    root = write_npz(tmp_path / "site-y" / "npz")
    bundle = load_data(DataConfig(name="breastmnist", root=str(root), image_size=32))
    assert bundle.split_info["file"].startswith("<redacted>/breastmnist.npz#")
    from medpeft.data.privacy import public_data_config

    written = public_data_config({"name": "breastmnist", "root": str(root), "split_file": str(tmp_path / "s.json")})
    assert str(tmp_path) not in json.dumps(written)
    relative = {"name": "busi", "root": "../shared/data", "split_file": None}
    assert public_data_config(relative) == relative  # relative paths (rerunnable from the same place) stay


def write_bad_uid_dicom(path: Path) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing an invalid UID warns too (the test reads the log after it)
        ds.StudyInstanceUID = "1.2.3.ST-MARYS-HOSPITAL-4711"
    ds.PatientID = "PID-42"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(str(path), enforce_file_format=True)
    return path


def test_pydicom_validation_warning_does_not_echo_the_uid(tmp_path, caplog, capfd):
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN  # pydicom's default
    path = write_bad_uid_dicom(tmp_path / "scan.dcm")
    from medpeft.data.dicom import dicom_group_ids
    from medpeft.data.io import read_image

    caplog.clear()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(path).shape == (8, 8)
        groups = dicom_group_ids(path)
    assert groups["study"].startswith("study-")
    said = " ".join(str(w.message) for w in caught) + caplog.text + "".join(capfd.readouterr())
    assert "ST-MARYS" not in said and "PID-42" not in said


def test_the_stored_experiment_holds_no_absolute_path_anywhere_in_it(tmp_path):
    from medpeft.bench.grid import public_experiment

    secret = str(tmp_path / "hospital-y")
    exp = {"data": [f"{secret}/kvasir", "breastmnist"], "data_root": "../shared/data",
           "external_test": [f"{secret}/cvc"], "methods": ["lora"], "seeds": [0, 1],
           "train": {"adapt": "dann", "target_unlabelled": f"{secret}/cvc/images", "epochs": 3},
           "data_options": {"split_file": f"{secret}/split.json", "val_ratio": 0.1}}
    public = public_experiment(exp)
    assert secret not in json.dumps(public)
    assert public["train"]["target_unlabelled"].startswith("<redacted>/images#")
    assert public["external_test"][0].startswith("<redacted>/cvc#")
    # names, relative paths, numbers and settings pass unchanged
    assert public["data"][1] == "breastmnist" and public["data_root"] == "../shared/data"
    assert public["train"]["adapt"] == "dann" and public["train"]["epochs"] == 3 and public["seeds"] == [0, 1]
    assert public_experiment(public) == public  # idempotent: a resumed sweep compares equal
