"""``medpeft calibrate RUN``: (re)fit the calibration map (and an operating point) of a finished
classification run on its validation predictions; writes calibration.json and reliability.png
into the run folder and nothing else (``predict`` and ``card`` then use calibration.json)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import __version__
from .calibration import (CALIBRATED_TASKS, CALIBRATION_FILE, RELIABILITY_FILE, TEST_PREDICTIONS_FILE,
                          VAL_PREDICTIONS_FILE, compute_entries, read_prediction_csv, reliability_plot, sha256_file)
from .errors import ConfigError, DataError


def add_calibrate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit Platt / temperature scaling (and an operating point) of a classification run on its "
                          "validation predictions; ECE/MCE/Brier/NLL before and after; reliability diagram",
        description="Fit the calibration map of a finished classification run on its validation predictions only "
                    "(Platt scaling for binary tasks, temperature scaling for multi-class), report ECE, MCE, Brier "
                    "and NLL with bootstrap 95%% CIs before and after on validation and test, and optionally choose "
                    "a decision threshold. Writes calibration.json and reliability.png into the run folder (never "
                    "any other file); 'medpeft predict' and 'medpeft card' then use calibration.json. Runs without "
                    "val_predictions.csv (older runs) are predicted again from the adapter and the data named in "
                    "config.yaml.")
    p.add_argument("run", help="run folder written by 'medpeft run' (classification)")
    p.add_argument("--operating-point", default=None, metavar="TARGET",
                   help="binary tasks: sensitivity=X, specificity=X or youden (default: the run's own, if any)")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default: the run's)")
    p.add_argument("--force", action="store_true",
                   help="fit even when the validation split is too small (fewer than 5 images of a class for Platt, "
                        "10 images for temperature scaling), where the map is mostly noise")
    p.add_argument("--weights", default=None, help="backbone weights file, if the run used one (re-prediction only)")
    p.add_argument("--data-root", default=None,
                   help="where the run's data lives now, if it moved (re-prediction only)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err})") from None


def _predictions(run: Path, metrics: dict, args) -> tuple[tuple, tuple, str]:
    """((val_y, val_probs), (test_y, test_probs), where they came from)."""
    names = metrics["class_names"]
    val_file, test_file = run / VAL_PREDICTIONS_FILE, run / TEST_PREDICTIONS_FILE
    if val_file.is_file() and test_file.is_file():
        _, vy, vp = read_prediction_csv(val_file, names)
        _, ty, tp = read_prediction_csv(test_file, names)
        return (vy, vp), (ty, tp), f"{VAL_PREDICTIONS_FILE} and {TEST_PREDICTIONS_FILE} of the run"
    if (metrics.get("selection") or {}).get("mode", "holdout") != "holdout":
        raise ConfigError(f"{run.name} chose its epoch by cross-validation and has no {VAL_PREDICTIONS_FILE} (the "
                          "out-of-fold predictions); run it again with this medpeft version to calibrate it")
    return _repredict(run, metrics, args)


def _repredict(run: Path, metrics: dict, args) -> tuple[tuple, tuple, str]:
    import yaml

    from .data import load_data
    from .run import RunConfig, load_run
    from .train import predict_images

    config = run / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run.name} has no {VAL_PREDICTIONS_FILE} and no config.yaml to load its data from")
    try:
        cfg = RunConfig.from_dict(yaml.safe_load(config.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{config} is not valid YAML: {err}") from None
    if args.data_root:
        cfg.data.root = args.data_root
    bundle = load_data(cfg.data)
    if bundle.class_names != metrics["class_names"] or bundle.task != metrics["task"]:
        raise DataError(f"the data of {run.name}'s config.yaml now has classes {bundle.class_names} ({bundle.task}); "
                        f"the run was trained on {metrics['class_names']} ({metrics['task']})")
    for split, n in (("val", metrics.get("n_val")), ("test", metrics.get("n_test"))):
        if n is not None and len(getattr(bundle, split)) != n:
            raise DataError(f"the {split} split of {run.name}'s data now has {len(getattr(bundle, split))} images, "
                            f"the run had {n}: the data or the split changed (give --data-root, or keep split.json)")
    loaded = load_run(run, weights=args.weights or cfg.weights)
    out = []
    for part in (bundle.val, bundle.test):
        probs = predict_images(loaded.model, part, loaded.mean, loaded.std, bundle.task, bundle.num_classes,
                               device="auto")
        out.append((part.labels.numpy(), probs))
    return out[0], out[1], "predicted again from the adapter and the data in config.yaml"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def calibrate_run(run: str | Path, operating_point: str | None = None, n_boot: int | None = None,
                  args=None, force: bool = False) -> dict:
    """Fit and write calibration.json + reliability.png of ``run``; returns the calibration.json content."""
    from .run import ADAPTER_FILE

    run = Path(run)
    if not run.is_dir() or not (run / "metrics.json").is_file() or not (run / ADAPTER_FILE).is_file():
        raise ConfigError(f"{run} is not a run folder (metrics.json and {ADAPTER_FILE} written by 'medpeft run')")
    metrics = _read_json(run / "metrics.json")
    task = metrics.get("task")
    if task == "segmentation":
        raise ConfigError(f"{run.name} is a segmentation run: calibration and operating points apply to image-level "
                          "classification (binary or multi-class); a segmentation model's per-pixel probabilities "
                          "are not calibrated here")
    if task not in CALIBRATED_TASKS:
        raise ConfigError(f"{run.name} is a {task} run: calibration applies to binary and multi-class classification")
    if args is None:
        import argparse

        args = argparse.Namespace(weights=None, data_root=None)
    if operating_point is None:
        previous = _previous_operating_point(run, metrics)
        operating_point = previous
    names = metrics["class_names"]
    positive = names.index(metrics["positive_class"]) if task == "binary" and metrics.get("positive_class") in names \
        else (1 if task == "binary" else None)
    (vy, vp), (ty, tp), source = _predictions(run, metrics, args)
    if n_boot is None:
        n_boot = _run_n_boot(run)
    fitted_on = "validation" if (metrics.get("selection") or {}).get("mode", "holdout") == "holdout" else \
        "out-of-fold predictions of the labelled training images (select cv:K)"
    entries = compute_entries(task, names, positive, vy, vp, ty, tp, n_boot, int(metrics.get("seed") or 0),
                              operating_point=operating_point, fitted_on=fitted_on, force=force)
    content = {"medpeft_version": __version__, "run": run.name, "adapter_sha256": sha256_file(run / ADAPTER_FILE),
               "task": task, "class_names": names, "positive_class": None if positive is None else names[positive],
               "predictions": source, "n_boot": n_boot, **entries}
    _write_atomic(run / CALIBRATION_FILE, json.dumps(content, indent=2, default=float) + "\n")
    reliability_plot(run / RELIABILITY_FILE, {"validation": (vy, vp), "test": (ty, tp)}, entries["calibration"],
                     title=f"{metrics.get('method')} on {Path(str(metrics.get('data'))).name}")
    return content


def _previous_operating_point(run: Path, metrics: dict) -> str | None:
    side = run / CALIBRATION_FILE
    if side.is_file():
        op = _read_json(side).get("operating_point")
        if op:
            return op.get("target")
    return (metrics.get("operating_point") or {}).get("target")


def _run_n_boot(run: Path) -> int:
    import yaml

    try:
        value = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("n_boot")
    except (OSError, yaml.YAMLError, AttributeError):
        value = None
    return int(value) if isinstance(value, int) and value > 0 else 1000


def _ci(m: dict, digits: int = 4) -> str:
    value = m.get("value")
    if value is None or value != value:
        return "n/a"
    low, high = m.get("low"), m.get("high")
    bounds = "" if low is None or low != low else f" [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{value:.{digits}f}{bounds}"


def cmd_calibrate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    content = calibrate_run(args.run, args.operating_point, args.n_boot, args, force=args.force)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: one line per row, no wrapped intervals
        console = Console(width=150)
    cal = content["calibration"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in cal["params"].items())
    what = f"not calibrated ({cal['n_fit']} {cal['fitted_on']} images)" if cal["method"] == "none" else \
        f"{cal['method']} scaling ({params}), fitted on {cal['fitted_on']} ({cal['n_fit']} images)"
    table = Table(title=f"{what}; 95% bootstrap CIs")
    for col in ("metric", "val before", "val after", "test before", "test after"):
        table.add_column(col)
    for name in ("ece", "mce", "brier", "nll"):
        table.add_row(name.upper() if name != "brier" else f"Brier ({cal['brier']})",
                      *[_ci(cal[s][w][name]) for s in ("val", "test") for w in ("before", "after")])
    console.print(table)
    for note in cal.get("notes") or []:
        console.print(f"note: {note}", highlight=False)
    op = content.get("operating_point")
    if op:
        table = Table(title=f"operating point {op['target']}: {op['rule']}, threshold {op['threshold']:.4g} "
                            f"(chosen on {op['chosen_on']})")
        for col in ("metric", "validation", "test"):
            table.add_column(col)
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            table.add_row(name if len(name) > 3 else name.upper(), _ci(op["val"][name]), _ci(op["test"][name]))
        console.print(table)
        for note in op.get("notes") or []:
            console.print(f"note: {note}", highlight=False)
    applied = [w for w, on in (("this calibration", cal["method"] != "none"), ("this threshold", bool(op))) if on]
    console.print(f"wrote {CALIBRATION_FILE} and {RELIABILITY_FILE} in {args.run}; 'medpeft predict' now applies "
                  + (" and ".join(applied) if applied else "no calibration and no threshold"), highlight=False)
    return 0

