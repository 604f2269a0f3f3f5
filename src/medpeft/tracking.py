"""Optional MLflow tracking: ``medpeft run --mlflow URI`` and ``medpeft benchmark --mlflow URI``.

One MLflow run per training: the run config flattened as params, every epoch's history row
(train loss, learning rate, validation metrics) as metrics at step = epoch, the final metrics
(test value and CI bounds, the selected validation metrics, time, memory, trainable %) and the
run folder as artefacts. A sweep opens a parent run; each HPO trial and final run is a run
nested under it (tags ``medpeft.kind``, ``medpeft.cell``, ``medpeft.seed``, ``medpeft.trial``),
logged by the process that trains it (a Ray worker logs its own jobs).

Off by default. When off, nothing here runs and mlflow is never imported; the tracking URI is
never part of a run config, so ``config.yaml`` and the sweep store's keys are the same with and
without it. A ``file:`` URI is resolved to an absolute path in memory (Ray workers run elsewhere).
Absolute paths in params (data folders, weights files) are logged as name + hash.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

DEFAULT_EXPERIMENT = "medpeft"
_PARAMS_PER_CALL = 100  # MLflow's log_batch limits
_METRICS_PER_CALL = 1000
_PARAM_VALUE_MAX = 500
_ROW_SKIP = {"epoch", "epochs_total", "step"}


# --------------------------------------------------------------------------- set-up


def add_tracking_options(parser) -> None:
    g = parser.add_argument_group("experiment tracking (optional: pip install 'medpeft[mlflow]')")
    g.add_argument("--mlflow", default=None, metavar="URI",
                   help="log params, per-epoch and final metrics and the run folder to MLflow, e.g. file:./mlruns "
                        "or http://host:5000 (default: off)")
    g.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT, metavar="NAME",
                   help=f"MLflow experiment name (default {DEFAULT_EXPERIMENT})")


def _mlflow():
    # an explicit file: store is what the user asked for (MLflow 3 refuses it unless opted in); no telemetry
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("--mlflow needs MLflow: pip install 'medpeft[mlflow]' (or pip install mlflow-skinny)") from None
    return MlflowClient


def resolve_uri(uri: str) -> str:
    """A tracking URI usable from any working directory: ``file:./mlruns`` or a bare path becomes
    an absolute ``file://`` URI (in memory only); other schemes are kept."""
    text = str(uri).strip()
    if not text:
        raise ConfigError("--mlflow: expected a tracking URI such as file:./mlruns")
    if "://" in text and not text.startswith("file:"):
        return text
    if ":" in text.split("/", 1)[0] and not text.startswith("file:"):
        return text  # another scheme without // (e.g. databricks:profile)
    path = text[len("file:"):] if text.startswith("file:") else text
    if path.startswith("//"):
        path = path[2:]
    folder = Path(path).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--mlflow {uri}: {folder.name} is a file; a file store is a folder")
    if not folder.parent.is_dir():
        raise ConfigError(f"--mlflow {uri}: the folder that should hold the store does not exist")
    return folder.as_uri()


def spec(uri: str | None, experiment: str | None = None) -> dict | None:
    """The tracking settings a process needs (plain data: pickled to Ray workers); None when off."""
    if not uri:
        return None
    _mlflow()
    return {"uri": resolve_uri(uri), "experiment": experiment or DEFAULT_EXPERIMENT}


def spec_from_args(args) -> dict | None:
    return spec(getattr(args, "mlflow", None), getattr(args, "mlflow_experiment", None))


# --------------------------------------------------------------------------- what is logged


def _public(value):
    """Absolute paths (data folders, weights) as name + short hash, as in config.yaml: they name
    users and sites ($MEDPEFT_RECORD_PATHS=1 keeps them, see data/privacy.py)."""
    from .data.privacy import public_text

    return public_text(value) if isinstance(value, str) else value


def public_config(config: dict) -> dict:
    """A run config dict with its data paths as config.yaml writes them (relative to the data root)."""
    from .data.privacy import public_run_config

    return public_run_config(config)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"data.name": "breastmnist", "train.lr": "0.001", "method_options.lora_rank": "8", ...}."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
            continue
        value = [_public(v) for v in value] if isinstance(value, (list, tuple)) else _public(value)
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
        out[name] = text[:_PARAM_VALUE_MAX]
    return out


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def final_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a finished run's metrics dict: test_<m> (+ _low/_high), selected_val_<m>
    (+ _low/_high), best epoch/score, time, memory, trainable parameters."""
    out: dict[str, float] = {}
    for split, prefix in (("test", "test_"), ("val", "selected_val_")):
        for name, entry in (metrics.get(split) or {}).items():
            if isinstance(entry, dict) and "value" in entry:
                for part, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
                    number = _number(entry.get(part))
                    if number is not None:
                        out[f"{prefix}{name}{suffix}"] = number
            elif _number(entry) is not None:
                out[f"{prefix}{name}"] = _number(entry)
    for key in ("best_epoch", "best_val", "epochs_run", "steps_run", "train_seconds", "total_seconds", "peak_rss_mb",
                "peak_gpu_mb", "peak_rss_delta_mb", "adapter_bytes", "n_train", "n_val", "n_test"):
        if _number(metrics.get(key)) is not None:
            out[key] = _number(metrics[key])
    params = metrics.get("params") or {}
    for key in ("trainable", "total", "trainable_pct"):
        if _number(params.get(key)) is not None:
            out[f"params_{key}"] = _number(params[key])
    return out


# --------------------------------------------------------------------------- one MLflow run


class Tracker:
    """One MLflow run, written through ``MlflowClient`` (no global active run: safe in workers)."""

    def __init__(self, settings: dict, name: str, params: dict[str, str], tags: dict[str, str]):
        client_cls = _mlflow()
        self.settings = settings
        self.client = client_cls(tracking_uri=settings["uri"])
        experiment_id = settings.get("experiment_id") or experiment_id_for(self.client, settings["experiment"])
        tags = {"medpeft.version": _version(), **{k: str(v) for k, v in tags.items() if v is not None}}
        if settings.get("parent_run_id"):
            tags["mlflow.parentRunId"] = settings["parent_run_id"]
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self.log_params(params)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_CALL])

    def log_metrics(self, values: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in ((k, _number(v)) for k, v in values.items())
                 if v is not None]
        for i in range(0, len(items), _METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=items[i:i + _METRICS_PER_CALL])

    def log_epoch(self, epoch: int, row: dict) -> None:
        self.log_metrics({k: v for k, v in row.items() if k not in _ROW_SKIP}, step=int(epoch))

    def progress(self, inner=None):
        """A ``progress(epoch, row)`` callback logging each epoch, then calling ``inner`` (a progress
        bar, the HPO pruning reporter: its TrialPruned passes through after the epoch is logged)."""
        def callback(epoch, row):
            try:
                self.log_epoch(epoch, row)
            except Exception as err:  # noqa: BLE001 - tracking never stops a training
                _warn(err)
            if inner is not None:
                inner(epoch, row)
        return callback

    def log_artifacts(self, folder: str | Path | None) -> None:
        if folder and Path(folder).is_dir():
            self.client.log_artifacts(self.run_id, str(folder))

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value)[:5000])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def experiment_id_for(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created by another worker meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _version() -> str:
    from . import __version__

    return __version__


def _warn(err: Exception) -> None:
    warnings.warn(f"MLflow tracking: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  stacklevel=3)


# --------------------------------------------------------------------------- medpeft run


def tracked_execute(execute, settings: dict, cfg, **kwargs) -> dict:
    """``run.execute`` as one MLflow run (the run config as params, epochs live, final metrics and
    the run folder at the end). The MLflow run is created before training: a bad store fails early."""
    try:
        tracker = Tracker(settings, name=Path(kwargs["out_dir"]).name if kwargs.get("out_dir") else "medpeft run",
                          params=flatten(public_config(cfg.to_dict())),
                          tags={"medpeft.kind": "run", "medpeft.data": _public(cfg.data.name),
                                "medpeft.backbone": cfg.backbone, "medpeft.method": cfg.method,
                                "medpeft.seed": cfg.train.seed})
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - an unusable store: say so before training
        raise ConfigError(f"--mlflow {settings['uri']}: cannot start an MLflow run: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    kwargs["progress"] = tracker.progress(kwargs.get("progress"))
    try:
        metrics = execute(cfg, tracking=None, **kwargs)
    except BaseException as err:
        _end_quietly(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                     {"medpeft.error": f"{type(err).__name__}: {err}"})
        raise
    try:
        tracker.log_metrics(final_metrics(metrics))
        if metrics.get("out_dir"):
            tracker.log_artifacts(metrics["out_dir"])
            if not kwargs.get("out_dir"):  # the default run folder's name is known now
                tracker.client.update_run(tracker.run_id, name=Path(metrics["out_dir"]).name)
        tracker.end("FINISHED")
    except Exception as err:  # noqa: BLE001 - the run folder is written: warn, do not fail
        _warn(err)
    return metrics


def _end_quietly(tracker: Tracker, status: str, tags: dict | None = None) -> None:
    try:
        if tags:
            tracker.set_tags(tags)
        tracker.end(status)
    except Exception as err:  # noqa: BLE001
        _warn(err)


# --------------------------------------------------------------------------- sweeps


def tracked_job(job: dict, run) -> dict:
    """One sweep job (HPO trial or final run) as an MLflow run nested under the sweep's run.
    ``run(on_epoch)`` trains it and returns the job result (it never raises); ``on_epoch`` wraps
    the job's progress callback. Tracking problems are warnings: the job itself goes on."""
    cell = job.get("cell") or {}
    kind = job.get("kind", "job")
    label = f"{Path(str(cell.get('data', ''))).name}|{cell.get('backbone')}|{cell.get('method')}|f{cell.get('fraction')}"
    name = f"{label} trial {job.get('trial')}" if kind == "trial" else f"{label} seed {job.get('seed')}"
    params = flatten(public_config(job.get("config") or {}))
    params.update({f"hpo.{k}": v for k, v in flatten(job.get("params") or {}).items()})
    tags = {"medpeft.kind": kind, "medpeft.cell": _public_cell(cell), "medpeft.seed": job.get("seed"),
            "medpeft.trial": job.get("trial"), "medpeft.key": job.get("key"),
            "medpeft.data": _public(str(cell.get("data"))), "medpeft.backbone": cell.get("backbone"),
            "medpeft.method": cell.get("method"), "medpeft.fraction": cell.get("fraction")}
    try:
        tracker = Tracker(job["tracking"], name, params, tags)
    except Exception as err:  # noqa: BLE001
        _warn(err)
        return run(None)
    result = run(tracker.progress)
    outcome = "failed" if result.get("status") == "failed" else result.get("outcome") or "complete"
    status = {"failed": "FAILED", "pruned": "KILLED"}.get(outcome, "FINISHED")
    try:
        metrics = result.get("metrics") or {}
        values = final_metrics(metrics)
        if result.get("value") is not None:
            values["objective"] = result["value"]
        tracker.log_metrics(values)
        tracker.log_artifacts(metrics.get("out_dir"))
        tracker.set_tags({"medpeft.outcome": outcome, "medpeft.worker": result.get("worker"),
                          "medpeft.error": (result.get("error") or "").splitlines()[0] if result.get("error") else None})
        tracker.end(status)
    except Exception as err:  # noqa: BLE001
        _warn(err)
    return result


def _public_cell(cell: dict) -> str:
    return "|".join(str(_public(str(cell.get(k)))) for k in ("data", "backbone", "method", "fraction"))


class SweepTracking:
    """The sweep's parent MLflow run; ``job_spec`` is what each job needs to log a nested run."""

    def __init__(self, settings: dict, exp, out: str | Path):
        flat = flatten(exp.to_dict())
        self.tracker = Tracker(settings, name=f"benchmark {Path(out).name}", params=flat,
                               tags={"medpeft.kind": "sweep"})
        self.job_spec = {**settings, "experiment_id": self._experiment_id(), "parent_run_id": self.tracker.run_id}

    def _experiment_id(self) -> str:
        return self.tracker.client.get_run(self.tracker.run_id).info.experiment_id

    def finish(self, summary: dict, report_dir: str | Path | None = None) -> None:
        store = summary.get("store") or {}
        try:
            self.tracker.log_metrics({"jobs_ran": summary.get("ran"), "jobs_reused": summary.get("reused"),
                                      "jobs_done": store.get("done"), "jobs_failed": store.get("failed")})
            self.tracker.log_artifacts(report_dir)
            self.tracker.end("FINISHED" if summary.get("complete") else "KILLED")
        except Exception as err:  # noqa: BLE001
            _warn(err)


@contextmanager
def sweep_tracking(uri: str | None, experiment: str | None, exp, out):
    """``None`` when tracking is off (mlflow not imported), else a ``SweepTracking`` whose parent run
    ends FAILED if the sweep raises."""
    settings = spec(uri, experiment)
    if settings is None:
        yield None
        return
    try:
        tracking = SweepTracking(settings, exp, out)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"--mlflow {uri}: cannot start an MLflow run: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    try:
        yield tracking
    except BaseException as err:
        _end_quietly(tracking.tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
