"""Terminal output: progress during training, the metrics table after a run, the methods table."""
from __future__ import annotations

import contextlib
import json

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


console = Console()


@contextlib.contextmanager
def progress_printer(epochs: int, quiet: bool = False):
    """Yields ``progress(epoch, row)``: a live bar on a terminal, one line per epoch otherwise."""
    if quiet:
        yield None
        return
    if console.is_terminal:
        with Progress(TextColumn("epoch {task.completed}/{task.total}"), BarColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task("train", total=epochs, loss=float("nan"), val="-")

            def update(epoch, row):
                bar.update(task, completed=epoch, loss=row["train_loss"], val=_val_text(row))

            yield update
    else:
        def log(epoch, row):
            console.print(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  {_val_text(row)}  {row['seconds']:.0f}s",
                          highlight=False)

        yield log


def _val_text(row: dict) -> str:
    """The first two validation metrics of an epoch row (auroc/acc, dice/iou, ...)."""
    shown = [(k[4:], v) for k, v in row.items() if k.startswith("val_") and k != "val_loss"][:2]
    return "  ".join(f"val_{k} {float(v):.4f}" for k, v in shown) or "no validation"


def _fmt(m: dict) -> str:
    return f"{m['value']:.4f} [{m['low']:.4f}, {m['high']:.4f}]"


def print_run_summary(metrics: dict) -> None:
    table = Table(title=f"{metrics['data']} · {metrics['backbone']} · {metrics['method']} · seed {metrics['seed']}")
    table.add_column("metric")
    table.add_column("validation (95% CI)")
    table.add_column("test (95% CI)")
    external = metrics.get("external") or {}  # read once after the home test; never used for selection
    for set_name in external:
        table.add_column(f"{set_name} (95% CI)")
    for name, test in metrics["test"].items():  # the task's metrics, in its order
        if isinstance(test, dict) and "value" in test:
            cells = [_fmt(ext[name]) if isinstance(ext.get(name), dict) else "-" for ext in external.values()]
            table.add_row(name, _fmt(metrics["val"][name]), _fmt(test), *cells)
    console.print(table)
    corrupted = metrics.get("corruptions")
    if corrupted:
        console.print(
            f"corruptions ({corrupted['suite']}, {len(corrupted['per_corruption'])} x 5 severities, test images): "
            f"{corrupted['metric']} clean {corrupted['clean']:.4f}, mean corrupted {corrupted['mean']:.4f}, "
            f"relative robustness {corrupted['relative']:.4f}; worst: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(corrupted["per_corruption"].items(), key=lambda kv: kv[1])[:3]),
            highlight=False)
    p = metrics["params"]
    console.print(
        f"trainable {p['trainable']:,} / {p['total']:,} params ({p['trainable_pct']:.3f}%) · best epoch "
        f"{metrics['best_epoch']}/{metrics['epochs_run']} · train {metrics['train_seconds']:.1f}s · "
        f"peak RSS {metrics['peak_rss_mb']:.0f} MB" + (f" · GPU {metrics['peak_gpu_mb']:.0f} MB" if 'peak_gpu_mb' in metrics else ""),
        highlight=False,
    )
    from .calibration import summary_lines

    for name, value in (metrics.get("fitted_on_validation") or {}).items():  # e.g. detection's score threshold
        if isinstance(value, dict):  # e.g. segmentation's post-processing: key=value pairs
            value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (int, float)):
            value = f"{value:.4g}"
        console.print(f"{name.replace('_', ' ')} (chosen on validation): {value}", highlight=False)
    for line in summary_lines(metrics):  # calibration and operating point of a classification run
        console.print(line, highlight=False)
    if "out_dir" in metrics:
        console.print(f"run folder: {metrics['out_dir']}", highlight=False)


def method_rows(backbone: str | None, image_size: int | None, num_classes: int = 2) -> list[dict]:
    """One row per method: families, reference, and (given a backbone) trainable count/% on it."""
    import torch

    from .backbones import create_backbone
    from .errors import ConfigError
    from .methods import get_method, list_methods
    from .run import build_model

    rows = []
    info = None
    if backbone:
        _, info = create_backbone(backbone, num_classes=num_classes, image_size=image_size or 224, pretrained=False)
    for name in list_methods():
        spec = get_method(name)
        row = {"method": name, "families": "/".join(spec.families), "mergeable": spec.mergeable,
               "identity_at_init": spec.identity_at_init, "description": spec.description,
               "reference": spec.reference}
        if backbone:
            size = image_size or info.native_size
            try:
                torch.manual_seed(0)
                model, *_ = build_model(backbone, num_classes, size, name, {}, pretrained=False)
                from .methods import count_parameters

                c = count_parameters(model)
                row.update(trainable=c["trainable"], total=c["total"], trainable_pct=c["trainable_pct"])
            except ConfigError as err:
                row.update(trainable=None, total=None, trainable_pct=None, note=str(err))
        rows.append(row)
    return rows


def methods_table(backbone: str | None, image_size: int | None, num_classes: int = 2, as_json: bool = False) -> None:
    rows = method_rows(backbone, image_size, num_classes)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="medpeft methods" + (f" on {backbone} ({num_classes} classes)" if backbone else ""))
    for col in ("method", "families", "mergeable", "reference"):
        table.add_column(col)
    if backbone:
        table.add_column("trainable", justify="right")
        table.add_column("trainable %", justify="right")
    for row in rows:
        cells = [row["method"], row["families"], "yes" if row["mergeable"] else "no", row["reference"]]
        if backbone:
            if row.get("trainable") is None:
                cells += ["n/a", "not for this backbone"]
            else:
                cells += [f"{row['trainable']:,}", f"{row['trainable_pct']:.3f}"]
        table.add_row(*cells)
    console.print(table)
