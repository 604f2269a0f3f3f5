"""One training job, as any worker runs it: a plain dict in, a plain dict out.

A job is an HPO trial (validation only, may be pruned, never reads the test split) or a
final run (the chosen configuration with one seed, tested once). The worker keeps loaded
data sets in a small cache keyed by the full data config (data set, image size, fraction,
subset seed, ...), so consecutive methods on the same data reuse one load.

Peak memory: on a GPU, torch's per-run peak allocation; on the CPU a sampler thread reads
this process's resident set size during the run and reports its peak above the level at
the start of the run (``peak_rss_delta_mb``): the process-wide ``ru_maxrss`` only grows over
a sweep and would say nothing about the run.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import shutil
import socket
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path

from ..data.base import DataBundle, DataConfig

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class BundleCache:
    """LRU cache of loaded data bundles keyed by the full data config."""

    def __init__(self, max_items: int = 8, loader=None):
        self.max_items = max_items
        self.loader = loader
        self.items: OrderedDict[str, DataBundle] = OrderedDict()
        self.loads = 0

    @staticmethod
    def key(cfg: DataConfig) -> str:
        import json
        import dataclasses

        return json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)

    def get(self, cfg: DataConfig) -> DataBundle:
        key = self.key(cfg)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        if self.loader is None:
            from ..data import load_data

            bundle = load_data(cfg)
        else:
            bundle = self.loader(cfg)
        self.loads += 1
        self.items[key] = bundle
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return bundle


# one per worker process (the local executor's process, or each Ray worker)
WORKER_CACHE = BundleCache()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_GC_FROZEN = False


def _release_free_memory() -> None:
    global _GC_FROZEN
    if not _GC_FROZEN:  # the long-lived objects (imported modules, ...) are never scanned again
        gc.collect()
        gc.freeze()
        _GC_FROZEN = True
    gc.collect()
    try:  # hand freed heap pages back, so the start level is the real baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemorySampler:
    """Peak resident memory of this process while a run is in progress (sampled every 10 ms)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        _release_free_memory()
        self.start_bytes = self.peak_bytes = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes())
        return False

    def summary(self) -> dict:
        return {"peak_rss_run_mb": self.peak_bytes / 2**20,
                "peak_rss_delta_mb": max(self.peak_bytes - self.start_bytes, 0) / 2**20}


def run_job(job: dict, cache: BundleCache | None = None, on_epoch=None) -> dict:
    """Train one job. Never raises for a failing run: the error is returned (the sweep goes on).

    job: {"key", "kind": "trial"|"final", "config": RunConfig dict, "threads": int|None,
          "configs": [RunConfig dict, ...] (trials: one per label subset; the objective is the mean
          of their best validation scores), "prune": bool (trials: successive-halving pruning),
          "hpo": {"history": [...], "params": {...}, "settings": {...}} (trials),
          "run_dir": str (finals), "keep_adapter": bool, "tracking": MLflow settings (--mlflow; optional)}
    ``on_epoch(progress) -> progress`` wraps the (first) run's per-epoch callback.
    """
    if job.get("tracking"):  # --mlflow: the job is one MLflow run, logged by the process that trains it
        from ..tracking import tracked_job

        return tracked_job(job, lambda wrap: run_job({**job, "tracking": None}, cache, on_epoch=wrap))
    import optuna
    import torch

    from ..run import RunConfig, execute
    from .hpo import HpoSettings, PruningReporter, TrialRecord

    cache = cache or WORKER_CACHE
    started = time.perf_counter()
    out = {"key": job["key"], "worker": f"{socket.gethostname()}:{os.getpid()}", "status": "done",
           "outcome": "complete", "value": None, "metrics": None, "intermediate": {}, "system_attrs": {},
           "error": None}
    reporter = None
    try:
        configs = [RunConfig.from_dict(c) for c in job.get("configs") or [job["config"]]]
        cfg = configs[0]
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        trial = job["kind"] == "trial"
        if trial and job.get("prune", True):
            hpo = job["hpo"]
            history = [TrialRecord.from_dict(t) for t in hpo["history"]]
            reporter = PruningReporter(history, hpo["params"], HpoSettings(**hpo["settings"]), cfg.train.monitor,
                                       budget_epochs=cfg.train.epochs)
        with MemorySampler() as memory:
            runs = []
            try:
                for i, each in enumerate(configs):  # the first subset may be pruned; the others then never run
                    progress = (on_epoch(reporter) if on_epoch else reporter) if i == 0 else None
                    runs.append(execute(each, out_dir=job.get("run_dir"), bundle=cache.get(each.data),
                                        progress=progress, save=not trial, evaluate_test=not trial))
            except optuna.TrialPruned as pruned:
                out.update(outcome="pruned", error=str(pruned))
                runs = []
        if runs:
            metrics = runs[0]
            metrics.update(memory.summary())
            values = [float(m["best_val"]) for m in runs]
            if len(runs) > 1:
                metrics["subset_values"] = values  # the objective's parts, one per label subset
            out["metrics"] = metrics
            out["value"] = float(sum(values) / len(values))
            if not trial and not job.get("keep_adapter") and metrics.get("out_dir"):
                adapter = Path(metrics["out_dir"]) / "adapter.safetensors"
                adapter.unlink(missing_ok=True)  # its size is recorded; the file is the big part
        if reporter is not None:
            out["intermediate"] = dict(reporter.intermediate)
            out["system_attrs"] = reporter.system_attrs()
            if out["outcome"] == "pruned":
                out["value"] = reporter.best_score if math.isfinite(reporter.best_score) else None
    except Exception as err:  # noqa: BLE001 - one failing run must not end the sweep
        out.update(status="failed", outcome=None, error=f"{type(err).__name__}: {err}\n"
                                                        + "".join(traceback.format_exc(limit=6)))
        if job.get("run_dir"):
            shutil.rmtree(job["run_dir"], ignore_errors=True)
    out["seconds"] = time.perf_counter() - started
    return out
