"""``medpeft benchmark`` and ``medpeft report``.

Precedence: a preset, then the YAML experiment file, then the options given on the command line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..errors import ConfigError

BENCHMARK_HELP = """\
Run a sweep: data sets x backbones x methods x label fractions x seeds, with HPO per
(data set, backbone, method, fraction) on validation, the chosen configuration trained and
tested once per seed, every result in a resumable SQLite store (<out>/results.db), and a
report in <out>/report/ (Markdown, HTML, PNG plots, CSV).

examples:
  medpeft benchmark --preset quick
  medpeft benchmark --data breastmnist --backbones efficientnet_lite0,dinov2_vits14 \\
      --methods all --fractions 0.01,0.1,1.0 --seeds 3 --hpo-trials 8 --out results/
  medpeft benchmark --config experiment.yaml --resume
  medpeft benchmark --preset full --executor ray --address 10.0.0.5:6379

experiment file (YAML; every key optional, unknown keys are errors):
  data: [breastmnist, pneumoniamnist]
  data_root: ../shared/data/medmnist
  backbones: [efficientnet_lite0, dinov2_vits14]
  methods: all                      # or a list, hybrids allowed: [lora, ssf, lora+ssf]
  fractions: [0.01, 0.1, 1.0]
  seeds: 3                          # or a list [0, 1, 2]
  image_size: {efficientnet_lite0: 64, dinov2_vits14: 112}  # or one number
  hpo: {trials: 8, subsets: 2, prune: false, parallel: 1, seed: 0, startup_trials: 4}
                                    # subsets: label subsets a trial averages over (fraction < 1);
                                    # prune: successive halving (then the budget is compute, not trials)
  train: {steps: 300, patience: 10, batch_size: 32}         # any 'medpeft run' training option;
                                    # a steps/epochs budget is searched too (x0.5, x1, x2)
  val_labels: follow                # selection labels follow the label budget (full: optimistic)
  margin: 0.02                      # equivalence margin of the report's TOST (metric units)
  method_options: {lora_targets: qv}                         # fixed, not searched
  data_options: {val_ratio: 0.1, test_ratio: 0.1}            # any 'medpeft run' data option
  external_test: [CVC-ClinicDB]     # evaluated once per final run after its home test
  corruptions: ultrasound           # each final run's test split under a corruption suite
  n_boot: 1000
  keep_adapters: false
  out: results/
  executor: local                   # or ray (with address: host:port)
"""


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip().replace("-", "_"), value


def _image_size(text: str):
    if "=" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected pixels (64) or backbone=pixels pairs, got {text!r}") from None
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"image size for {name.strip()!r}: expected pixels, got {value!r}") from None
    return out


def add_benchmark_parsers(sub) -> dict:
    """Add the ``benchmark`` and ``report`` sub-commands; returns {name: handler}."""
    from .presets import PRESETS

    p = sub.add_parser("benchmark", help="compare fine-tuning methods: sweep with HPO, resumable store, report",
                       description=BENCHMARK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML experiment file (layout below)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named experiment: quick (the README's main job, < 10 min on 2 CPU cores) or full")
    g = p.add_argument_group("grid")
    g.add_argument("--data", default=None, help="comma-separated data sets (MedMNIST names, folders, manifests)")
    g.add_argument("--task", choices=("classification", "segmentation", "detection"), default=None,
                   help="what the data's targets are: classification (default), segmentation (masks) or detection "
                        "(boxes; a box file via --data-option boxes=FILE)")
    g.add_argument("--data-root", default=None, help="data root (default: $MEDPEFT_DATA)")
    g.add_argument("--medmnist-size", type=int, default=None, choices=(28, 64, 128, 224),
                   help="which MedMNIST file variant to read (default 28)")
    g.add_argument("--backbones", default=None, help="comma-separated backbones")
    g.add_argument("--methods", default=None,
                   help="comma-separated methods or 'all' (every method that applies to the backbone)")
    g.add_argument("--fractions", default=None, help="comma-separated label fractions in (0, 1], e.g. 0.01,0.1,1.0")
    g.add_argument("--seeds", default=None, help="number of seeds (3 = seeds 0,1,2) or a comma-separated list")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="pixels, or per backbone: efficientnet_lite0=64,dinov2_vits14=112 (default per backbone: "
                        "64 for CNNs, 8x8 tokens for a ViT: 112 for dinov2_vits14)")
    g = p.add_argument_group("HPO")
    g.add_argument("--hpo-trials", type=int, default=None, help="trials per cell (0 = each method's defaults)")
    g.add_argument("--hpo-parallel", type=int, default=None,
                   help="trials of a cell sampled together and run side by side (Ray); default 1")
    g.add_argument("--hpo-seed", type=int, default=None, help="seed of the Optuna sampler (default 0)")
    g.add_argument("--hpo-subsets", type=int, default=None,
                   help="label subsets each trial's objective averages over where the fraction is below 1 "
                        "(default 2: the first seeds' subsets)")
    g.add_argument("--hpo-prune", action="store_true", default=None,
                   help="successive-halving pruning (off by default so every method gets the same number of "
                        "completed trials; on, the budget is in trials started)")
    g.add_argument("--val-labels", choices=("follow", "full"), default=None,
                   help="selection labels: follow the label budget (default) or full (the literature's "
                        "optimistic protocol)")
    g.add_argument("--margin", type=float, default=None,
                   help="equivalence margin for the report's TOST verdicts, in metric units (default 0.02)")
    g = p.add_argument_group("training (shared by every run)")
    g.add_argument("--epochs", type=int, default=None, help="maximum epochs per run (default 30, or the preset's)")
    g.add_argument("--steps", type=int, default=None,
                   help="training budget in optimizer steps per run (instead of epochs; searched x0.5/x1/x2 by HPO)")
    g.add_argument("--batch-size", type=int, default=None, help="training batch size (default 32)")
    g.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience in epochs (default 6, or the preset's)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    g.add_argument("--train", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="any other training option, e.g. --train class_weighted=true (repeatable)")
    g.add_argument("--method-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="fixed method option, e.g. --method-option lora_targets=qv (repeatable; not searched)")
    g.add_argument("--data-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="data option for every run, e.g. --data-option val_ratio=0.1 (repeatable)")
    g.add_argument("--external-test", default=None, metavar="DATA[,DATA]",
                   help="external test sets (same task and label space) every final run is evaluated on once, "
                        "after its home test; the report adds an in-domain vs external table")
    g.add_argument("--corruptions", default=None, metavar="SUITE",
                   help="evaluate every final run's test split under a corruption suite (ultrasound, xray, ct_mr, "
                        "fundus, endoscopy, generic); the report adds a robustness table and plot")
    g.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples for the final runs' CIs")
    g.add_argument("--keep-adapters", action="store_true", default=None,
                   help="keep each final run's adapter.safetensors (default: keep only its size)")
    g = p.add_argument_group("execution")
    g.add_argument("--out", default=None, help="sweep folder: results.db, runs/, report/ (default per preset, "
                                               "else runs/benchmark)")
    g.add_argument("--resume", action="store_true", help="continue the sweep in --out: done runs are kept, "
                                                         "unfinished ones run again")
    g.add_argument("--retry-failed", action="store_true", help="with --resume: run failed jobs again too")
    g.add_argument("--executor", default=None, choices=("local", "ray"), help="local (default) or ray")
    g.add_argument("--address", default=None, help="Ray cluster address (host:port or auto); "
                                                   "default: a private local Ray on 127.0.0.1")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the local executor (default: the cores other processes leave free, "
                        "decided when the sweep starts and kept on --resume)")
    g.add_argument("--ray-cpus-per-trial", type=float, default=1.0,
                   help="CPUs Ray reserves for each run; also its torch threads (default 1)")
    g.add_argument("--ray-gpus-per-trial", type=float, default=0.0,
                   help="GPUs (or a fraction of one) Ray reserves for each run (default 0)")
    g.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the private local Ray (default: all)")
    g.add_argument("--max-jobs", type=int, default=None, help="stop after training this many jobs "
                                                              "(run a long sweep in chunks with --resume)")
    g.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    g.add_argument("--dry-run", action="store_true",
                   help="check the settings and the data (files, folders, manifest rows; no image decoded), print "
                        "the grid and the number of jobs, run nothing")
    g.add_argument("--quiet", action="store_true", help="no progress display and no leaderboard")
    from ..tracking import add_tracking_options

    add_tracking_options(p)  # --mlflow URI: every trial and final run logged (not part of the sweep's keys)

    r = sub.add_parser("report", help="rebuild a sweep's report (tables, plots, Markdown, HTML) from its store")
    r.add_argument("dir", help="the sweep's --out folder (with results.db)")
    r.add_argument("--metric", default=None, help="test metric to rank by (default: the sweep's monitor, auroc)")
    r.add_argument("--export", default="csv", help="comma-separated: csv, parquet (needs pyarrow)")
    r.add_argument("--quiet", action="store_true", help="write the files, print no leaderboard")
    r.add_argument("--margin", type=float, default=None,
                   help="equivalence margin for the TOST verdicts (default: the sweep's, else 0.02)")
    r.add_argument("--against", default=None, metavar="DIR",
                   help="another sweep's --out folder with the same cells (e.g. the same methods with --adapt dann): "
                        "adds a section comparing the two, paired by seed, on the home test and each external set")
    return {"benchmark": cmd_benchmark, "report": cmd_report}


def experiment_from_args(args):
    """(Experiment, run options dict) from preset < config file < command line."""
    from .grid import Experiment, load_experiment_file
    from .presets import preset

    values, run = {}, {}
    if args.preset:
        values = preset(args.preset)
        run = {k: values.pop(k) for k in ("out", "executor", "address") if k in values}
    exp = Experiment.from_mapping(values, where=f"preset {args.preset}") if values else Experiment()
    if args.config:
        file_values, file_run = load_experiment_file(args.config)
        run.update(file_run)
        merged = {**_as_mapping(exp), **file_values}
        if "train" in file_values:
            merged["train"] = {**exp.train, **(file_values["train"] or {})}
        exp = Experiment.from_mapping(merged, where=f"experiment file {args.config}")
    train = {k: v for k, v in (("epochs", args.epochs), ("steps", args.steps), ("batch_size", args.batch_size),
                               ("patience", args.patience), ("device", args.device)) if v is not None}
    train.update(dict(args.train))
    exp = exp.updated(
        data=args.data, task=args.task, data_root=args.data_root, medmnist_size=args.medmnist_size, backbones=args.backbones,
        methods=args.methods, fractions=args.fractions, seeds=args.seeds, image_size=args.image_size,
        hpo_trials=args.hpo_trials, hpo_parallel=args.hpo_parallel, hpo_seed=args.hpo_seed,
        hpo_subsets=args.hpo_subsets, hpo_prune=args.hpo_prune, val_labels=args.val_labels, margin=args.margin,
        n_boot=args.n_boot, keep_adapters=args.keep_adapters, train=train or None,
        method_options=dict(args.method_option) or None, data_options=dict(args.data_option) or None,
        external_test=args.external_test, corruptions=args.corruptions)
    for key in ("out", "executor", "address"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    return exp, run


def _as_mapping(exp) -> dict:
    """An Experiment back in the YAML layout (to merge a file over a preset)."""
    from .grid import HPO_KEYS

    flat = exp.to_dict()
    hpo = {short: flat.pop(long) for short, long in HPO_KEYS.items()}
    return {**flat, "hpo": hpo}


def cmd_benchmark(args) -> int:
    from rich.console import Console

    from .progress import SweepProgress
    from .report import print_leaderboard
    from .sweep import RunOptions, run_sweep

    for flag, value, low in (("--threads", args.threads, 1), ("--max-jobs", args.max_jobs, 1),
                             ("--ray-num-cpus", args.ray_num_cpus, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: expected a whole number >= {low}")
    if not args.ray_cpus_per_trial > 0 or args.ray_gpus_per_trial < 0:
        raise ConfigError(f"--ray-cpus-per-trial {args.ray_cpus_per_trial} must be > 0 and --ray-gpus-per-trial "
                          f"{args.ray_gpus_per_trial} >= 0")
    exp, run = experiment_from_args(args)
    exp.validate()  # also checks the data (the MedMNIST file, class folders, manifest rows and files)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 130))  # log lines and the leaderboard unwrapped
    cells = exp.cells()
    if args.dry_run:
        jobs = len(cells) * (exp.hpo_trials + len(exp.seeds))
        console.print(f"{len(cells)} cells x ({exp.hpo_trials} HPO trials + {len(exp.seeds)} seeds) = {jobs} jobs",
                      highlight=False)
        for note in exp.notes:
            console.print(f"  note: {note}", highlight=False)
        for cell in cells:
            console.print(f"  {cell.id}  ({cell.image_size}px)", highlight=False)
        return 0
    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed only makes sense with --resume")
    opts = RunOptions(out=Path(run.get("out") or "runs/benchmark"), resume=args.resume, retry_failed=args.retry_failed,
                      executor=run.get("executor") or "local", address=run.get("address"), threads=args.threads,
                      cpus_per_trial=args.ray_cpus_per_trial, gpus_per_trial=args.ray_gpus_per_trial,
                      ray_num_cpus=args.ray_num_cpus, quiet=args.quiet, report=not args.no_report,
                      max_jobs=args.max_jobs, mlflow=args.mlflow, mlflow_experiment=args.mlflow_experiment)
    progress = SweepProgress(console, quiet=args.quiet)
    try:
        summary = run_sweep(exp, opts, progress=progress)
    except KeyboardInterrupt:
        console.print(f"interrupted: finished runs are in {opts.out}/results.db; continue with the same command "
                      "and --resume", highlight=False)
        return 130
    if summary.get("report") and not args.quiet:
        print_leaderboard(summary["report"], console)
    failed, failed_now, done = summary["store"].get("failed", 0), summary.get("failed", 0), summary["store"]["done"]
    if failed:
        where = f"{opts.out}/report/runs.csv" if summary.get("report") else f"{opts.out}/results.db"
        console.print(f"{failed_now} of the {summary['ran']} job(s) run this time failed, {failed} failed in the "
                      f"store ({done} done); first error: {_first_error(opts.out)}; every error is in {where} "
                      "(re-run them with --resume --retry-failed)", highlight=False)
    if not summary["complete"]:
        console.print(f"sweep not complete ({summary['ran']} jobs this time); continue with --resume", highlight=False)
    return 1 if failed_now or (failed and not done) else 0  # a failed job is no silent success


def _first_error(out) -> str:
    from .store import Store

    try:
        with Store.open_readonly(out) as store:
            rows = store.rows(status="failed")
    except ConfigError:
        return "unknown"
    return (rows[0].get("error") or "unknown").splitlines()[0] if rows else "unknown"


def cmd_report(args) -> int:
    from rich.console import Console

    from .report import build_report, print_leaderboard

    formats = [f.strip() for f in args.export.split(",") if f.strip()]
    report = build_report(args.dir, metric=args.metric, formats=formats, margin=args.margin,
                          against=args.against)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 130))
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)
    if not args.quiet:
        print_leaderboard(report, console)
    else:
        console.print(f"report: {report['markdown']}", highlight=False)
    return 0
