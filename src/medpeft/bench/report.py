"""The sweep report: which method wins, per data set x backbone x label fraction, at what cost.

From the final runs (one per seed) in the store:

- a table of methods x fractions: test metric mean +- std and 95% CI over seeds (Student t),
  trainable %, train time, peak memory, adapter size;
- the difference to full fine-tuning with a paired test over seeds (``stats.paired_test``:
  the same seeds of both methods, i.e. the same label subsets);
- a ranking per fraction;
- plots: metric vs label fraction per method; metric vs trainable % with the Pareto front;
- ``report.md``, a self-contained ``report.html`` (plots embedded), ``summary.csv``, ``runs.csv``.

Everything is written to ``<out>/report/`` and rebuilt from the store by ``medpeft report <out>``.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..stats import mean_std_ci, paired_test
from .store import Store, export

BASELINE = "full"
ALPHA = 0.05


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
    """A data set as shown: a MedMNIST name as is, a folder or manifest by its file name."""
    return Path(str(name)).name or str(name)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def _p(p) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ---------------------------------------------------------------------- data


def final_runs(store: Store, metric: str):
    """One row per finished final run: cell, seed, test metric, costs."""
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
        records.append({
            "data": row["data"], "backbone": row["backbone"], "method": row["method"],
            "fraction": float(row["fraction"]), "seed": int(row["seed"]),
            "value": float("nan") if value is None else float(value),
            "val": row["value"], "trainable": params.get("trainable"), "trainable_pct": params.get("trainable_pct"),
            "train_seconds": metrics.get("train_seconds"),
            "peak_mb": gpu if gpu is not None else metrics.get("peak_rss_delta_mb"),
            "peak_kind": "GPU" if gpu is not None else "RSS",
            "adapter_bytes": metrics.get("adapter_bytes"), "n_train": metrics.get("n_train"),
            "params": row.get("params") or {}, "best_epoch": metrics.get("best_epoch"),
        })
    return pd.DataFrame.from_records(records)


def summarize(runs) -> list[dict]:
    """Per (data, backbone, method, fraction): mean/std/CI over seeds, costs, delta to full, rank."""
    out = []
    if runs.empty:
        return out
    for (data, backbone, method, fraction), group in runs.groupby(["data", "backbone", "method", "fraction"], sort=False):
        values = [v for v in group["value"] if v == v]
        stats = mean_std_ci(values) if values else {"mean": float("nan"), "std": float("nan"),
                                                     "low": float("nan"), "high": float("nan"), "n": 0}
        # every metric here lies in [0, 1]: the t interval is clipped to it
        low, high = (max(stats["low"], 0.0), min(stats["high"], 1.0)) if stats["n"] > 1 else (stats["low"], stats["high"])
        row = {"data": data, "backbone": backbone, "method": method, "fraction": fraction,
               "n": stats["n"], "mean": stats["mean"], "std": stats["std"], "low": low, "high": high,
               "trainable_pct": group["trainable_pct"].mean(), "trainable": group["trainable"].mean(),
               "train_seconds": group["train_seconds"].mean(), "peak_mb": group["peak_mb"].mean(),
               "peak_kind": group["peak_kind"].iloc[0], "adapter_bytes": group["adapter_bytes"].mean(),
               "n_train": group["n_train"].iloc[0], "params": group["params"].iloc[0],
               "seeds": sorted(group["seed"].tolist())}
        base = runs[(runs.data == data) & (runs.backbone == backbone) & (runs.fraction == fraction)
                    & (runs.method == BASELINE)]
        row.update(delta=None, delta_low=None, delta_high=None, p_t=None, p_w=None, n_pairs=0)
        if method != BASELINE and not base.empty:
            ours = group.set_index("seed")["value"]
            theirs = base.set_index("seed")["value"]
            seeds = sorted(s for s in set(ours.index) & set(theirs.index) if ours[s] == ours[s] and theirs[s] == theirs[s])
            if seeds:
                test = paired_test([ours[s] for s in seeds], [theirs[s] for s in seeds])
                row.update(delta=test["mean_diff"], delta_low=test["diff_low"], delta_high=test["diff_high"],
                           p_t=test["t_pvalue"], p_w=test["wilcoxon_pvalue"], n_pairs=test["n"])
        out.append(row)
    # rank per (data, backbone, fraction): 1 = best mean test metric
    groups: dict = {}
    for row in out:
        groups.setdefault((row["data"], row["backbone"], row["fraction"]), []).append(row)
    for rows in groups.values():
        ordered = sorted(rows, key=lambda r: -r["mean"] if r["mean"] == r["mean"] else math.inf)
        for rank, row in enumerate(ordered, 1):
            row["rank"] = rank
    return out


def significance(row) -> str:
    if row.get("delta") is None:
        return ""
    p = row["p_t"]
    return "*" if p is not None and p < ALPHA else ""


# ---------------------------------------------------------------------- plots


def _plots(summary: list[dict], out: Path, metric: str) -> dict:
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
        ax.set_xlabel("label fraction of the training split")
        ax.set_ylabel(f"test {metric} (mean +- std over seeds)")
        ax.set_title(f"{label(data)} - {backbone}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / _safe(f"{label(data)}_{backbone}_{metric}_vs_fraction.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        entry["fraction"] = path
        for fraction in fractions:
            pts = [r for r in rows if r["fraction"] == fraction and r["mean"] == r["mean"] and r["trainable_pct"]]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            front = pareto_front(pts)
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


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both axes (fewer trainable % and a higher metric, one strictly)."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["trainable_pct"] <= r["trainable_pct"] and o["mean"] >= r["mean"]
                        and (o["trainable_pct"] < r["trainable_pct"] or o["mean"] > r["mean"]) for o in rows)
        if not dominated:
            front.append(r)
    return front


# ---------------------------------------------------------------------- content


def _settings_lines(experiment: dict | None) -> list[str]:
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
        f"seeds: {', '.join(str(s) for s in experiment.get('seeds', []))} (seed = training seed and label-subset seed)",
        f"HPO: {experiment.get('hpo_trials', 0)} trial(s) per cell (Optuna TPE, seed {experiment.get('hpo_seed', 0)}; "
        f"successive halving from epoch {experiment.get('prune_min_epochs')}, reduction factor "
        f"{experiment.get('prune_reduction_factor')}); chosen on validation only, then trained once per seed"
        if experiment.get("hpo_trials") else "HPO: none (each method's default learning rate and options)",
        "training: " + (", ".join(f"{k}={v}" for k, v in sorted(train.items())) or "medpeft defaults")
        + " (early stopping on validation; the best state is tested once)",
    ]


def _conclusion(summary: list[dict], metric: str) -> list[str]:
    """Plain sentences: does PEFT beat full fine-tuning at each fraction?"""
    lines = []
    keys = list(dict.fromkeys((r["data"], r["backbone"], r["fraction"]) for r in summary))
    for data, backbone, fraction in keys:
        rows = [r for r in summary if (r["data"], r["backbone"], r["fraction"]) == (data, backbone, fraction)]
        base = next((r for r in rows if r["method"] == BASELINE), None)
        peft = [r for r in rows if r["method"] not in (BASELINE, "linear") and r["mean"] == r["mean"]]
        if base is None or not peft:
            continue
        best = max(peft, key=lambda r: r["mean"])
        above = [r for r in peft if r["mean"] > base["mean"]]
        sig = [r["method"] for r in above if significance(r)]
        worse_sig = [r["method"] for r in peft if r["mean"] < base["mean"] and significance(r)]
        lines.append(
            f"{label(data)} / {backbone} / fraction {fraction:g}: {len(above)} of {len(peft)} PEFT methods beat full "
            f"fine-tuning ({metric} {_num(base['mean'])}); best {best['method']} {_num(best['mean'])} "
            f"(delta {_num(best['delta'])}, paired t p={_p(best['p_t'])}, n={best['n_pairs']})"
            + (f"; significantly better (p<{ALPHA}): {', '.join(sig)}" if sig else "; none significantly better")
            + (f"; significantly worse: {', '.join(worse_sig)}" if worse_sig else ""))
    return lines


def _blocks(summary, runs, store: Store, plots: dict, metric: str, notes: list[str]) -> list[Block]:
    experiment = store.get_meta("experiment")
    sweep_notes = store.get_meta("notes") or []
    blocks = [Block("h1", "medpeft benchmark report")]
    blocks.append(Block("list", rows=_settings_lines(experiment)))
    failed = store.rows(status="failed")
    running = store.rows(status="running")
    counts = f"{len(runs)} final runs done"
    if failed:
        counts += f", {len(failed)} failed (see runs.csv)"
    if running:
        counts += f", {len(running)} unfinished (resume the sweep with --resume)"
    blocks.append(Block("p", f"Metric: test {metric}; mean +- std and 95% CI over seeds (Student t, clipped to [0, 1]). {counts}. "
                              f"Delta = method minus full fine-tuning on the same seeds (paired t-test; "
                              f"* p < {ALPHA}). Peak memory: GPU peak allocation on a GPU, else the process's "
                              f"resident memory above its level at the start of the run."))
    for note in list(sweep_notes) + list(notes):
        blocks.append(Block("p", f"Note: {note}"))
    conclusion = _conclusion(summary, metric)
    if conclusion:
        blocks.append(Block("h2", "Does PEFT beat full fine-tuning?"))
        blocks.append(Block("list", rows=conclusion))
    pairs = list(dict.fromkeys((r["data"], r["backbone"]) for r in summary))
    trials = store.rows(kind="trial")
    for data, backbone in pairs:
        rows = [r for r in summary if r["data"] == data and r["backbone"] == backbone]
        fractions = sorted({r["fraction"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        blocks.append(Block("h2", f"{label(data)} - {backbone}"))
        # methods x fractions at a glance
        header = ["method"] + [f"f={f:g}" for f in fractions] + ["trainable %"]
        table = []
        for method in methods:
            cells = [method]
            for f in fractions:
                r = next((r for r in rows if r["method"] == method and r["fraction"] == f), None)
                cells.append("-" if r is None else f"{_num(r['mean'], 3)} +- {_num(r['std'], 3)}"
                             + (f" ({r['rank']})" if r.get("rank") else "") + significance(r))
            pct = next((r["trainable_pct"] for r in rows if r["method"] == method), None)
            cells.append(_num(pct, 3))
            table.append(cells)
        blocks.append(Block("h3", f"Test {metric}: methods x label fractions (rank in brackets)"))
        blocks.append(Block("table", header=header, rows=table))
        # the full table
        header = ["fraction", "rank", "method", f"{metric} mean +- std", "95% CI", "delta vs full (95% CI)",
                  "p (t / Wilcoxon)", "seeds", "trainable %", "train s", "peak MB", "adapter"]
        table = []
        for f in fractions:
            for r in sorted((r for r in rows if r["fraction"] == f), key=lambda r: r.get("rank", 99)):
                delta = "-" if r["delta"] is None else (
                    f"{r['delta']:+.4f} [{_num(r['delta_low'])}, {_num(r['delta_high'])}]{significance(r)}")
                table.append([f"{f:g}", str(r.get("rank", "")), r["method"], f"{_num(r['mean'])} +- {_num(r['std'])}",
                              f"[{_num(r['low'])}, {_num(r['high'])}]", delta,
                              "-" if r["delta"] is None else f"{_p(r['p_t'])} / {_p(r['p_w'])}", str(r["n"]),
                              _num(r["trainable_pct"], 3), _num(r["train_seconds"], 1),
                              f"{_num(r['peak_mb'], 0)} ({r['peak_kind']})", _size(r["adapter_bytes"])])
        blocks.append(Block("h3", "All numbers"))
        blocks.append(Block("table", header=header, rows=table))
        # ranking per fraction
        ranking = [f"fraction {f:g}: " + " > ".join(
            r["method"] for r in sorted((r for r in rows if r["fraction"] == f), key=lambda r: r.get("rank", 99)))
            for f in fractions]
        blocks.append(Block("h3", "Ranking per fraction"))
        blocks.append(Block("list", rows=ranking))
        # what HPO chose
        hpo_rows = []
        for r in rows:
            cell_trials = [t for t in trials if t["data"] == data and t["backbone"] == backbone
                           and t["method"] == r["method"] and t["fraction"] == r["fraction"]]
            states = {}
            for t in cell_trials:
                state = t["outcome"] if t["status"] == "done" else t["status"]
                states[state] = states.get(state, 0) + 1
            chosen = ", ".join(f"{k}={_short(v)}" for k, v in sorted((r["params"] or {}).items())) or "defaults"
            hpo_rows.append([f"{r['fraction']:g}", r["method"], chosen,
                             ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "-",
                             _num(sum(t["seconds"] or 0 for t in cell_trials), 0), str(r["n_train"])])
        blocks.append(Block("h3", "Chosen hyper-parameters (validation only)"))
        blocks.append(Block("table", header=["fraction", "method", "chosen", "trials", "HPO s", "n train"],
                            rows=hpo_rows))
        entry = plots.get((data, backbone), {})
        if entry.get("fraction"):
            blocks.append(Block("img", text=f"{metric} vs label fraction", path=entry["fraction"]))
        for f, path in sorted(entry.get("pareto", {}).items()):
            blocks.append(Block("img", text=f"{metric} vs trainable % at fraction {f:g} (Pareto front in red)",
                                path=path))
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


def default_metric(store: Store) -> str:
    experiment = store.get_meta("experiment") or {}
    monitor = (experiment.get("train") or {}).get("monitor", "auroc")
    return "auroc" if monitor == "loss" else monitor


def build_report(out_dir: str | Path, metric: str | None = None, formats=("csv",)) -> dict:
    """Write ``<out_dir>/report/``; returns {'markdown', 'html', 'plots', 'summary', 'leaderboard', ...}."""
    import pandas as pd

    out_dir = Path(out_dir)
    store = Store.open_readonly(out_dir)
    try:
        metric = metric or default_metric(store)
        report_dir = out_dir / "report"
        report_dir.mkdir(parents=True, exist_ok=True)
        runs = final_runs(store, metric)
        summary = summarize(runs)
        plots = _plots(summary, report_dir / "plots", metric) if summary else {}
        files, notes = export(store, report_dir, formats)
        if summary:
            columns = [k for k in summary[0] if k not in ("params", "seeds")]
            pd.DataFrame([{k: r[k] for k in columns} for r in summary]).to_csv(report_dir / "summary.csv", index=False)
        blocks = _blocks(summary, runs, store, plots, metric, notes)
        md_path, html_path = report_dir / "report.md", report_dir / "report.html"
        md_path.write_text(to_markdown(blocks, report_dir))
        html_path.write_text(to_html(blocks))
        plot_files = [p for entry in plots.values() for p in [entry.get("fraction"), *entry["pareto"].values()] if p]
        return {"dir": str(report_dir), "markdown": str(md_path), "html": str(html_path),
                "plots": [str(p) for p in plot_files], "exports": [str(p) for p in files], "notes": notes,
                "summary": summary, "metric": metric}
    finally:
        store.close()


def print_leaderboard(report: dict, console=None) -> None:
    """Per data set x backbone: the methods ranked per fraction, with the delta to full fine-tuning."""
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
        table = Table(title=f"leaderboard: {label(data)} - {backbone} (test {metric}, mean ± std over seeds)")
        for col, justify in (("fraction", "right"), ("rank", "right"), ("method", "left"), (metric, "right"),
                             ("95% CI", "right"), ("delta vs full", "right"), ("p", "right"),
                             ("trainable %", "right"), ("train s", "right")):
            table.add_column(col, justify=justify)
        rows = [r for r in summary if r["data"] == data and r["backbone"] == backbone]
        for f in sorted({r["fraction"] for r in rows}):
            group = sorted((r for r in rows if r["fraction"] == f), key=lambda r: r.get("rank", 99))
            for i, r in enumerate(group):
                table.add_row(f"{f:g}" if i == 0 else "", str(r.get("rank", "")), r["method"],
                              f"{_num(r['mean'])} ± {_num(r['std'])}", f"[{_num(r['low'], 3)}, {_num(r['high'], 3)}]",
                              "-" if r["delta"] is None else f"{r['delta']:+.4f}{significance(r)}",
                              "-" if r["delta"] is None else _p(r["p_t"]), _num(r["trainable_pct"], 3),
                              _num(r["train_seconds"], 1), end_section=i == len(group) - 1)
        console.print(table)
    console.print(f"report: {report['markdown']} and {report['html']}", highlight=False)
