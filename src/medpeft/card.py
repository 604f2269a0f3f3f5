"""``medpeft card RUN``: a Markdown model card generated from a run folder.

Everything in the card is read from the folder: metrics.json (metrics with CIs, parameters,
audit, selection), config.yaml, split.json, the adapter's metadata and sha256, and
calibration.json when ``medpeft calibrate`` wrote one (it replaces the run's own calibration
entry, as it does for ``predict``). Paths are never written, only file and data-set names.
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import date
from pathlib import Path

from . import __version__
from .errors import ConfigError

CARD_FILE = "MODEL_CARD.md"
# metrics.json keys of evaluations beyond the run's own test split (written by later commands)
EXTRA_EVALUATIONS = {"external": "External data", "corruption": "Corrupted test images",
                     "corruptions": "Corrupted test images", "robustness": "Robustness"}


def add_card_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "card", help="write a Markdown model card (MODEL_CARD.md) from a run folder",
        description="Generate MODEL_CARD.md from a run folder: backbone and weights source with checksum, method "
                    "and trainable %%, data, split and audit findings, selection protocol, test metrics with CIs, "
                    "calibration and operating point when present, intended use and limitations.")
    p.add_argument("run", help="run folder written by 'medpeft run'")
    p.add_argument("--out", default=None, help=f"output file (default: RUN/{CARD_FILE})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def cmd_card(args) -> int:
    run = Path(args.run)
    out = Path(args.out) if args.out else run / CARD_FILE
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / CARD_FILE}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"the folder of {out} does not exist; create it first")
    text = build_card(run)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- reading the run


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path.name}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"{path.name} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a JSON object")
    return data


def _adapter_info(run: Path) -> tuple[dict, str | None, int | None]:
    from safetensors import safe_open

    from .calibration import sha256_file
    from .run import ADAPTER_FILE

    path = run / ADAPTER_FILE
    if not path.is_file():
        return {}, None, None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # an unreadable adapter: the card says so rather than failing
        meta = {}
    return meta, sha256_file(path), path.stat().st_size


def _config(run: Path) -> dict:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- formatting


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{float(value):.{digits}f}"


def _ci(m, digits: int = 3) -> str:
    if not isinstance(m, dict):
        return _num(m, digits)
    value, low, high = m.get("value"), m.get("low"), m.get("high")
    if value is None or value != value:
        return "n/a"
    if low is None or low != low:
        return _num(value, digits)
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _name(text) -> str:
    """A data set / file name without the folders that lead to it (no user or hospital paths)."""
    text = str(text or "")
    return Path(text).name or text


def _size(nbytes) -> str:
    if not nbytes:
        return "n/a"
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def _weights(metrics: dict, meta: dict, cfg: dict) -> tuple[str, str]:
    """(weights source in words, checksum in words)."""
    source = str(metrics.get("weights_source") or "unknown")
    sha = metrics.get("weights_sha256") or meta.get("weights_sha256") or meta.get("weights_checksum")
    kind, _, rest = source.partition(":")
    if kind == "offline":
        from .backbones.offline import PROVIDERS

        provider = PROVIDERS.get(str(metrics.get("backbone")))
        words = f"offline pretrained weights from the pip package {rest}"
        if provider is not None:
            words += f" ({_name(provider.relpath)}, converted by medpeft)"
            sha = sha or provider.source_sha256
    elif kind == "file":
        words = f"local weights file {_name(meta.get('weights_file') or rest or cfg.get('weights'))} (--weights)"
    elif source == "hub":
        words = "pretrained weights downloaded from the timm / Hugging Face hub"
    elif source == "random":
        words = "none: random initialisation (no pretrained weights)"
    else:
        words = source
    if sha:
        checksum = f"sha256 `{sha}`"
    elif source == "random":
        checksum = "not applicable"
    else:
        checksum = "not recorded by this run"
    return words, checksum


# ----------------------------------------------------------------------------- the card


def build_card(run: str | Path) -> str:
    """The model card of ``run`` as Markdown."""
    from .calibration import CALIBRATION_FILE, RELIABILITY_FILE

    run = Path(run)
    if not run.is_dir() or not (run / "metrics.json").is_file():
        raise ConfigError(f"{run} is not a run folder (no metrics.json written by 'medpeft run')")
    m = _json(run / "metrics.json", "metrics")
    cfg = _config(run)
    meta, adapter_sha, adapter_bytes = _adapter_info(run)
    split_file = run / "split.json"
    split_ids = _json(split_file, "split") if split_file.is_file() else {}
    side = _json(run / CALIBRATION_FILE, "calibration") if (run / CALIBRATION_FILE).is_file() else {}
    if side and adapter_sha and side.get("adapter_sha256") not in (None, adapter_sha):
        side = {}  # computed for another adapter: not this model's
    calibration = side.get("calibration") if side else m.get("calibration")
    operating = side.get("operating_point") if side else m.get("operating_point")
    cal_source = f"{CALIBRATION_FILE} (medpeft calibrate)" if side else "metrics.json (medpeft run)"

    task = m.get("task") or meta.get("task") or "unknown"
    classes = m.get("class_names") or json.loads(meta.get("class_names", "[]") or "[]")
    data = _name(m.get("data"))
    backbone, method = m.get("backbone") or meta.get("backbone"), m.get("method") or meta.get("method")
    is_seg = task == "segmentation"
    params = m.get("params") or {}
    split = m.get("split") or {}
    selection = m.get("selection") or {}
    data_cfg, train_cfg = cfg.get("data") or {}, cfg.get("train") or {}
    test, val = m.get("test") or {}, m.get("val") or {}
    image_size = meta.get("image_size") or data_cfg.get("image_size")

    out = [f"# Model card: {method} on {backbone} for {data}", ""]
    out.append(f"Generated by medpeft {__version__} on {date.today().isoformat()} from the run folder "
               f"`{run.resolve().name}` (trained with medpeft {m.get('medpeft_version', 'unknown')}). Every number "
               "below comes from that folder: metrics.json, config.yaml, split.json, the adapter's metadata"
               + (f" and {CALIBRATION_FILE}" if side else "") + ".")

    # ------------------------------------------------------------------ model
    words, checksum = _weights(m, meta, cfg)
    out += ["", "## Model", ""]
    task_words = {"binary": "binary classification", "multiclass": f"{len(classes)}-class classification",
                  "multilabel": f"multi-label classification ({len(classes)} labels)",
                  "segmentation": f"segmentation ({len(classes)} mask classes)"}.get(task, task)
    rows = [["task", task_words],
            ["classes", ", ".join(f"`{c}`" for c in classes) or "n/a"]]
    if m.get("positive_class"):
        rows.append(["positive class (sensitivity, PPV, F1 follow it)", m["positive_class"]])
    rows += [["backbone", f"{backbone}"],
             ["pretrained weights", words],
             ["weights checksum", checksum],
             ["fine-tuning method", f"{method}" + (f" ({_options(m.get('method_config'))})"
                                                   if m.get("method_config") else "")],
             ["trainable parameters", f"{_num(params.get('trainable'))} of {_num(params.get('total'))} "
                                      f"({_num(params.get('trainable_pct'), 3)} %, head/decoder included"
                                      + (f"; {_num(params.get('trainable_without_head'))} without it)"
                                         if params.get("trainable_without_head") is not None else ")")],
             ["input", f"{image_size} x {image_size} px, normalised with mean {_vec(meta.get('mean'))}, "
                       f"std {_vec(meta.get('std'))}" if image_size else "n/a"],
             ["adapter file", f"adapter.safetensors, {_size(adapter_bytes)}"
                              + (f", sha256 `{adapter_sha}`" if adapter_sha else "") if adapter_sha else "missing"]]
    if m.get("prompt") == "box":
        rows.append(["prompts", "ground-truth box prompts (a box is needed for every image at inference)"])
    out.append(_table(["", ""], rows))

    # ------------------------------------------------------------------ data
    out += ["", "## Data and split", ""]
    sizes = split.get("sizes") or {}
    src = split.get("source") or ("MedMNIST" if split.get("medmnist_size") else "")
    lines = [f"- Data set: **{data}**" + (f" ({src}" + (f", {split['medmnist_size']} px variant" if
                                                          split.get("medmnist_size") else "") + ")" if src else "")
             + (f", file {_name(split['file'])}" if split.get("file") else "") + "."]
    if sizes:
        lines.append(f"- Split ({split.get('kind', 'unknown')}"
                     + (f", seed {split['seed']}" if split.get("seed") is not None else "")
                     + f"): train {_num(sizes.get('train'))}, validation {_num(sizes.get('val'))}, "
                     f"test {_num(sizes.get('test'))} images.")
    budget = []
    if split.get("fraction") is not None:
        budget.append(f"fraction {split['fraction']:g} of the training labels")
    if split.get("shots") is not None:
        budget.append(f"{split['shots']} images per class")
    lines.append(f"- Labels used for training: **{_num(m.get('n_train'))}** images"
                 + (f" ({', '.join(budget)}, subset seed {m.get('subset_seed')})" if budget else " (all)") + ".")
    if selection.get("mode", "holdout") == "holdout":
        lines.append(f"- Labels used for model selection: {_num(m.get('n_val'))} validation images ("
                     + ("the whole validation split: the literature's protocol, optimistic for a user with few "
                        "labels" if selection.get("val_labels") == "full" else
                        "the validation split subsampled like the training labels") + ").")
    else:
        lines.append(f"- Model selection: {selection.get('mode')} cross-validation inside the "
                     f"{_num(selection.get('n_selection_labels'))} training labels; no validation labels used.")
    lines.append(f"- Test: {_num(m.get('n_test'))} images, never subsampled, evaluated once with the selected state.")
    if split_ids:
        lines.append(f"- The ids of every split (and of the label subsets) are in split.json "
                     f"({len(split_ids.get('train', []))}/{len(split_ids.get('val', []))}/"
                     f"{len(split_ids.get('test', []))} ids): reuse them with --split-file.")
    audit = m.get("audit")
    if isinstance(audit, dict):
        problems = audit.get("problems") or []
        counted = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in audit.items()
                            if k != "problems" and isinstance(v, (int, float)))
        lines.append("- Data audit before training: " + ("; ".join(problems) if problems else "no problem found")
                     + (f" ({counted})." if counted else "."))
    else:
        lines.append("- Data audit: not run for this run (--audit off or a data set passed in by a sweep); run "
                     f"'medpeft audit {data}' before relying on the numbers.")
    out += lines

    # ------------------------------------------------------------------ training
    out += ["", "## Training and model selection", ""]
    monitor = m.get("monitor")
    lr = m.get("lr")
    lr = f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)
    out += [f"- Seed {m.get('seed')}; learning rate {lr}; augmentation {m.get('augment')}; batch size {train_cfg.get('batch_size', 'n/a')}.",
            f"- Early stopping / selection on validation {monitor}: best epoch {m.get('best_epoch')} of "
            f"{m.get('epochs_run')} run ({m.get('epochs_planned')} planned, {m.get('steps_run')} optimizer steps); "
            f"selected validation {monitor} {_num(m.get('best_val'))}.",
            f"- Training time {_num(m.get('train_seconds'), 1)} s; peak memory "
            + (f"{_num(m.get('peak_gpu_mb'), 0)} MB GPU" if m.get("peak_gpu_mb") is not None
               else f"{_num(m.get('peak_rss_mb'), 0)} MB resident") + "."]

    # ------------------------------------------------------------------ results
    out += ["", "## Results", ""]
    names = [k for k, v in test.items() if isinstance(v, dict) and "value" in v] or \
        [k for k, v in val.items() if isinstance(v, dict) and "value" in v]
    if names:
        out.append(f"Point estimate and percentile-bootstrap 95 % CI over the images (test n = {_num(m.get('n_test'))}"
                   f", validation n = {_num(m.get('n_val'))}).")
        out.append("")
        out.append(_table(["metric", "validation", "test"], [[n, _ci(val.get(n)), _ci(test.get(n))] for n in names]))
    else:
        out.append("No test metrics in this run (the test split was not evaluated).")

    # ------------------------------------------------------------------ calibration
    out += ["", "## Calibration", ""]
    if is_seg or task == "multilabel":
        out.append(f"Not applicable: medpeft calibrates image-level binary and multi-class classifiers; this is a "
                   f"{task_words} model (its probabilities are per {'pixel' if is_seg else 'label'}).")
    elif calibration and calibration.get("method") == "none":
        note = "; ".join(calibration.get("notes") or ["not calibrated: no calibration map was fitted"])
        out.append(note[:1].upper() + note[1:] + ". "
                   "Calibration of the raw probabilities (top-label ECE, "
                   f"{calibration.get('n_bins', 15)} equal-width bins; 95 % bootstrap CIs):")
        out.append("")
        out.append(_table(["metric", "validation", "test"],
                          [[k.upper() if k != "brier" else "Brier", _ci(calibration["val"]["before"].get(k)),
                            _ci(calibration["test"]["before"].get(k))] for k in ("ece", "mce", "brier", "nll")]))
    elif calibration:
        p = ", ".join(f"{k} = {_num(v, 4) if isinstance(v, float) else v}" for k, v in calibration["params"].items())
        out.append(f"{calibration['method'].capitalize()} scaling ({p}), fitted on {calibration.get('fitted_on')} "
                   f"({calibration.get('n_fit')} images), from {cal_source}; `medpeft predict` applies it "
                   "(`--uncalibrated` for the raw probabilities). ECE: top-label, "
                   f"{calibration.get('n_bins', 15)} equal-width bins; Brier: "
                   + ("binary (p_positive - y)^2" if calibration.get("brier") == "binary"
                      else "multi-class, summed over classes") + "; 95 % bootstrap CIs.")
        out.append("")
        rows = [[k.upper() if k != "brier" else "Brier"] + [_ci(calibration[s][w].get(k))
                                                            for s in ("val", "test") for w in ("before", "after")]
                for k in ("ece", "mce", "brier", "nll")]
        out.append(_table(["metric", "validation before", "validation after", "test before", "test after"], rows))
        for note in calibration.get("notes") or []:
            out += ["", f"Note: {note}."]
        if (run / RELIABILITY_FILE).is_file():
            out += ["", f"![reliability diagram]({RELIABILITY_FILE})"]
    else:
        out.append("Not calibrated (run with calibration off, or by a medpeft version without calibration); "
                   "`medpeft calibrate` fits it on the validation predictions.")

    # ------------------------------------------------------------------ operating point
    if not is_seg and task != "multilabel":
        out += ["", "## Operating point", ""]
        if operating and operating.get("threshold") is not None:
            out.append(f"Target {operating['target']}, chosen on {operating.get('chosen_on', 'validation')}: "
                       f"**{operating['rule']}** with threshold **{operating['threshold']:.4g}**; `medpeft predict` "
                       "reports this decision next to the probabilities.")
            out.append("")
            rows = [[k if len(k) > 3 else k.upper(), _ci(operating["val"].get(k)), _ci(operating["test"].get(k))]
                    for k in ("sensitivity", "specificity", "ppv", "npv")]
            rows.append(["counts (TP/FP/TN/FN)", _counts(operating["val"].get("counts")),
                         _counts(operating["test"].get("counts"))])
            out.append(_table(["metric at the threshold", "validation", "test"], rows))
            for note in operating.get("notes") or []:
                out += ["", f"Note: {note}."]
        elif operating:
            out.append(f"Requested ({operating.get('target')}) but not set: {operating.get('error')}.")
        else:
            out.append("None set: the prediction is the most probable class. For a clinical target use "
                       "`medpeft calibrate RUN --operating-point sensitivity=0.95` (binary tasks).")

    # ------------------------------------------------------------------ further evaluations
    for key, title in EXTRA_EVALUATIONS.items():
        if m.get(key):
            out += ["", f"## {title}", ""]
            out.append(_evaluation(m[key]))

    # ------------------------------------------------------------------ provenance: a sweep's winner
    if (run / "winner.json").is_file():
        won = _json(run / "winner.json", "winner")
        out += ["", "## Chosen by a comparison", ""]
        out.append(f"This model is the winner of the sweep `{_name(won.get('sweep'))}` for "
                   f"{' / '.join(str(c) for c in won.get('cell', []))}: **{won.get('method')}**, chosen on validation "
                   f"only (ties within the margin went to the fewest trainable parameters: {', '.join(won.get('tied', []))}), "
                   f"retrained from the sweep's stored configuration with seed {won.get('seed')} "
                   f"(store key `{str(won.get('store_key'))[:12]}`).")
        out.append("")
        out.append(_table(["method", "validation mean", "trainable %", "seeds"],
                          [[e["method"], _num(e.get("val_mean"), 4), _num(e.get("trainable_pct"), 3), str(e.get("seeds"))]
                           for e in won.get("ranking", [])]))

    # ------------------------------------------------------------------ use and limits
    out += ["", "## Intended use", ""]
    out.append(f"Research use: comparing parameter-efficient fine-tuning methods on small medical-imaging data sets, "
               f"and studying this {task_words} model on data like {data}. It is not a medical device, has not been "
               "evaluated prospectively or by a regulator, and must not be used for diagnosis or treatment decisions. "
               "Any use on patients' images needs a clinical validation on the target population, scanners and "
               "sites, and a clinician responsible for every decision.")
    out += ["", "## Limitations", ""]
    out += [f"- {line}" for line in _limitations(m, split, selection, calibration, operating, image_size, is_seg)]
    return "\n".join(out) + "\n"


def _options(config) -> str:
    if isinstance(config, dict):
        flat = []
        for key, value in config.items():
            if isinstance(value, dict):
                flat += [f"{k}={v}" for k, v in value.items() if not isinstance(v, (dict, list))]
            elif not isinstance(value, list):
                flat.append(f"{key}={value}")
        return ", ".join(flat[:12]) or "defaults"
    return str(config)


def _vec(text) -> str:
    try:
        return "(" + ", ".join(f"{float(v):.3f}" for v in json.loads(text)) + ")"
    except (TypeError, ValueError):
        return "n/a"


def _counts(c) -> str:
    if not isinstance(c, dict):
        return "n/a"
    return f"{c.get('tp')}/{c.get('fp')}/{c.get('tn')}/{c.get('fn')}"


def _evaluation(entry) -> str:
    """A metrics.json evaluation entry: {name: {metric: {value, low, high}}} or {metric: {...}}."""
    if isinstance(entry, dict) and all(isinstance(v, dict) and "value" in v for v in entry.values()):
        return _table(["metric", "value [95% CI]"], [[k, _ci(v)] for k, v in entry.items()])
    if isinstance(entry, dict):
        rows = []
        for name, metrics in entry.items():
            if isinstance(metrics, dict):
                shown = {k: v for k, v in metrics.items() if isinstance(v, dict) and "value" in v}
                if shown:
                    rows.append([_name(name), "; ".join(f"{k} {_ci(v)}" for k, v in shown.items())])
                    continue
            rows.append([_name(name), str(metrics)])
        return _table(["evaluation", "metrics [95% CI]"], rows)
    return str(entry)


def _limitations(m: dict, split: dict, selection: dict, calibration, operating, image_size, is_seg: bool) -> list[str]:
    lines = []
    n_train, n_val, n_test = m.get("n_train"), m.get("n_val"), m.get("n_test")
    budget = f"fraction {split['fraction']:g}" if split.get("fraction") is not None else (
        f"{split['shots']} per class" if split.get("shots") is not None else "all training labels")
    lines.append(f"Label budget: trained on {_num(n_train)} labelled images ({budget}) and selected on "
                 f"{_num(selection.get('n_selection_labels', n_val))} labels; a different draw of the same number of "
                 "labels (another subset seed) can change the numbers, and the wide CIs above reflect the small "
                 f"test set ({_num(n_test)} images).")
    external = any(m.get(k) for k in EXTRA_EVALUATIONS)
    lines.append(f"Single source: training, validation and test images all come from {_name(m.get('data'))}"
                 + (" (MedMNIST: public images downsampled and centre-cropped)" if split.get("source") == "medmnist"
                    else "") + "; " + ("see the further evaluations above for other data, but performance on other "
                                       "hospitals, scanners and populations is still unknown."
                                       if external else "no external or multi-site evaluation was run, so "
                                       "performance on other hospitals, scanners and populations is unknown."))
    audit = m.get("audit")
    if isinstance(audit, dict) and audit.get("cross_split_groups"):
        lines.append(f"The audit found {audit['cross_split_groups']} duplicate / near-duplicate group(s) spanning "
                     "splits: test images with a near-copy in training make the test metrics optimistic.")
    if isinstance(audit, dict) and audit.get("cross_class_groups"):
        lines.append(f"The audit found {audit['cross_class_groups']} group(s) of (near-)identical images with "
                     "different labels: label noise bounds the achievable accuracy.")
    if selection.get("val_labels") == "full":
        lines.append("Model selection used every validation label (more labels than the training budget): "
                     "optimistic for a user who has only the training budget.")
    if image_size and str(image_size).isdigit() and int(image_size) < 64:
        lines.append(f"Input resolution {image_size} px: fine detail (micro-calcifications, small lesions) is lost.")
    if str(m.get("weights_source")) == "random":
        lines.append("The backbone was not pretrained (random initialisation): an ablation, not a deployable model.")
    if m.get("best_is_last"):
        lines.append("The best validation epoch was the last one: training may not have converged.")
    if calibration and calibration.get("method") != "none" and not is_seg:
        lines.append(f"Calibration was fitted on {calibration.get('n_fit')} images; calibrated probabilities hold "
                     "for data like the validation split only and drift with prevalence and scanner changes.")
    if operating and operating.get("threshold") is not None:
        kind = str(operating.get("target")).partition("=")[0]
        on_test = (f"; at it, test {kind} was {_ci((operating.get('test') or {}).get(kind))} for a target of "
                   f"{str(operating.get('target')).partition('=')[2]}" if kind in ("sensitivity", "specificity")
                   else "")
        lines.append(f"The threshold was chosen on {operating.get('n_val_positive')} positive and "
                     f"{operating.get('n_val_negative')} negative validation images{on_test}: a target met on "
                     "validation is not guaranteed on new data.")
    if m.get("prompt") == "box":
        lines.append("Prompted segmentation: scores were obtained with ground-truth box prompts, which a deployed "
                     "model does not have; they are not comparable with unprompted models.")
    lines.append("No fairness or subgroup analysis (age, sex, device, site) was performed; the data carry no such "
                 "attributes here.")
    return lines
