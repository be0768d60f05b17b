"""Reward plug-ins inside real runs (local Ray cluster): a python scorer from a module outside the package, and a
reward service (`videorl reward serve` on 127.0.0.1) killed and restarted mid-run, refusing a sample, unreachable."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import requests

from orchestrator.config import load_config
from orchestrator.checkpoint import latest_checkpoint
from orchestrator.evaluation import evaluate
from orchestrator.metrics import read_metrics
from orchestrator.train import run_training
from policy.backend import load_policy
from tests.orchestrator.test_faults import ROOT, TINY
from tests.rewards.test_reward_http import free_port, start_server, stop_server

pytestmark = pytest.mark.slow

BRIGHT = '''
import numpy as np

class Brightness:
    """Mean of each clip's brightest channel x scale."""
    dims = ("bright",)
    version = "brightness-1"

    def __init__(self, scale=1.0):
        self.scale = scale

    def score(self, batch):
        return {"bright": batch["videos"].astype(np.float32).max(-1).mean((1, 2, 3)) / 255 * self.scale}
'''

REFUSE = '''
from rewards.errors import DataError
from rewards.scorer import OracleScorer

class RefuseOne(OracleScorer):
    """The oracle, except that it refuses one training sample by id."""
    version = "refuse-one"

    def score(self, batch):
        if "g000003/1" in batch["ids"]:
            raise DataError("g000003/1", "refused by the service")
        return super().score(batch)
'''


ORACLE_V2 = '''
from rewards.scorer import OracleScorer

class OracleV2(OracleScorer):
    """The oracle under a new version name: a service restarted with another model."""
    version = "oracle-v2"
'''

FAIL_TRAINING = '''
from rewards.scorer import OracleScorer

class FailTraining(OracleScorer):
    """The oracle for calibration and held-out clips; a lost device (RuntimeError) for every training group."""
    version = "fail-training"

    def score(self, batch):
        if batch["ids"][0].startswith("g"):
            raise RuntimeError("device lost")
        return super().score(batch)
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("plugin-cache")  # one base model for every run here


def _config(root, cache, models: str, constraint: str, *extra: str):
    (root / "profile.yaml").write_text(f"primary: ta\nconstraints: {{{constraint}: 0.5}}\n")
    return load_config(None, [*[a for a in TINY if not a.startswith("rewards.models")], f"rewards.models={models}",
                              f"rewards.profile={root / 'profile.yaml'}", f"cache_dir={cache}",
                              "eval.constraint_samples_per_prompt=2", "train.checkpoint_every=100", *extra])


def test_a_python_scorer_from_outside_the_package_reaches_metrics_summary_and_report(tmp_path, cache, ray_cluster):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "bright_scorer.py").write_text(textwrap.dedent(BRIGHT))
    models = (f"{{oracle: {{kind: oracle}}, bright: {{kind: python, callable: 'bright_scorer:Brightness', "
              f"pythonpath: [{tmp_path / 'plugins'}], kwargs: {{scale: 10.0}}}}}}")
    cfg = _config(tmp_path, cache, models, "bright", "train.steps=3")
    summary = run_training(cfg, tmp_path / "run", progress=False)
    m = read_metrics(tmp_path / "run")
    assert len(m["reward/bright"]) == 3 and np.isfinite(m["reward/bright"]).all() and np.isfinite(m["tau/bright"]).all()
    # the held-out value is the plug-in's formula on the trained policy's held-out rollouts, scale 10 included
    r = cfg.rollout
    res = evaluate(load_policy(cfg.model, tmp_path / "run" / "final"), sampler=r.sampler, eta=r.eta, steps=r.steps,
                   mode=r.mode, shift=r.shift, seeds_per_prompt=2, seed=cfg.eval.seed)
    direct = float((res.videos.astype(np.float32).max(-1).mean((1, 2, 3)) / 255 * 10.0).mean())
    bright = summary["constraints"]["bright"]
    assert bright["final"] == pytest.approx(direct, rel=1e-5) and bright["final"] > 1.0  # scale 10 applied
    assert bright["satisfied"] == (bright["final"] >= bright["tau"])
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<td>bright</td>" in report and f"{bright['tau']:.4g}"[:4] in report
    assert summary["ledger"]["balanced"] and summary["ledger"]["lost"] == 0


def test_a_reward_service_killed_and_restarted_mid_run_loses_nothing(tmp_path, cache, ray_cluster):
    """... and each step's metrics row names the model version that scored its latest reward batch: the service comes
    back with another model (version oracle-v2)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "oracle_v2.py").write_text(textwrap.dedent(ORACLE_V2))
    port = free_port()
    serve = ("--model", "oracle", "rewards.models={oracle: {kind: oracle}}")
    serve_v2 = ("--model", "v2", f"rewards.models={{v2: {{kind: python, callable: 'oracle_v2:OracleV2', "
                                 f"pythonpath: [{tmp_path / 'plugins'}]}}}}")
    server = start_server(port, *serve)
    url = f"http://127.0.0.1:{port}"
    models = f"{{remote: {{kind: http, url: '{url}', retries: 3}}}}"
    cfg = _config(tmp_path, cache, models, "vq", "train.steps=8")
    out = {}
    run = threading.Thread(target=lambda: out.update(summary=run_training(cfg, tmp_path / "run", progress=False)))
    run.start()
    try:
        while requests.get(f"{url}/info", timeout=5).json()["batches"] < 4:  # calibration, then training batches
            assert run.is_alive(), "the run ended before the server was killed"
            time.sleep(0.2)
        stop_server(server)
        time.sleep(8)  # longer than the client's own retries (1 + 2 + 4 s): the pool must retry batches
        assert run.is_alive()
        server = start_server(port, *serve_v2)
        run.join(timeout=600)
    finally:
        stop_server(server)
    ledger = out["summary"]["ledger"]
    assert out["summary"]["steps"] == 8 and ledger["consumed"] == 8 * 2
    assert ledger["retried"] >= 1  # reward batches re-run after the server died
    assert ledger["lost"] == 0 and ledger["counted_twice"] == 0 and ledger["balanced"]
    assert ledger.get("dropped_infra_error", 0) == 0 and ledger["skipped_samples"] == 0  # none given up
    versions = list(read_metrics(tmp_path / "run")["reward_version/remote"])
    seen = out["summary"]["reward_versions"]["remote"]
    assert len(versions) == 8 and set(versions) <= {"oracle", "oracle-v2"} and versions[-1] == "oracle-v2"
    assert seen[-1] == "oracle-v2" and seen[0] == versions[0] and set(seen) == set(versions)
    first_v2 = versions.index("oracle-v2")  # steps before the kill: the old model, and never again after the new one
    assert set(versions[:first_v2]) <= {"oracle"} and set(versions[first_v2:]) == {"oracle-v2"}


def test_a_sample_the_service_refuses_is_skipped_and_counted(tmp_path, cache, ray_cluster):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "refuse_scorer.py").write_text(textwrap.dedent(REFUSE))
    port = free_port()
    server = start_server(port, "--model", "refuse", "rewards.models={refuse: {kind: python, callable: "
                          f"'refuse_scorer:RefuseOne', pythonpath: [{tmp_path / 'plugins'}]}}}}")
    try:
        cfg = _config(tmp_path, cache, f"{{remote: {{kind: http, url: 'http://127.0.0.1:{port}'}}}}", "vq", "train.steps=4")
        summary = run_training(cfg, tmp_path / "run", progress=False)
    finally:
        stop_server(server)
    ledger = summary["ledger"]
    assert ledger["dropped_data_error"] == 1 and ledger["skipped_samples"] == 4  # g000003: its group of 4
    assert ledger["balanced"] and ledger["lost"] == 0 and ledger["retried"] == 0 and summary["steps"] == 4
    rollouts = __import__("pyarrow.parquet", fromlist=["x"]).read_table(tmp_path / "run" / "rollouts.parquet")
    assert "g000003" not in set(rollouts.column("group_id").to_pylist())


def test_an_unreachable_service_fails_the_run_naming_the_url(tmp_path, cache):
    url = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    args = [*[a for a in TINY if not a.startswith("rewards.models")], f"rewards.models={{remote: {{kind: http, url: '{url}', "
            "retries: 1}}", f"rewards.profile={tmp_path / 'profile.yaml'}", f"cache_dir={cache}", "ray.num_cpus=2",
            f"train.run_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "RAY_ADDRESS": ""})
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("videorl: error: ")]
    assert out.returncode == 2 and lines, out.stderr[-2000:]
    assert f"reward service {url} failed 2 times (ConnectionError)" in lines[0]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_audio_sync_profile_is_calibrated_and_its_constraint_reported(tmp_path, cache, ray_cluster):
    """configs/audio_sync.yaml (rollout.extras: [beat], the BeatSync plug-in, profile audio_sync) on the tiny model,
    the oracle standing in for the learned vq / ta."""
    from orchestrator.inputs import score_all, scorers
    from rewards.audio_sync import BeatSync, batch_extras
    from rewards.calibration import read_calibration

    models = "{oracle: {kind: oracle}, sync: {kind: python, callable: 'rewards.audio_sync:BeatSync'}}"
    args = [*[a for a in TINY if not a.startswith("rewards.models")], f"rewards.models={models}", f"cache_dir={cache}",
            "eval.constraint_samples_per_prompt=2", "train.checkpoint_every=100", "train.steps=3"]
    cfg = load_config(ROOT / "configs" / "audio_sync.yaml", args)
    assert cfg.rollout.extras == ["beat"] and cfg.rewards.profile == "audio_sync"
    summary = run_training(cfg, tmp_path / "run", progress=False)
    sync = summary["constraints"]["sync"]
    assert set(summary["constraints"]) == {"sync", "vq"} and np.isfinite(sync["tau"]) and np.isfinite(sync["final"])
    cal = read_calibration(sorted(cache.glob("calibration-*.json"), key=lambda p: p.stat().st_mtime)[-1])
    c = cal["profiles"]["audio_sync"]["constraints"]["sync"]
    assert sync["tau"] == pytest.approx(c["mu"] + 1.0 * c["sigma"]) and c["sigma"] > 0
    # "final" is BeatSync on the trained policy's held-out rollouts with their beat tracks
    r = cfg.rollout
    res = evaluate(load_policy(cfg.model, tmp_path / "run" / "final"), sampler=r.sampler, eta=r.eta, steps=r.steps,
                   mode=r.mode, shift=r.shift, seeds_per_prompt=2, seed=cfg.eval.seed)
    ids = [str(i) for i in range(len(res.prompts))]
    direct = BeatSync().score({"ids": ids, "videos": res.videos, "prompts": res.prompts,
                               **batch_extras(["beat"], res.prompts, res.videos.shape[1])})["sync"]
    assert sync["final"] == pytest.approx(float(direct.mean()), rel=1e-5)
    assert np.isfinite(read_metrics(tmp_path / "run")["reward/sync"]).all()
    # without rollout.extras the scorer has no beat to hear: every batch is a data error
    no_beat = load_config(ROOT / "configs" / "audio_sync.yaml", [*args, "rollout.extras=[]"])
    with pytest.raises(Exception, match="no 'beat' track"):
        score_all(no_beat, scorers(no_beat, {"oracle": None, "sync": None}), res.videos[:2], res.prompts[:2])


def test_a_reward_service_gone_for_good_ends_the_run_naming_it(tmp_path, cache, ray_cluster):
    port = free_port()
    server = start_server(port, "--model", "oracle", "rewards.models={oracle: {kind: oracle}}")
    url = f"http://127.0.0.1:{port}"
    cfg = _config(tmp_path, cache, f"{{remote: {{kind: http, url: '{url}', retries: 0}}}}", "vq", "train.steps=200",
                  "train.checkpoint_every=1")
    out = {}

    def train():
        try:
            run_training(cfg, tmp_path / "run", progress=False)
        except Exception as e:  # noqa: BLE001 - what ended the run is the point
            out["error"] = e

    run = threading.Thread(target=train)
    run.start()
    try:
        while requests.get(f"{url}/info", timeout=5).json()["batches"] < 4:
            assert run.is_alive(), f"the run ended before the server was killed: {out}"
            time.sleep(0.2)
    finally:
        stop_server(server)  # for good
    run.join(timeout=600)
    assert not run.is_alive()
    error = out["error"]
    assert isinstance(error, ConnectionError), repr(error)
    assert str(error).startswith(f"reward model 'remote' ({url}) failed 3 groups in a row after its retries")
    assert "\n" not in str(error)  # one line for the CLI
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.skipped == [] and 0 < ckpt.state["step"] < 200  # the last one, whole
    assert len(read_metrics(tmp_path / "run")["step"]) == ckpt.state["step"]  # metrics up to it, nothing after
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("limit", [1, 2])
def test_max_consecutive_failures_is_how_many_dropped_groups_end_the_run(tmp_path, cache, ray_cluster, capfd, limit):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fail_training.py").write_text(textwrap.dedent(FAIL_TRAINING))
    models = (f"{{bad: {{kind: python, callable: 'fail_training:FailTraining', pythonpath: [{tmp_path / 'plugins'}], "
              f"max_consecutive_failures: {limit}}}}}")
    cfg = _config(tmp_path, cache, models, "vq", "train.steps=50")
    with pytest.raises(ConnectionError, match=rf"reward model 'bad' failed {limit} groups in a row after its retries "
                                              r"\(batch g\d+ failed 6 times on bad"):
        run_training(cfg, tmp_path / "run", progress=False)
    dropped = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("dropping group")]
    assert len(dropped) == limit  # each after its pool's 5 retries; the limit-th ends the run
