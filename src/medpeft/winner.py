"""From the comparison to the model: ``medpeft winner SWEEP [--train --out DIR ...]``.

**Choosing** (validation only). For each data set x backbone x label fraction of a sweep, every
method with finished final runs is ranked by its mean validation score over seeds (the store's
value: the monitored metric of each run's kept state, in the monitor's direction). Methods within
``tie`` of the best validation mean (default: the experiment's equivalence margin) count as tied,
and the tie goes to the cheapest: fewest trainable parameters, then the shortest mean training
time. ``max_trainable`` (a percentage of the model) drops the methods above the budget first.
Test scores are never read for the choice; they are shown beside it, marked as not used, with the
report's verdict against full fine-tuning.

**Training the winner** (``--train``): the sweep's stored configuration of the winning final run
(data, split, label budget, image size, weights and checksum, method, options, the hyper-parameters
HPO chose, seed policy) is run again with ``medpeft run``'s machinery into a new run folder, so
the same seed reproduces the sweep's test numbers exactly. Sweeps do not keep adapters by default
(KB-MB each, but a sweep writes hundreds): retraining from the stored configuration costs one run
and needs nothing but the sweep folder and the data. The run folder is a normal one: predict,
calibrate, explain, export and card accept it; ``winner.json`` in it records which sweep and
which comparison chose it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ConfigError


def validation_records(store) -> list[dict]:
    """Per finished final run: cell, method, seed, validation value, trainable params, train time,
    its stored config. Reads nothing of the test metrics (the choice must not see them)."""
    chosen = store.get_meta("chosen", {}) or {}
    out = []
    for row in store.rows(kind="final", status="done"):
        if row["cell"] in chosen and (row.get("params") or {}) != chosen[row["cell"]]:
            continue  # a final run of an earlier HPO choice (a resumed sweep with more trials)
        metrics = (row.get("result") or {}).get("metrics") or {}
        params = metrics.get("params") or {}
        out.append({"cell": row["cell"], "data": row["data"], "backbone": row["backbone"], "method": row["method"],
                    "fraction": float(row["fraction"]), "seed": int(row["seed"]),
                    "val": None if row["value"] is None else float(row["value"]),
                    "trainable": params.get("trainable"), "trainable_pct": params.get("trainable_pct"),
                    "train_seconds": metrics.get("train_seconds"), "config": row["config"], "key": row["key"]})
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def choose(records: list[dict], lower_is_better: bool, tie: float, max_trainable: float | None = None) -> list[dict]:
    """One entry per (data, backbone, fraction): the winner and the ranking it came from."""
    cells: dict = {}
    for r in records:
        cells.setdefault((r["data"], r["backbone"], r["fraction"]), {}).setdefault(r["method"], []).append(r)
    out = []
    for (data, backbone, fraction), methods in cells.items():
        ranking = []
        for method, runs in methods.items():
            ranking.append({"method": method, "val_mean": _mean([r["val"] for r in runs]), "seeds": len(runs),
                            "trainable": _mean([r["trainable"] for r in runs]),
                            "trainable_pct": _mean([r["trainable_pct"] for r in runs]),
                            "train_seconds": _mean([r["train_seconds"] for r in runs]),
                            "excluded": None, "runs": sorted(runs, key=lambda r: r["seed"])})
        for entry in ranking:
            if max_trainable is not None and not entry["trainable_pct"] <= max_trainable:
                entry["excluded"] = f"trainable {entry['trainable_pct']:.3g} % > budget {max_trainable:g} %"
            elif math.isnan(entry["val_mean"]):
                entry["excluded"] = "no validation score"
        sign = 1.0 if lower_is_better else -1.0
        ranking.sort(key=lambda e: (e["excluded"] is not None, sign * e["val_mean"] if not math.isnan(e["val_mean"])
                                    else math.inf))
        eligible = [e for e in ranking if e["excluded"] is None]
        winner, tied = None, []
        if eligible:
            best = eligible[0]["val_mean"]
            tied = [e for e in eligible if abs(e["val_mean"] - best) <= tie]
            winner = min(tied, key=lambda e: (e["trainable"] if not math.isnan(e["trainable"]) else math.inf,
                                              e["train_seconds"] if not math.isnan(e["train_seconds"]) else math.inf))
        out.append({"data": data, "backbone": backbone, "fraction": fraction, "winner": winner,
                    "tied": [e["method"] for e in tied], "ranking": ranking})
    return sorted(out, key=lambda c: (c["data"], c["backbone"], c["fraction"]))


def store_folder(sweep: str | Path) -> Path:
    """The folder holding the sweep's results.db; a committed ``results.db.gz`` (this repository's
    results/ folders) is decompressed once into a private temporary folder."""
    import gzip
    import shutil
    import tempfile

    from .bench.store import DB_NAME

    folder = Path(sweep)
    if (folder / DB_NAME).is_file():
        return folder
    packed = folder / f"{DB_NAME}.gz"
    if packed.is_file():
        target = Path(tempfile.mkdtemp(prefix="medpeft-winner-")) / folder.name
        target.mkdir()
        with gzip.open(packed, "rb") as src, open(target / DB_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return target
    raise ConfigError(f"{folder} holds no results store ({DB_NAME} or {DB_NAME}.gz); give the --out folder of a "
                      "'medpeft benchmark' sweep")


def winners(sweep: str | Path, tie: float | None = None, max_trainable: float | None = None) -> dict:
    """Open the sweep's store, choose per cell (validation only), then attach the test means and
    report verdicts for information."""
    from .bench.report import _margin, experiment_task, final_runs, summarize
    from .bench.store import Store

    folder = store_folder(sweep)
    if max_trainable is not None and not (isinstance(max_trainable, (int, float)) and 0 < max_trainable <= 100):
        raise ConfigError(f"--max-trainable {max_trainable!r}: expected a percentage in (0, 100]")
    with Store.open_readonly(folder) as store:
        experiment = store.get_meta("experiment")
        if not experiment:
            raise ConfigError(f"{folder}: the store records no experiment (written by an older medpeft?); rerun "
                              "the sweep with --resume to record it")
        task = experiment_task(experiment)
        monitor = task.resolve_monitor((experiment.get("train") or {}).get("monitor", "auto"))
        lower = task.direction(monitor) == "min"
        tie = _margin(tie, experiment)
        records = validation_records(store)
        if not records:
            failed = len(store.rows(kind="final", status="failed"))
            raise ConfigError(f"{folder}: no finished final run" + (f" ({failed} failed: see the report's runs.csv)"
                                                                     if failed else "") + "; nothing to choose from")
        cells = choose(records, lower, tie, max_trainable)
        # for information only, after the choice: test means and verdicts vs full fine-tuning
        metric = task.primary_metric if monitor in ("auto", "loss") else monitor
        summary = summarize(final_runs(store, metric), margin=_margin(None, experiment),
                            lower_val_is_better=lower, higher_is_better=task.direction(metric) == "max")
    info = {(r["data"], r["backbone"], r["fraction"], r["method"]): r for r in summary}
    for cell in cells:
        for entry in cell["ranking"]:
            row = info.get((cell["data"], cell["backbone"], cell["fraction"], entry["method"]), {})
            entry["test_mean"], entry["verdict"] = row.get("mean"), row.get("verdict")
    return {"sweep": folder.name, "monitor": monitor, "lower_is_better": lower, "tie": tie,
            "max_trainable": max_trainable, "test_metric": metric, "cells": cells}


def describe(result: dict) -> str:
    lines = [f"winners of {result['sweep']}: chosen on validation {result['monitor']} "
             f"({'lower' if result['lower_is_better'] else 'higher'} is better); ties within {result['tie']:g} go to "
             "the fewest trainable parameters, then the fastest" + (
                 f"; budget <= {result['max_trainable']:g} % trainable" if result["max_trainable"] else "")]
    for cell in result["cells"]:
        w = cell["winner"]
        lines.append(f"\n{cell['data']} / {cell['backbone']} / fraction {cell['fraction']:g}: "
                     + (f"winner {w['method']} (tied: {', '.join(cell['tied'])})" if w else "no eligible method"))
        lines.append(f"  {'method':<14} {'val ' + result['monitor']:>12} {'trainable %':>12} {'train s':>9} "
                     f"{'test ' + result['test_metric'] + ' (not used)':>26} {'verdict vs full (test)':>24}")
        for e in cell["ranking"]:
            test = "-" if e.get("test_mean") is None else f"{e['test_mean']:.4f}"
            note = f"  [{e['excluded']}]" if e["excluded"] else ""
            lines.append(f"  {e['method']:<14} {e['val_mean']:>12.4f} {e['trainable_pct']:>12.3f} "
                         f"{e['train_seconds']:>9.1f} {test:>26} {str(e.get('verdict') or '-'):>24}{note}")
    return "\n".join(lines)


def train_winner(sweep: str | Path, cell: dict, out: str | Path, seed: int | None = None,
                 operating_point: str | None = None, overwrite: bool = False, data_root: str | None = None) -> dict:
    """Run the winner's stored final configuration again (``seed``: one of its seeds; default the
    first) into ``out``; returns the run's metrics with ``winner.json`` written beside them."""
    from .run import RunConfig, check_out_dir, execute

    winner = cell["winner"]
    if winner is None:
        raise ConfigError(f"{cell['data']} / {cell['backbone']} / {cell['fraction']:g}: no eligible method to train")
    runs = {r["seed"]: r for r in winner["runs"]}
    seed = min(runs) if seed is None else int(seed)
    if seed not in runs:
        raise ConfigError(f"seed {seed} has no final run of {winner['method']} in this cell; its seeds: "
                          f"{', '.join(str(s) for s in sorted(runs))}")
    check_out_dir(out, overwrite=overwrite)
    config = dict(runs[seed]["config"])
    from .data.privacy import is_redacted

    data = dict(config.get("data") or {})
    if data_root is not None:  # the sweep recorded data paths relative to a root it did not write down
        data["root"] = str(data_root)
    elif is_redacted(data.get("root")) or is_redacted(data.get("name")):
        raise ConfigError(f"the sweep recorded no absolute data path (privacy); give --data-root FOLDER, the folder "
                          f"holding {data.get('name')!r}")
    config["data"] = data
    if operating_point:
        config["operating_point"] = operating_point
    cfg = RunConfig.from_dict(config)
    metrics = execute(cfg, out_dir=out)
    record = {"sweep": Path(sweep).name, "store_key": runs[seed]["key"], "cell": [cell["data"], cell["backbone"],
                                                                                    cell["fraction"]],
              "method": winner["method"], "seed": seed, "chosen_on": "validation", "tied": cell["tied"],
              "ranking": [{k: e[k] for k in ("method", "val_mean", "trainable_pct", "seeds")} for e in cell["ranking"]]}
    (Path(out) / "winner.json").write_text(json.dumps(record, indent=1))
    return metrics
