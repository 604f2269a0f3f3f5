"""The sweep report: which method wins, per data set x backbone x label fraction, at what cost.

From the final runs (one per seed) in the store, per cell (data set, backbone, label fraction):

- test metric mean +- std and 95% CI over seeds (Student t), trainable %, train time, peak
  memory, adapter size; the seeds (and label-subset seeds) run;
- the difference to full fine-tuning with a paired t-test over seeds (``stats.paired_test``: the
  same seeds of both methods, i.e. the same label subsets), Holm-adjusted within the cell,
  Benjamini-Hochberg q across the whole sweep, a TOST equivalence test within +-margin and a
  verdict (better / worse / equivalent / inconclusive, from the Holm p);
- how many seeds would detect the margin (paired t power from the observed noise);
- the best method chosen on validation (never on test), with its test score;
- the labels used (train and selection) and whether selection saw the full validation split;
- the HPO choice with its validation and test scores and the trial counts;
- a convergence note when most runs of a method peaked at their last epoch;
- plots: metric vs label fraction per method; metric vs trainable % with the Pareto front;
  validation learning curves (monitored metric vs optimizer step);
- with two or more backbones: every pair of backbones per data set x method x fraction, paired by
  seed, Holm / BH over those comparisons (``backbones.csv``: "which backbone?");
- with external test sets: the in-domain vs external table (the paired drop), every method against
  full fine-tuning on the external score and on the drop ("which methods lose least?",
  ``shift_vs_full.csv``), what style alignment recovers (aligned minus raw of the same runs,
  ``alignment.csv``) and the backbone pairs on each external set (``backbones_external.csv``);
  with a corruption suite: relative robustness per method and against full fine-tuning;
- ``report.md``, a self-contained ``report.html`` (plots embedded), ``summary.csv``, ``runs.csv``.

Everything is written to ``<out>/report/`` and rebuilt from the store by ``medpeft report <out>``.
"""
from __future__ import annotations

import base64
import html
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..stats import (benjamini_hochberg, detectable_difference, holm, mean_std_ci, paired_test, seeds_needed,
                     tost_paired, verdict)
from .store import Store, export

BASELINE = "full"  # the reference every method is compared with
# never counted as PEFT: full fine-tuning, the linear probe and partial fine-tuning
BASELINES = ("full", "linear", "decoder", "head", "partial")


def _baseline_names() -> str:
    """'Full, linear, decoder and partial' from BASELINES (decoder: the segmentation linear probe)."""
    *head, last = BASELINES
    return (", ".join(head) + " and " + last).capitalize()
ALPHA = 0.05
DEFAULT_MARGIN = 0.02  # equivalence margin on the metric's scale (experiment meta "margin" overrides)
POWER = 0.8


@dataclass
class Block:
    kind: str  # h1 h2 h3 p table img list
    text: str = ""
    header: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    path: Path | None = None


def _num(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _size(nbytes) -> str:
    if nbytes is None or (isinstance(nbytes, float) and math.isnan(nbytes)):
        return "-"
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def label(name: str) -> str:
    """A data set as shown: a MedMNIST name as is, a folder or manifest by its file name (a path
    the store did not record, ``<redacted>/toy#3f9a1c2e``: its name, ``toy``)."""
    from ..data.privacy import REDACTED, is_redacted

    text = str(name)
    if is_redacted(text):
        text = text[len(REDACTED):].rsplit("#", 1)[0]
    return Path(text).name or text


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def _p(p) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ---------------------------------------------------------------------- data


def _selection(metrics: dict) -> dict:
    """How the run chose its epoch/state: labels used and whether the full validation split was read."""
    sel = metrics.get("selection")
    if not isinstance(sel, dict):  # older stores: only the validation size is known
        return {"val_labels": None, "mode": None, "n_selection_labels": metrics.get("n_val")}
    return {"val_labels": sel.get("val_labels"), "mode": sel.get("mode"),
            "n_selection_labels": sel.get("n_selection_labels", metrics.get("n_val"))}


def final_runs(store: Store, metric: str):
    """One row per finished final run: cell, seed, test metric, validation score, costs, labels, curve."""
    import pandas as pd

    records = []
    chosen = store.get_meta("chosen", {})
    for row in store.rows(kind="final", status="done"):
        if row["cell"] in chosen and (row.get("params") or {}) != chosen[row["cell"]]:
            continue  # a final run of an earlier choice (the sweep was resumed with more HPO trials)
        metrics = (row.get("result") or {}).get("metrics") or {}
        test = (metrics.get("test") or {}).get(metric) or {}
        value = test.get("value")
        params = metrics.get("params") or {}
        gpu = metrics.get("peak_gpu_mb")
        selection = _selection(metrics)
        subset_seed = metrics.get("subset_seed", (metrics.get("split") or {}).get("subset_seed"))
        records.append({
            "data": row["data"], "backbone": row["backbone"], "method": row["method"],
            "fraction": float(row["fraction"]), "seed": int(row["seed"]),
            "value": float("nan") if value is None else float(value),
            # the store's value: the run's best validation score of the monitored metric (selection)
            "val": float("nan") if row["value"] is None else float(row["value"]),
            "trainable": params.get("trainable"), "trainable_pct": params.get("trainable_pct"),
            "train_seconds": metrics.get("train_seconds"),
            "peak_mb": gpu if gpu is not None else metrics.get("peak_rss_delta_mb"),
            "peak_kind": "GPU" if gpu is not None else "RSS",
            "adapter_bytes": metrics.get("adapter_bytes"), "n_train": metrics.get("n_train"),
            "n_val": metrics.get("n_val"), "n_selection": selection["n_selection_labels"],
            "val_labels": selection["val_labels"], "selection_mode": selection["mode"],
            "subset_seed": subset_seed, "monitor": metrics.get("monitor"),
            # which images each split held (hashes of their ids): paired runs must share them
            "split_ids": _split_ids(metrics),
            "params": row.get("params") or {}, "best_epoch": metrics.get("best_epoch"),
            "best_is_last": metrics.get("best_is_last"), "curve": metrics.get("curve"),
            "out_dir": metrics.get("out_dir"),
            # detection: test sensitivity at 1/8 .. 8 false positives per image (the FROC points)
            "froc_at": (metrics.get("test") or {}).get("froc_at"),
            # the corruption suite's summary (primary metric): mean corrupted, relative, per corruption
            "corruptions": _corruption_summary(metrics.get("corruptions")),
            # the metric on each external test set (evaluated once, after the home test)
            "external": {name: (values.get(metric) or {}).get("value")
                         for name, values in (metrics.get("external") or {}).items()},
            # test ECE (after / before calibration) and Brier after; NaN for runs without calibration
            **{k: float("nan") if v is None else float(v) for k, v in _calibration(metrics).items()},
        })
    return pd.DataFrame.from_records(records)


def _split_ids(metrics: dict) -> str | None:
    split = metrics.get("split") or {}
    hashes = [split.get(f"{name}_ids_sha256") for name in ("train", "val", "test")]
    return None if None in hashes else "/".join(hashes)


def _calibration(metrics: dict) -> dict:
    from ..calibration import calibration_columns

    cols = calibration_columns(metrics)
    return {"ece": cols["test_ece_cal"], "ece_raw": cols["test_ece_raw"], "brier": cols["test_brier_cal"]}


def _known(values) -> list:
    """The distinct non-missing values, in order of appearance."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v in out:
            continue
        out.append(v)
    return out


def _one(values):
    """The value all runs agree on (an int for counts), a "a/b" string if they differ, None if unknown."""
    known = _known(values)
    known = [int(v) if isinstance(v, float) and v.is_integer() else v for v in known]
    if not known:
        return None
    return known[0] if len(known) == 1 else "/".join(str(v) for v in known)


def summarize(runs, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA, lower_val_is_better: bool = False,
              higher_is_better: bool = True) -> list[dict]:
    """Per (data, backbone, method, fraction): mean/std/CI over seeds, costs, labels, comparison to full.

    The comparison to full fine-tuning (same seeds) gives the raw paired t p (``p_t``), the Holm p
    within the cell (``p_holm``: the family is every method compared with full in that cell), the
    BH q over every comparison of the sweep (``q_bh``), the TOST p within +-margin (``tost_p``) and
    the ``verdict``. ``rank`` orders by test mean (descriptive only); ``val_best`` marks the method
    a reader would pick: the highest mean validation score (lowest when the monitor is the loss).
    ``higher_is_better=False`` (HD95, ASSD): "better" means a lower test metric, and ranks follow.
    """
    sign = 1.0 if higher_is_better else -1.0
    out = []
    if runs.empty:
        return out
    nan = float("nan")
    for (data, backbone, method, fraction), group in runs.groupby(["data", "backbone", "method", "fraction"], sort=False):
        values = [v for v in group["value"] if v == v]
        stats = mean_std_ci(values) if values else {"mean": nan, "std": nan, "low": nan, "high": nan, "n": 0}
        # every metric here lies in [0, 1]: the t interval is clipped to it
        low, high = (max(stats["low"], 0.0), min(stats["high"], 1.0)) if stats["n"] > 1 else (stats["low"], stats["high"])
        vals = [v for v in group["val"] if v == v]
        last = [bool(b) for b in group["best_is_last"] if b is not None and b == b]
        row = {"data": data, "backbone": backbone, "method": method, "fraction": fraction,
               "n": stats["n"], "mean": stats["mean"], "std": stats["std"], "low": low, "high": high,
               "val_mean": sum(vals) / len(vals) if vals else nan,
               "val_std": mean_std_ci(vals)["std"] if vals else nan,
               "trainable_pct": group["trainable_pct"].mean(), "trainable": group["trainable"].mean(),
               "train_seconds": group["train_seconds"].mean(), "peak_mb": group["peak_mb"].mean(),
               "peak_kind": group["peak_kind"].iloc[0], "adapter_bytes": group["adapter_bytes"].mean(),
               "ece": group["ece"].mean(), "ece_raw": group["ece_raw"].mean(), "brier": group["brier"].mean(),
               "n_train": _one(group["n_train"]), "n_val": _one(group["n_val"]),
               "n_selection": _one(group["n_selection"]), "val_labels": _one(group["val_labels"]),
               "selection_mode": _one(group["selection_mode"]),
               "optimistic": "full" in _known(group["val_labels"]),
               # runs whose best validation epoch was the last one (None: not recorded by this store)
               "best_is_last": sum(last) if last else None, "n_runs": len(group),
               "params": group["params"].iloc[0], "seeds": sorted(group["seed"].tolist()),
               "subset_seeds": sorted(int(s) for s in _known(group["subset_seed"])), "val_best": False}
        base = runs[(runs.data == data) & (runs.backbone == backbone) & (runs.fraction == fraction)
                    & (runs.method == BASELINE)]
        row.update(delta=None, delta_low=None, delta_high=None, sd_diff=None, p_t=None, p_w=None, n_pairs=0,
                   tost_p=None, p_holm=None, q_bh=None, verdict="reference" if method == BASELINE else "-")
        if method != BASELINE and not base.empty:
            ours = group.set_index("seed")["value"]
            theirs = base.set_index("seed")["value"]
            seeds = sorted(s for s in set(ours.index) & set(theirs.index) if ours[s] == ours[s] and theirs[s] == theirs[s])
            if seeds:
                a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
                test = paired_test(a, b)
                row.update(delta=test["mean_diff"], delta_low=test["diff_low"], delta_high=test["diff_high"],
                           sd_diff=None if test["std_diff"] != test["std_diff"] else test["std_diff"],
                           p_t=test["t_pvalue"], p_w=test["wilcoxon_pvalue"], n_pairs=test["n"],
                           tost_p=tost_paired(a, b, margin, alpha)["p"])
        out.append(row)
    compared = [r for r in out if r["method"] != BASELINE]
    for r, q in zip(compared, benjamini_hochberg([r["p_t"] for r in compared])):
        r["q_bh"] = q  # across every comparison of the sweep
    for rows in _cells(out).values():
        family = [r for r in rows if r["method"] != BASELINE]
        for r, p in zip(family, holm([r["p_t"] for r in family])):
            r["p_holm"] = p  # within the cell: the methods compared with full there
            if r["n_pairs"]:
                r["verdict"] = verdict(None if r["delta"] is None else sign * r["delta"], p, r["tost_p"], alpha)
        # rank 1 = best mean test metric: a description, never the basis of a choice
        ordered = sorted(rows, key=lambda r: -sign * r["mean"] if r["mean"] == r["mean"] else math.inf)
        for rank, row in enumerate(ordered, 1):
            row["rank"] = rank
        best = _val_best(rows, lower_val_is_better)
        if best is not None:
            best["val_best"] = True
    return out


def _cells(summary: list[dict]) -> dict:
    """{(data, backbone, fraction): rows} in order of appearance."""
    cells: dict = {}
    for row in summary:
        cells.setdefault((row["data"], row["backbone"], row["fraction"]), []).append(row)
    return cells


def _val_best(rows: list[dict], lower_is_better: bool = False) -> dict | None:
    """The method chosen on validation: the best mean validation score of its final runs."""
    scored = [r for r in rows if r["val_mean"] == r["val_mean"]]
    if not scored:
        return None
    return (min if lower_is_better else max)(scored, key=lambda r: r["val_mean"])


def cell_summaries(summary: list[dict], margin: float = DEFAULT_MARGIN, alpha: float = ALPHA,
                   power: float = POWER) -> list[dict]:
    """Per cell: the method chosen on validation, the labels used and the seed count the noise calls for.

    The noise is the median SD of the paired differences to full fine-tuning over the cell's
    methods; ``seeds_needed`` detects the margin with ``power``; ``mdd`` is the smallest
    difference the seeds actually run detect (both per comparison, before the Holm adjustment).
    """
    out = []
    for (data, backbone, fraction), rows in _cells(summary).items():
        sds = [r["sd_diff"] for r in rows if r["sd_diff"] is not None]
        sd = statistics.median(sds) if sds else None
        n = max((r["n_pairs"] for r in rows), default=0)
        best = next((r for r in rows if r["val_best"]), None)
        out.append({
            "data": data, "backbone": backbone, "fraction": fraction, "sd_diff": sd, "n_sd": len(sds),
            "n_seeds": n, "seeds_needed": None if sd is None else seeds_needed(sd, margin, alpha, power),
            "mdd": None if sd is None or n < 2 else detectable_difference(sd, n, alpha, power),
            "val_best": None if best is None else best["method"],
            "val_best_val": None if best is None else best["val_mean"],
            "val_best_test": None if best is None else best["mean"],
            "n_train": _one(r["n_train"] for r in rows), "n_val": _one(r["n_val"] for r in rows),
            "n_selection": _one(r["n_selection"] for r in rows),
            "val_labels": _one(r["val_labels"] for r in rows), "selection_mode": _one(r["selection_mode"] for r in rows),
            "optimistic": any(r["optimistic"] for r in rows),
            "seeds": sorted({s for r in rows for s in r["seeds"]}),
            "subset_seeds": sorted({s for r in rows for s in r["subset_seeds"]}),
        })
    return out


def significance(row) -> str:
    """"*" when the Holm-adjusted paired t p is below alpha (never the raw p)."""
    p = row.get("p_holm")
    return "*" if row.get("delta") is not None and p is not None and p < ALPHA else ""


# ---------------------------------------------------------------------- plots


def _plots(summary: list[dict], out: Path, metric: str, direction: str = "max") -> dict:
    """PNG files per (data, backbone): {'fraction': path, 'pareto': {fraction: path}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    pairs = list(dict.fromkeys((r["data"], r["backbone"]) for r in summary))
    for data, backbone in pairs:
        rows = [r for r in summary if r["data"] == data and r["backbone"] == backbone]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        fractions = sorted({r["fraction"] for r in rows})
        entry = files.setdefault((data, backbone), {"pareto": {}})
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, method in enumerate(methods):
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["fraction"])
            # methods side by side around each fraction (multiplicative offsets: the axis is log)
            dodge = 1 + 0.03 * (i - (len(methods) - 1) / 2) if len(fractions) > 1 else 1
            xs = [r["fraction"] * dodge for r in pts]
            ys = [r["mean"] for r in pts]
            err = [r["std"] if r["std"] == r["std"] else 0 for r in pts]
            style = dict(linewidth=2.5, color="black") if method == BASELINE else {}
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method, **style)
        if len(fractions) > 1:
            ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:g}" for f in fractions])
        entry["fraction"] = _finish(fig, ax, "label fraction of the training split",
                                    f"test {metric} (mean +- std over seeds)", f"{label(data)} - {backbone}",
                                    out / _safe(f"{label(data)}_{backbone}_{metric}_vs_fraction.png"), ncol=2)
        for fraction in fractions:
            # a log axis: runs without a recorded (positive) trainable share have no place on it
            pts = [r for r in rows if r["fraction"] == fraction and r["mean"] == r["mean"]
                   and r["trainable_pct"] == r["trainable_pct"] and (r["trainable_pct"] or 0) > 0]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            front = pareto_front(pts, higher_is_better=direction == "max")
            for r in pts:
                on_front = any(r is o for o in front)
                ax.scatter(r["trainable_pct"], r["mean"], s=60 if on_front else 30,
                           color="tab:red" if on_front else "tab:blue", zorder=3)
                ax.annotate(r["method"], (r["trainable_pct"], r["mean"]), fontsize=8, xytext=(4, 3),
                            textcoords="offset points")
            fr = sorted(front, key=lambda r: r["trainable_pct"])
            ax.step([r["trainable_pct"] for r in fr], [r["mean"] for r in fr], where="post", color="tab:red",
                    alpha=0.6, label="Pareto front")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters (% of the model, log scale)")
            ax.set_ylabel(f"test {metric} (mean over seeds)")
            ax.set_title(f"{label(data)} - {backbone} - fraction {fraction:g}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / _safe(f"{label(data)}_{backbone}_f{fraction:g}_pareto.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            entry["pareto"][fraction] = path
    return files


def _case_figures(summary: list[dict], runs, out: Path) -> dict:
    """{(data, backbone, fraction): png}: the test-case figure a run wrote (segmentation), of the
    method chosen on validation, copied next to the other plots."""
    import shutil

    files = {}
    if runs.empty or "out_dir" not in runs:
        return files
    for r in summary:
        if not r.get("val_best"):
            continue
        mine = runs[(runs.data == r["data"]) & (runs.backbone == r["backbone"]) & (runs.method == r["method"])
                    & (runs.fraction == r["fraction"])].sort_values("seed")
        for out_dir in mine["out_dir"]:
            figure = Path(str(out_dir)) / "test_cases.png"
            if out_dir and figure.is_file():
                out.mkdir(parents=True, exist_ok=True)
                target = out / _safe(f"{label(r['data'])}_{r['backbone']}_f{r['fraction']:g}_cases.png")
                shutil.copyfile(figure, target)
                files[(r["data"], r["backbone"], r["fraction"])] = target
                break
    return files


def _curve_plots(runs, out: Path, monitor: str, lower_is_better: bool = False) -> dict:
    """One PNG per (data, backbone, fraction): validation score vs optimizer step, each seed thin,
    the mean over seeds thick (on the steps every seed reached). Cells without curves get none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    if runs.empty:
        return files
    for (data, backbone, fraction), cell in runs.groupby(["data", "backbone", "fraction"], sort=False):
        curves: dict = {}
        for method, curve in zip(cell["method"], cell["curve"]):
            pts = np.asarray([p for p in (curve or []) if len(p) == 2 and p[1] is not None], dtype=float)
            pts = pts[np.isfinite(pts).all(axis=1)] if pts.size else pts
            if len(pts):
                curves.setdefault(method, []).append(pts[np.argsort(pts[:, 0])])
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (method, seeds) in enumerate(curves.items()):
            color = "black" if method == BASELINE else colors[i % len(colors)]
            for pts in seeds:
                ax.plot(pts[:, 0], pts[:, 1], color=color, alpha=0.25, linewidth=0.8)
            lo, hi = max(p[0, 0] for p in seeds), min(p[-1, 0] for p in seeds)
            grid = np.unique(np.concatenate([p[:, 0] for p in seeds]))
            grid = grid[(grid >= lo) & (grid <= hi)]
            if len(grid):
                mean = np.mean([np.interp(grid, p[:, 0], p[:, 1]) for p in seeds], axis=0)
                ax.plot(grid, mean, color=color, linewidth=2.2, marker="o" if len(grid) == 1 else None,
                        label=f"{method} (n={len(seeds)})")
        # the curve holds the trainer's score (higher is better): a loss or an HD95 appears negated
        shown = f"-{monitor}" if lower_is_better else monitor
        files[(data, backbone, fraction)] = _finish(
            fig, ax, "optimizer step", f"validation {shown} (thin: seeds, thick: mean)",
            f"{label(data)} - {backbone} - fraction {fraction:g}: learning curves",
            out / _safe(f"{label(data)}_{backbone}_f{fraction:g}_learning_curves.png"), ncol=2)
    return files


SHIFT_HEADER = ["data", "backbone", "fraction", "method", "external set", "seeds", "in-domain test mean",
                "external mean", "drop (external - in-domain) [95% CI]", "external / in-domain"]


def shift_rows(runs, metric: str) -> list[list[str]]:
    """Per cell, method and external set: the in-domain and external test means over seeds and the
    paired drop (external minus in-domain on the same runs) with its Student-t 95 % CI."""
    from ..stats import mean_std_ci

    rows = []
    if runs.empty or "external" not in runs:
        return rows
    for (data, backbone, fraction, method), cell in runs.groupby(["data", "backbone", "fraction", "method"],
                                                                 sort=False):
        names = sorted({n for ext in cell["external"] if isinstance(ext, dict) for n in ext})
        for name in names:
            pairs = [(v, ext.get(name)) for v, ext in zip(cell["value"], cell["external"])
                     if isinstance(ext, dict) and ext.get(name) is not None and v == v]
            if not pairs:
                continue
            home = [p[0] for p in pairs]
            away = [float(p[1]) for p in pairs]
            drop = mean_std_ci([b - a for a, b in pairs])
            ratio = sum(away) / sum(home) if sum(home) else float("nan")
            rows.append([label(data), backbone, f"{fraction:g}", method, name, str(len(pairs)),
                         _num(sum(home) / len(home)), _num(sum(away) / len(away)),
                         f"{drop['mean']:+.4f} [{_num(drop['low'])}, {_num(drop['high'])}]", _num(ratio, 3)])
    return rows


SHIFT_CONTRAST_HEADER = ["data", "backbone", "fraction", "external set", "quantity", "method", "method mean",
                         "full mean", "delta vs full (95% CI)", "p t (raw)", "p Holm", "q BH", "TOST p", "verdict",
                         "seeds"]


def _external_values(runs, name: str):
    """The per-run score on external set ``name`` (NaN where a run has none)."""
    nan = float("nan")
    return [float(e[name]) if isinstance(e, dict) and e.get(name) is not None else nan for e in runs["external"]]


def _external_names(runs) -> list[str]:
    if runs.empty or "external" not in runs:
        return []
    return sorted({n for ext in runs["external"] if isinstance(ext, dict) for n in ext})


def shift_contrasts(runs, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA,
                    higher_is_better: bool = True) -> list[dict]:
    """Which methods lose least under shift? Every method against full fine-tuning on the same seeds,
    per external set, on two quantities: the external score itself and the drop (external minus
    in-domain of the same run).

    Each (set, quantity) is run through ``summarize`` with the run's value replaced, so the paired t,
    the Holm family (the methods compared with full in one data set x backbone x fraction cell), the
    BH q (over that set and quantity), TOST and the verdict are the method-vs-full ones of the report.
    A drop nearer zero is the better one: the direction is the metric's (HD95: lower is better, a
    positive drop is a loss).
    """
    out: list[dict] = []
    for name in _external_names(runs):
        away = _external_values(runs, name)
        home = list(runs["value"])
        for quantity, values in (("external", away), ("drop", [b - a for a, b in zip(home, away)])):
            out += _versus_full(runs, values, margin, alpha, higher_is_better, external=name, quantity=quantity)
    return out


def _versus_full(runs, values, margin: float, alpha: float, higher_is_better: bool, **extra) -> list[dict]:
    """``summarize``'s method-vs-full comparisons with each run's value replaced by ``values``."""
    rows = summarize(runs.assign(value=values), margin=margin, alpha=alpha, higher_is_better=higher_is_better)
    full = {(r["data"], r["backbone"], r["fraction"]): r["mean"] for r in rows if r["method"] == BASELINE}
    return [{"data": r["data"], "backbone": r["backbone"], "fraction": r["fraction"], **extra, "method": r["method"],
             "mean": r["mean"], "full_mean": full.get((r["data"], r["backbone"], r["fraction"])),
             "delta": r["delta"], "delta_low": r["delta_low"], "delta_high": r["delta_high"], "p_t": r["p_t"],
             "p_holm": r["p_holm"], "q_bh": r["q_bh"], "tost_p": r["tost_p"], "verdict": r["verdict"],
             "seeds": r["seeds"]}
            for r in rows if r["method"] != BASELINE and r["n_pairs"]]


def robustness_contrasts(runs, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA) -> list[dict]:
    """Which methods keep most of their score under corruption? Relative robustness (corrupted / clean
    of the suite's metric, per run) of every method against full fine-tuning on the same seeds, with
    the report's method-vs-full statistics. Higher is better: the run stores the ratio oriented so
    (clean / corrupted for a lower-is-better metric)."""
    if runs.empty or "corruptions" not in runs:
        return []
    values = [float(c["relative"]) if isinstance(c, dict) and c.get("relative") is not None else float("nan")
              for c in runs["corruptions"]]
    if all(v != v for v in values):
        return []
    return _versus_full(runs, values, margin, alpha, True, external="corrupted", quantity="relative robustness")


def shift_contrast_rows(contrasts: list[dict]) -> list[list[str]]:
    return [[label(r["data"]), r["backbone"], f"{r['fraction']:g}", r["external"], r["quantity"], r["method"],
             _num(r["mean"]), _num(r["full_mean"]),
             f"{r['delta']:+.4f} [{_num(r['delta_low'])}, {_num(r['delta_high'])}]", _p(r["p_t"]), _p(r["p_holm"]),
             _p(r["q_bh"]), _p(r["tost_p"]), r["verdict"], ", ".join(str(s) for s in r["seeds"])]
            for r in contrasts]


ALIGNMENT_HEADER = ["data", "backbone", "fraction", "method", "external set", "alignment", "seeds", "raw mean",
                    "aligned mean", "recovered (aligned - raw) [95% CI]", "p t (raw)", "p Holm", "verdict"]


def alignment_recovery(runs, alpha: float = ALPHA, higher_is_better: bool = True) -> list[dict]:
    """How much does training-free style alignment recover? For every external set ``X`` evaluated also
    as ``X+<alignment>``: aligned minus raw score of the same runs (the same models), paired over seeds.

    Holm adjusts within each data set x backbone x fraction x set x alignment (the family: that
    alignment on every method); verdict "recovers" / "hurts" when the Holm p is below ``alpha`` in
    the metric's direction, else "inconclusive".
    """
    names = _external_names(runs)
    out: list[dict] = []
    for aligned_name in names:
        raw_name, _, how = aligned_name.partition("+")
        if not how or raw_name not in names:
            continue
        raw, aligned = _external_values(runs, raw_name), _external_values(runs, aligned_name)
        frame = runs.assign(raw=raw, aligned=aligned)
        family: list[dict] = []
        for (data, backbone, fraction, method), cell in frame.groupby(["data", "backbone", "fraction", "method"],
                                                                      sort=False):
            pairs = sorted((int(s), a, r) for s, a, r in zip(cell["seed"], cell["aligned"], cell["raw"])
                           if a == a and r == r)
            if len(pairs) < 2:
                continue
            test = paired_test([a for _, a, _ in pairs], [r for _, _, r in pairs])
            family.append({"data": data, "backbone": backbone, "fraction": fraction, "method": method,
                           "external": raw_name, "alignment": how, "seeds": [s for s, _, _ in pairs],
                           "raw_mean": sum(r for _, _, r in pairs) / len(pairs),
                           "aligned_mean": sum(a for _, a, _ in pairs) / len(pairs),
                           "delta": test["mean_diff"], "delta_low": test["diff_low"],
                           "delta_high": test["diff_high"], "p_t": test["t_pvalue"]})
        groups: dict = {}
        for r in family:
            groups.setdefault((r["data"], r["backbone"], r["fraction"]), []).append(r)
        for rows in groups.values():
            for r, p in zip(rows, holm([r["p_t"] for r in rows])):
                gain = r["delta"] if higher_is_better else -r["delta"]
                r["p_holm"] = p
                r["verdict"] = "inconclusive" if not (p == p and p < alpha) else ("recovers" if gain > 0 else "hurts")
        out.extend(family)
    return out


def alignment_rows(recovery: list[dict]) -> list[list[str]]:
    return [[label(r["data"]), r["backbone"], f"{r['fraction']:g}", r["method"], r["external"], r["alignment"],
             ", ".join(str(s) for s in r["seeds"]), _num(r["raw_mean"]), _num(r["aligned_mean"]),
             f"{r['delta']:+.4f} [{_num(r['delta_low'])}, {_num(r['delta_high'])}]", _p(r["p_t"]),
             _p(r["p_holm"]), r["verdict"]] for r in recovery]


def external_backbone_comparisons(runs, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA,
                                  higher_is_better: bool = True) -> list[dict]:
    """Does one backbone transfer better? ``backbone_comparisons`` on each external set's score and on
    the drop (external minus in-domain of the same run: does it lose less?), one Holm / BH family per
    external set and quantity; each row names its set and quantity."""
    out: list[dict] = []
    for name in _external_names(runs):
        away = _external_values(runs, name)
        for quantity, values in (("external", away), ("drop", [b - a for a, b in zip(runs["value"], away)])):
            for r in backbone_comparisons(runs.assign(value=values), margin=margin, alpha=alpha,
                                          higher_is_better=higher_is_better):
                out.append({**r, "external": name, "quantity": quantity})
    return out


def _paired_by_seed(a_rows, b_rows) -> tuple[list[int], list[float], list[float]]:
    """(seeds both frames ran with a value, their values in A, in B); frames indexed by seed."""
    seeds = sorted(s for s in set(a_rows.index) & set(b_rows.index)
                   if a_rows["value"][s] == a_rows["value"][s] and b_rows["value"][s] == b_rows["value"][s])
    return seeds, [float(a_rows["value"][s]) for s in seeds], [float(b_rows["value"][s]) for s in seeds]


AGAINST_HEADER = ["quantity", "data", "backbone", "fraction", "method", "this sweep", "other sweep",
                  "delta this - other (95% CI)", "p t (raw)", "p Holm", "q BH", "TOST p", "verdict (this vs other)",
                  "seeds", "same split"]


def sweep_contrasts(runs, other, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA,
                    higher_is_better: bool = True) -> list[dict]:
    """This sweep against another one with the same cells (e.g. the same methods trained with DANN and
    without): every data set x backbone x method x fraction present in both, paired by seed, on the
    home test metric and on each external set both evaluated.

    One Holm / BH family per quantity (the home test, or one external set) over every cell of the
    comparison; TOST within +-``margin``; the verdict is for this sweep against the other
    (``higher_is_better=False``: lower is better). ``same_split`` says whether the recorded split
    ids agree on every paired seed (None: not recorded).
    """
    out: list[dict] = []
    if runs.empty or other.empty:
        return out
    keys = ["data", "backbone", "method", "fraction"]
    quantities = [("test", None)] + [(f"external {n}", n) for n in _external_names(runs)
                                     if n in set(_external_names(other))]
    sign = 1.0 if higher_is_better else -1.0
    for quantity, name in quantities:
        mine = runs if name is None else runs.assign(value=_external_values(runs, name))
        theirs = other if name is None else other.assign(value=_external_values(other, name))
        family = []
        for key, cell in mine.groupby(keys, sort=False):
            match = theirs
            for k, v in zip(keys, key):
                match = match[match[k] == v]
            a_rows, b_rows = cell.set_index("seed"), match.set_index("seed")
            seeds, a, b = _paired_by_seed(a_rows, b_rows)
            if not seeds:
                continue
            test = paired_test(a, b)
            family.append({"quantity": quantity, **dict(zip(keys, key)), "mean_a": sum(a) / len(a),
                           "mean_b": sum(b) / len(b), "delta": test["mean_diff"], "delta_low": test["diff_low"],
                           "delta_high": test["diff_high"], "p_t": test["t_pvalue"],
                           "tost_p": tost_paired(a, b, margin, alpha)["p"], "seeds": seeds,
                           "same_split": _agree(a_rows, b_rows, seeds, "split_ids")})
        for r, p, q in zip(family, holm([r["p_t"] for r in family]), benjamini_hochberg([r["p_t"] for r in family])):
            r["p_holm"], r["q_bh"] = p, q
            r["verdict"] = verdict(sign * r["delta"], p, r["tost_p"], alpha)
        out += family
    return out


def sweep_contrast_rows(contrasts: list[dict]) -> list[list[str]]:
    same = {True: "yes", False: "no: the splits differ", None: "unknown"}
    return [[r["quantity"], label(r["data"]), r["backbone"], f"{r['fraction']:g}", r["method"], _num(r["mean_a"]),
             _num(r["mean_b"]), f"{r['delta']:+.4f} [{_num(r['delta_low'])}, {_num(r['delta_high'])}]",
             _p(r["p_t"]), _p(r["p_holm"]), _p(r["q_bh"]), _p(r["tost_p"]), r["verdict"],
             ", ".join(str(s) for s in r["seeds"]), same[r["same_split"]]] for r in contrasts]


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (mapping or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_difference(this: dict | None, other: dict | None) -> list[str]:
    """The experiment settings in which two sweeps differ (``out`` aside), as 'key: this vs other';
    an absolute path is shown by its public form (never the user's folders)."""
    from ..data.privacy import public_path

    a, b = _flat(this or {}), _flat(other or {})
    lines = []
    for key in sorted(set(a) | set(b)):
        if key == "out" or a.get(key) == b.get(key):
            continue
        show = [public_path(v) if isinstance(v, str) else v for v in (a.get(key), b.get(key))]
        lines.append(f"{key}: {show[0]!s} vs {show[1]!s}")
    return lines


BACKBONE_HEADER = ["data", "fraction", "method", "backbone A", "backbone B", "A mean", "B mean",
                   "delta A - B (95% CI)", "p t (raw)", "p Holm", "q BH", "TOST p", "verdict (A vs B)", "seeds",
                   "same split and labelled images"]


def backbone_comparisons(runs, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA,
                         higher_is_better: bool = True) -> list[dict]:
    """Which backbone? Every pair of backbones run with the same data set, method and fraction, paired by seed.

    A seed draws the same label subset on every backbone of a sweep (the subset seed does not depend on
    the backbone), so pairing by seed removes the subset's share of the variance; ``same_split`` and
    ``same_subsets`` say whether the recorded split id hashes and subset seeds agree (stores from before
    the split stopped depending on the image size can hold different splits per image size). A is the
    backbone that comes first in the sweep. Holm and BH adjust over every backbone comparison of the
    sweep (one family: "which backbone?"), apart from the method-vs-full family of ``summarize``.
    ``higher_is_better=False`` (HD95): "better" means lower.
    """
    from itertools import combinations

    sign = 1.0 if higher_is_better else -1.0
    out: list[dict] = []
    if runs.empty or runs["backbone"].nunique() < 2:
        return out
    order = list(dict.fromkeys(runs["backbone"]))
    for (data, method, fraction), group in runs.groupby(["data", "method", "fraction"], sort=False):
        present = [b for b in order if b in set(group["backbone"])]
        for a_name, b_name in combinations(present, 2):
            a_rows = group[group.backbone == a_name].set_index("seed")
            b_rows = group[group.backbone == b_name].set_index("seed")
            seeds, a, b = _paired_by_seed(a_rows, b_rows)
            if not seeds:
                continue
            test = paired_test(a, b)
            out.append({"data": data, "fraction": fraction, "method": method, "backbone_a": a_name,
                        "backbone_b": b_name, "n_pairs": test["n"], "seeds": seeds,
                        "mean_a": sum(a) / len(a), "mean_b": sum(b) / len(b), "delta": test["mean_diff"],
                        "delta_low": test["diff_low"], "delta_high": test["diff_high"], "p_t": test["t_pvalue"],
                        "tost_p": tost_paired(a, b, margin, alpha)["p"],
                        "same_split": _agree(a_rows, b_rows, seeds, "split_ids"),
                        "same_subsets": _agree(a_rows, b_rows, seeds, "subset_seed")})
    for r, p, q in zip(out, holm([r["p_t"] for r in out]), benjamini_hochberg([r["p_t"] for r in out])):
        r["p_holm"], r["q_bh"] = p, q
        r["verdict"] = verdict(sign * r["delta"], p, r["tost_p"], alpha)
    return out


def _agree(a_rows, b_rows, seeds, column: str) -> bool | None:
    """Do the paired runs record the same ``column`` for every seed? None: not recorded."""
    if column not in a_rows or column not in b_rows:
        return None
    pairs = [(a_rows[column][s], b_rows[column][s]) for s in seeds]
    known = [(x, y) for x, y in pairs if x is not None and y is not None and x == x and y == y]
    return all(x == y for x, y in known) if known else None


def _same_images(r: dict) -> str:
    if r["same_split"] is False:
        return "no: the splits differ"
    if r["same_subsets"] is False:
        return "no: the label subsets differ"
    if r["same_split"]:  # and the subsets did not differ (checked above)
        return "yes"
    return "unknown"


def backbone_rows(comparisons: list[dict]) -> list[list[str]]:
    return [[label(r["data"]), f"{r['fraction']:g}", r["method"], r["backbone_a"], r["backbone_b"],
             _num(r["mean_a"]), _num(r["mean_b"]),
             f"{r['delta']:+.4f} [{_num(r['delta_low'])}, {_num(r['delta_high'])}]", _p(r["p_t"]),
             _p(r["p_holm"]), _p(r["q_bh"]), _p(r["tost_p"]), r["verdict"], ", ".join(str(s) for s in r["seeds"]),
             _same_images(r)] for r in comparisons]


def _corruption_summary(entry: dict | None) -> dict | None:
    """A run's corruption results as the report needs them: the suite summary and the primary
    metric at each corruption x severity (``by_severity[name][severity]``)."""
    if not entry:
        return None
    out = {k: entry.get(k) for k in ("suite", "metric", "clean", "mean", "relative", "per_corruption")}
    out["by_severity"] = {name: {str(sev): ((values.get(entry.get("metric")) or {}).get("value"))
                                 for sev, values in severities.items()}
                          for name, severities in (entry.get("results") or {}).items()}
    return out


def corruption_breakdown(runs) -> list[dict]:
    """Per cell, method, corruption and severity: the suite metric's mean over seeds with its
    Student-t 95 % CI and the mean relative value (corrupted / clean of the same run) - the
    per corruption x severity table of the robustness section (``corruptions.csv``)."""
    from ..stats import mean_std_ci

    rows = []
    for (data, backbone, fraction, method), entries in _robust_cells(runs):
        names = list(dict.fromkeys(n for _, c in entries for n in (c.get("by_severity") or {})))
        for name in names:
            severities = list(dict.fromkeys(s for _, c in entries for s in (c.get("by_severity") or {}).get(name, {})))
            for severity in severities:
                pairs = [(c["by_severity"][name][severity], clean) for clean, c in entries
                         if (c.get("by_severity") or {}).get(name, {}).get(severity) is not None]
                if not pairs:
                    continue
                stats = mean_std_ci([v for v, _ in pairs])
                rows.append({"data": label(data), "backbone": backbone, "fraction": fraction, "method": method,
                             "corruption": name, "severity": int(severity), "metric": entries[0][1].get("metric"),
                             "seeds": len(pairs), "mean": stats["mean"], "std": stats["std"], "low": stats["low"],
                             "high": stats["high"],
                             "relative": sum(v / clean for v, clean in pairs if clean) / len(pairs)})
    return rows


def corruption_tables(breakdown: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """For each cell, (title, header, rows): methods x corruptions (mean over severities and seeds)
    with a column per severity (mean over corruptions and seeds) - the suite metric itself."""
    import pandas as pd

    if not breakdown:
        return []
    frame = pd.DataFrame(breakdown)
    tables = []
    for (data, backbone, fraction), rows in frame.groupby(["data", "backbone", "fraction"], sort=False):
        by_corruption = rows.pivot_table(index="method", columns="corruption", values="mean", aggfunc="mean", sort=False)
        by_severity = rows.pivot_table(index="method", columns="severity", values="mean", aggfunc="mean")
        table = by_corruption.join(by_severity.rename(columns=lambda s: f"severity {s}"))
        body = [[method, *[_num(v) if pd.notna(v) else "-" for v in values]]
                for method, values in zip(table.index, table.to_numpy())]
        tables.append((f"{data} - {backbone} - fraction {fraction:g}: {rows['metric'].iloc[0]} per corruption "
                       f"(mean over severities and seeds) and per severity (mean over corruptions and seeds)",
                       ["method", *table.columns], body))
    return tables


ROBUSTNESS_HEADER = ["data", "backbone", "fraction", "method", "seeds", "clean test mean (suite metric)", "corrupted mean",
                     "relative robustness [95% CI]", "worst corruption (mean)"]


def _robust_cells(runs):
    if runs.empty or "corruptions" not in runs:
        return []
    out = []
    for key, cell in runs.groupby(["data", "backbone", "fraction", "method"], sort=False):
        # (clean value of the suite's metric, the run's corruption summary)
        entries = [(c["clean"], c) for c in cell["corruptions"] if isinstance(c, dict) and c.get("clean") is not None]
        if entries:
            out.append((key, entries))
    return out


def robustness_rows(runs) -> list[list[str]]:
    """Per cell and method: clean and corrupted test means over seeds, the relative robustness
    (corrupted / clean of the suite's primary metric) with its Student-t 95 % CI over seeds, and
    the corruption with the lowest mean."""
    from ..stats import mean_std_ci

    rows = []
    for (data, backbone, fraction, method), entries in _robust_cells(runs):
        relative = mean_std_ci([c["relative"] for _, c in entries])
        per = {}
        for _, c in entries:
            for name, value in (c.get("per_corruption") or {}).items():
                per.setdefault(name, []).append(value)
        worst = min(per, key=lambda n: sum(per[n]) / len(per[n])) if per else None
        rows.append([label(data), backbone, f"{fraction:g}", method, str(len(entries)),
                     _num(sum(v for v, _ in entries) / len(entries)),
                     _num(sum(c["mean"] for _, c in entries) / len(entries)),
                     f"{_num(relative['mean'], 3)} [{_num(relative['low'], 3)}, {_num(relative['high'], 3)}]",
                     f"{worst} ({_num(sum(per[worst]) / len(per[worst]))})" if worst else "-"])
    return rows


def _robustness_plots(runs, out: Path, metric: str) -> dict:
    """One PNG per (data, backbone, fraction): relative robustness vs clean test metric per method
    (means over seeds, bars: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files, groups = {}, {}
    for (data, backbone, fraction, method), entries in _robust_cells(runs):
        groups.setdefault((data, backbone, fraction), []).append((method, entries))
    for (data, backbone, fraction), methods in groups.items():
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, entries in methods:
            clean = np.array([v for v, _ in entries], dtype=float)
            rel = np.array([c["relative"] for _, c in entries], dtype=float)
            style = dict(color="black") if method == BASELINE else {}
            ax.errorbar(clean.mean(), rel.mean(), xerr=clean.std(ddof=1) if len(clean) > 1 else 0,
                        yerr=rel.std(ddof=1) if len(rel) > 1 else 0, marker="o", capsize=3, label=method, **style)
        files[(data, backbone, fraction)] = _finish(
            fig, ax, f"clean test {metric} (mean over seeds)", "relative robustness (corrupted / clean)",
            f"{label(data)} - {backbone} - fraction {fraction:g}: robustness vs accuracy",
            out / _safe(f"{label(data)}_{backbone}_f{fraction:g}_robustness.png"), ncol=2)
    return files


def _froc_plots(runs, out: Path) -> dict:
    """One PNG per (data, backbone, fraction) of runs that hold FROC points (detection): test
    sensitivity vs false positives per image, the mean over seeds per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files: dict = {}
    if runs.empty or "froc_at" not in runs:
        return files
    for (data, backbone, fraction), cell in runs.groupby(["data", "backbone", "fraction"], sort=False):
        curves: dict = {}
        for method, points in zip(cell["method"], cell["froc_at"]):
            if isinstance(points, dict) and points:
                rates = sorted(points, key=float)
                curves.setdefault(method, []).append(([float(r) for r in rates], [points[r] for r in rates]))
        if not curves:
            continue
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, seeds in curves.items():
            rates = seeds[0][0]
            mean = np.nanmean([np.asarray(s, dtype=float) for _, s in seeds if len(s) == len(rates)], axis=0)
            style = dict(linewidth=2.5, color="black") if method == BASELINE else {}
            ax.plot(rates, mean, marker="o", label=f"{method} (n={len(seeds)})", **style)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        files[(data, backbone, fraction)] = _finish(
            fig, ax, "false positives per image (log scale)", "test sensitivity (mean over seeds)",
            f"{label(data)} - {backbone} - fraction {fraction:g}: FROC",
            out / _safe(f"{label(data)}_{backbone}_f{fraction:g}_froc.png"), ncol=2)
    return files


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, ncol: int = 1) -> Path:
    """Label, grid, legend, save and close one plot; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(rows: list[dict], higher_is_better: bool = True) -> list[dict]:
    """Rows no other row beats on both axes (fewer trainable % and a better metric, one strictly)."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for r in rows:
        dominated = any(o is not r and o["trainable_pct"] <= r["trainable_pct"] and sign * o["mean"] >= sign * r["mean"]
                        and (o["trainable_pct"] < r["trainable_pct"] or sign * o["mean"] > sign * r["mean"])
                        for o in rows)
        if not dominated:
            front.append(r)
    return front


# ---------------------------------------------------------------------- content


def _settings_lines(experiment: dict | None) -> list[str]:
    from ..data.privacy import public_path  # stores written before every path was made public

    if not experiment:
        return []
    train = experiment.get("train") or {}
    size = experiment.get("image_size")
    size = ", ".join(f"{k} {v}px" for k, v in size.items()) if isinstance(size, dict) else f"{size}px"
    return [
        f"data: {', '.join(label(d) for d in experiment.get('data', []))}" + (f" (MedMNIST {experiment['medmnist_size']}px files)"
                                                           if experiment.get("medmnist_size") else ""),
        f"backbones: {', '.join(experiment.get('backbones', []))}; image size {size}",
        f"label fractions: {', '.join(f'{f:g}' for f in experiment.get('fractions', []))}; "
        f"seeds: {', '.join(str(s) for s in experiment.get('seeds', []))} (the seed drives head initialisation, data "
        "order, augmentation and dropout; below fraction 1 it also draws the label subset)",
        _hpo_line(experiment),
        "selection labels: " + ("every validation label (the literature's protocol: optimistic)"
                                if experiment.get("val_labels") == "full" else
                                "the validation split subsampled with the training labels' fraction rule"
                                if experiment.get("val_labels") == "follow" else "the whole validation split"),
        "training: " + (", ".join(f"{k}={public_path(v) if isinstance(v, str) else v}"
                                  for k, v in sorted(train.items())) or "medpeft defaults")
        + " (early stopping on validation; the best state is tested once)",
    ] + (["**PROMPTED**: every mask was predicted from a box prompt (the ground-truth mask's bounding box, "
          "jittered in training): these scores use test-time information an unprompted model does not have and "
          "are never to be ranked with unprompted results"] if train.get("prompt") == "box" else []) \
        + _noise_lines(experiment.get("data_options") or {})


def _noise_lines(data_options: dict) -> list[str]:
    spec = data_options.get("label_noise")
    if not spec:
        return []
    validation = "clean validation labels (--clean-validation)" if data_options.get("clean_validation") else \
        "validation labels as noisy as the training labels (what a user with noisy labels selects with)"
    return [f"label noise: {spec} on the training labels, {validation}; a new draw per seed; the test labels are "
            "clean; each run's noisy_labels.csv lists the flips"]


def _hpo_line(experiment: dict) -> str:
    trials = experiment.get("hpo_trials", 0)
    if not trials:
        return "HPO: none (each method's default learning rate and options)"
    line = f"HPO: {trials} trial(s) per cell (Optuna TPE, seed {experiment.get('hpo_seed', 0)}, trial 0 = the defaults; "
    if experiment.get("hpo_prune", True):  # stores before the protocol always pruned
        line += (f"successive halving from epoch {experiment.get('prune_min_epochs')}, reduction factor "
                 f"{experiment.get('prune_reduction_factor')}: the budget is trials started, pruned ones included")
    else:
        line += "no pruning: every method completes the same number of trials"
    subsets = experiment.get("hpo_subsets")
    if subsets and subsets > 1:
        line += f"; below fraction 1 a trial's objective is the mean over {subsets} label subsets"
    return line + "); chosen on validation only, then trained once per seed"


def _conclusion(summary: list[dict], cells: list[dict], metric: str, margin: float,
                lower_val_is_better: bool = False) -> list[str]:
    """Plain sentences per cell: does PEFT beat full fine-tuning (Holm-adjusted verdicts)?"""
    lines = []
    info = {(c["data"], c["backbone"], c["fraction"]): c for c in cells}
    for key, rows in _cells(summary).items():
        data, backbone, fraction = key
        base = next((r for r in rows if r["method"] == BASELINE), None)
        peft = [r for r in rows if r["method"] not in BASELINES and r["mean"] == r["mean"]]
        if base is None or not peft:
            continue
        by = {v: [r["method"] for r in peft if r["verdict"] == v] for v in ("better", "equivalent", "worse", "inconclusive")}
        above = [r for r in peft if r["mean"] > base["mean"]]
        chosen = _val_best(peft, lower_val_is_better)
        n = max(r["n_pairs"] for r in peft)
        text = (f"{label(data)} / {backbone} / fraction {fraction:g}: {len(peft)} PEFT method(s) vs full fine-tuning "
                f"({metric} {_num(base['mean'])}; paired t over {n} seed(s), Holm-adjusted within the cell, "
                f"TOST margin +-{margin:g}): better: {', '.join(by['better']) or 'none'}; "
                f"equivalent: {', '.join(by['equivalent']) or 'none'}; worse: {', '.join(by['worse']) or 'none'}; "
                f"inconclusive: {', '.join(by['inconclusive']) or 'none'}. "
                f"{len(above)} of {len(peft)} have a higher test mean (descriptive).")
        if chosen is not None:
            text += (f" Best PEFT method on validation: {chosen['method']} (validation {_num(chosen['val_mean'])}, "
                     f"test {_num(chosen['mean'])}, delta {_num(chosen['delta'])}, Holm p={_p(chosen['p_holm'])}, "
                     f"{chosen['verdict']}).")
        if info[key]["optimistic"]:
            text += " " + OPTIMISTIC
        lines.append(text)
    return lines


OPTIMISTIC = "Optimistic: selection used the full validation split."


def _labels_line(cell: dict) -> str:
    """Labels the cell's runs saw: for training, and for selection (early stopping / HPO)."""
    val_labels, mode = cell["val_labels"], cell["selection_mode"]
    if val_labels is None and mode is None:
        policy = (f"{_int(cell['n_val'])} validation images; selection policy unknown (the store predates "
                  "its recording)")
    else:
        policy = {"follow": "validation labels follow the label budget",
                  "full": "the full validation split"}.get(val_labels, f"validation labels: {val_labels or 'unknown'}")
        if mode and str(mode).startswith("cv:"):
            policy = f"{mode.split(':', 1)[1]}-fold cross-validation inside the labelled training subset"
        policy += f" (mode {mode or 'unknown'})"
    text = f"Labels used: {_int(cell['n_train'])} train labels; {_int(cell['n_selection'])} selection labels ({policy})."
    if cell["optimistic"]:
        text += " " + OPTIMISTIC + " The numbers of this cell overstate what the label budget allows."
    return text


def _seeds_line(cell: dict, margin: float) -> str:
    seeds = ", ".join(str(s) for s in cell["seeds"]) or "-"
    text = f"Seeds: {len(cell['seeds'])} ({seeds})"
    if cell["subset_seeds"]:
        text += f"; label-subset seeds {', '.join(str(s) for s in cell['subset_seeds'])}"
    text += ". "
    if cell["sd_diff"] is None:
        return text + ("Too few paired seeds (or no full fine-tuning runs) to estimate the noise of a comparison: "
                       "run at least 2 seeds per method.")
    text += (f"SD of the paired differences to full fine-tuning: {_num(cell['sd_diff'])} (median over "
             f"{cell['n_sd']} method(s)). ")
    if cell["mdd"] is not None and cell["sd_diff"] > 0:
        text += (f"With {cell['n_seeds']} seeds a paired t-test (alpha {ALPHA}, before the Holm adjustment) detects "
                 f"a difference of {_num(cell['mdd'])} with {POWER:.0%} power; ")
    if cell["sd_diff"] == 0:
        text += "the differences show no spread, so the seeds needed cannot be estimated."
    elif cell["seeds_needed"] is None:
        text += f"detecting the margin {margin:g} would need more than 10000 seeds."
    else:
        text += f"detecting the margin {margin:g} needs {cell['seeds_needed']} seeds."
    return text


def _int(x) -> str:
    return "-" if x is None else str(x)


def _convergence_notes(rows: list[dict]) -> list[str]:
    """Methods whose best validation epoch was the last one in more than half their runs."""
    notes = []
    for r in rows:
        if r["best_is_last"] is not None and r["best_is_last"] * 2 > r["n_runs"]:
            notes.append(f"{r['method']}: the best validation epoch was the last epoch in {r['best_is_last']} of "
                         f"{r['n_runs']} runs; training may not have converged (a longer schedule could change "
                         "its numbers).")
    return notes


def _trial_counts(trials: list[dict]) -> str:
    counts = {"completed": 0, "pruned": 0, "failed": 0}
    for t in trials:
        if t["status"] == "failed":
            counts["failed"] += 1
        elif t["status"] == "done":
            counts["pruned" if t["outcome"] == "pruned" else "completed"] += 1
    return " / ".join(str(counts[k]) for k in ("completed", "pruned", "failed"))


def _blocks(summary, cells, store: Store, plots: dict, metric: str, notes: list[str], margin: float,
            n_runs: int, lower_val_is_better: bool = False, shift: list | None = None,
            robustness: list | None = None, backbones: list | None = None, shift_contrasts_: list | None = None,
            alignment: list | None = None, external_backbones: list | None = None,
            robust_contrasts: list | None = None, against: dict | None = None,
            corruptions: list | None = None) -> list[Block]:
    experiment = store.get_meta("experiment")
    monitor = experiment_task(experiment).resolve_monitor(((experiment or {}).get("train") or {}).get("monitor", "auto"))
    sweep_notes = store.get_meta("notes") or []
    blocks = [Block("h1", "medpeft benchmark report")]
    blocks.append(Block("list", rows=_settings_lines(experiment)))
    failed = store.rows(status="failed")
    running = store.rows(status="running")
    counts = f"{n_runs} final runs done"
    if failed:
        counts += f", {len(failed)} failed (see runs.csv)"
    if running:
        counts += f", {len(running)} unfinished (resume the sweep with --resume)"
    blocks.append(Block("p", f"Metric: test {metric}; mean +- std and 95% CI over seeds (Student t, clipped to [0, 1]). {counts}. "
                              f"Delta = method minus full fine-tuning on the same seeds (paired t-test). "
                              f"p Holm: adjusted within each data set x backbone x fraction cell; q BH: "
                              f"Benjamini-Hochberg over every comparison of the sweep; * Holm p < {ALPHA}. "
                              f"TOST: two one-sided paired t-tests for a difference within +-{margin:g}. "
                              f"Verdict (from the Holm p): better / worse when significant (even inside the margin), "
                              f"equivalent when TOST p < {ALPHA}, else inconclusive. The best method of a cell is "
                              f"chosen on validation ({monitor}, mean over its final runs), never on test; ranks by "
                              f"test mean are descriptive. {_baseline_names()} are baselines, not PEFT. "
                              f"Peak memory: GPU peak allocation on a GPU, else the process's resident memory above "
                              f"its level at the start of the run."))
    for note in list(sweep_notes) + list(notes):
        blocks.append(Block("p", f"Note: {note}"))
    conclusion = _conclusion(summary, cells, metric, margin, lower_val_is_better)
    if conclusion:
        blocks.append(Block("h2", "Does PEFT beat full fine-tuning?"))
        blocks.append(Block("list", rows=conclusion))
    if backbones:  # the same method on different backbones, paired by seed (same label subsets)
        better = "lower" if experiment_task(experiment).direction(metric) == "min" else "higher"
        blocks.append(Block("h2", "Which backbone? The same method on each backbone, paired by seed"))
        blocks.append(Block("p", f"Test {metric} of backbone A minus backbone B for the same data set, method, label "
                                 f"fraction and seeds (a seed draws the same labelled images on every backbone; the "
                                 f"last column checks the recorded split and subset seeds: where they differ the runs "
                                 f"were not tested on the same images and the pairing is approximate). Paired t over "
                                 f"seeds; "
                                 f"p Holm and q BH adjust over every backbone comparison of the sweep; TOST within "
                                 f"+-{margin:g}; verdict for A against B ({better} {metric} is better). Each backbone "
                                 f"runs at its own image size and, where it has one, with its own decoder: the "
                                 f"comparison is of backbones as this sweep configured them."))
        blocks.append(Block("table", header=BACKBONE_HEADER, rows=backbone_rows(backbones)))
    from ..calibration import CALIBRATION_TABLE_HEADER, calibration_summary_lines

    sentence, calibration_rows = calibration_summary_lines(summary, BASELINE)
    if sentence:  # is a PEFT method better calibrated than full fine-tuning? (per cell, mean over seeds)
        blocks.append(Block("h2", "Calibration: PEFT vs full fine-tuning"))
        blocks.append(Block("p", sentence))
        blocks.append(Block("table", header=CALIBRATION_TABLE_HEADER, rows=calibration_rows))
    if shift:  # external test sets: evaluated once per final run, after its home test; never used to choose
        blocks.append(Block("h2", "Shift: in-domain vs external test sets"))
        blocks.append(Block("p", f"Test {metric} on the home test split and on each external set, by the same "
                                 f"models (chosen on home validation); drop = external minus in-domain on the same "
                                 f"runs, mean over seeds with its Student-t 95% CI."))
        blocks.append(Block("table", header=SHIFT_HEADER, rows=shift))
    if shift_contrasts_:  # which methods lose least: method vs full on the external score and on the drop
        blocks.append(Block("h3", "Which methods lose least under shift? Each method vs full fine-tuning"))
        blocks.append(Block("p", f"Per external set, every method against full fine-tuning on the same seeds, on the "
                                 f"external {metric} and on the drop (external minus in-domain of the same run; "
                                 f"nearer zero is better). Paired t over seeds, p Holm within each data set x "
                                 f"backbone x fraction for that set and quantity, q BH over that set and quantity, "
                                 f"TOST within +-{margin:g}; verdicts as in the method tables."))
        blocks.append(Block("table", header=SHIFT_CONTRAST_HEADER, rows=shift_contrast_rows(shift_contrasts_)))
    if alignment:  # training-free style alignment of the external images: the same models, aligned minus raw
        blocks.append(Block("h3", "How much does style alignment recover?"))
        blocks.append(Block("p", f"External {metric} with the target images aligned to the home set's style minus "
                                 f"the raw external {metric}, by the same models (paired over seeds, Student-t 95% "
                                 f"CI); p Holm over the methods of each cell for one alignment; 'recovers' / "
                                 f"'hurts' when the Holm p < {ALPHA}."))
        blocks.append(Block("table", header=ALIGNMENT_HEADER, rows=alignment_rows(alignment)))
    if external_backbones:  # does one backbone (e.g. the medical-pretrained one) transfer better?
        blocks.append(Block("h3", "Which backbone transfers better? The same method on each backbone, external set"))
        blocks.append(Block("p", f"As the backbone table above, on each external set's {metric} and on the drop "
                                 f"(external minus in-domain of the same run; a drop nearer zero is better), Holm / "
                                 f"BH over the comparisons of one external set and quantity."))
        blocks.append(Block("table", header=["external set", "quantity"] + BACKBONE_HEADER,
                            rows=[[r["external"], r["quantity"]] + row
                                  for r, row in zip(external_backbones, backbone_rows(external_backbones))]))
    if against:  # another sweep with the same cells (e.g. with DANN vs without), paired by seed
        blocks.append(Block("h2", f"Against the sweep '{against['name']}': the same cells, paired by seed"))
        differ = against["differences"] or ["none recorded"]
        blocks.append(Block("p", f"This sweep minus '{against['name']}' for every data set x backbone x method x "
                                 f"fraction both ran, on the home test {metric} and on each external set both "
                                 f"evaluated; paired t over the seeds both ran; p Holm and q BH over the cells of one "
                                 f"quantity; TOST within +-{margin:g}. Settings that differ: " + "; ".join(differ)
                                 + "."))
        blocks.append(Block("table", header=AGAINST_HEADER, rows=sweep_contrast_rows(against["contrasts"])))
    if robustness:  # the home test split under a corruption suite; never used to choose
        suite = (experiment or {}).get("corruptions") or "the suite"
        blocks.append(Block("h2", "Robustness: the test split under corruptions"))
        blocks.append(Block("p", f"Every corruption of the {suite} suite (MedMNIST-C's definitions and severities) at "
                                 f"severities 1-5 on the home test images; corrupted mean = mean over corruptions and "
                                 f"severities; relative robustness = corrupted / clean of the same run, mean over "
                                 f"seeds with its Student-t 95% CI."))
        blocks.append(Block("table", header=ROBUSTNESS_HEADER, rows=robustness))
        for title, header, rows in corruption_tables(corruptions or []):
            blocks.append(Block("p", title + "; every corruption x severity with CIs: corruptions.csv."))
            blocks.append(Block("table", header=header, rows=rows))
    if robust_contrasts:
        blocks.append(Block("h3", "Which methods keep most under corruption? Relative robustness vs full fine-tuning"))
        blocks.append(Block("p", f"Relative robustness of every method against full fine-tuning on the same seeds: "
                                 f"paired t, p Holm within each cell, q BH over the sweep, TOST within +-{margin:g}."))
        blocks.append(Block("table", header=SHIFT_CONTRAST_HEADER, rows=shift_contrast_rows(robust_contrasts)))
    info = {(c["data"], c["backbone"], c["fraction"]): c for c in cells}
    pairs = list(dict.fromkeys((r["data"], r["backbone"]) for r in summary))
    trials = store.rows(kind="trial")
    task = experiment_task(experiment)
    # the task's other headline metrics (segmentation: HD95, IoU, NSD), each in its own direction
    secondary = {m: _cell_means(final_runs(store, m)) for m in task.report_metrics if m != metric}
    for data, backbone in pairs:
        rows = [r for r in summary if r["data"] == data and r["backbone"] == backbone]
        fractions = sorted({r["fraction"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        blocks.append(Block("h2", f"{label(data)} - {backbone}"))
        # methods x fractions at a glance
        header = ["method"] + [f"f={f:g}" for f in fractions] + ["trainable %"]
        table = []
        for method in methods:
            cells_ = [method]
            for f in fractions:
                r = next((r for r in rows if r["method"] == method and r["fraction"] == f), None)
                cells_.append("-" if r is None else f"{_num(r['mean'], 3)} +- {_num(r['std'], 3)}"
                              + (f" ({r['rank']})" if r.get("rank") else "") + significance(r))
            pct = next((r["trainable_pct"] for r in rows if r["method"] == method), None)
            cells_.append(_num(pct, 3))
            table.append(cells_)
        blocks.append(Block("h3", f"Test {metric}: methods x label fractions (rank by test mean in brackets, "
                                  f"descriptive; * Holm p < {ALPHA} vs full)"))
        blocks.append(Block("table", header=header, rows=table))
        for other, means in secondary.items():
            better = "lower" if task.direction(other) == "min" else "higher"
            blocks.append(Block("h3", f"Test {other} ({better} is better): methods x label fractions, mean +- std "
                                      f"over seeds (descriptive)"))
            blocks.append(Block("table", header=["method"] + [f"f={f:g}" for f in fractions], rows=[
                [method] + [_mean_std(means.get((data, backbone, method, f)), 3) for f in fractions]
                for method in methods]))
        entry = plots.get((data, backbone), {})
        if entry.get("fraction"):
            blocks.append(Block("img", text=f"{metric} vs label fraction", path=entry["fraction"]))
        for f in fractions:
            cell = info[(data, backbone, f)]
            frows = sorted((r for r in rows if r["fraction"] == f), key=lambda r: r.get("rank", 99))
            blocks.append(Block("h3", f"{label(data)} - {backbone} - fraction {f:g}"))
            if cell["val_best"] is not None:
                blocks.append(Block("p", f"Best method chosen on validation: {cell['val_best']} (validation "
                                         f"{monitor} {_num(cell['val_best_val'])}; its test {metric} "
                                         f"{_num(cell['val_best_test'])})."
                                         + (" " + OPTIMISTIC if cell["optimistic"] else "")))
            blocks.append(Block("p", _labels_line(cell)))
            blocks.append(Block("p", _seeds_line(cell, margin)))
            for note in _convergence_notes(frows):
                blocks.append(Block("p", f"Note: {note}"))
            header = ["rank by test mean, descriptive", "method", f"test {metric} mean +- std", "95% CI",
                      f"val {monitor}", "delta vs full (95% CI)", "p t (raw)", "p Holm", "q BH", "TOST p", "verdict",
                      "seeds", "best = last epoch", "trainable %", "train s", "peak MB", "adapter"]
            table = []
            for r in frows:
                delta = "-" if r["delta"] is None else (
                    f"{r['delta']:+.4f} [{_num(r['delta_low'])}, {_num(r['delta_high'])}]{significance(r)}")
                table.append([str(r.get("rank", "")), r["method"] + (" (chosen on val)" if r["val_best"] else ""),
                              f"{_num(r['mean'])} +- {_num(r['std'])}", f"[{_num(r['low'])}, {_num(r['high'])}]",
                              _num(r["val_mean"]), delta, _p(r["p_t"]) if r["delta"] is not None else "-",
                              _p(r["p_holm"]) if r["delta"] is not None else "-",
                              _p(r["q_bh"]) if r["delta"] is not None else "-",
                              _p(r["tost_p"]) if r["delta"] is not None else "-", r["verdict"],
                              ", ".join(str(s) for s in r["seeds"]),
                              "-" if r["best_is_last"] is None else f"{r['best_is_last']}/{r['n_runs']}",
                              _num(r["trainable_pct"], 3), _num(r["train_seconds"], 1),
                              f"{_num(r['peak_mb'], 0)} ({r['peak_kind']})", _size(r["adapter_bytes"])])
            blocks.append(Block("table", header=header, rows=table))
            # what HPO chose, on validation only; its test score next to it for the reader
            hpo_rows = []
            for r in frows:
                cell_trials = [t for t in trials if t["data"] == data and t["backbone"] == backbone
                               and t["method"] == r["method"] and t["fraction"] == r["fraction"]]
                chosen = ", ".join(f"{k}={_short(v)}" for k, v in sorted((r["params"] or {}).items())) or "defaults"
                hpo_rows.append([r["method"], chosen, _num(r["val_mean"]), _num(r["mean"]), _trial_counts(cell_trials),
                                 _num(sum(t["seconds"] or 0 for t in cell_trials), 0)])
            blocks.append(Block("h3", f"HPO at fraction {f:g}: chosen configuration (on validation only)"))
            blocks.append(Block("table", header=["method", "chosen", f"val {monitor} (mean of finals)",
                                                 f"test {metric} (mean of finals)",
                                                 "trials completed / pruned / failed", "HPO s"], rows=hpo_rows))
            if f in entry.get("pareto", {}):
                blocks.append(Block("img", text=f"{metric} vs trainable % at fraction {f:g} (Pareto front in red)",
                                    path=entry["pareto"][f]))
            if f in entry.get("cases", {}):
                blocks.append(Block("img", text=f"best and worst test cases of the method chosen on validation at "
                                                f"fraction {f:g} (its lowest seed)", path=entry["cases"][f]))
            if f in entry.get("robustness", {}):
                blocks.append(Block("img", text=f"relative robustness vs clean test {metric} at fraction {f:g}",
                                    path=entry["robustness"][f]))
            if f in entry.get("froc", {}):
                blocks.append(Block("img", text=f"FROC at fraction {f:g}: test sensitivity at 1/8 .. 8 false "
                                                "positives per image, mean over seeds", path=entry["froc"][f]))
            if f in entry.get("curves", {}):
                blocks.append(Block("img", text=f"validation {monitor} vs optimizer step at fraction {f:g} "
                                                "(learning curves)", path=entry["curves"][f]))
    return blocks


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def to_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {line}" for line in b.rows))
        elif b.kind == "table":
            esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(esc(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.path.relative_to(base).as_posix()})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block]) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b.rows) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
             "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:0.85em;color:#555}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>medpeft benchmark report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------- entry points


def _cell_means(runs) -> dict:
    """(data, backbone, method, fraction) -> the finite test values of its final runs."""
    out: dict = {}
    for r in runs.to_dict("records") if hasattr(runs, "to_dict") else runs:
        if r["value"] == r["value"]:
            out.setdefault((r["data"], r["backbone"], r["method"], r["fraction"]), []).append(r["value"])
    return out


def _mean_std(values, digits: int) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{_num(mean, digits)} +- -"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{_num(mean, digits)} +- {_num(sd, digits)}"


def experiment_task(experiment: dict | None):
    from ..tasks import get_task

    return get_task((experiment or {}).get("task") or "classification")


def default_metric(store: Store) -> str:
    """The sweep's monitored metric, or its task's primary one (AUROC, Dice) for auto / loss."""
    experiment = store.get_meta("experiment") or {}
    monitor = (experiment.get("train") or {}).get("monitor", "auto")
    return experiment_task(experiment).primary_metric if monitor in ("auto", "loss") else monitor


def _margin(margin, experiment: dict | None) -> float:
    if margin is None:
        margin = (experiment or {}).get("margin", DEFAULT_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < 1:
        raise ConfigError(f"margin={margin!r}; expected a number in (0, 1) on the metric's scale, e.g. 0.02")
    return float(margin)


def check_metric(metric: str, task) -> None:
    """ConfigError unless ``metric`` is a metric of the sweep's task (one the report can rank by)."""
    if metric not in task.metrics:
        raise ConfigError(f"--metric {metric!r} is not a {task.name} metric of this sweep; expected one of "
                          f"{', '.join(task.metrics)}")


def _csv_value(value):
    return " ".join(str(v) for v in value) if isinstance(value, list) else value


def _against(other_dir, out_dir: Path, task, metric: str) -> dict | None:
    """The other sweep of ``--against``: its name (the folder's, never its path), experiment and
    final runs; a clear error when it is missing, this very sweep or of another task."""
    if other_dir is None:
        return None
    other_dir = Path(other_dir)
    if other_dir.resolve() == out_dir.resolve():
        raise ConfigError(f"--against {other_dir.name}: that is this sweep; expected another sweep's --out folder")
    store = Store.open_readonly(other_dir)
    try:
        experiment = store.get_meta("experiment") or {}
        other_task = experiment_task(experiment)
        if other_task.name != task.name:
            raise ConfigError(f"--against {other_dir.name}: a {other_task.name} sweep; this sweep is {task.name}: "
                              f"expected a sweep of the same task")
        runs = final_runs(store, metric)
    finally:
        store.close()
    if runs.empty:
        raise ConfigError(f"--against {other_dir.name}: no finished final runs in its store")
    return {"name": other_dir.resolve().name, "experiment": experiment, "runs": runs}


def build_report(out_dir: str | Path, metric: str | None = None, formats=("csv",), margin: float | None = None,
                 against: str | Path | None = None) -> dict:
    """Write ``<out_dir>/report/``; returns {'markdown', 'html', 'plots', 'summary', 'cells', 'margin', ...}.

    ``margin``: the equivalence margin of the TOST verdicts (default: the experiment's ``margin``,
    else 0.02). ``against``: another sweep's folder with the same cells (for example the same methods
    trained with DANN): a section and ``against.csv`` compare the two, paired by seed.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    store = Store.open_readonly(out_dir)
    try:
        experiment = store.get_meta("experiment") or {}
        metric = metric or default_metric(store)
        margin = _margin(margin, experiment)
        task = experiment_task(experiment)
        check_metric(metric, task)  # before anything is written: a typo never empties report.md
        monitor = task.resolve_monitor((experiment.get("train") or {}).get("monitor", "auto"))
        other = _against(against, out_dir, task, metric)  # checked before anything is written
        report_dir = out_dir / "report"
        report_dir.mkdir(parents=True, exist_ok=True)
        runs = final_runs(store, metric)
        summary = summarize(runs, margin=margin, lower_val_is_better=task.direction(monitor) == "min",
                            higher_is_better=task.direction(metric) == "max")
        cells = cell_summaries(summary, margin=margin)
        plots = _plots(summary, report_dir / "plots", metric, task.direction(metric)) if summary else {}
        for (data, backbone, fraction), path in _case_figures(summary, runs, report_dir / "plots").items():
            plots.setdefault((data, backbone), {"pareto": {}}).setdefault("cases", {})[fraction] = path
        for (data, backbone, fraction), path in _curve_plots(runs, report_dir / "plots", monitor,
                                                                 task.direction(monitor) == "min").items():
            plots.setdefault((data, backbone), {"pareto": {}}).setdefault("curves", {})[fraction] = path
        for (data, backbone, fraction), path in _froc_plots(runs, report_dir / "plots").items():
            plots.setdefault((data, backbone), {"pareto": {}}).setdefault("froc", {})[fraction] = path
        for (data, backbone, fraction), path in _robustness_plots(runs, report_dir / "plots", metric).items():
            plots.setdefault((data, backbone), {"pareto": {}}).setdefault("robustness", {})[fraction] = path
        files, notes = export(store, report_dir, formats)
        if summary:
            columns = [k for k in summary[0] if k != "params"]
            pd.DataFrame([{k: _csv_value(r[k]) for k in columns} for r in summary]).to_csv(
                report_dir / "summary.csv", index=False)
        backbones = backbone_comparisons(runs, margin=margin, higher_is_better=task.direction(metric) == "max")
        if backbones:
            pd.DataFrame([{k: _csv_value(v) for k, v in r.items()} for r in backbones]).to_csv(
                report_dir / "backbones.csv", index=False)
        higher = task.direction(metric) == "max"
        shift = {"shift_contrasts_": shift_contrasts(runs, margin=margin, higher_is_better=higher),
                 "alignment": alignment_recovery(runs, higher_is_better=higher),
                 "external_backbones": external_backbone_comparisons(runs, margin=margin, higher_is_better=higher),
                 "robust_contrasts": robustness_contrasts(runs, margin=margin)}
        if other is not None:
            shift["against"] = {"name": other["name"], "differences": settings_difference(experiment,
                                                                                          other["experiment"]),
                                "contrasts": sweep_contrasts(runs, other["runs"], margin=margin,
                                                             higher_is_better=higher)}
        breakdown = corruption_breakdown(runs)
        for name, rows in (("against.csv", (shift.get("against") or {}).get("contrasts") or []),
                           ("shift_vs_full.csv", shift["shift_contrasts_"] + shift["robust_contrasts"]),
                           ("alignment.csv", shift["alignment"]), ("backbones_external.csv", shift["external_backbones"]),
                           ("corruptions.csv", breakdown)):
            if rows:
                pd.DataFrame([{k: _csv_value(v) for k, v in r.items()} for r in rows]).to_csv(report_dir / name,
                                                                                            index=False)
        blocks = _blocks(summary, cells, store, plots, metric, notes, margin, len(runs),
                         task.direction(monitor) == "min", shift=shift_rows(runs, metric),
                         robustness=robustness_rows(runs), backbones=backbones, corruptions=breakdown, **shift)
        md_path, html_path = report_dir / "report.md", report_dir / "report.html"
        md_path.write_text(to_markdown(blocks, report_dir))
        html_path.write_text(to_html(blocks))
        plot_files = [p for entry in plots.values()
                      for p in [entry.get("fraction"), *entry["pareto"].values(), *entry.get("curves", {}).values(),
                                *entry.get("cases", {}).values(), *entry.get("froc", {}).values(),
                                *entry.get("robustness", {}).values()] if p]
        return {"dir": str(report_dir), "markdown": str(md_path), "html": str(html_path),
                "plots": [str(p) for p in plot_files], "exports": [str(p) for p in files], "notes": notes,
                "summary": summary, "cells": cells, "backbones": backbones, "metric": metric, "margin": margin,
                "shift": shift}
    finally:
        store.close()


def print_leaderboard(report: dict, console=None) -> None:
    """Per data set x backbone: the methods per fraction with the Holm p and verdict vs full fine-tuning."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: wide enough for the table
            console = Console(width=max(console.width, 130))
    summary, metric = report["summary"], report["metric"]
    if not summary:
        console.print("no finished final runs yet: nothing to rank")
        return
    for data, backbone in dict.fromkeys((r["data"], r["backbone"]) for r in summary):
        table = Table(title=f"leaderboard: {label(data)} - {backbone} (test {metric}, mean ± std over seeds; "
                            f"rank by test mean, descriptive; ◆ chosen on validation)")
        for col, justify in (("fraction", "right"), ("rank", "right"), ("method", "left"), (metric, "right"),
                             ("95% CI", "right"), ("val", "right"), ("delta vs full", "right"), ("p Holm", "right"),
                             ("verdict", "left"), ("trainable %", "right"), ("train s", "right")):
            table.add_column(col, justify=justify)
        rows = [r for r in summary if r["data"] == data and r["backbone"] == backbone]
        for f in sorted({r["fraction"] for r in rows}):
            group = sorted((r for r in rows if r["fraction"] == f), key=lambda r: r.get("rank", 99))
            for i, r in enumerate(group):
                table.add_row(f"{f:g}" if i == 0 else "", str(r.get("rank", "")),
                              r["method"] + (" ◆" if r["val_best"] else ""),
                              f"{_num(r['mean'])} ± {_num(r['std'])}", f"[{_num(r['low'], 3)}, {_num(r['high'], 3)}]",
                              _num(r["val_mean"]), "-" if r["delta"] is None else f"{r['delta']:+.4f}{significance(r)}",
                              "-" if r["delta"] is None else _p(r["p_holm"]), r["verdict"],
                              _num(r["trainable_pct"], 3), _num(r["train_seconds"], 1),
                              end_section=i == len(group) - 1)
        console.print(table)
    console.print(f"verdicts vs full fine-tuning: Holm-adjusted paired t within each cell, TOST margin "
                  f"+-{report.get('margin', DEFAULT_MARGIN):g}", highlight=False)
    console.print(f"report: {report['markdown']} and {report['html']}", highlight=False)
