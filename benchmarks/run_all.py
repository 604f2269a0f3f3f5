"""Run every benchmark, one fresh process each, and collect their output in one markdown file.

    python benchmarks/run_all.py --quick                 # 2 CPU cores: about 15-25 minutes
    python benchmarks/run_all.py                         # full sizes, for the GPU machine
    python benchmarks/run_all.py --quick --only throughput,memory --threads 1

Every figure is a ratio of measurements taken in the same process, interleaved; the header of
each section states the machine, its load average and the settings.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["throughput", "det_bootstrap", "linear_probe_cache", "inference_merge", "memory", "data_pipeline", "profile_step",
           "sweep_walltime"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help=f"comma list of {', '.join(SCRIPTS)}")
    p.add_argument("--skip", default="", help="comma list of scripts to leave out")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every benchmark")
    p.add_argument("--out", default=None, help="markdown file for the collected output "
                                               "(default benchmarks/results/<time>-<quick|full>.md)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else [s for s in SCRIPTS if s not in args.skip.split(",")]
    out = Path(args.out) if args.out else HERE / "results" / time.strftime(
        f"%Y%m%d-%H%M%S-{'quick' if args.quick else 'full'}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "MEDPEFT_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    chunks = [f"# medpeft benchmarks ({'quick' if args.quick else 'full'})\n"]
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick and name != "sweep_walltime"
                                                            else [])
        if args.threads:
            cmd += ["--", "--threads", str(args.threads)] if name == "sweep_walltime" else ["--threads", str(args.threads)]
        print(f"\n>>> {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            if "USDT:" in line or "gpuGetDeviceCount" in line:
                continue  # profiler chatter
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
        took = time.perf_counter() - start
        chunks.append("".join(lines) + f"\n({name}: exit {proc.returncode}, {took:.0f} s)\n")
        out.write_text("\n".join(chunks))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
