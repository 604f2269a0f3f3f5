"""``medpeft export``: a trained run as one file an inference stack can load.

- ``RUN model.onnx``: the merged model (methods folded into the backbone weights; methods that
  cannot merge, such as adapters and visual prompts, are exported unmerged and the command says
  so) as ONNX with a dynamic batch axis. Input ``input``: float32 [N, 3, S, S], the image
  resized to S x S, RGB (grayscale repeated), ``(pixel / 255 - mean) / std``; output ``logits``
  ([N, classes], or [N, classes, S, S] for segmentation). The preprocessing and the classes are
  in the model's ``metadata_props``. The command then runs the ONNX file with onnxruntime and
  the PyTorch model on the same inputs (a few images of the run's own test split when its data
  is available, else random inputs) and fails if the logits differ by more than the tolerance.
- ``RUN merged.safetensors``: the merged, plain timm state dict with the adapter's metadata.

Nothing is overwritten without ``--overwrite``, the run's own adapter never, and the output
location is checked before the model is built.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

SUFFIXES = (".onnx", ".safetensors")
TOLERANCE = 1e-4
OPSET = 17


def add_export_options(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--check-images", type=int, default=8,
                        help=".onnx: test-split images (else random inputs) of the onnxruntime parity check "
                             "(default 8)")
    parser.add_argument("--data-root", default=None,
                        help=".onnx: folder holding the run's data for the parity check, when its config.yaml did not "
                             "record it (absolute paths are never recorded); default: as recorded / $MEDPEFT_DATA")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f".onnx: largest accepted |onnxruntime - torch| logit difference (default {TOLERANCE:g})")


def check_output(out: str | Path, run: str | Path, overwrite: bool) -> Path:
    """The output path, checked before any work: a known suffix, an existing folder, no file
    replaced without ``overwrite``, never the run's own adapter."""
    from .run import ADAPTER_FILE

    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"output {out}: expected a .onnx (ONNX model) or .safetensors (merged state dict) file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"output folder {folder} does not exist; create it first or choose another path")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"output folder {folder} is not writable")
    if out.is_dir():
        raise ConfigError(f"output {out} is a folder; give a file name ending in .onnx or .safetensors")
    run = Path(run)
    adapter = run / ADAPTER_FILE if run.is_dir() else run
    if out.exists():
        if adapter.exists() and os.path.samefile(out, adapter):
            raise ConfigError(f"output {out} is the run's trained adapter; exporting into it would destroy the "
                              "run. Choose another file name")
        if not overwrite:
            raise ConfigError(f"output {out} already exists; pass --overwrite to replace it")
    return out


def cmd_export(args) -> int:
    out = check_output(args.out, args.run, args.overwrite)
    if out.suffix.lower() == ".onnx":
        if args.tolerance is not None and not args.tolerance > 0:
            raise ConfigError(f"--tolerance {args.tolerance} must be > 0")
        if args.check_images < 1:
            raise ConfigError(f"--check-images {args.check_images} must be >= 1")
        require_onnxruntime()
        report = export_onnx(args.run, out, weights=args.weights, n_check=args.check_images,
                             tolerance=args.tolerance, data_root=args.data_root)
        for line in report["lines"]:
            print(line)
        return 0 if report["passed"] else 1
    print(export_safetensors(args.run, out, weights=args.weights))
    return 0


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("the ONNX parity check needs onnxruntime: pip install 'medpeft[deploy]' "
                          "(or pip install onnxruntime)") from None
    return onnxruntime


def _atomic_target(out: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix + ".part", dir=out.parent or ".")
    os.close(fd)
    return Path(tmp)


def export_safetensors(run, out: Path, weights: str | None = None) -> str:
    from safetensors.torch import save_file

    from .run import load_run

    loaded = load_run(run, weights=weights, merge=True)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    tmp = _atomic_target(out)
    try:
        # the adapter's metadata travels along: classes and preprocessing (backbone, image size, mean/std)
        save_file(state, str(tmp), metadata=loaded.metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return (f"wrote merged {loaded.metadata['backbone']} ({len(state)} tensors; input {loaded.image_size} px, "
            f"mean {tuple(round(m, 4) for m in loaded.mean)}, std {tuple(round(s, 4) for s in loaded.std)}) to {out}")


def load_for_export(run, weights: str | None = None):
    """(loaded run, merged?, note): merged when every method can be, else the unmerged model."""
    from .methods import merge_methods, set_train_mode
    from .run import load_run

    loaded = load_run(run, weights=weights, merge=False)
    from .tasks import get_task

    refusal = get_task(loaded.task).onnx_refusal  # checked before any export work
    if refusal:
        raise ConfigError(refusal)
    if loaded.metadata.get("prompt", "none") == "box":
        raise ConfigError("this run was trained with box prompts: its model needs a box per image, which the "
                          "exported graph (one image input) cannot take; export a run trained with --prompt none")
    try:
        merge_methods(loaded.model)  # refuses, changing nothing, when a method cannot merge
        merged, note = True, f"merged {loaded.method} into the backbone weights"
    except ConfigError as err:
        merged, note = False, f"exported unmerged: {err}".replace("; export it unmerged", "")
    set_train_mode(loaded.model, False)
    return loaded, merged, note


def onnx_metadata(loaded, merged: bool, positive_class: str | None) -> dict[str, str]:
    from . import __version__

    task = loaded.task
    output = {"binary": "logits [N, classes]; softmax gives the class probabilities",
              "multiclass": "logits [N, classes]; softmax gives the class probabilities",
              "multilabel": "logits [N, labels]; sigmoid gives each label's probability",
              "segmentation": "logits [N, classes, S, S]; argmax over classes gives the mask"}.get(task, "logits")
    # what 'medpeft predict' applies on top of the logits, when the run saved it with the adapter
    extra = {k: loaded.metadata[k] for k in ("calibration", "operating_point") if loaded.metadata.get(k)}
    return {
        **extra,
        "medpeft_version": __version__,
        "task": task,
        "backbone": loaded.metadata.get("backbone", ""),
        "method": loaded.method,
        "merged": "true" if merged else "false",
        "image_size": str(loaded.image_size),
        "mean": json.dumps([float(m) for m in loaded.mean]),
        "std": json.dumps([float(s) for s in loaded.std]),
        "class_names": json.dumps(loaded.class_names),
        "positive_class": positive_class or "",
        "input": ("input: float32 [N, 3, S, S], S = image_size: the image resized to S x S (bilinear, "
                  "antialiased), RGB (grayscale repeated), (pixel / 255 - mean) / std per channel"),
        "output": output,
    }


def _positive_class(run, loaded) -> str | None:
    """The run's positive class (binary tasks): the adapter's metadata, else the run folder's metrics.json."""
    if loaded.metadata.get("positive_class"):
        return loaded.metadata["positive_class"]
    run = Path(run)
    metrics = (run if run.is_dir() else run.parent) / "metrics.json"
    try:
        return json.loads(metrics.read_text()).get("positive_class")
    except (OSError, ValueError):
        return None


def check_inputs(run, loaded, n: int, data_root: str | None = None) -> tuple[torch.Tensor, str]:
    """Normalised inputs for the parity check: up to ``n`` images of the run's own test split (as
    training decoded and normalised them), or random normal inputs when its data cannot be read."""
    from .batching import BatchLoader

    size = loaded.image_size
    reason = ""
    try:
        bundle = _run_test_split(run, data_root)
        images = bundle.test.subset(np.arange(min(n, len(bundle.test))))
        loader = BatchLoader(images, len(images), loaded.mean, loaded.std)
        x = loader.to_input(loader.images)
        x = x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
        if x.shape[-1] == size and len(x):
            return x.float(), f"{len(x)} test image(s) of {bundle.name}"
        reason = f"its test images are {x.shape[-1]} px, the model takes {size}"
    except Exception as err:  # noqa: BLE001 - any reason the data is not here: fall back to random inputs
        reason = str(err).splitlines()[0].split("; ")[0] if str(err) else type(err).__name__
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=gen), (
        f"{n} random input(s) (the run's test images could not be read: {reason}; --data-root names their folder)")


def _run_test_split(run, data_root: str | None = None):
    import yaml

    from .data import load_data
    from .run import RunConfig

    run = Path(run)
    folder = run if run.is_dir() else run.parent
    config = folder / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"no config.yaml beside the adapter in {folder}")
    values = yaml.safe_load(config.read_text()) or {}
    if data_root and isinstance(values.get("data"), dict):
        values["data"] = {**values["data"], "root": data_root}
    cfg = RunConfig.from_dict(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_data(cfg.data)


def export_onnx(run, out: Path, weights: str | None = None, n_check: int = 8, tolerance: float = TOLERANCE,
                opset: int = OPSET, data_root: str | None = None) -> dict:
    """Export, write the metadata, check parity with onnxruntime; the file is moved into place only
    when the check passes. Returns {"passed", "max_abs_diff", "merged", "inputs", "lines"}."""
    import onnx

    loaded, merged, note = load_for_export(run, weights)
    model = loaded.model.float()
    for param in model.parameters():
        param.requires_grad_(False)
    size = loaded.image_size
    example = torch.zeros(2, 3, size, size)
    tmp = _atomic_target(out)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        for key, value in onnx_metadata(loaded, merged, _positive_class(run, loaded)).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "medpeft"
        onnx.save(proto, str(tmp))
        x, source = check_inputs(run, loaded, n_check, data_root)
        diff = parity(model, tmp, x)
        passed = bool(np.isfinite(diff) and diff <= tolerance)
        if passed:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    verdict = "ok" if passed else f"FAILED: above the tolerance {tolerance:g}; nothing written"
    lines = [f"{note}" + ("" if merged else " (the ONNX graph carries the method's extra modules)"),
             f"parity onnxruntime vs torch on {source}: max abs diff of the logits {diff:.3g} "
             f"(tolerance {tolerance:g}) {verdict}"]
    if passed:
        lines.append(f"wrote {out} ({'merged' if merged else 'unmerged'} {loaded.metadata.get('backbone')} + "
                     f"{loaded.method}, {loaded.task}; input float32 [N, 3, {size}, {size}] normalised with mean "
                     f"{tuple(round(m, 4) for m in loaded.mean)}, std {tuple(round(s, 4) for s in loaded.std)}; "
                     f"classes {loaded.class_names}; preprocessing in the model's metadata_props)")
    return {"passed": passed, "max_abs_diff": diff, "merged": merged, "inputs": source, "lines": lines}


def parity(model: torch.nn.Module, path: Path, x: torch.Tensor) -> float:
    """max |onnxruntime(x) - torch(x)| over the logits."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).float().numpy()
    got = session.run(None, {"input": x.numpy().astype(np.float32)})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an exported ONNX model."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
