"""The Ray executor: a real local Ray head on 127.0.0.1 (2 CPUs) runs the toy sweep through
``medpeft benchmark --executor ray``; jobs run in Ray worker processes, the driver writes the
store, and the results equal the local executor's (same keys, same numbers).
"""
from __future__ import annotations

import os

import pytest
import yaml

from test_benchmark import assert_same_results, comparable, reference_sweep, store_rows, toy_data  # noqa: F401

ray = pytest.importorskip("ray")


def test_ray_executor_runs_the_sweep_on_a_local_head(reference_sweep, tmp_path, capsys):  # noqa: F811
    from medpeft.bench.cli import _as_mapping
    from medpeft.cli import main

    exp, ref_out, ref_summary = reference_sweep
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**_as_mapping(exp), "executor": "ray"}))
    out = tmp_path / "ray"
    assert not ray.is_initialized()
    code = main(["benchmark", "--config", str(config), "--out", str(out), "--ray-num-cpus", "2"])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    assert "Ray executor: 2 jobs at a time on 2 CPUs" in text and "leaderboard" in text
    assert not ray.is_initialized()  # the private head was shut down
    rows = store_rows(out)
    assert len(rows) == ref_summary["jobs_total"] and all(r["status"] == "done" for r in rows)
    workers = {r["worker"] for r in rows}
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)  # trained in Ray workers, not the driver
    assert len(workers) >= 2  # spread over the workers
    assert_same_results(comparable(rows), comparable(store_rows(ref_out)))
    assert (out / "report" / "report.html").is_file()
