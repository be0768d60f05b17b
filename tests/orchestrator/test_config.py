import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, base_checkpoint_dir, load_config, usable_cores

ROOT = Path(__file__).resolve().parents[2]


def videorl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_default_config_is_tiny_yaml():
    cfg = load_config()
    assert cfg.model.frames >= 8 and cfg.model.size >= 16
    assert cfg.rollout.group_size > 1


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["rollout.group_size=4", "rollout.sampler=cps", "data.flaws.p_noise=0.5"])
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.sampler == "cps"
    assert cfg.data.flaws.p_noise == 0.5


@pytest.mark.parametrize(
    "override, names",
    [
        ("rollout.group_sizee=3", "unknown config key 'rollout.group_sizee'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("rollout.group_size=-2", "rollout.group_size"),
        ("rollout.sampler=euler", "rollout.sampler"),
        ("pretrain.steps=many", "pretrain.steps"),
        ("model.patch=5", "patch"),
        ("ray.compute_slots=0", "ray.compute_slots"),
        ("ray.compute_slots=some", "ray.compute_slots"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_deterministic_runs_take_one_group_per_rollout_call():
    assert load_config(None, ["rollout.groups_per_call=4"]).rollout.groups_per_call == 4
    with pytest.raises(ConfigError, match="rollout.groups_per_call=1"):
        load_config(None, ["train.deterministic=true", "rollout.groups_per_call=2"])
    with pytest.raises(ConfigError, match="rollout.groups_per_call"):
        load_config(None, ["rollout.groups_per_call=0"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["rollout.group_size"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cache_key_follows_what_shapes_the_base_model():
    a, b = load_config(), load_config(None, ["eval.steps=3"])
    c = load_config(None, ["pretrain.steps=7"])
    assert base_checkpoint_dir(a) == base_checkpoint_dir(b)  # eval settings do not retrain
    assert base_checkpoint_dir(a) != base_checkpoint_dir(c)


def test_cli_help_lists_subcommands():
    out = videorl("--help")
    assert out.returncode == 0
    for name in ("pretrain", "eval", "bench"):
        assert name in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "rollout.group_sizee=3"], "unknown config key 'rollout.group_sizee'"),
        (["pretrain", "rollout.group_size=-1"], "rollout.group_size"),
        (["pretrain", "rollout.mode=bidirectional", "rollout.shared_prefix=false"],
         "rollout.shared_prefix=false applies to causal rollouts"),
        (["eval", "--checkpoint", "/nonexistent/model.safetensors"], "checkpoint not found: /nonexistent/model.safetensors"),
    ],
)
def test_cli_user_errors_exit_nonzero_with_one_line(args, message):
    out = videorl(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_model_kind_picks_the_section_and_a_section_of_another_kind_replaces_the_base(tmp_path):
    wan = load_config(ROOT / "configs/wan_shapes.yaml", [f"cache_dir={tmp_path}"])
    assert wan.model.kind == "wan_causal" and not hasattr(wan.model, "dim")  # tiny.yaml's VideoDiT keys are gone
    assert wan.model.path == str(tmp_path / "wan-init-shapes-0")  # model.init: a random model in the cache
    assert wan.rewards == load_config().rewards and wan.constraints == load_config().constraints
    with pytest.raises(ConfigError, match="unknown config key 'model.dim'"):
        load_config(ROOT / "configs/wan_shapes.yaml", ["model.dim=8"])
    # a child naming the base's own (default) kind merges into it: tiny.yaml's qk_norm and window survive
    (tmp_path / "child.yaml").write_text(f"base: {ROOT / 'configs/tiny.yaml'}\nmodel: {{kind: videodit, sink: 2}}\n")
    child, tiny = load_config(tmp_path / "child.yaml"), load_config()
    assert child.model.sink == 2 and child.model.model_dump(exclude={"sink"}) == tiny.model.model_dump(exclude={"sink"})
    with pytest.raises(ConfigError, match="model.kind=wan attends over the whole clip: set rollout.mode=bidirectional"):
        load_config(ROOT / "configs/wan_shapes.yaml", ["model.kind=wan", "model.chunk=null", "model.window=null",
                                                       "model.sink=0"])
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(ROOT / "configs/wan_shapes.yaml", ["model.init=null"])
    from policy.backend import check_policy_config

    check_policy_config(wan.model)  # writes the random model on first use
    assert (tmp_path / "wan-init-shapes-0" / "transformer" / "config.json").is_file()
    key = base_checkpoint_dir(wan)
    import shutil

    shutil.rmtree(tmp_path / "wan-init-shapes-0")
    check_policy_config(load_config(ROOT / "configs/wan_shapes.yaml", [f"cache_dir={tmp_path}", "model.init.seed=1"]).model)
    assert base_checkpoint_dir(load_config(ROOT / "configs/wan_shapes.yaml", [f"cache_dir={tmp_path}",
                                                                                "model.init.seed=1"])) != key


def test_ablation_configs_extend_tiny_and_differ_only_in_the_controller():
    pid, dual = load_config(ROOT / "configs/ablation_pid.yaml"), load_config(ROOT / "configs/ablation_dual.yaml")
    tiny = load_config()
    assert pid.constraints.controller == "pid" and dual.constraints.controller == "dual"
    for cfg in (pid, dual):
        assert cfg.train.steps == tiny.train.steps and cfg.model == tiny.model and cfg.rollout == tiny.rollout


def test_base_include_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_cache_keys_change_with_the_code_that_makes_the_cached_thing(tmp_path, monkeypatch):
    from orchestrator.hashing import code_version

    (tmp_path / "made_by.py").write_text("WIDTH = 64\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_version("made_by")
    assert code_version("made_by") == before and code_version("made_by", "rewards.world") != before
    (tmp_path / "made_by.py").write_text("WIDTH = 96\n")  # e.g. a reward model class changed shape
    assert code_version("made_by") != before
    with pytest.raises(ValueError, match="no_such_module"):
        code_version("no_such_module")


def test_the_base_does_not_depend_on_lora_or_how_the_learner_runs(tmp_path):
    wan = ROOT / "configs/wan_shapes.yaml"
    a = load_config(wan, [f"cache_dir={tmp_path}"])
    for same in (["model.lora.rank=4"], ["model.lora=null"], ["model.gradient_checkpointing=true"]):
        assert base_checkpoint_dir(load_config(wan, [f"cache_dir={tmp_path}", *same])) == base_checkpoint_dir(a)
    assert base_checkpoint_dir(load_config(wan, [f"cache_dir={tmp_path}", "model.window=4"])) != base_checkpoint_dir(a)


def test_without_pretraining_the_base_key_follows_the_model_as_sampled(tmp_path):
    """Calibration, preference data and resumes key on the base: with `pretrain: null` that is the model's files and
    every setting that changes its samples (not LoRA, which starts as the identity)."""
    from orchestrator.config import base_key
    from policy.wan.init import write_random_model

    for seed in (0, 1):
        write_random_model(tmp_path / f"D{seed}", "shapes", seed=seed)

    def key(*more, path=tmp_path / "D0"):
        return base_key(load_config(ROOT / "configs/wan_shapes.yaml", [f"model.path={path}", "pretrain=null", *more]),
                        None)
    assert key() == key() and key("model.lora={rank: 4}") == key()
    keys = {key(), key("model.window=4"), key("model.frames=4"), key("model.dtype=float64"), key(path=tmp_path / "D1")}
    assert len(keys) == 5


def test_top_level_seed_sets_every_section_seed_the_config_leaves_unset():
    cfg = load_config(None, ["seed=3", "train.seed=7"])
    r = cfg.rewards
    assert (cfg.data.seed, cfg.pretrain.seed, r.preference.seed, r.reward_model.seed, r.engagement.seed,
            r.calibration.seed) == (3, 3, 3, 3, 3, 3)
    assert cfg.train.seed == 7  # set explicitly: kept
    assert cfg.eval.seed == load_config().eval.seed  # every run is judged on the same held-out draw
    assert {s.seed for s in load_config().seeded_sections()} == {0}


@pytest.mark.parametrize("overrides, sync", [
    ([], "object_store"),  # the embedded default: CPUs
    (["ray.learner_gpus=1", "ray.rollout_gpus=1"], "broadcast"),  # full weights between GPUs
    (["ray.learner_gpus=1", "ray.rollout_gpus=1", "weights.sync=object_store"], "object_store"),
    (["weights.sync=broadcast"], "broadcast"),
])
def test_weights_sync_auto_broadcasts_full_weights_between_gpus(overrides, sync):
    assert load_config(None, overrides).weight_sync() == sync


@pytest.mark.parametrize("overrides, cpus, slots", [
    ([], 2, 2),  # the embedded default on 2 cores: one rollout call or update per core
    (["threads=2"], 8, 4),  # each process computes on 2 threads
    (["threads=4"], 2, 1),
    (["ray.rollout_gpus=0.5", "ray.learner_gpus=1"], 16, None),  # the policy on GPUs: no cap
    (["ray.compute_slots=3"], 2, 3),
    (["ray.compute_slots=null"], 2, None),
])
def test_compute_slots_auto_is_the_cores_of_a_cpu_only_cluster(overrides, cpus, slots):
    from orchestrator.cluster import compute_slots

    assert compute_slots(load_config(None, overrides), cpus) == slots


def test_weights_settings_reach_the_broadcast_group():
    """weights.bucket_mb / timeout_s and the staleness window shape the run's BroadcastSync (the object store: none)."""
    from types import SimpleNamespace

    from orchestrator.train import _weight_sync

    cfg = load_config(None, ["weights.sync=broadcast", "weights.bucket_mb=2", "weights.timeout_s=7",
                             "train.max_staleness=3"])
    sync = _weight_sync(cfg, SimpleNamespace(learner=None))
    assert (sync.bucket_bytes, sync.timeout_s, sync.keep) == (2 << 20, 7.0, 5)
    assert _weight_sync(load_config(None, []), SimpleNamespace(learner=None)) is None


def test_driver_threads_come_from_the_key_then_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert load_config(None, []).driver_torch_threads() == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert load_config(None, []).driver_torch_threads() == 1
    assert load_config(None, ["driver_threads=3"]).driver_torch_threads() == 3
    with pytest.raises(ConfigError, match="driver_threads"):
        load_config(None, ["driver_threads=0"])


@pytest.mark.slow
def test_pretraining_runs_on_the_driver_threads(tmp_path):
    small = ["model.dim=16", "model.depth=1", "data.sft_clips=32", "pretrain.steps=2", "pretrain.batch_size=2"]
    for threads in (1, 2):
        cache = tmp_path / f"cache{threads}"
        done = videorl("pretrain", *small, f"driver_threads={threads}", f"cache_dir={cache}")
        assert done.returncode == 0, done.stderr[-2000:]
        (record,) = cache.glob("base-*/pretrain.json")
        assert json.loads(record.read_text())["threads"] == threads
