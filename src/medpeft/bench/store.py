"""The results store: one SQLite file (WAL), one row per HPO trial and per final run.

A row's key is a hash of everything that decides its result: the full resolved run config
(data, subset seed, image size, backbone, method and options, training schedule, seed) plus,
for trials, the HPO context (cell, trial number, sampler/pruner settings). Execution details
that do not change the numbers (CPU threads) are left out, so a sweep may resume on another
executor.

Statuses: ``running`` (written before the job starts), ``done``, ``failed``. Every change is
its own transaction with ``synchronous=FULL``: a row that says ``done`` survives a crash or
power loss. Only one sweep process writes a store at a time (an exclusive lock on
``<db>.lock``, released by the OS even after ``kill -9``), so a ``running`` row found at the
start of a sweep belongs to a dead process: ``--resume`` runs it again; ``done`` rows are never
run again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import sqlite3
import time
from pathlib import Path

from ..errors import ConfigError

DB_NAME = "results.db"
EXCLUDED_FROM_KEY = {("train", "threads")}  # execution detail, not part of the result

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key         TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('trial', 'final')),
    cell        TEXT NOT NULL,
    data        TEXT NOT NULL,
    backbone    TEXT NOT NULL,
    method      TEXT NOT NULL,
    fraction    REAL NOT NULL,
    seed        INTEGER NOT NULL,
    trial       INTEGER,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    outcome     TEXT,
    value       REAL,
    params      TEXT NOT NULL,
    config      TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    worker      TEXT,
    started_at  REAL,
    finished_at REAL,
    seconds     REAL
);
CREATE INDEX IF NOT EXISTS runs_cell ON runs (cell, kind);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _jsonable(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value


def dumps(value) -> str:
    return json.dumps(_jsonable(value), sort_keys=True, default=str)


def config_key(kind: str, config: dict, context: dict | None = None) -> str:
    """sha256 of the canonical JSON of what decides the result."""
    config = json.loads(json.dumps(config, default=str))
    for section, name in EXCLUDED_FROM_KEY:
        config.get(section, {}).pop(name, None)
    payload = {"kind": kind, "config": config, "context": context or {}}
    return hashlib.sha256(dumps(payload).encode()).hexdigest()


class StoreLocked(ConfigError):
    pass


STORE_TABLES = {"runs": {"key", "kind", "cell", "status", "config", "result"}, "meta": {"key", "value"}}


def _check_is_store(conn: sqlite3.Connection, path: Path, existing_only: bool = False) -> None:
    """ConfigError unless the database is a medpeft results store, or (``existing_only`` False)
    holds no table at all; reads the schema only, so a refused file is left exactly as it was."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables and not existing_only:
        return  # new or empty: the schema is created
    missing = sorted(set(STORE_TABLES) - tables)
    if not missing:
        for table, needed in STORE_TABLES.items():
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing += [f"{table}.{c}" for c in sorted(needed - columns)]
    if missing:
        found = ", ".join(sorted(tables)) or "none"
        raise ConfigError(f"{path} is not a medpeft results store (tables: {found}; missing: {', '.join(missing)}); "
                          "it was left unchanged. Give the --out folder of a 'medpeft benchmark' sweep, or another "
                          "--out for a new sweep")


class Store:
    def __init__(self, path: str | Path, lock: bool = True, existing_only: bool = False):
        """``existing_only``: the file must already be a medpeft store (reports); otherwise an empty
        or new file becomes one. Any other SQLite file is refused, unchanged."""
        self.conn = None
        self.path = Path(path)
        if self.path.is_dir() or self.path.suffix != ".db":
            self.path = self.path / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fh = None
        if lock:
            self._lock_fh = open(str(self.path) + ".lock", "w")
            try:
                fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_fh.close()
                raise StoreLocked(f"{self.path} is in use by another running sweep; wait for it to finish "
                                  "or use another --out") from None
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            # read before anything is written: never turn another program's database into a store
            _check_is_store(self.conn, self.path, existing_only=existing_only)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            self.close()
            raise ConfigError(f"{self.path} is not a readable SQLite results store ({err}): the file is corrupt or "
                              "not a medpeft store; restore it from a backup or start the sweep in a new --out") \
                from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_readonly(cls, path: str | Path) -> "Store":
        path = Path(path)
        db = path if path.suffix == ".db" else path / DB_NAME
        if not db.is_file():
            raise ConfigError(f"no results store at {db}; expected the --out folder of a 'medpeft benchmark' sweep")
        return cls(db, lock=False, existing_only=True)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, dumps(value)))

    # ------------------------------------------------------------------ rows

    def count(self, status: str | None = None) -> int:
        if status:
            return self.conn.execute("SELECT COUNT(*) FROM runs WHERE status = ?", (status,)).fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def get(self, key: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        return _row(row) if row else None

    def rows(self, kind: str | None = None, status: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        if kind:
            sql, args = sql + " AND kind = ?", args + [kind]
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        return [_row(r) for r in self.conn.execute(sql + " ORDER BY rowid", args)]

    def mark_running(self, job: dict) -> None:
        """Insert or reset the job's row to ``running`` (a stale running/failed row is taken over).
        Data paths are written as ``medpeft.data.privacy`` says (the key hashes the real config)."""
        from ..data.privacy import public_path, public_run_config
        from .grid import public_cell_id

        cell = dict(job["cell"])
        cell["id"], cell["data"] = public_cell_id(cell["id"], cell["data"]), public_path(cell["data"])
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM runs WHERE key = ?", (job["key"],)).fetchone()
            if row and row["status"] == "done":
                raise RuntimeError(f"run {job['key'][:12]} is already done; it must not run twice")
            conn.execute(
                """INSERT INTO runs (key, kind, cell, data, backbone, method, fraction, seed, trial, status,
                                     params, config, attempts, worker, started_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, 1, ?, ?)
                   ON CONFLICT(key) DO UPDATE SET status = 'running', attempts = attempts + 1, outcome = NULL,
                       value = NULL, result = NULL, error = NULL, worker = excluded.worker,
                       started_at = excluded.started_at, finished_at = NULL, seconds = NULL""",
                (job["key"], job["kind"], cell["id"], cell["data"], cell["backbone"], cell["method"],
                 cell["fraction"], job["seed"], job.get("trial"), dumps(job.get("params", {})),
                 dumps(public_run_config(job["config"])), f"{socket.gethostname()}:{os.getpid()}", time.time()))

    def record(self, result: dict) -> None:
        """Write a job's outcome (done or failed) in one transaction."""
        payload = {k: result.get(k) for k in ("metrics", "intermediate", "system_attrs")}
        with self.transaction() as conn:
            cur = conn.execute(
                """UPDATE runs SET status = ?, outcome = ?, value = ?, result = ?, error = ?, worker = ?,
                       finished_at = ?, seconds = ? WHERE key = ? AND status = 'running'""",
                (result["status"], result.get("outcome"), _finite(result.get("value")), dumps(payload),
                 result.get("error"), result.get("worker"), time.time(), result.get("seconds"), result["key"]))
            if cur.rowcount != 1:
                raise RuntimeError(f"run {result['key'][:12]} was not marked running; refusing to record it")

    def running_rows(self) -> list[dict]:
        return self.rows(status="running")


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _row(row: sqlite3.Row) -> dict:
    out = dict(row)
    for name in ("params", "config", "result"):
        if out.get(name):
            out[name] = json.loads(out[name])
    return out


# ---------------------------------------------------------------------- export


def runs_frame(store: Store):
    """One flat row per run (trials and finals): cell, status, value, params and the main metrics."""
    import pandas as pd

    records = []
    for row in store.rows():
        result = row.get("result") or {}
        metrics = result.get("metrics") or {}
        rec = {k: row[k] for k in ("key", "kind", "data", "backbone", "method", "fraction", "seed", "trial",
                                   "status", "outcome", "value", "attempts", "worker", "seconds")}
        rec["params"] = json.dumps(row["params"], sort_keys=True)
        for split in ("val", "test"):
            for name, m in (metrics.get(split) or {}).items():
                if not isinstance(m, dict) or "value" not in m:  # counts, FROC points: not metrics
                    continue
                rec[f"{split}_{name}"] = m.get("value")
                rec[f"{split}_{name}_low"] = m.get("low")
                rec[f"{split}_{name}_high"] = m.get("high")
        for source, values in (metrics.get("external") or {}).items():  # external test sets (after the home test)
            for name, m in values.items():
                if isinstance(m, dict) and "value" in m:
                    rec[f"external_{source}_{name}"] = m.get("value")
        params = metrics.get("params") or {}
        rec.update(trainable=params.get("trainable"), total_params=params.get("total"),
                   trainable_pct=params.get("trainable_pct"), train_seconds=metrics.get("train_seconds"),
                   best_epoch=metrics.get("best_epoch"), epochs_run=metrics.get("epochs_run"),
                   peak_rss_delta_mb=metrics.get("peak_rss_delta_mb"), peak_gpu_mb=metrics.get("peak_gpu_mb"),
                   adapter_bytes=metrics.get("adapter_bytes"), n_train=metrics.get("n_train"),
                   error=(row.get("error") or "").splitlines()[0] if row.get("error") else None)
        from ..calibration import calibration_columns

        rec.update(calibration_columns(metrics))  # test ECE / Brier before and after calibration
        records.append(rec)
    return pd.DataFrame.from_records(records)


def export(store: Store, out_dir: str | Path, formats=("csv",)) -> tuple[list[Path], list[str]]:
    """Write runs.csv / runs.parquet; returns (files written, notes about what was skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(store)
    written, notes = [], []
    for fmt in formats:
        if fmt == "csv":
            path = out_dir / "runs.csv"
            frame.to_csv(path, index=False)
            written.append(path)
        elif fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                notes.append("Parquet export skipped: pyarrow is not installed (pip install pyarrow); "
                             "runs.csv has the same table")
                continue
            path = out_dir / "runs.parquet"
            frame.to_parquet(path, index=False)
            written.append(path)
        else:
            raise ConfigError(f"unknown export format {fmt!r}; expected csv or parquet")
    return written, notes
