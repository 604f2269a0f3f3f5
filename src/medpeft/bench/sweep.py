"""The sweep driver: turns the experiment into jobs, cell by cell, and records every result.

Per cell (data, backbone, method, fraction): HPO trials 0..T-1 (trial n is sampled once the
trials it may learn from are finished, see ``hpo.py``), then the chosen configuration once
per seed. Jobs whose key is ``done`` in the store are never run again: their stored result
feeds the HPO history as if just computed, so a resumed sweep takes the same decisions.
Cells are visited in grid order and the executor is kept full, so on Ray the trials of
different cells (and the seeds of a cell) run side by side.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..data.base import DataConfig
from ..errors import ConfigError
from ..run import RunConfig
from ..train import TrainConfig
from .grid import Cell, Experiment, public_experiment
from .hpo import HpoSettings, TrialRecord, choose, sample_params, space_to_json, visible_history
from .space import default_params, search_space, split_params
from .store import Store, config_key

# settings that must not change when a sweep is resumed (the grid itself may grow)
GRID_FIELDS = ("data", "backbones", "methods", "fractions", "seeds", "hpo_trials")
REPORT_ONLY = ("margin",)  # read by the report alone: may change on resume


@dataclass
class RunOptions:
    out: Path = Path("results")
    resume: bool = False
    retry_failed: bool = False
    executor: str = "local"
    address: str | None = None
    threads: int | None = None
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    ray_num_cpus: int | None = None
    quiet: bool = False
    report: bool = True
    max_jobs: int | None = None  # stop after this many jobs ran (resumable chunks)
    mlflow: str | None = None  # tracking URI (--mlflow): a parent MLflow run, one nested run per job; not in any key
    mlflow_experiment: str | None = None


@dataclass
class CellState:
    cell: Cell
    space: dict
    defaults: dict
    history: dict = field(default_factory=dict)  # trial number -> TrialRecord
    trial_jobs: dict = field(default_factory=dict)  # trial number -> job in flight
    chosen: dict | None = None
    chosen_note: str = ""
    final_done: dict = field(default_factory=dict)  # seed -> status
    final_jobs: dict = field(default_factory=dict)  # seed -> job in flight

    @property
    def finished(self) -> bool:
        return self.chosen is not None and not self.final_jobs and len(self.final_done) == self._n_seeds

    _n_seeds: int = 0


class Sweep:
    def __init__(self, exp: Experiment, opts: RunOptions, executor=None, progress=None):
        self.exp = exp
        self.opts = opts
        self.out = Path(opts.out)
        self.settings = HpoSettings(seed=exp.hpo_seed, startup_trials=exp.hpo_startup_trials,
                                    parallel=exp.hpo_parallel, prune_min_epochs=exp.prune_min_epochs,
                                    reduction_factor=exp.prune_reduction_factor)
        self.cells = exp.cells()
        self.executor = executor
        self.progress = progress
        self.store: Store | None = None
        self.states: list[CellState] = []
        self.ran = 0  # jobs trained by this process
        self.failed = 0  # of them, the jobs that failed
        self.reused = 0  # jobs found done in the store
        self.tracking: dict | None = None  # --mlflow: settings each job logs its MLflow run with (tracking.py)

    # ------------------------------------------------------------------ configs and jobs

    def fixed_params(self) -> set[str]:
        fixed = set(self.exp.method_options)
        fixed |= {k for k in ("lr", "weight_decay") if self.exp.train.get(k) is not None}
        return fixed

    def run_config(self, cell: Cell, seed: int, params: dict, n_boot: int, subset_seed: int | None = None,
                   final: bool = False) -> dict:
        from ..methods import parse_method

        train_params, knobs = split_params(params)
        parts = parse_method(cell.method)
        options = {k: v for k, v in self.exp.method_options.items() if any(k.startswith(p + "_") for p in parts)}
        options.update(knobs)
        subset = cell.fraction < 1  # without a subset the subset seed means nothing: one data load for all seeds
        subset_seed = seed if subset_seed is None else subset_seed
        data = DataConfig(name=cell.data, root=self.exp.data_root, image_size=cell.image_size,
                          medmnist_size=self.exp.medmnist_size, fraction=cell.fraction if subset else None,
                          subset_seed=subset_seed if subset else 0, val_labels=self.exp.val_labels,
                          task=self.exp.task, **self.exp.data_options,
                          # injected label noise: a new draw per seed (also at fraction 1)
                          **({"noise_seed": seed} if self.exp.data_options.get("label_noise") else {}))
        train = TrainConfig(**{**self.exp.train, **train_params, "seed": seed})
        cfg = RunConfig(data=data, train=train, backbone=cell.backbone, method=cell.method,
                        method_options=options, n_boot=n_boot, weights=self.exp.weights.get(cell.backbone),
                        # trials never test: their configs (and store keys) leave external sets out
                        external_test=list(self.exp.external_test) if final else [],
                        corruptions=self.exp.corruptions if final else None,
                        align=list(self.exp.align) if final else [])
        return cfg.to_dict()

    def _cell_dict(self, cell: Cell) -> dict:
        return {"id": cell.id, **dataclasses.asdict(cell)}

    def trial_job(self, state: CellState, number: int) -> dict:
        history = visible_history(list(state.history.values()), number, self.settings.parallel)
        params = sample_params(state.space, history, number, self.settings, state.cell.id, state.defaults)
        seed = self.exp.seeds[0]
        # one training seed; where labels are scarce the objective averages over the label subsets of
        # the first seeds, so the choice does not fit one draw of a few images
        subsets = self.trial_subset_seeds(state.cell)
        configs = [self.run_config(state.cell, seed, params, self.exp.trial_n_boot, subset_seed=s) for s in subsets]
        config = configs[0]
        context = {"trial": number, "hpo": self.settings.to_dict(), "subsets": subsets, "prune": self.exp.hpo_prune}
        return {"key": config_key("trial", config, context), "kind": "trial", "cell": self._cell_dict(state.cell),
                "seed": seed, "trial": number, "params": params, "config": config, "configs": configs,
                "prune": self.exp.hpo_prune,
                "hpo": {"history": [t.to_dict() for t in history], "params": params,
                        "settings": self.settings.to_dict()},
                "distributions": space_to_json(state.space)}

    def trial_subset_seeds(self, cell: Cell) -> list[int]:
        if cell.fraction >= 1:
            return [self.exp.seeds[0]]
        seeds = list(self.exp.seeds[:self.exp.hpo_subsets])
        while len(seeds) < self.exp.hpo_subsets:  # fewer sweep seeds than subsets: extra ones after them
            seeds.append(max(seeds) + 1)
        return seeds

    def final_job(self, state: CellState, seed: int) -> dict:
        config = self.run_config(state.cell, seed, state.chosen, self.exp.n_boot, final=True)
        key = config_key("final", config)
        safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{Path(state.cell.data).name}-{state.cell.backbone}-{state.cell.method}"
                      f"-f{state.cell.fraction:g}-s{seed}")
        return {"key": key, "kind": "final", "cell": self._cell_dict(state.cell), "seed": seed, "trial": None,
                "params": state.chosen, "config": config, "run_dir": str(self.out / "runs" / f"{safe}-{key[:8]}"),
                "keep_adapter": self.exp.keep_adapters}

    # ------------------------------------------------------------------ results

    def _trial_record(self, job: dict, result: dict) -> TrialRecord:
        state = "failed" if result["status"] == "failed" else result.get("outcome") or "complete"
        return TrialRecord(number=job["trial"], params=job["params"], distributions=job["distributions"],
                           state=state, value=result.get("value"),
                           intermediate={int(k): v for k, v in (result.get("intermediate") or {}).items()},
                           system_attrs=result.get("system_attrs") or {})

    def _stored(self, key: str) -> dict | None:
        """A stored result that counts as finished: done, or failed unless failures are retried."""
        row = self.store.get(key)
        if row is None or row["status"] == "running":
            return None
        if row["status"] == "failed" and self.opts.retry_failed:
            return None
        stored = dict(row.get("result") or {})
        stored.update(status=row["status"], outcome=row["outcome"], value=row["value"])
        return stored

    def _finish_hpo(self, state: CellState) -> None:
        if self.exp.hpo_trials == 0:
            state.chosen, state.chosen_note = {}, "defaults (no HPO)"
            return
        best = choose(list(state.history.values()))
        if best is None:
            state.chosen = default_params(state.cell.method, state.space, self._default_wd(), self._budget())
            state.chosen_note = "defaults: no HPO trial completed"
        else:
            state.chosen = dict(best.params)
            state.chosen_note = f"trial {best.number} (validation {best.value:.4f})"
        # the report reads the final runs of this choice (a resumed sweep with more trials may choose anew)
        chosen = self.store.get_meta("chosen", {})
        chosen[state.cell.public_id] = state.chosen  # the store's cell ids (no absolute data path)
        self.store.set_meta("chosen", chosen)

    def _budget(self) -> tuple[str, int] | None:
        """The training budget every method searches around: ("steps", S) or ("epochs", E)."""
        for key in ("steps", "epochs"):
            if self.exp.train.get(key) is not None:
                return key, int(self.exp.train[key])
        return None

    def _default_wd(self) -> float:
        return float(self.exp.train.get("weight_decay", TrainConfig().weight_decay))

    def next_job(self, state: CellState) -> dict | None:
        """The next job of this cell that can start now (None: wait for results or cell done).

        Jobs already finished in the store are consumed here, without running."""
        while state.chosen is None:
            started = set(state.history) | set(state.trial_jobs)
            pending = [n for n in range(self.exp.hpo_trials) if n not in started]
            if not pending:
                if state.trial_jobs:
                    return None
                self._finish_hpo(state)
                break
            number = pending[0]
            cutoff = number - number % self.settings.parallel
            if any(n not in state.history for n in range(cutoff)):
                return None  # its batch must wait for the earlier batches
            job = self.trial_job(state, number)
            stored = self._stored(job["key"])
            if stored is not None:
                state.history[number] = self._trial_record(job, stored)
                self._reuse(job, stored)
                continue
            state.trial_jobs[number] = job
            return job
        for seed in self.exp.seeds:
            if seed in state.final_done or seed in state.final_jobs:
                continue
            job = self.final_job(state, seed)
            stored = self._stored(job["key"])
            if stored is not None:
                state.final_done[seed] = stored["status"]
                self._reuse(job, stored)
                continue
            state.final_jobs[seed] = job
            return job
        return None

    def _reuse(self, job: dict, stored: dict) -> None:
        self.reused += 1
        if self.progress:
            self.progress.reused(job, stored)

    def on_result(self, state: CellState, job: dict, result: dict) -> None:
        if result.get("error"):  # a message may quote a data path: written as the store writes paths
            result = {**result, "error": public_error(result["error"], state.cell.data, self.exp.data_root)}
        self.store.record(result)
        self.ran += 1
        self.failed += result["status"] == "failed"
        if job["kind"] == "trial":
            state.trial_jobs.pop(job["trial"])
            state.history[job["trial"]] = self._trial_record(job, result)
        else:
            state.final_jobs.pop(job["seed"])
            state.final_done[job["seed"]] = result["status"]
        if self.progress:
            self.progress.finished(job, result)

    # ------------------------------------------------------------------ main loop

    def open_store(self) -> Store:
        store = Store(self.out)
        try:
            existing = store.count()
            previous = store.get_meta("experiment")
            if existing and not self.opts.resume:
                raise ConfigError(f"{store.path} already holds {existing} runs ({store.count('done')} done); "
                                  "pass --resume to continue that sweep, or choose a new --out")
            if previous and self.opts.resume:
                _check_compatible(public_experiment(previous), public_experiment(self.exp.to_dict()), store.path)
            stale = store.running_rows()
            if stale and self.progress:
                self.progress.note(f"{len(stale)} run(s) left 'running' by a stopped sweep will be run again")
            store.set_meta("experiment", public_experiment(self.exp.to_dict()))  # no absolute data path
            store.set_meta("medpeft_version", __version__)
            store.set_meta("notes", self.exp.notes)
        except BaseException:
            store.close()
            raise
        return store

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.store = self.open_store()
        except BaseException:
            self.executor.close()
            raise
        self._choose_threads()
        fixed = self.fixed_params()
        space_notes: list[str] = []
        for cell in self.cells:
            space = search_space(cell.method, fixed, cell.backbone, cell.image_size, space_notes,
                                 budget=self._budget()) if self.exp.hpo_trials else {}
            state = CellState(cell, space, default_params(cell.method, space, self._default_wd(), self._budget()))
            state._n_seeds = len(self.exp.seeds)
            self.states.append(state)
        self.exp.notes.extend(dict.fromkeys(space_notes))
        self.store.set_meta("notes", self.exp.notes)
        total = len(self.cells) * (self.exp.hpo_trials + len(self.exp.seeds))
        owner: dict[str, tuple] = {}  # key -> (cell state, job) of the jobs in flight
        interrupted = False
        try:
            if self.progress:
                self.progress.start(total, self.executor.describe(), self.exp.notes)
            while True:
                budget_left = self.opts.max_jobs is None or self.ran + self.executor.in_flight() < self.opts.max_jobs
                while budget_left and self.executor.free_slots() > 0:
                    job = None
                    for state in self.states:
                        job = self.next_job(state)
                        if job is not None:
                            owner[job["key"]] = (state, job)
                            break
                    if job is None:
                        break
                    self.store.mark_running(job)
                    if self.progress:
                        self.progress.started(job)
                    self.executor.submit({**job, "tracking": self.tracking} if self.tracking else job)
                    budget_left = self.opts.max_jobs is None or self.ran + self.executor.in_flight() < self.opts.max_jobs
                if self.executor.in_flight() == 0:
                    break
                for result in self.executor.wait():
                    state, job = owner.pop(result["key"])
                    self.on_result(state, job, result)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.executor.close()
            if self.progress:
                self.progress.stop()
            summary = self.summary(interrupted)
            self.store.set_meta("last_sweep", summary)
            self.store.close()
        return summary

    def _choose_threads(self) -> None:
        """Local executor without --threads: decided once per sweep (kept on --resume, so the
        numbers do not depend on the machine's load at resume time)."""
        from .executors import auto_threads

        if getattr(self.executor, "name", "") != "local":
            return
        if self.executor.threads is None:
            saved = self.store.get_meta("threads") if self.opts.resume else None
            self.executor.threads = int(saved) if saved else auto_threads()
        self.store.set_meta("threads", self.executor.threads)

    def summary(self, interrupted: bool = False) -> dict:
        counts = {s: self.store.count(s) for s in ("done", "failed", "running")}
        complete = all(s.finished for s in self.states)
        return {"cells": len(self.cells), "jobs_total": len(self.cells) * (self.exp.hpo_trials + len(self.exp.seeds)),
                "ran": self.ran, "failed": self.failed, "reused": self.reused,
                "complete": complete and not interrupted,
                "interrupted": interrupted, "store": counts,
                "chosen": {s.cell.public_id: {"params": s.chosen, "note": s.chosen_note} for s in self.states
                           if s.chosen is not None},
                "finished_at": time.time(), "pid": os.getpid()}


def public_error(text: str, *paths) -> str:
    """An error message with the given data paths (absolute ones) written as the store writes them."""
    from ..data.privacy import public_path

    for path in paths:
        if isinstance(path, str) and path and public_path(path) != path:
            full = os.path.normpath(os.path.expanduser(path))
            text = text.replace(full, str(public_path(path))).replace(path, str(public_path(path)))
    return text


def _check_compatible(previous: dict, current: dict, path) -> None:
    changed = {k: (previous.get(k), current.get(k)) for k in current
               if k not in GRID_FIELDS + REPORT_ONLY and previous.get(k) != current.get(k)}
    if changed:
        detail = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(f"--resume: the sweep in {path} was started with other settings ({detail}); "
                          "resume with the same settings (only the grid - data, backbones, methods, fractions, "
                          "seeds, hpo trials - may grow), or use a new --out")


def run_sweep(exp: Experiment, opts: RunOptions, executor=None, progress=None) -> dict:
    """Validate, run every job not yet done, write the report; returns the sweep summary."""
    from .executors import make_executor

    from ..tracking import sweep_tracking

    exp.validate()
    with sweep_tracking(opts.mlflow, opts.mlflow_experiment, exp, opts.out) as tracking:  # None unless --mlflow
        if executor is None:
            executor = make_executor(opts.executor, opts.address, opts.threads, opts.cpus_per_trial,
                                     opts.gpus_per_trial, opts.ray_num_cpus)
        sweep = Sweep(exp, opts, executor, progress)
        sweep.tracking = tracking.job_spec if tracking else None
        summary = sweep.run()
        if opts.report and summary["store"]["done"]:
            from .report import build_report

            summary["report"] = build_report(opts.out)
        if tracking:
            tracking.finish(summary, Path(opts.out) / "report")
    return summary
