"""The benchmark report on a hand-made store: multiplicity-adjusted verdicts, the method chosen on
validation (not test), baselines kept out of the PEFT counts, labels used, HPO counts, the
convergence note and the learning curves; old stores without the newer metric keys still report."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from medpeft.bench.report import BASELINES, build_report, print_leaderboard
from medpeft.bench.store import Store
from medpeft.errors import ConfigError
from medpeft.stats import benjamini_hochberg, holm, paired_test, seeds_needed, tost_paired, verdict

SEEDS = (0, 1, 2, 3)
FULL = {0.1: [0.70, 0.72, 0.71, 0.73], 1.0: [0.80, 0.81, 0.79, 0.82]}
# test-score differences to full per seed; validation scores per seed
CELLS = {
    0.1: {
        "full": ([0, 0, 0, 0], [0.80, 0.81, 0.80, 0.82]),
        "lora": ([0.05, 0.06, 0.055, 0.052], [0.84, 0.85, 0.84, 0.85]),      # clearly better
        "adapter": ([0.001, -0.002, 0.0015, -0.001], [0.80, 0.80, 0.81, 0.80]),  # equivalent within 0.02
        "partial": ([0.09, 0.10, 0.08, 0.095], [0.83, 0.82, 0.83, 0.84]),    # the best on test ...
        "linear": ([-0.06, -0.05, -0.07, -0.055], [0.95, 0.96, 0.94, 0.95]),  # ... the best on validation
    },
    1.0: {
        "full": ([0, 0, 0, 0], [0.85, 0.86, 0.85, 0.86]),
        "lora": ([0.01, 0.025, 0.008, 0.02], [0.86, 0.86, 0.87, 0.86]),    # raw p < 0.05, Holm p > 0.05
        "adapter": ([0.02, -0.03, 0.01, -0.01], [0.85, 0.84, 0.85, 0.84]),
        "partial": ([0.015, 0.01, 0.02, 0.012], [0.86, 0.87, 0.86, 0.87]),
        "linear": ([-0.01, 0.02, -0.02, 0.005], [0.84, 0.84, 0.83, 0.84]),
    },
}
# best_is_last per seed at fraction 0.1: lora 3 of 4 (a note), adapter 2 of 4 (exactly half: none)
LAST = {"lora": [True, True, True, False], "adapter": [True, True, False, False]}
PARAMS = {"lr": 0.001}


def _cell(method: str, fraction: float) -> dict:
    return {"id": f"toy|bb|{method}|{fraction:g}", "data": "toy", "backbone": "bb", "method": method,
            "fraction": fraction}


def _metrics(method: str, fraction: float, seed: int, test: float) -> dict:
    metrics = {"test": {"auroc": {"value": test}}, "params": {"trainable": 10, "trainable_pct": 1.0},
               "train_seconds": 1.0, "adapter_bytes": 1000, "n_train": 50 if fraction < 1 else 500, "n_val": 120,
               "monitor": "auroc", "best_epoch": 3}
    if fraction < 1:  # the newer keys; fraction 1 looks like an old store
        metrics.update(selection={"val_labels": "full", "mode": "holdout", "n_selection_labels": 120},
                       best_is_last=LAST.get(method, [False] * 4)[seed], subset_seed=seed + 100,
                       curve=[[10, 0.6 + 0.01 * seed], [20, 0.7], [30 + seed, 0.72]])
    return metrics


def make_store(out: Path, meta_margin=None) -> None:
    n = 0
    with Store(out) as store:
        experiment = {"data": ["toy"], "backbones": ["bb"], "fractions": [0.1, 1.0], "seeds": list(SEEDS),
                      "hpo_trials": 4, "train": {"monitor": "auroc"},
                      "image_size": 32}
        if meta_margin is not None:
            experiment["margin"] = meta_margin
        store.set_meta("experiment", experiment)
        store.set_meta("chosen", {_cell(m, f)["id"]: PARAMS for f in CELLS for m in CELLS[f]})
        for fraction, methods in CELLS.items():
            for method, (diffs, vals) in methods.items():
                for seed in SEEDS:
                    n += 1
                    job = {"key": f"k{n}", "kind": "final", "cell": _cell(method, fraction), "seed": seed,
                           "trial": None, "params": PARAMS, "config": {}}
                    store.mark_running(job)
                    test = FULL[fraction][seed] + diffs[seed]
                    store.record({"key": job["key"], "status": "done", "outcome": "complete", "value": vals[seed],
                                  "metrics": _metrics(method, fraction, seed, test), "seconds": 2.0, "worker": "w"})
        # HPO trials of lora at 0.1: 2 completed, 1 pruned, 1 failed
        for trial, (status, outcome) in enumerate([("done", "complete"), ("done", "pruned"), ("done", "complete"),
                                                   ("failed", None)]):
            n += 1
            job = {"key": f"k{n}", "kind": "trial", "cell": _cell("lora", 0.1), "seed": 0, "trial": trial,
                   "params": {"lr": 0.01 * (trial + 1)}, "config": {}}
            store.mark_running(job)
            store.record({"key": job["key"], "status": status, "outcome": outcome, "value": 0.8,
                          "metrics": None, "seconds": 1.5, "error": "boom" if status == "failed" else None})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    make_store(out)
    rep = build_report(out)
    rep["md"] = Path(rep["markdown"]).read_text()
    rep["csv"] = pd.read_csv(Path(rep["dir"]) / "summary.csv")
    return rep


def _row(rep, method, fraction):
    return next(r for r in rep["summary"] if r["method"] == method and r["fraction"] == fraction)


def _test_values(method, fraction):
    return [FULL[fraction][s] + CELLS[fraction][method][0][s] for s in SEEDS]


def test_best_method_is_chosen_on_validation_not_test(report):
    cell = next(c for c in report["cells"] if c["fraction"] == 0.1)
    test_best = max((r for r in report["summary"] if r["fraction"] == 0.1), key=lambda r: r["mean"])
    assert test_best["method"] == "partial" and test_best["rank"] == 1  # the descriptive rank
    assert cell["val_best"] == "linear" != test_best["method"]
    assert _row(report, "linear", 0.1)["val_best"] and not _row(report, "partial", 0.1)["val_best"]
    assert cell["val_best_test"] == pytest.approx(sum(_test_values("linear", 0.1)) / 4)
    md = report["md"]
    assert f"Best method chosen on validation: linear (validation auroc {cell['val_best_val']:.4f}; " \
           f"its test auroc {cell['val_best_test']:.4f})" in md
    assert f"Best method chosen on validation: partial (validation auroc {_row(report, 'partial', 0.1)['val_mean']:.4f}" \
        not in md
    assert "rank by test mean, descriptive" in md
    # the PEFT sentence picks on validation too: lora (val 0.845) over adapter (0.8025), not by test
    assert "Best PEFT method on validation: lora" in md


def test_holm_and_bh_in_summary_csv_equal_the_stats_functions(report):
    csv = report["csv"]
    compared = csv[csv.method != "full"]
    raw = []
    for _, r in compared.iterrows():
        ref = paired_test(_test_values(r["method"], r["fraction"]), FULL[r["fraction"]])
        assert r["p_t"] == pytest.approx(ref["t_pvalue"])
        raw.append(ref["t_pvalue"])
    assert list(compared["q_bh"]) == pytest.approx(benjamini_hochberg(raw))  # across the whole sweep
    for fraction in CELLS:
        cell = compared[compared.fraction == fraction]
        assert list(cell["p_holm"]) == pytest.approx(holm(list(cell["p_t"])))  # within the cell
    assert csv[csv.method == "full"]["p_holm"].isna().all()
    # the adjustment matters in this store: lora at fraction 1 is significant only before it
    lora = _row(report, "lora", 1.0)
    assert lora["p_t"] < 0.05 <= lora["p_holm"] and lora["verdict"] != "better"
    assert {"p_holm", "q_bh", "tost_p", "verdict", "val_mean", "n_val", "n_selection", "seeds"} <= set(csv.columns)


def test_verdict_column(report):
    csv = report["csv"]
    got = {(r["method"], r["fraction"]): r["verdict"] for _, r in csv.iterrows()}
    assert got[("full", 0.1)] == got[("full", 1.0)] == "reference"
    assert got[("lora", 0.1)] == "better" and got[("partial", 0.1)] == "better"
    assert got[("linear", 0.1)] == "worse" and got[("adapter", 0.1)] == "equivalent"
    for r in report["summary"]:
        if r["method"] == "full":
            continue
        tost = tost_paired(_test_values(r["method"], r["fraction"]), FULL[r["fraction"]], 0.02)["p"]
        assert r["tost_p"] == pytest.approx(tost)
        assert r["verdict"] == verdict(r["delta"], r["p_holm"], r["tost_p"])
    # the stars follow the Holm p, not the raw one
    lora = _row(report, "lora", 1.0)
    line = next(line for line in report["md"].splitlines() if line.startswith("| ") and "| lora |" in line
                and f"{lora['delta']:+.4f}" in line)
    assert "*" not in line.split("|")[6]


def test_baselines_are_not_counted_as_peft(report):
    assert BASELINES == ("full", "linear", "decoder", "head", "partial")
    md = report["md"]
    section = md.split("## Does PEFT beat full fine-tuning?")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) == 2
    first = next(line for line in lines if "fraction 0.1:" in line)
    assert "2 PEFT method(s) vs full fine-tuning" in first
    assert "better: lora;" in first and "equivalent: adapter;" in first and "worse: none;" in first
    assert "partial" not in first and "linear" not in first  # partial is better and linear worse, but no PEFT
    assert "1 of 2 have a higher test mean" in first


def test_convergence_note_exactly_when_more_than_half_the_runs_end_at_their_best(report):
    md = report["md"]
    assert _row(report, "lora", 0.1)["best_is_last"] == 3 and _row(report, "adapter", 0.1)["best_is_last"] == 2
    notes = [line for line in md.splitlines() if line.startswith("Note:") and "last epoch" in line]
    assert len(notes) == 1 and notes[0].startswith("Note: lora: the best validation epoch was the last epoch in 3 of 4")
    assert _row(report, "lora", 1.0)["best_is_last"] is None  # an old store: unknown, no note


def test_learning_curve_png_per_cell_with_curves(report):
    curves = [p for p in report["plots"] if p.endswith("_learning_curves.png")]
    assert len(curves) == 1 and "f0.1" in curves[0]  # fraction 1 has no curves (old-store runs)
    assert Path(curves[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "learning_curves.png)" in report["md"]
    html = Path(report["html"]).read_text()
    assert html.count("data:image/png;base64,") == len(report["plots"])


def test_labels_used_and_optimistic_selection_and_old_stores(report):
    md = report["md"]
    assert ("Labels used: 50 train labels; 120 selection labels (the full validation split (mode holdout)). "
            "Optimistic: selection used the full validation split.") in md
    assert "Labels used: 500 train labels; 120 selection labels (120 validation images; selection policy unknown" in md
    assert _row(report, "lora", 0.1)["optimistic"] and not _row(report, "lora", 1.0)["optimistic"]
    assert "Seeds: 4 (0, 1, 2, 3); label-subset seeds 100, 101, 102, 103." in md
    assert "Seeds: 4 (0, 1, 2, 3). SD" in md  # no subset seeds recorded at fraction 1


def test_seeds_needed_line(report):
    for cell in report["cells"]:
        sds = sorted(r["sd_diff"] for r in report["summary"]
                     if r["fraction"] == cell["fraction"] and r["sd_diff"] is not None)
        assert len(sds) == 4 and cell["sd_diff"] == pytest.approx((sds[1] + sds[2]) / 2)
        assert cell["seeds_needed"] == seeds_needed(cell["sd_diff"], 0.02)
        assert f"detecting the margin 0.02 needs {cell['seeds_needed']} seeds." in report["md"]
        assert f"With 4 seeds a paired t-test (alpha 0.05, before the Holm adjustment) detects a difference of " \
               f"{cell['mdd']:.4f} with 80% power" in report["md"]


def test_hpo_table_counts_and_scores(report):
    lora = _row(report, "lora", 0.1)
    line = next(line for line in report["md"].splitlines() if line.startswith("| lora | lr=0.001 |")
                and "2 / 1 / 1" in line)
    assert f"| {lora['val_mean']:.4f} | {lora['mean']:.4f} | 2 / 1 / 1 |" in line
    assert "| adapter | lr=0.001 | 0.8025 |" in report["md"] and "0 / 0 / 0" in report["md"]


def test_margin_from_meta_argument_and_errors(tmp_path):
    make_store(tmp_path, meta_margin=0.0005)
    rep = build_report(tmp_path)
    assert rep["margin"] == 0.0005 and _row(rep, "adapter", 0.1)["verdict"] == "inconclusive"  # too tight
    rep = build_report(tmp_path, margin=0.02)
    assert rep["margin"] == 0.02 and _row(rep, "adapter", 0.1)["verdict"] == "equivalent"
    with pytest.raises(ConfigError, match="margin"):
        build_report(tmp_path, margin=0)


def test_leaderboard_shows_holm_p_and_verdict(report):
    from rich.console import Console

    buf = io.StringIO()
    print_leaderboard(report, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "p Holm" in text and "verdict" in text and "equivalent" in text and "reference" in text
    assert "linear ◆" in text  # the method chosen on validation


# ---------------------------------------------------------------- which backbone? (paired by seed)
BACKBONE_TEST = {  # (backbone, method) -> test values for seeds 0..3 at fraction 0.1
    ("cnn", "full"): [0.60, 0.62, 0.61, 0.63], ("cnn", "lora"): [0.70, 0.71, 0.69, 0.72],
    ("vit", "full"): [0.61, 0.60, 0.64, 0.62], ("vit", "lora"): [0.60, 0.62, 0.58, 0.63],
    ("med", "full"): [0.80, 0.83, 0.81, 0.82], ("med", "lora"): [0.701, 0.709, 0.691, 0.721],
}


def make_backbone_store(out: Path, subset_offset: dict | None = None, test_split: dict | None = None) -> None:
    n = 0
    with Store(out) as store:
        store.set_meta("experiment", {"data": ["toy"], "backbones": ["cnn", "vit", "med"], "fractions": [0.1],
                                      "seeds": list(SEEDS), "train": {"monitor": "auroc"}})
        for (backbone, method), values in BACKBONE_TEST.items():
            for seed in SEEDS:
                n += 1
                cell = {"id": f"toy|{backbone}|{method}|0.1", "data": "toy", "backbone": backbone, "method": method,
                        "fraction": 0.1}
                job = {"key": f"k{n}", "kind": "final", "cell": cell, "seed": seed, "trial": None, "params": {},
                       "config": {}}
                store.mark_running(job)
                metrics = {"test": {"auroc": {"value": values[seed]}}, "monitor": "auroc",
                           "subset_seed": seed + 100 + (subset_offset or {}).get(backbone, 0),
                           "split": {"train_ids_sha256": "aa", "val_ids_sha256": "bb",
                                     "test_ids_sha256": (test_split or {}).get(backbone, "cc")}}
                store.record({"key": job["key"], "status": "done", "outcome": "complete", "value": 0.7,
                              "metrics": metrics, "seconds": 1.0, "worker": "w"})


def test_backbone_pairs_paired_by_seed_with_holm_over_the_family(tmp_path):
    make_backbone_store(tmp_path)
    rep = build_report(tmp_path)
    comps = rep["backbones"]
    # 3 backbones -> 3 pairs per method, A first in sweep order
    assert [(r["method"], r["backbone_a"], r["backbone_b"]) for r in comps] == [
        (m, a, b) for m in ("full", "lora") for a, b in (("cnn", "vit"), ("cnn", "med"), ("vit", "med"))]
    raw = []
    for r in comps:
        ref = paired_test(BACKBONE_TEST[(r["backbone_a"], r["method"])], BACKBONE_TEST[(r["backbone_b"], r["method"])])
        assert r["delta"] == pytest.approx(ref["mean_diff"]) and r["p_t"] == pytest.approx(ref["t_pvalue"])
        assert r["same_subsets"] is True and r["same_split"] is True and r["seeds"] == list(SEEDS)
        raw.append(ref["t_pvalue"])
    assert [r["p_holm"] for r in comps] == pytest.approx(holm(raw))  # one family: every backbone comparison
    assert [r["q_bh"] for r in comps] == pytest.approx(benjamini_hochberg(raw))
    got = {(r["method"], r["backbone_a"], r["backbone_b"]): r["verdict"] for r in comps}
    assert got[("full", "cnn", "med")] == "worse" and got[("lora", "cnn", "vit")] == "better"
    assert got[("lora", "cnn", "med")] == "equivalent"  # within 0.002 on every seed
    csv = pd.read_csv(Path(rep["dir"]) / "backbones.csv")
    assert len(csv) == 6 and list(csv["p_holm"]) == pytest.approx(holm(raw))
    md = Path(rep["markdown"]).read_text()
    assert "## Which backbone? The same method on each backbone, paired by seed" in md
    line = next(line for line in md.splitlines() if line.startswith("| toy | 0.1 | full | cnn | med | 0.6150 | 0.8150 | -0.2000 ["))
    assert line.endswith("| 0, 1, 2, 3 | yes |")


def test_backbone_pairs_direction_and_subset_check(tmp_path):
    from medpeft.bench.report import _same_images, backbone_comparisons, final_runs

    make_backbone_store(tmp_path, subset_offset={"vit": 7}, test_split={"med": "other"})
    with Store.open_readonly(tmp_path) as store:
        runs = final_runs(store, "auroc")
    lower = backbone_comparisons(runs, higher_is_better=False)  # e.g. HD95: the lower backbone is better
    higher = backbone_comparisons(runs)
    flip = {"better": "worse", "worse": "better", "equivalent": "equivalent", "inconclusive": "inconclusive"}
    assert [flip[r["verdict"]] for r in higher] == [r["verdict"] for r in lower]
    full = [r for r in higher if r["method"] == "full"]
    assert {(r["backbone_a"], r["backbone_b"]): (r["same_split"], r["same_subsets"]) for r in full} == {
        ("cnn", "vit"): (True, False), ("cnn", "med"): (False, True), ("vit", "med"): (False, False)}
    # a different test split (e.g. grouped at another image size) is flagged, not silently paired
    assert [_same_images(r) for r in full] == ["no: the label subsets differ", "no: the splits differ",
                                               "no: the splits differ"]


def test_one_backbone_has_no_backbone_section(report):
    assert report["backbones"] == [] and "Which backbone?" not in report["md"]
    assert not (Path(report["dir"]) / "backbones.csv").exists()


# ---------------------------------------------------------------- shift: which methods lose least?
SHIFT_RUNS = {  # (backbone, method) -> per seed: (home test, external "B", external "B+fda", relative robustness)
    ("cnn", "full"): [(0.80, 0.50, 0.56, 0.70), (0.82, 0.52, 0.57, 0.72), (0.81, 0.49, 0.55, 0.71),
                      (0.83, 0.53, 0.60, 0.69)],
    ("cnn", "lora"): [(0.84, 0.62, 0.63, 0.80), (0.85, 0.61, 0.615, 0.82), (0.83, 0.63, 0.645, 0.79),
                      (0.86, 0.60, 0.60, 0.81)],
    ("cnn", "ssf"): [(0.80, 0.51, 0.49, 0.70), (0.82, 0.50, 0.48, 0.73), (0.81, 0.52, 0.505, 0.70),
                     (0.83, 0.52, 0.50, 0.68)],
    ("med", "full"): [(0.78, 0.70, 0.71, 0.90), (0.79, 0.72, 0.72, 0.92), (0.77, 0.69, 0.70, 0.91),
                      (0.80, 0.71, 0.72, 0.90)],
    ("med", "lora"): [(0.79, 0.71, 0.70, 0.90), (0.80, 0.70, 0.70, 0.91), (0.78, 0.72, 0.73, 0.92),
                      (0.81, 0.70, 0.70, 0.90)],
}


def make_shift_store(out: Path, bump: dict | None = None, train: dict | None = None) -> None:
    """``bump``: {(backbone, method): [per-seed change of the external "B" score]} (another sweep of the same cells)."""
    with Store(out) as store:
        store.set_meta("experiment", {"data": ["toy"], "backbones": ["cnn", "med"], "fractions": [1.0],
                                      "seeds": list(SEEDS), "train": {"monitor": "auroc", **(train or {})},
                                      "corruptions": "generic"})
        for n, ((backbone, method), seeds) in enumerate(SHIFT_RUNS.items()):
            for seed, (home, away, aligned, relative) in enumerate(seeds):
                away += (bump or {}).get((backbone, method), [0.0] * len(SEEDS))[seed]
                cell = {"id": f"toy|{backbone}|{method}|1", "data": "toy", "backbone": backbone, "method": method,
                        "fraction": 1.0}
                job = {"key": f"k{n}-{seed}", "kind": "final", "cell": cell, "seed": seed, "trial": None,
                       "params": {}, "config": {}}
                store.mark_running(job)
                metrics = {"test": {"auroc": {"value": home}}, "monitor": "auroc", "subset_seed": seed,
                           "external": {"B": {"auroc": {"value": away}}, "B+fda": {"auroc": {"value": aligned}}},
                           "corruptions": {"suite": "generic", "metric": "auroc", "clean": home,
                                           "mean": home * relative, "relative": relative,
                                           "per_corruption": {"gaussian_noise": home * relative}}}
                store.record({"key": job["key"], "status": "done", "outcome": "complete", "value": 0.7,
                              "metrics": metrics, "seconds": 1.0, "worker": "w"})


def _col(backbone, method, i):
    return [row[i] for row in SHIFT_RUNS[(backbone, method)]]


def test_shift_contrasts_compare_every_method_with_full_on_the_external_score_and_the_drop(tmp_path):
    make_shift_store(tmp_path)
    rep = build_report(tmp_path)
    got = {(r["backbone"], r["external"], r["quantity"], r["method"]): r for r in rep["shift"]["shift_contrasts_"]}
    assert set(got) == {(b, e, q, m) for e in ("B", "B+fda") for q in ("external", "drop")
                        for b, m in (("cnn", "lora"), ("cnn", "ssf"), ("med", "lora"))}
    for quantity in ("external", "drop"):
        raw = []
        for method in ("lora", "ssf"):  # the Holm family: the methods of the cnn cell against full
            def score(m, q=quantity):
                away = _col("cnn", m, 1)
                return away if q == "external" else [b - a for a, b in zip(_col("cnn", m, 0), away)]
            ref = paired_test(score(method), score("full"))
            row = got[("cnn", "B", quantity, method)]
            assert row["delta"] == pytest.approx(ref["mean_diff"]) and row["p_t"] == pytest.approx(ref["t_pvalue"])
            assert row["tost_p"] == pytest.approx(tost_paired(score(method), score("full"), 0.02)["p"])
            raw.append(ref["t_pvalue"])
        assert [got[("cnn", "B", quantity, m)]["p_holm"] for m in ("lora", "ssf")] == pytest.approx(holm(raw))
    # LoRA keeps +0.10 external on every seed and loses less (drop -0.225 vs -0.305): better on both
    assert got[("cnn", "B", "external", "lora")]["verdict"] == "better"
    assert got[("cnn", "B", "drop", "lora")]["verdict"] == "better"
    assert got[("cnn", "B", "drop", "lora")]["full_mean"] == pytest.approx(
        sum(b - a for a, b in zip(_col("cnn", "full", 0), _col("cnn", "full", 1))) / 4)
    md = Path(rep["markdown"]).read_text()
    assert "### Which methods lose least under shift? Each method vs full fine-tuning" in md
    assert pd.read_csv(Path(rep["dir"]) / "shift_vs_full.csv")["quantity"].tolist().count("drop") == 6


def test_shift_contrasts_follow_the_metric_direction(tmp_path):
    from medpeft.bench.report import final_runs, shift_contrasts

    make_shift_store(tmp_path)
    with Store.open_readonly(tmp_path) as store:
        runs = final_runs(store, "auroc")
    flip = {"better": "worse", "worse": "better", "equivalent": "equivalent", "inconclusive": "inconclusive"}
    higher, lower = shift_contrasts(runs), shift_contrasts(runs, higher_is_better=False)  # e.g. HD95
    assert [flip[r["verdict"]] for r in higher] == [r["verdict"] for r in lower]
    assert "better" in [r["verdict"] for r in higher]


def test_alignment_recovery_is_aligned_minus_raw_of_the_same_runs_with_holm(tmp_path):
    make_shift_store(tmp_path)
    rep = build_report(tmp_path)
    got = {(r["backbone"], r["method"]): r for r in rep["shift"]["alignment"]}
    assert set(got) == {(b, m) for b, m in SHIFT_RUNS} and {r["alignment"] for r in got.values()} == {"fda"}
    raw = []
    for method in ("full", "lora", "ssf"):
        ref = paired_test(_col("cnn", method, 2), _col("cnn", method, 1))
        assert got[("cnn", method)]["delta"] == pytest.approx(ref["mean_diff"])
        raw.append(ref["t_pvalue"])
    assert [got[("cnn", m)]["p_holm"] for m in ("full", "lora", "ssf")] == pytest.approx(holm(raw))
    assert got[("cnn", "full")]["verdict"] == "recovers"  # +0.04 to +0.07 on every seed
    assert got[("cnn", "ssf")]["verdict"] == "hurts"      # -0.015 to -0.02 on every seed
    assert got[("med", "lora")]["verdict"] == "inconclusive"
    assert "### How much does style alignment recover?" in Path(rep["markdown"]).read_text()


def test_external_backbone_comparison_and_robustness_contrasts(tmp_path):
    make_shift_store(tmp_path)
    rep = build_report(tmp_path)
    ext = {(r["external"], r["quantity"], r["method"]): r for r in rep["shift"]["external_backbones"]}
    ref = paired_test(_col("cnn", "full", 1), _col("med", "full", 1))
    got = ext[("B", "external", "full")]
    assert got["delta"] == pytest.approx(ref["mean_diff"]) and got["verdict"] == "worse"
    assert ("B+fda", "external", "lora") in ext
    # does it lose less? the drop (external - in-domain of the same run), paired by seed, Holm over
    # the backbone pairs of one set and quantity (here the two methods both backbones ran)
    drops = {(b, m): [x[1] - x[0] for x in SHIFT_RUNS[(b, m)]] for b in ("cnn", "med") for m in ("full", "lora")}
    refs = {m: paired_test(drops[("cnn", m)], drops[("med", m)]) for m in ("full", "lora")}
    for method in ("full", "lora"):
        got = ext[("B", "drop", method)]
        assert got["delta"] == pytest.approx(refs[method]["mean_diff"]) and got["verdict"] == "worse"
    assert [ext[("B", "drop", m)]["p_holm"] for m in ("full", "lora")] == pytest.approx(
        holm([refs[m]["t_pvalue"] for m in ("full", "lora")]))
    robust = {(r["backbone"], r["method"]): r for r in rep["shift"]["robust_contrasts"]}
    ref = paired_test(_col("cnn", "lora", 3), _col("cnn", "full", 3))
    assert robust[("cnn", "lora")]["delta"] == pytest.approx(ref["mean_diff"])
    assert robust[("cnn", "lora")]["verdict"] == "better"
    md = Path(rep["markdown"]).read_text()
    assert "Which backbone transfers better?" in md and "Relative robustness vs full fine-tuning" in md


def test_a_sweep_without_external_sets_has_no_shift_contrasts(report):
    assert "Which methods lose least" not in report["md"] and "style alignment" not in report["md"]


def test_against_compares_two_sweeps_of_the_same_cells_paired_by_seed(tmp_path):
    bump = {("cnn", "lora"): [0.05, 0.06, 0.055, 0.05], ("med", "full"): [0.01, -0.01, 0.0, 0.005]}
    make_shift_store(tmp_path / "dann", bump=bump, train={"adapt": "dann", "target_unlabelled": "/home/me/cvc"})
    make_shift_store(tmp_path / "plain")
    rep = build_report(tmp_path / "dann", against=tmp_path / "plain")
    got = {(r["quantity"], r["backbone"], r["method"]): r for r in rep["shift"]["against"]["contrasts"]}
    assert {q for q, _, _ in got} == {"test", "external B", "external B+fda"}
    raw = []
    for backbone, method in SHIFT_RUNS:  # one family per quantity: every cell
        mine = [a + d for a, d in zip(_col(backbone, method, 1), bump.get((backbone, method), [0.0] * 4))]
        ref = paired_test(mine, _col(backbone, method, 1))
        assert got[("external B", backbone, method)]["delta"] == pytest.approx(ref["mean_diff"])
        raw.append(ref["t_pvalue"])
        assert got[("test", backbone, method)]["delta"] == pytest.approx(0.0)
    assert [got[("external B", b, m)]["p_holm"] for b, m in SHIFT_RUNS] == pytest.approx(holm(raw))
    assert got[("external B", "cnn", "lora")]["verdict"] == "better"
    assert got[("external B", "cnn", "full")]["verdict"] == "equivalent"  # identical on every seed
    md = Path(rep["markdown"]).read_text()
    assert "## Against the sweep 'plain': the same cells, paired by seed" in md
    assert "train.adapt: dann vs None" in md
    assert "/home/me" not in md and str(tmp_path) not in md  # no user paths in the report
    assert len(pd.read_csv(Path(rep["dir"]) / "against.csv")) == 15


def test_against_rejects_itself_a_missing_store_and_another_task(tmp_path):
    make_shift_store(tmp_path / "a")
    with pytest.raises(ConfigError, match="that is this sweep"):
        build_report(tmp_path / "a", against=tmp_path / "a")
    with pytest.raises(ConfigError, match="no results store"):
        build_report(tmp_path / "a", against=tmp_path / "nowhere")
    with Store(tmp_path / "seg") as store:
        store.set_meta("experiment", {"data": ["toy"], "task": "segmentation"})
    with pytest.raises(ConfigError, match="a segmentation sweep; this sweep is classification"):
        build_report(tmp_path / "a", against=tmp_path / "seg")
    assert not (tmp_path / "a" / "report").exists()  # checked before anything was written
