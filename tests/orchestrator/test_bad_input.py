"""Every bad input a user can give gets one clear line and a non-zero exit (README: "Bad input")."""

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import ray
import torch

import orchestrator.cluster
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.train import run_training
from rewards.reward_model import RewardModelConfig, VideoReward

ROOT = Path(__file__).resolve().parents[2]


def videorl(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (~5 s of importing torch and Ray: the tests using it are marked slow)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, f"cache_dir={tmp / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _no_cluster(*args, **kwargs):
    raise AssertionError("an in-process case reached a Ray cluster start: run it with videorl() in a fresh process")


def videorl_inproc(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    """The CLI's own main() with the same argv, in this process, for input rejected before any Ray cluster starts
    (connecting is made to fail the test). Its stdout and stderr are captured as a fresh process's would be; the
    process-wide state main() touches (sys.stderr, tqdm's defaults, torch threads, the working directory, sys.path and
    the modules a reward plug-in imports, the environment, logging handlers) is put back afterwards."""
    from tqdm import std

    argv = [*args, f"cache_dir={tmp / 'cache'}"]
    out, err = io.StringIO(), io.StringIO()
    tqdm_defaults = {k: std.tqdm.__dict__[k] for k in ("__init__", "set_postfix")}
    threads, cwd, path, modules = torch.get_num_threads(), os.getcwd(), list(sys.path), set(sys.modules)
    environ, handlers, ray_was_up = dict(os.environ), list(logging.getLogger().handlers), ray.is_initialized()
    try:
        os.chdir(ROOT)
        with (mock.patch.object(ray, "init", _no_cluster),
              mock.patch.object(orchestrator.cluster, "connect", _no_cluster),
              contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name in set(sys.modules) - modules:  # a reward plug-in imported from tmp (e.g. plugin_bad)
            if str(tmp) in str(getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
        for k, v in tqdm_defaults.items():
            setattr(std.tqdm, k, v)
        torch.set_num_threads(threads)
        for k in os.environ.keys() - environ.keys():
            del os.environ[k]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        logging.getLogger().handlers[:] = handlers
    assert ray.is_initialized() == ray_was_up, "an in-process case started (or stopped) a Ray cluster"
    return subprocess.CompletedProcess(["videorl", *argv], code, out.getvalue(), err.getvalue())


def fresh_process(*values):
    """A case run by the real CLI in a fresh process: end to end (the process's exit status and its stderr), or it is
    rejected only once a cluster has started."""
    return pytest.param(videorl, *values, marks=pytest.mark.slow)


def in_process(*values):
    """A case rejected before a cluster starts: main() in this process (fast)."""
    return pytest.param(videorl_inproc, *values)


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    # (Ray's own start-up notice about token authentication may precede it when a cluster was started)
    lines = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("Token authentication is enabled")]
    assert len(lines) == 1 and lines[0].startswith("videorl: error: "), out.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("cli, overrides, fragments", [
    fresh_process(["rollout.group_size=1"], ["rollout.group_size=1", "gdpo needs groups of at least 2"]),
    in_process(["learner.advantage=grpo", "rollout.group_size=1"], ["grpo needs groups of at least 2"]),
    in_process(["learner.loss=ppo", "rollout.sampler=ode"], ["learner.loss=ppo needs a stochastic rollout.sampler"]),
    in_process(["rewards.models.videoreward.autoscale={min: 3, max: 2}"],
               ["autoscale.max (2) must be >= autoscale.min (3)"]),
    in_process(["train.max_staleness=-1"], ["train.max_staleness", "greater than or equal to 0"]),
    in_process(["rollout.eta=nan"], ["rollout.eta"]),
    # checked against the cluster's resources, once it has started
    fresh_process(["ray.rollout_workers=12", "ray.num_cpus=2"], ["actors need", "CPUs but the cluster has 2"]),
    fresh_process(["ray.learner_workers=8", "ray.num_cpus=2"],
                  ["actors need", "CPUs but the cluster has 2", "ray.learner_workers"]),
])
def test_contradictory_or_invalid_settings(cli, overrides, fragments, tmp_path):
    one_line_error(cli("train", *overrides, tmp=tmp_path), *fragments)


@pytest.mark.parametrize("cli, content, fragments", [
    fresh_process(b"", ["no prompts"]),
    in_process(b"# only a comment\n\n", ["no prompts"]),
    in_process(b"a red square moving left slowly\n\xff\xfe broken\n", ["not UTF-8"]),
    in_process(b"a red square moving left slowly\n" + b"a" * 300 + b"\n", [":2:", "200"]),
    in_process(b"a red square moving left slowly\na red hexagon moving left slowly\n", [":2:", "hexagon"]),
    in_process(b"a red square moving left\x00 slowly\n", ["NUL"]),
])
def test_bad_prompt_files(cli, content, fragments, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    out = cli("train", f"data.prompts={path}", tmp=tmp_path)
    one_line_error(out, str(path), *fragments)
    assert "Ray dashboard" not in out.stdout + out.stderr  # named before a cluster starts


def test_missing_prompt_file(tmp_path):
    out = videorl_inproc("train", f"data.prompts={tmp_path / 'nope.txt'}", tmp=tmp_path)
    one_line_error(out, "nope.txt")
    assert "Ray dashboard" not in out.stdout + out.stderr


def test_corrupt_and_truncated_checkpoints(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    (tmp_path / "model.json").write_text("{not json")
    one_line_error(videorl_inproc("eval", "--checkpoint", str(bad), tmp=tmp_path), "corrupt model config", "model.json")
    (tmp_path / "model.json").write_text(load_config().model.model_dump_json())
    one_line_error(videorl_inproc("eval", "--checkpoint", str(bad), tmp=tmp_path), "corrupt weights file", str(bad))


def test_resume_problems(tmp_path):
    one_line_error(videorl_inproc("train", "--resume", str(tmp_path / "nothing"), tmp=tmp_path),
                   "run directory not found")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {steps: 3}\n")
    one_line_error(videorl_inproc("train", "--resume", str(tmp_path / "run"), tmp=tmp_path),
                   "no checkpoint to resume from")


@pytest.mark.slow
def test_resume_with_a_different_model_shape_and_a_nan_reward_model(tmp_path, ray_cluster):
    """A reward model that returns NaN for one prompt word: those groups are skipped and counted, the run
    goes on; resuming that run with another model width is refused naming the tensor."""
    cfg_rm = RewardModelConfig(dim=16, depth=1, heads=2)
    model = VideoReward(cfg_rm)
    with torch.no_grad():
        model.word_embed.weight[model.tokenize(["magenta"])[0, 0]] = float("nan")
    model.save(tmp_path / "poisoned")
    (tmp_path / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    (tmp_path / "prompts.txt").write_text("a magenta circle moving up slowly\na red square moving left quickly\n"
                                          "a blue triangle moving down slowly\na green circle moving right quickly\n")
    args = ["model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=30", "pretrain.batch_size=8",
            "rollout.steps=3", "rollout.group_size=4", f"rewards.models={{rm: {{kind: videoreward, checkpoint: {tmp_path / 'poisoned'}}}}}",
            f"rewards.profile={tmp_path / 'profile.yaml'}", "rewards.calibration.samples_per_prompt=2",
            f"data.prompts={tmp_path / 'prompts.txt'}", "train.steps=4", "train.groups_per_step=2",
            "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=2", "eval.seeds_per_prompt=1",
            "eval.constraint_samples_per_prompt=2", f"cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ValueError, match="non-finite"):  # calibration on held-out prompts meets magenta first
        run_training(load_config(None, args), tmp_path / "run0", progress=False)
    # calibrate with the oracle instead, then train with the poisoned model as the only reward
    cal_args = [a for a in args if not a.startswith("rewards.models")] + ["rewards.models={rm: {kind: oracle}}"]
    from orchestrator.inputs import calibration_path, ensure_calibration
    from orchestrator.pretraining import base_policy

    cal_cfg = load_config(None, cal_args)
    base = base_policy(cal_cfg, progress=False)
    cal = ensure_calibration(cal_cfg, base, {"rm": None})
    cfg = load_config(None, args)
    calibration_path(cfg, base, {"rm": str(tmp_path / "poisoned")}).write_bytes(cal.read_bytes())  # same τ for the run
    summary = run_training(cfg, tmp_path / "run", progress=False)
    ledger = summary["ledger"]
    assert ledger["dropped_data_error"] >= 1 and ledger["skipped_samples"] >= 4
    assert ledger["balanced"] and ledger["lost"] == 0 and summary["steps"] == 4
    # the held-out constraint check leaves the magenta clips out too, and says how many (3 prompts x 2 clips)
    assert summary["constraints"]["vq"]["skipped_samples"] == 6 and np.isfinite(summary["constraints"]["vq"]["final"])
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "--resume", str(tmp_path / "run"),
                          "model.dim=48"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    one_line_error(out, "cannot resume", "has shape")


NOT_A_SCORER = "class Thing:\n    pass\n\nclass WrongDims:\n    dims = ('a',)\n    version = '1'\n\n    def score(self, batch):\n        return {'b': [0.0] * len(batch['ids'])}\n"


@pytest.mark.parametrize("model, fragments", [
    ("{kind: clip}", ["rewards.models.x.kind", "'clip'"]),
    ("{kind: python, callable: 'no_such_module_xyz:Scorer'}", ["rewards.models.x", "cannot import 'no_such_module_xyz'"]),
    ("{kind: python, callable: 'plugin_bad:Thing', pythonpath: [DIR]}", ["'plugin_bad:Thing' is not a scorer"]),
    ("{kind: http, url: 'ftp://10.0.0.5/score'}", ["rewards.models.x", "'ftp://10.0.0.5/score' is not an http(s) URL"]),
    ("{kind: http, url: 'http://127.0.0.1:9', token_env: VIDEORL_NO_SUCH_TOKEN}",
     ["environment variable 'VIDEORL_NO_SUCH_TOKEN' is not set"]),
    ("{kind: oracle, url: 'http://127.0.0.1:9'}", ["url applies to kind http, not oracle"]),
])
def test_bad_reward_plugins(model, fragments, tmp_path):
    (tmp_path / "plugin_bad.py").write_text(NOT_A_SCORER)
    one_line_error(videorl_inproc("train", f"rewards.models={{x: {model.replace('DIR', str(tmp_path))}}}", tmp=tmp_path),
                   *fragments)


@pytest.mark.slow  # calibration runs once the cluster has started: a fresh process
def test_a_scorer_returning_the_wrong_dims_stops_the_run_at_calibration(tmp_path):
    (tmp_path / "plugin_bad.py").write_text(NOT_A_SCORER)
    (tmp_path / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    out = videorl("train", "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=5",
                  "pretrain.batch_size=8", "rollout.steps=2", "rollout.group_size=4",
                  f"rewards.models={{oracle: {{kind: oracle}}, x: {{kind: python, callable: 'plugin_bad:WrongDims', "
                  f"pythonpath: [{tmp_path}]}}}}", f"rewards.profile={tmp_path / 'profile.yaml'}",
                  "rewards.calibration.samples_per_prompt=1", "ray.num_cpus=2", tmp=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]  # after the progress lines of pretraining and calibration sampling
    assert last == "videorl: error: sample clip-0: WrongDims.score returned dims ['b'], expected ['a']", last
