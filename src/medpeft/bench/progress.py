"""Sweep progress: one overall bar with an ETA on a terminal, one line per job otherwise.

The ETA counts only jobs trained by this process (jobs found done in the store on
``--resume`` take no time and would make it far too optimistic).
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def describe_job(job: dict) -> str:
    cell = job["cell"]
    what = f"trial {job['trial']}" if job["kind"] == "trial" else f"seed {job['seed']}"
    from pathlib import Path

    return f"{Path(cell['data']).name} {cell['backbone']} {cell['method']} f={cell['fraction']:g} {what}"


class SweepProgress:
    def __init__(self, console: Console | None = None, quiet: bool = False, live: bool | None = None):
        self.console = console or Console()
        self.quiet = quiet
        self.live = self.console.is_terminal if live is None else live
        self.total = 0
        self.done = 0
        self.ran = 0
        self.started_at = None
        self.bar = None
        self.task = None
        self.current = ""

    # ETA from the mean time of the jobs this process trained
    def eta(self) -> float | None:
        if not self.ran:
            return None
        elapsed = time.perf_counter() - self.started_at
        return elapsed / self.ran * max(self.total - self.done, 0)

    def start(self, total: int, executor: str, notes: list[str]) -> None:
        self.total, self.started_at = total, time.perf_counter()
        if self.quiet:
            return
        self.console.print(f"[bold]medpeft benchmark[/bold]: {total} jobs; {executor}", highlight=False)
        for note in notes:
            self.console.print(f"  note: {note}", highlight=False)
        if self.live:
            self.bar = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[current]}"),
                                console=self.console, transient=False)
            self.bar.start()
            self.task = self.bar.add_task("sweep", total=total, eta="?", current="")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"  note: {text}", highlight=False)

    def started(self, job: dict) -> None:
        self.current = describe_job(job)
        if self.bar is not None:
            self.bar.update(self.task, current=self.current)

    def reused(self, job: dict, stored: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def finished(self, job: dict, result: dict) -> None:
        self.done += 1
        self.ran += 1
        eta = _fmt_seconds(self.eta())
        if self.quiet:
            return
        if result["status"] == "failed":
            status = "FAILED: " + (result.get("error") or "").splitlines()[0][:160]
        else:
            value = result.get("value")
            score = f"val {value:.4f}" if value is not None else "val -"
            status = f"{result.get('outcome')}, {score}"
            metrics = result.get("metrics") or {}
            test = (metrics.get("test") or {}).get(metrics.get("monitor", "auroc"))
            if test:
                status += f", test {test['value']:.4f}"
        line = (f"[{self.done}/{self.total}] {describe_job(job)}: {status} "
                f"({_fmt_seconds(result.get('seconds'))}; ETA {eta})")
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, eta=eta)
            self.bar.console.print(line, highlight=False, markup=False)
        else:
            self.console.print(line, highlight=False, markup=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if not self.quiet and self.started_at is not None:
            self.console.print(f"sweep: {self.ran} job(s) trained, {self.done - self.ran} reused from the store, "
                               f"{_fmt_seconds(time.perf_counter() - self.started_at)}", highlight=False)
