"""The synthetic-data study's report over a folder of generators and classifier runs:
``medpeft generator report DIR``.

Two tables, written to ``DIR/report/`` (``report.md``, ``generators.csv``, ``downstream.csv``):

* **generators** - one row per (adaptation method, target label fraction) over seeds: FD and KID
  in the evaluation's feature space, k-NN precision / recall, the memorised fraction (samples
  closer to a training image than the copy threshold), trainable parameters, adapter bytes and
  training time. Read from each generator folder's ``generator.json`` and ``eval.json``.
* **downstream** - the classifier trained on real + synthetic images (or synthetic only) against
  the same classifier on real images only, paired on seed, per classifier label fraction: mean and
  spread of the test metric, the paired difference with its CI, paired t p-values Holm-adjusted
  within a fraction and BH-adjusted over the table, TOST equivalence within ``margin``, the
  protocol's verdict, and the seeds 80 % power needs for a difference of ``margin``.

A classifier run is any folder with ``metrics.json`` and ``config.yaml`` (``medpeft run``); its
synthetic source is its config's ``data.synthetic`` manifest, whose generator is the nearest folder
above the manifest holding ``generator.json``. Runs without a manifest are the real-only reference.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import stats
from .errors import ConfigError

GENERATOR_FILE, EVAL_FILE = "generator.json", "eval.json"
REFERENCE = "real only"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from None


def _generator_of(manifest: Path, root: Path) -> Path | None:
    """The nearest folder at or above the manifest (inside root) that is a generator folder."""
    for folder in manifest.parents:
        if (folder / GENERATOR_FILE).is_file():
            return folder
        if folder == root or root not in folder.parents:
            return None
    return None


def _label(meta: dict) -> str:
    fraction = meta.get("fraction")
    return f"{meta.get('method')} @ {'100 %' if fraction in (None, 1.0) else f'{100 * fraction:g} %'}"


def collect(root) -> tuple[list[dict], list[dict]]:
    """(generator rows, classifier-run rows) found under root."""
    import yaml

    root = Path(root).resolve()
    if not root.is_dir():
        raise ConfigError(f"{root.name}: no such folder (expected the study folder holding generator folders "
                          "and classifier runs)")
    generators, runs = [], []
    for meta_file in sorted(root.rglob(GENERATOR_FILE)):
        meta = _read_json(meta_file)
        if meta.get("method") == "pretrain":
            continue  # the source generator, not an adaptation
        evaluation = _read_json(meta_file.parent / EVAL_FILE) if (meta_file.parent / EVAL_FILE).is_file() else {}
        generators.append({"folder": meta_file.parent, "group": _label(meta), "method": meta.get("method"),
                           "fraction": meta.get("fraction"), "seed": meta.get("seed"), "meta": meta,
                           "eval": evaluation})
    for metrics_file in sorted(root.rglob("metrics.json")):
        folder = metrics_file.parent
        if not (folder / "config.yaml").is_file():
            continue
        metrics = _read_json(metrics_file)
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        data = config.get("data") or {}
        manifest = data.get("synthetic")
        if manifest:
            path = Path(manifest)
            path = path if path.is_absolute() else (folder / path if (folder / path).is_file() else Path.cwd() / path)
            source = _generator_of(path.resolve(), root)
            if source is None:
                raise ConfigError(f"{folder.relative_to(root)}: its synthetic manifest {Path(manifest).name} is "
                                  f"not inside a generator folder under {root.name}")
            group = _label(_read_json(source / GENERATOR_FILE))
            if data.get("synthetic_only"):
                group += ", synthetic only"
        else:
            group = REFERENCE
        runs.append({"folder": folder, "group": group, "fraction": data.get("fraction"),
                     "seed": metrics.get("seed"), "test": metrics.get("test") or {}})
    return generators, runs


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


def generator_table(generators: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for g in generators:
        groups[g["group"]].append(g)
    rows = []
    for name, members in sorted(groups.items()):
        evals = [m["eval"] for m in members]
        memorised = [e.get("memorisation", {}).get("flagged_fraction") for e in evals]
        rows.append({
            "generator": name, "seeds": len(members),
            "fd": _mean_sd([e.get("fd") for e in evals]), "kid": _mean_sd([e.get("kid") for e in evals]),
            "precision": _mean_sd([e.get("precision") for e in evals]),
            "recall": _mean_sd([e.get("recall") for e in evals]),
            "memorised": _mean_sd(memorised),
            "trainable": _mean_sd([m["meta"].get("trainable") for m in members]),
            "adapter_bytes": _mean_sd([m["meta"].get("adapter_bytes") for m in members]),
            "train_s": _mean_sd([m["meta"].get("train_seconds") for m in members]),
            "feature_space": ", ".join(sorted({str(e.get("feature_space")) for e in evals if e})) or "-",
        })
    return rows


def downstream_table(runs: list[dict], metric: str = "auroc", margin: float = 0.02) -> list[dict]:
    """Each synthetic group against the real-only reference, paired on seed, per label fraction."""
    by = defaultdict(dict)  # (fraction, group) -> seed -> value
    for run in runs:
        entry = run["test"].get(metric)
        if entry is None:
            raise ConfigError(f"{run['folder'].name}/metrics.json has no test {metric!r}; it has "
                              f"{', '.join(sorted(run['test'])) or 'no test metrics'}")
        value = entry["value"] if isinstance(entry, dict) else entry
        cell = by[(run["fraction"], run["group"])]
        if run["seed"] in cell:
            raise ConfigError(f"two runs of {run['group']} at label fraction {run['fraction']} with seed "
                              f"{run['seed']} (one is {run['folder'].name}); keep one per seed")
        cell[run["seed"]] = value
    rows = []
    for fraction in sorted({f for f, _ in by}, key=lambda f: (f is None, f)):
        reference = by.get((fraction, REFERENCE), {})
        block = []
        for (f, group), values in sorted(by.items(), key=lambda kv: str(kv[0][1])):
            if f != fraction:
                continue
            summary = stats.mean_std_ci(list(values.values()))
            row = {"fraction": fraction, "group": group, "n": summary["n"], "mean": summary["mean"],
                   "std": summary["std"], "delta": None, "diff_low": None, "diff_high": None, "p": None,
                   "p_holm": None, "p_bh": None, "tost_p": None, "verdict": "reference" if group == REFERENCE
                   else "inconclusive", "seeds_needed": None}
            seeds = sorted(set(values) & set(reference))
            if group != REFERENCE and seeds:
                a, b = [values[s] for s in seeds], [reference[s] for s in seeds]
                test = stats.paired_test(a, b)
                row.update(delta=test["mean_diff"], diff_low=test["diff_low"], diff_high=test["diff_high"],
                           p=test["t_pvalue"], n=len(seeds))
                if len(seeds) >= 2:
                    row["tost_p"] = stats.tost_paired(a, b, margin)["p"]
                    sd = test["std_diff"]
                    row["seeds_needed"] = stats.seeds_needed(sd, margin) if sd and not math.isnan(sd) else None
            block.append(row)
        adjusted = stats.holm([r["p"] for r in block])
        for row, p_holm in zip(block, adjusted):
            row["p_holm"] = p_holm
            if row["group"] != REFERENCE:
                row["verdict"] = stats.verdict(row["delta"], p_holm, row["tost_p"])
        rows.extend(block)
    for row, p_bh in zip(rows, stats.benjamini_hochberg([r["p"] for r in rows])):
        row["p_bh"] = p_bh
    return rows


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def write_report(root, metric: str = "auroc", margin: float = 0.02) -> Path:
    root = Path(root)
    generators, runs = collect(root)
    if not generators and not runs:
        raise ConfigError(f"{root.name}: no generator folders ({GENERATOR_FILE}) and no classifier runs "
                          "(metrics.json) under it")
    gen_rows = generator_table(generators)
    down_rows = downstream_table(runs, metric, margin) if runs else []
    out = root / "report"
    out.mkdir(exist_ok=True)
    for name, rows in (("generators.csv", gen_rows), ("downstream.csv", down_rows)):
        with open(out / name, "w", newline="") as fh:
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    lines = ["# Synthetic data: generators and their downstream use", ""]
    if gen_rows:
        lines += ["## Generators (mean ± SD over seeds)", "",
                  "| generator | seeds | FD | KID | precision | recall | memorised | trainable | adapter bytes | "
                  "train s |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['generator']} | {r['seeds']} | {r['fd']} | {r['kid']} | {r['precision']} | {r['recall']} | "
                  f"{r['memorised']} | {r['trainable']} | {r['adapter_bytes']} | {r['train_s']} |" for r in gen_rows]
        spaces = sorted({r["feature_space"] for r in gen_rows} - {"-"})
        lines += ["", f"FD and KID in the {', '.join(spaces) or 'evaluation'} feature space (lower is better); "
                  "memorised: fraction of samples closer to a training image than the copy threshold.", ""]
    if down_rows:
        lines += [f"## Downstream classifier: test {metric}, paired on seed against real images only", "",
                  "| label fraction | training images | seeds | mean ± SD | Δ vs real only [95 % CI] | p (Holm) | "
                  "p (BH) | TOST p | verdict | seeds for 80 % power |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in down_rows:
            delta = "-" if r["delta"] is None else (f"{r['delta']:+.4f} [{_fmt(r['diff_low'])}, "
                                                    f"{_fmt(r['diff_high'])}]")
            fraction = "100 %" if r["fraction"] in (None, 1.0) else f"{100 * r['fraction']:g} %"
            lines.append(f"| {fraction} | {r['group']} | {r['n']} | {_fmt(r['mean'])} ± {_fmt(r['std'], 2)} | "
                         f"{delta} | {_fmt(r['p_holm'])} | {_fmt(r['p_bh'])} | {_fmt(r['tost_p'])} | "
                         f"**{r['verdict']}** | {_fmt(r['seeds_needed'])} |")
        lines += ["", f"Paired t-test on the seeds both share, Holm within a label fraction, BH over the table; "
                  f"equivalence: TOST within ±{margin}; verdicts as the benchmark report's."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
