"""Run metrics: one row per learner step to parquet and TensorBoard, and live gauges/counters for the Ray dashboard.

`MetricsLog` guarantees: `run_dir/metrics.parquet` is always a complete parquet file (written to a temp file
and moved into place with `os.replace`), its steps are strictly increasing (no step twice, also across resumes),
and on resume at step k every row with step >= k from the killed run is discarded.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METRICS_FILE = "metrics.parquet"


def _scalar(key: str, value) -> float:
    """A row value as float; NaN means "not measured", bools become 0/1, 0-d arrays/tensors are unwrapped."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
        value = value.item()
    if not isinstance(value, (int, float)):
        raise ValueError(f"metric {key!r} must be a scalar int or float, got {type(value).__name__}: {value!r}")
    return float(value)


TEXT_COLUMNS = ("reward_version/",)  # columns of these prefixes hold text (the reward model version per step)


def _value(key: str, value) -> float | str:
    """A row value: a scalar (`_scalar`), or a text in a TEXT_COLUMNS column."""
    if key.startswith(TEXT_COLUMNS):
        if not isinstance(value, str):
            raise ValueError(f"metric {key!r} must be a str, got {type(value).__name__}: {value!r}")
        return value
    return _scalar(key, value)


def _read_rows(path: Path) -> list[dict]:
    """Rows of an existing metrics.parquet as dicts (nulls become NaN)."""
    rows = pq.read_table(path).to_pylist()
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]


def _rows_to_table(rows: list[dict]) -> pa.Table:
    """"step" as int64 first, then every other column as float64 (missing -> NaN), or string where any value is a text
    (missing -> null), in order of first appearance."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(k for k in r if k != "step"))
    cols = {"step": pa.array([r["step"] for r in rows], pa.int64())}
    for n in names:
        values = [r.get(n, math.nan) for r in rows]
        if any(isinstance(v, str) for v in values):
            cols[n] = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
        else:
            cols[n] = pa.array(values, pa.float64())
    return pa.table(cols)


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write parquet to a temp file in the same directory, fsync, then os.replace: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class MetricsLog:
    """Per-step metric rows -> `run_dir/metrics.parquet` (+ TensorBoard scalars in `run_dir/tb`).

    A row is a flat dict: "step" (int, required) plus scalar values under any names (`reward/vq`, `lambda/ta`,
    `loss/policy`, ...; NaN allowed for "not measured"), or texts under TEXT_COLUMNS (`reward_version/<model>`; not in
    TensorBoard). Columns may appear at any step; earlier rows read NaN.
    Rows are flushed every `flush_every` rows and on `close()`. The file is rewritten whole on each flush
    (parquet cannot append; a run has at most a few thousand rows), always atomically.

    Invariants: steps in the file are strictly increasing; `log` refuses a step <= the last one or < start_step;
    on resume (`start_step=k`) rows with step >= k already in the file are discarded at once (a killed run may have
    logged a step whose checkpoint never landed), and TensorBoard events from those steps are purged too.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0, flush_every: int = 10, tensorboard: bool = True):
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.start_step = start_step
        self.flush_every = flush_every
        self._rows: list[dict] = []
        self._unflushed = 0
        self._closed = False
        for stale in self.run_dir.glob(f".{METRICS_FILE}.tmp-*"):  # left by a process killed mid-write
            stale.unlink()
        if self.path.exists():
            old = _read_rows(self.path)
            self._rows = [r for r in old if r["step"] < start_step]
            if len(self._rows) != len(old):  # persist the discard now, so readers never see the dead steps
                self._flush_file()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at step >= start_step left by the killed run
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step if start_step > 0 else None)

    @property
    def last_step(self) -> int | None:
        return self._rows[-1]["step"] if self._rows else None

    def log(self, row: dict) -> None:
        """Append one row {"step": int, name: scalar, ...}; flushes to disk every `flush_every` rows."""
        if self._closed:
            raise ValueError("MetricsLog is closed")
        if "step" not in row:
            raise ValueError(f"metrics row needs a 'step' key, got keys {sorted(row)}")
        step = row["step"]
        if hasattr(step, "item") and getattr(step, "ndim", 0) == 0:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"metrics 'step' must be an int, got {type(step).__name__}: {step!r}")
        if step < self.start_step:
            raise ValueError(f"step {step} is before start_step {self.start_step}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"step {step} already logged or out of order (last step {self.last_step})")
        clean = {"step": step}
        for k, v in row.items():
            if k != "step":
                if not isinstance(k, str) or not k:
                    raise ValueError(f"metric names must be non-empty strings, got {k!r}")
                clean[k] = _value(k, v)
        self._rows.append(clean)
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and not isinstance(v, str) and not math.isnan(v):  # NaN = not measured: no point
                    self._tb.add_scalar(k, v, step)
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def _flush_file(self) -> None:
        if self._rows:
            _write_atomic(_rows_to_table(self._rows), self.path)
        elif self.path.exists():
            self.path.unlink()  # resumed at a step before every logged row
        self._unflushed = 0

    def flush(self) -> None:
        """Write every row so far to metrics.parquet (atomically) and flush TensorBoard."""
        if self._unflushed:
            self._flush_file()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
        self._closed = True

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Columns of `run_dir/metrics.parquet` sorted by step: "step" int64 [S], every other column float64 [S] (NaN =
    missing), or an object array of str (None = missing) for a text column (reward_version/<model>)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}")
    table = pq.read_table(path)
    order = np.argsort(table.column("step").to_numpy(), kind="stable")
    out = {}
    for name in table.column_names:
        col = table.column(name).to_numpy(zero_copy_only=False)
        if pa.types.is_string(table.schema.field(name).type):
            out[name] = col.astype(object)[order]
        else:
            out[name] = (col.astype(np.int64) if name == "step" else col.astype(np.float64))[order]
    return out


_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(name: str) -> str:
    """`queue/rollout` -> `queue_rollout`: Prometheus' [a-zA-Z_][a-zA-Z0-9_]* (Ray 2.60 also rejects ':')."""
    out = _INVALID.sub("_", name)
    if not out:
        raise ValueError("metric name must not be empty")
    return "_" + out if out[0].isdigit() else out


class DashboardMetrics:
    """Gauges and counters for the Ray dashboard / Prometheus, created lazily on first use.

    `set("queue_depth", 3, tags={"stage": "reward"})` makes gauge `<prefix>_queue_depth` with tag keys ("stage",)
    the first time; later calls under that name must give the same tag keys. Ray exports them from every node's
    metrics agent (prefixed `ray_`, counters may get a `_total` suffix) every few seconds. Use one instance per
    process (driver or actor); Ray aggregates per worker.
    """

    def __init__(self, prefix: str = "videorl"):
        self.prefix = prometheus_name(prefix) if prefix else ""
        self._metrics: dict[str, tuple[str, object, tuple[str, ...]]] = {}  # full name -> (kind, metric, tag keys)

    def _get(self, kind: str, name: str, tags: dict | None, description: str | None):
        from ray.util import metrics as ray_metrics

        full = prometheus_name(f"{self.prefix}_{name}" if self.prefix else name)
        tags = {prometheus_name(str(k)): str(v) for k, v in (tags or {}).items()}
        keys = tuple(sorted(tags))
        if full not in self._metrics:
            cls = ray_metrics.Gauge if kind == "gauge" else ray_metrics.Counter
            desc = description or f"{name} ({self.prefix or 'videorl'} {kind})"
            self._metrics[full] = (kind, cls(full, description=desc, tag_keys=keys), keys)
        have_kind, metric, have_keys = self._metrics[full]
        if have_kind != kind:
            raise ValueError(f"metric {full!r} is a {have_kind}, cannot use it as a {kind}")
        if have_keys != keys:
            raise ValueError(f"metric {full!r} was created with tag keys {list(have_keys)}, got {list(keys)}")
        return metric, tags

    def set(self, name: str, value: float, tags: dict | None = None, description: str | None = None) -> None:
        """Set gauge `<prefix>_<name>` to `value` for these tags."""
        metric, tags = self._get("gauge", name, tags, description)
        metric.set(_scalar(name, value), tags=tags)

    def inc(self, name: str, value: float = 1.0, tags: dict | None = None, description: str | None = None) -> None:
        """Add `value` >= 0 to counter `<prefix>_<name>` (0 is a no-op, e.g. `inc("ledger_retried", n)` with n = 0)."""
        value = _scalar(name, value)
        if not value >= 0:
            raise ValueError(f"counter {name!r} can only grow, got increment {value}")
        metric, tags = self._get("counter", name, tags, description)
        if value > 0:
            metric.inc(value, tags=tags)
