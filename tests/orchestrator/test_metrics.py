import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.metrics import DashboardMetrics, MetricsLog, prometheus_name, read_metrics

REPO = Path(__file__).resolve().parents[2]


def _file_steps(run_dir) -> list[int]:
    return pq.read_table(Path(run_dir) / "metrics.parquet").column("step").to_pylist()


def test_rows_flush_every_n_and_on_close_with_late_columns(tmp_path):
    log = MetricsLog(tmp_path, flush_every=3, tensorboard=False)
    for s in range(3):
        log.log({"step": s, "reward/vq": 0.1 * s, "kl": np.float32(0.5)})
    assert _file_steps(tmp_path) == [0, 1, 2]
    log.log({"step": 3, "reward/vq": 0.3, "lambda/ta": 0.25, "kl": math.nan})  # new column, NaN = not measured
    assert _file_steps(tmp_path) == [0, 1, 2]  # not yet flushed
    log.close()
    m = read_metrics(tmp_path)
    assert m["step"].dtype == np.int64 and m["step"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(m["reward/vq"], [0.0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(m["kl"][:3], 0.5)
    assert math.isnan(m["kl"][3])
    assert np.isnan(m["lambda/ta"][:3]).all() and m["lambda/ta"][3] == 0.25
    assert not list(tmp_path.glob(".metrics.parquet.tmp-*"))


def test_resume_discards_steps_at_or_after_start_and_never_duplicates(tmp_path):
    with MetricsLog(tmp_path, flush_every=4, tensorboard=False) as log:
        for s in range(10):
            log.log({"step": s, "loss/policy": float(s)})
    assert _file_steps(tmp_path) == list(range(10))
    # the run died after logging step 9 but its last checkpoint is step 5 -> resume at 6
    log = MetricsLog(tmp_path, start_step=6, flush_every=100, tensorboard=False)
    assert _file_steps(tmp_path) == list(range(6))  # discarded on disk at once
    with pytest.raises(ValueError, match="before start_step"):
        log.log({"step": 5, "loss/policy": 0.0})
    for s in range(6, 9):
        log.log({"step": s, "loss/policy": 100.0 + s})
    with pytest.raises(ValueError, match="already logged"):
        log.log({"step": 8, "loss/policy": 0.0})
    log.close()
    m = read_metrics(tmp_path)
    assert m["step"].tolist() == list(range(9))
    np.testing.assert_allclose(m["loss/policy"], [0, 1, 2, 3, 4, 5, 106, 107, 108])


def test_reward_version_columns_hold_text_across_a_resume(tmp_path):
    with MetricsLog(tmp_path, flush_every=2, tensorboard=False) as log:
        for s in range(4):
            log.log({"step": s, "reward/vq": float(s), **({"reward_version/remote": f"v{s // 2}"} if s else {})})
    log = MetricsLog(tmp_path, start_step=3, tensorboard=False)  # re-reads the text column, rewrites it
    log.log({"step": 3, "reward/vq": 30.0, "reward_version/remote": "v9"})
    log.close()
    m = read_metrics(tmp_path)
    assert m["reward_version/remote"].tolist() == [None, "v0", "v1", "v9"]
    np.testing.assert_allclose(m["reward/vq"], [0, 1, 2, 30])
    with pytest.raises(ValueError, match="reward_version/remote' must be a str"):
        MetricsLog(tmp_path / "x", tensorboard=False).log({"step": 0, "reward_version/remote": 1.0})


def test_bad_rows_name_the_problem(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="'step'"):
        log.log({"reward/vq": 1.0})
    with pytest.raises(ValueError, match="must be an int"):
        log.log({"step": 1.5})
    with pytest.raises(ValueError, match="reward/vq"):
        log.log({"step": 0, "reward/vq": "high"})
    with pytest.raises(ValueError, match="reward/vq"):
        log.log({"step": 0, "reward/vq": np.zeros(3)})
    log.log({"step": 0, "ok": 1, "satisfied": np.bool_(True)})
    log.close()
    assert read_metrics(tmp_path)["satisfied"].tolist() == [1.0]
    with pytest.raises(ValueError, match="closed"):
        log.log({"step": 1})
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nope")


def test_tensorboard_scalars_match_and_resume_purges_dead_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLog(tmp_path) as log:
        for s in range(5):
            log.log({"step": s, "reward/feedback": float(s), "tau/ta": math.nan})
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<writer count>; a resumed run is a new process
    # at a later second, but here both writers share a process, and the count (9 < 10 as text) must not decide
    time.sleep(1.1)
    with MetricsLog(tmp_path, start_step=3) as log:
        for s in range(3, 6):
            log.log({"step": s, "reward/feedback": 10.0 + s})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    ev = acc.Scalars("reward/feedback")
    assert [e.step for e in ev] == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose([e.value for e in ev], [0, 1, 2, 13, 14, 15])
    assert "tau/ta" not in acc.Tags()["scalars"]  # NaN is "not measured": no points
    assert read_metrics(tmp_path)["step"].tolist() == list(range(6))


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from orchestrator.metrics import MetricsLog
    log = MetricsLog(sys.argv[1], flush_every=1, tensorboard=False)
    row = {f"reward/r{i}": 0.5 for i in range(40)}
    step = 0
    while True:
        log.log({"step": step, **row})
        if step == 0:
            print("ready", flush=True)
        step += 1
    """
)


def test_killed_writer_never_leaves_a_half_written_file(tmp_path):
    """SIGKILL a process that rewrites metrics.parquet continuously: the file must always read back whole."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    for delay in (0.05, 0.2, 0.4):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), str(REPO)], stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        steps = _file_steps(tmp_path / "run")  # raises if the file were truncated
        assert steps == list(range(len(steps))) and len(steps) >= 1
    # resuming cleans any temp file the kill left behind and keeps the steps before the checkpoint
    MetricsLog(tmp_path / "run", start_step=1, tensorboard=False).close()
    assert not list((tmp_path / "run").glob(".metrics.parquet.tmp-*"))
    assert _file_steps(tmp_path / "run") == [0]


def test_prometheus_names():
    assert prometheus_name("queue/rollout") == "queue_rollout"
    assert prometheus_name("videorl_throughput/samples_per_s") == "videorl_throughput_samples_per_s"
    assert prometheus_name("9lives:x") == "_9lives_x"
    with pytest.raises(ValueError):
        prometheus_name("")


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()


def _find(text: str, name: str, labels: dict) -> float | None:
    """Value of the first sample of `name` (or `name_total`) carrying all `labels`, else None."""
    for line in text.splitlines():
        head = line.split("{", 1)[0].split(" ", 1)[0]
        if head in (name, name + "_total") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.slow
def test_dashboard_metrics_from_actor_and_driver_reach_prometheus(ray_cluster):
    ray = ray_cluster

    @ray.remote
    class RewardProbe:
        def report(self, depth):
            from orchestrator.metrics import DashboardMetrics

            dm = DashboardMetrics(prefix="videorltest")
            dm.set("queue_depth", depth, tags={"stage": "reward", "actor": "reward-vq-0"})
            dm.inc("ledger_retried", 2)
            dm.inc("ledger_retried", 3)
            return True

    probe = RewardProbe.options(runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}).remote()
    assert ray.get(probe.report.remote(3))
    dm = DashboardMetrics(prefix="videorltest")
    dm.set("queue/depth", np.float32(1.5), tags={"stage": "rollout", "actor": "driver"})  # same metric name after sanitising
    with pytest.raises(ValueError, match="tag keys"):
        dm.set("queue_depth", 1.0, tags={"stage": "rollout"})
    with pytest.raises(ValueError, match="is a gauge"):
        dm.inc("queue_depth", 1, tags={"stage": "rollout", "actor": "driver"})
    with pytest.raises(ValueError, match="only grow"):
        dm.inc("ledger_retried", -1)

    port = ray.nodes()[0]["MetricsExportPort"]
    want = {
        ("ray_videorltest_queue_depth", (("actor", "reward-vq-0"), ("stage", "reward"))): 3.0,
        ("ray_videorltest_queue_depth", (("actor", "driver"), ("stage", "rollout"))): 1.5,
        ("ray_videorltest_ledger_retried", ()): 5.0,
    }
    found: dict = {}
    deadline = time.time() + 25  # Ray exports every few seconds
    while time.time() < deadline and len(found) < len(want):
        text = _scrape(port)
        for (name, labels), _ in want.items():
            v = _find(text, name, dict(labels))
            if v is not None:
                found[(name, labels)] = v
        time.sleep(0.5)
    assert found == want
    ray.kill(probe)
