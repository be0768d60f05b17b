"""What a user opens while a run goes, over real HTTP: a local `videorl train` prints its Ray dashboard's URL and the
dashboard lists the run's actors by name; every metric of configs/grafana/videorl.json is in the Prometheus endpoint
during the run; `ray job logs` of a submitted run has a progress line at most every $VIDEORL_PROGRESS_S seconds."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

FEEDBACK = '''
import numpy as np

class Feedback:
    """Stands in for the engagement predictor (no training): each clip's mean brightness."""
    dims = ("feedback",)

    def score(self, batch):
        return {"feedback": batch["videos"].astype(np.float32).mean((1, 2, 3, 4)) / 255}
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("observability-cache")  # one base model for every run here


def train_args(root: Path, cache: Path, *extra: str) -> list[str]:
    """A tiny run whose pools, reward names and constraints are those of the default config (what the Grafana panels
    name): videoreward -> vq, mq, ta (the oracle stands in), feedback (a python scorer), oracle -> oracle_*."""
    (root / "feedback_scorer.py").write_text(FEEDBACK)
    (root / "profile.yaml").write_text("primary: feedback\nconstraints: {vq: 0.5, mq: 0.5, ta: 0.5}\n")
    models = (f"{{videoreward: {{kind: oracle}}, oracle: {{kind: oracle, prefix: oracle_, num_cpus: 0.1}}, "
              f"feedback: {{kind: python, callable: 'feedback_scorer:Feedback', pythonpath: [{root}], num_cpus: 0.1}}}}")
    return ["videorl", "train", "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=30",
            "pretrain.batch_size=8", "rollout.steps=3", "rollout.group_size=4", f"rewards.models={models}",
            f"rewards.profile={root / 'profile.yaml'}", "rewards.calibration.samples_per_prompt=2",
            "train.groups_per_step=2", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=3",
            "eval.seeds_per_prompt=1", "eval.constraint_samples_per_prompt=2", "train.checkpoint_every=100",
            f"train.run_dir={root / 'run'}", f"cache_dir={cache}", *extra]


def get_json(url: str, headers: dict) -> dict:
    return json.loads(urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).read())


def auth_headers() -> dict:
    """Ray 2.60 puts token auth on local clusters by default: the dashboard wants `authorization: Bearer <token>`
    (the token in ~/.ray/auth_token, $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH)."""
    from ray._raylet import AuthenticationTokenLoader

    token = AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True)
    return {"authorization": f"Bearer {token}"} if token else {}


def wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


# -- progress in `ray job logs` --------------------------------------------------------------------------------------

def ray_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# tqdm's line: "train:  40%|####      | 12/30 [00:07<00:10,  1.71step/s, feedback=0.37, ...]" ("s/step" when slower)
BAR = re.compile(r"^train: +\d+%\|.*\| (\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<([\d:]+|\?), +([\d.]+|\?)(?:s/step|step/s)[,\]]")


def test_job_logs_have_a_progress_line_at_most_every_n_seconds(head_node, tmp_path, cache):
    address, env = head_node
    every, steps = 3, 30
    entry = train_args(tmp_path, cache, f"train.steps={steps}")
    runtime_env = {"excludes": [".venv", ".git", "runs", "*.egg-info"], "env_vars": {"VIDEORL_PROGRESS_S": str(every)}}
    submit = ["job", "submit", "--address", address, "--submission-id", "progress-lines", "--working-dir", ".",
              "--runtime-env-json", json.dumps(runtime_env), "--", *entry]
    deadline = time.time() + 120
    while True:  # the head node's dashboard agent takes a few seconds to accept jobs
        out = ray_cli(env, *submit)
        if not any(s in out.stdout + out.stderr for s in ("No available agent", "Failed to connect")) or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    logs = ray_cli(env, "job", "logs", "--address", address, "progress-lines")
    assert logs.returncode == 0, logs.stderr[-2000:]
    lines = [ln.strip() for ln in logs.stdout.splitlines() if ln.strip().startswith("train:")]
    bars = [BAR.match(ln) for ln in lines]
    assert lines and all(bars), "\n".join(ln for ln, m in zip(lines, bars) if not m)
    done = [m for m in bars if int(m[1]) == steps]
    assert done, lines[-1]
    h, m, s = (int(x or 0) for x in done[-1].group(3, 4, 5))
    elapsed = 3600 * h + 60 * m + s + 1  # the bar shows whole seconds, rounded down
    # one line when the bar starts, one when it closes, and between them at most one per `every` seconds
    assert 2 <= len(lines) <= math.ceil(elapsed / every) + 2, f"{len(lines)} lines in {elapsed} s:\n" + "\n".join(lines)
    assert len(lines) < steps + 1, "a line per step: the interval is not applied"
    # rate and ETA on every line after the first (the first, at 0 steps, has neither yet: "<?, ?step/s")
    assert all(m[6] != "?" and m[7] != "?" for m in bars[1:]), "\n".join(lines)


# -- a local run: its dashboard, and the Grafana dashboard's metrics ---------------------------------------------------

@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cache):
    """`videorl train` starting its own local cluster (as a user runs it), long enough to be watched; the URLs it
    printed. Stopped with SIGTERM (finish the step, checkpoint, summarise) after the module's tests."""
    root = tmp_path_factory.mktemp("local-run")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    out = open(root / "stdout.log", "w")
    proc = subprocess.Popen(train_args(root, cache, "train.steps=400"), cwd=ROOT, env=env, start_new_session=True,
                            stdout=out, stderr=subprocess.STDOUT)

    def printed():
        assert proc.poll() is None, (root / "stdout.log").read_text()[-3000:]
        return re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+) +\(Prometheus metrics: (http://\S+/metrics)\)",
                         (root / "stdout.log").read_text())
    found = wait_for(printed, 180, "the dashboard line")
    yield {"dashboard": found[1], "metrics": found[2], "proc": proc, "log": root / "stdout.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out.close()


def test_a_local_run_prints_its_dashboard_url_and_the_dashboard_lists_its_actors(local_run):
    log = local_run["log"].read_text()
    assert log.count("Ray dashboard: http://127.0.0.1:") == 1, log[-3000:]
    want = {"rollout-0", "rollout-1", "learner", "reward-videoreward-0", "reward-feedback-0", "reward-oracle-0",
            "constraint-controller"}

    def alive_names():
        assert local_run["proc"].poll() is None, local_run["log"].read_text()[-3000:]
        body = get_json(f"{local_run['dashboard']}/api/v0/actors?limit=1000&filter_keys=state&filter_predicates=%3D"
                        f"&filter_values=ALIVE", auth_headers())
        names = {a["name"] for a in body["data"]["result"]["result"]}
        return names if want <= names else None
    names = wait_for(alive_names, 240, f"actors {sorted(want)} in the dashboard")
    assert want <= names


def panel_metrics() -> set[str]:
    dash = json.loads((ROOT / "configs" / "grafana" / "videorl.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p.get("targets", []))
    return {name for e in exprs for name in re.findall(r"\bray_videorl_\w+", e)}


def test_every_grafana_panel_metric_is_in_prometheus_during_a_run(local_run):
    want = panel_metrics()
    assert len(want) >= 30, sorted(want)

    def missing():
        assert local_run["proc"].poll() is None, local_run["log"].read_text()[-3000:]
        text = urllib.request.urlopen(local_run["metrics"], timeout=5).read().decode()
        have = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if not ln.startswith("#")}
        return want - have
    deadline = time.time() + 300
    while (gone := missing()) and time.time() < deadline:
        time.sleep(2)
    assert not gone, f"panel metrics not exported during the run: {sorted(gone)}"
    assert local_run["proc"].poll() is None, "metrics must be checked while the run is going"


def test_ray_dashboard_false_starts_the_local_cluster_without_it(tmp_path):
    """`ray.dashboard=false`: no dashboard process takes the run's CPU (what `videorl bench pipeline --mode real` on 2
    cores wants); the run says so in the line that otherwise carries the URL."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(BIN / "videorl"), "bench", "pipeline", "--mode", "simulated", "--actors", "1",
                          "--rollout-s", "0.05", "--reward-s", "0.01", "--learner-s", "0.01", "--measure-s", "0.2",
                          "--out", str(tmp_path), "ray.dashboard=false"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("Ray dashboard:")]
    assert len(lines) == 1 and lines[0].startswith("Ray dashboard: off (ray.dashboard=false)"), out.stdout
    assert "http://127.0.0.1:8265" not in out.stdout
    assert json.loads((tmp_path / "bench_pipeline.json").read_text())["simulated"]["rows"][0]["actors"] == 1
