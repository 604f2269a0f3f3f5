"""Wall time of ``medpeft benchmark --preset quick`` (the README's main job), end to end, in a fresh
process: data loading, every run of the grid, the report.

Also prints the time per training run and, from the sweep's own records where available, how
much of it was training. Extra arguments after ``--`` go to ``medpeft benchmark`` (e.g.
``-- --threads 2``).

    python benchmarks/sweep_walltime.py
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_ROOT, REPO, device_of, header, load_average

CMD = ("import sys; from medpeft.cli import main; sys.exit(main(sys.argv[1:]))",)


def available() -> bool:
    """The ``benchmark`` subcommand exists in this checkout (it is built in src/medpeft/bench/)."""
    try:
        from medpeft.cli import build_parser

        build_parser().parse_args(["benchmark", "--preset", "quick", "--dry-run"])
        return True
    except (ImportError, SystemExit, AttributeError):
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("extra", nargs="*", help="extra arguments for medpeft benchmark")
    args = p.parse_args(argv)
    device = device_of("auto")
    print(header(f"Wall time of `medpeft benchmark --preset {args.preset}`", device), flush=True)
    if not available():
        print("HOOK: `medpeft benchmark` is not available in this checkout yet; nothing measured.")
        return None
    env = {"PYTHONPATH": str(REPO / "src"), "MEDPEFT_OFFLINE": "1", "MEDPEFT_DATA": str(DATA_ROOT)}
    import os

    env = {**os.environ, **env}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", CMD[0], "benchmark", "--preset", args.preset, "--out", out, *args.extra]
        load_before = load_average()
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        runs = list(Path(out).rglob("metrics.json"))
        log = done.stdout + done.stderr
        failed = log.count("FAILED")
        summary = [line for line in log.splitlines() if line.startswith("sweep:")]
        print(f"exit code {done.returncode}; wall time {wall:.1f} s ({wall / 60:.1f} min); "
              f"{summary[-1] if summary else 'no sweep summary'}; {failed} failed job(s); "
              f"load average before {load_before}, after {load_average()}")
        if done.returncode or failed:
            print(log[-3000:])
        train_s = []
        import json

        for path in runs:
            try:
                train_s.append(json.loads(path.read_text()).get("train_seconds", 0.0))
            except (OSError, ValueError):
                pass
        if train_s:
            print(f"training loops: {sum(train_s):.1f} s in total ({100 * sum(train_s) / wall:.0f} % of the wall time), "
                  f"{sum(train_s) / len(train_s):.2f} s per run")
    return wall


if __name__ == "__main__":
    main()
