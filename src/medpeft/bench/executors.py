"""Where jobs run. The driver (``sweep.py``) submits jobs and waits for results; only the
driver writes the results store, whichever executor trains.

- ``LocalExecutor`` (default): one job at a time in this process (torch uses every core
  for that one job), data sets cached across jobs.
- ``RayExecutor``: jobs are Ray tasks spread over the cluster's workers; each worker process
  keeps its own data cache. ``address=None`` starts a private local Ray instance bound to
  127.0.0.1; ``--address host:port`` (or ``auto``) joins a running cluster.
"""
from __future__ import annotations

import os
import traceback

from ..errors import ConfigError
from .jobs import WORKER_CACHE, BundleCache, run_job


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """Torch threads for one job at a time: the cores other processes leave free (1-min load average).

    On a shared machine torch's default (every core) is far slower than fewer threads: its
    OpenMP threads spin-wait for cores that others hold (measured 4-7x slower with 2 threads
    than with 1 on a 2-core machine running two other trainings).
    """
    cores = cpu_cores()
    try:
        others = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, cores - round(others)))


class LocalExecutor:
    name = "local"

    def __init__(self, cache: BundleCache | None = None, threads: int | None = None):
        self.cache = cache or WORKER_CACHE
        self.threads = threads  # None: torch's default
        self.queue: list[dict] = []
        self.slots = 1

    def free_slots(self) -> int:
        return self.slots - len(self.queue)

    def in_flight(self) -> int:
        return len(self.queue)

    def submit(self, job: dict) -> None:
        if self.threads:
            job = {**job, "threads": self.threads}
        self.queue.append(job)

    def wait(self) -> list[dict]:
        """Run the queued job here and return its result."""
        job = self.queue.pop(0)
        return [run_job(job, self.cache)]

    def describe(self) -> str:
        import torch

        return (f"local executor: one job at a time, {self.threads or torch.get_num_threads()} torch thread(s) "
                f"on {cpu_cores()} cores")

    def close(self) -> None:
        self.queue.clear()


def _ray_job(job: dict) -> dict:  # module level: Ray pickles it by reference
    return run_job(job)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
                 num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'medpeft[ray]' (or pip install ray)") from None
        self.ray = ray
        self.owns = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address in (None, "", "local"):
                # a private single-machine cluster that listens on loopback only
                ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
            else:
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, RuntimeError, ValueError) as err:
                    raise ConfigError(f"could not connect to the Ray cluster at --address {address}: {err}") from None
            self.owns = True
        if cpus_per_trial <= 0:
            raise ConfigError(f"--ray-cpus-per-trial {cpus_per_trial} must be > 0")
        self.cpus_per_trial = cpus_per_trial
        self.remote = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=0)(_ray_job)
        resources = ray.cluster_resources()
        by_cpu = int(resources.get("CPU", 1) // cpus_per_trial)
        by_gpu = int(resources.get("GPU", 0) // gpus_per_trial) if gpus_per_trial else by_cpu
        self.slots = max(1, min(by_cpu, by_gpu))
        self.resources = resources
        self.pending: dict = {}

    def free_slots(self) -> int:
        return self.slots - len(self.pending)

    def in_flight(self) -> int:
        return len(self.pending)

    def submit(self, job: dict) -> None:
        threads = max(1, int(self.cpus_per_trial))
        ref = self.remote.remote({**job, "threads": threads})
        self.pending[ref] = job

    def wait(self) -> list[dict]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        results = []
        for ref in ready:
            job = self.pending.pop(ref)
            try:
                results.append(self.ray.get(ref))
            except Exception as err:  # noqa: BLE001 - a worker died (OOM, node lost): the job failed
                results.append({"key": job["key"], "status": "failed", "outcome": None, "value": None,
                                "error": f"Ray task failed: {type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}",
                                "worker": "ray", "seconds": None})
        return results

    def describe(self) -> str:
        cpus = self.resources.get("CPU", 0)
        gpus = self.resources.get("GPU", 0)
        return (f"Ray executor: {self.slots} jobs at a time on {cpus:g} CPUs"
                + (f" / {gpus:g} GPUs" if gpus else "") + f" ({self.cpus_per_trial:g} CPU per job)")

    def close(self) -> None:
        for ref in list(self.pending):
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.owns:
            self.ray.shutdown()


def make_executor(name: str, address: str | None = None, threads: int | None = None, cpus_per_trial: float = 1,
                  gpus_per_trial: float = 0, num_cpus: int | None = None):
    if name == "local":
        if address:
            raise ConfigError("--address is for --executor ray; the local executor needs no cluster")
        return LocalExecutor(threads=threads)
    if name == "ray":
        return RayExecutor(address=address or os.environ.get("MEDPEFT_RAY_ADDRESS"), cpus_per_trial=cpus_per_trial,
                           gpus_per_trial=gpus_per_trial, num_cpus=num_cpus)
    raise ConfigError(f"unknown executor {name!r}; expected local or ray")
