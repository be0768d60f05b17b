"""Run configuration: YAML validated into typed sections, with `key.sub=value` overrides.

A config is checked completely before any work starts: an unknown key, a value of the
wrong type or out of range, or settings that contradict each other raise `ConfigError`
with one line naming the key. Sections that belong to a module are defined next to the
code that uses them (`policy.model.ModelConfig`, `rewards.world.FlawConfig`) and composed here.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.autoscale import AutoscaleConfig
from orchestrator.chaos import ChaosConfig
from orchestrator.hashing import POLICY_CODE, code_version, fingerprint
from orchestrator.reward_training import EngagementConfig, RewardTrainConfig, VideoAlignTrainConfig
from policy.learner import LearnerConfig, check_rewards
from policy.model import ModelConfig
from policy.wan.config import WanConfig
from rewards.constraints import ConstraintsConfig
from rewards.curriculum import CurriculumConfig, check_curriculum_rewards
from rewards.preference import PreferenceDataConfig
from rewards.scorer import declared_dims, load_callable
from rewards.world import VOCAB, FlawConfig

SAMPLERS = ("ode", "flow_grpo", "dance_grpo", "sage", "cps")


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    prompts: str | None = None  # text file, one prompt a line; None = the world's training split
    sft_clips: int = Field(8192, gt=0)  # imperfect renders the base model is pretrained on
    flaws: FlawConfig = FlawConfig()
    seed: int = 0


class PretrainConfig(Section):
    steps: int = Field(3000, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(200, ge=0)
    ema: float = Field(0.999, ge=0, lt=1)
    causal_fraction: float = Field(0.5, ge=0, le=1)  # share of batches trained chunk-causally
    t_mean: float = 0.0  # logit-normal noise levels: sigmoid(N(t_mean, t_std)); > 0 favours high noise
    t_std: float = Field(1.0, gt=0)
    seed: int = 0


class DynamicGroupingConfig(Section):
    """Self-Paced GRPO's dynamic grouping: a scored group whose every trained reward has a within-group std below
    `min_std` carries no signal; it is dropped (ledger: low_signal) and its prompt re-sampled with a new seed, at
    most `max_resamples` times per prompt, after which it is trained as it is."""

    min_std: float = Field(gt=0)  # reward units
    max_resamples: int = Field(2, ge=1)


class GuidanceConfig(Section):
    """VideoAlign reward-guided sampling: v' = v − (t/(1−t))·(w/β)·∇_{x_t} r(x̂0) at every sampler step."""

    reward: str  # a reward name of a differentiable model (a videoreward model's prefix + dimension, e.g. ta)
    weight: float = Field(1.0, ge=0)  # w; 0 samples exactly as unguided
    beta: float = Field(1.0, gt=0)  # β, the KL temperature the weight is divided by


class RolloutConfig(Section):
    mode: Literal["bidirectional", "causal"] = "causal"
    dtype: Literal["float32", "bfloat16", "float64"] | None = None  # the rollout copy's model dtype; None = model.dtype
    sampler: Literal[SAMPLERS] = "sage"
    eta: float = Field(0.7, ge=0)
    steps: int = Field(8, gt=0)
    shift: float = Field(1.0, gt=0)
    group_size: int = Field(8, gt=0)
    # causal: each group draws a history of 0..n-1 chunks generated once and shared by its G candidates (Astrolabe);
    # false: the G candidates differ from the first frame (every group varies what the first chunk decides)
    shared_prefix: bool = True
    dynamic_grouping: DynamicGroupingConfig | None = None
    # streaming long tuning (Astrolabe, causal): rollouts up to this many frames; each group's shared history is
    # 0 .. (frames - model.frames) / chunk chunks, then the G candidates make one model.frames clip window, the one
    # rewarded and trained. None: one clip per rollout (history inside it, as shared_prefix says)
    frames: int | None = Field(None, gt=0)
    guidance: GuidanceConfig | None = None  # reward-guided rollouts (VideoAlign); None: the policy's own sampler
    # extra per-clip fields the rollout adds to every reward batch (`rewards.audio_sync.EXTRAS`): "beat", a per-frame
    # beat track from the prompt's speed, which the audio-sync scorer reads
    extras: list[Literal["beat"]] = Field(default_factory=list)
    # how rollout latents travel to the learner (policy.rollout.trajectory_payload); the learner casts them back to
    # float32 before any maths. float32: as sampled (no rounding); float16 / bfloat16 halve their bytes
    payload_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # groups one generate call to a rollout actor carries (orchestrator.pipeline): each call costs the driver ~0.8 ms
    # of CPU, so k groups per call cut that cost per group by k at many actors (and give a GPU rollout k groups at
    # once); the call's groups come back together, after k rollouts' time. train.deterministic needs 1
    groups_per_call: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _prefix_needs_causal(self):
        if not self.shared_prefix and self.mode != "causal":
            raise ValueError("rollout.shared_prefix=false applies to causal rollouts; a bidirectional group shares "
                             "no history")
        if self.frames is not None and self.mode != "causal":
            raise ValueError("rollout.frames (streaming long tuning) needs rollout.mode=causal: a bidirectional "
                             "clip is at most model.frames long")
        if self.frames is not None and not self.shared_prefix:
            raise ValueError("rollout.frames: streaming candidates share their history; drop rollout.shared_prefix=false")
        return self


VIDEOALIGN_KEYS = ("fps", "num_frames", "max_pixels", "aggregate", "normalize", "base", "rubric")


class RewardModelSpec(Section):
    """One reward model served by its own pool of actors (one replica per GPU on a cluster). Every kind is a scorer
    plug-in (`rewards.scorer`); `python` loads any class, `http` scores through a remote service."""

    kind: Literal["videoreward", "feedback", "oracle", "python", "http", "videoalign"]
    prefix: str = ""  # reward names are prefix + dimension (the oracle monitors as oracle_vq, ...)
    replicas: int = Field(1, ge=1)
    autoscale: AutoscaleConfig | None = None  # grow/shrink replicas with the reward backlog
    num_cpus: float = Field(0.2, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    checkpoint: str | None = None  # None: trained by videorl and cached
    delay_s: float = Field(0.0, ge=0)  # simulated device time per batch (benchmarks)
    # groups in a row dropped for infrastructure errors of this model (its pool's retries spent) that end the run
    max_consecutive_failures: int = Field(3, ge=1)
    callable: str | None = None  # python: "pkg.module:Class", a scorer class
    kwargs: dict[str, Any] = Field(default_factory=dict)  # python: the class's constructor arguments
    pythonpath: list[str] = Field(default_factory=list)  # python: directories put first on sys.path where it loads
    url: str | None = None  # http: the reward service, e.g. http://10.0.0.5:8000 (`videorl reward serve`)
    token_env: str | None = None  # http: environment variable holding a bearer token
    retries: int = Field(3, ge=0)  # http: retries of a batch (5xx, connection errors) before the pool retries it
    # videoalign (`rewards.videoalign.VideoAlignScorer`; checkpoint: a VideoAlign directory): None keeps the
    # checkpoint's model_config.json frame sampling
    fps: float | None = Field(None, gt=0)  # frames sampled per second of video (the world renders 8)
    num_frames: int | None = Field(None, ge=1)  # a fixed frame count instead of fps
    max_pixels: int | None = Field(None, ge=28 * 28)  # per-frame pixel budget after resizing
    aggregate: Literal["clip", "astrolabe", "vq_top_frames", "mq_grayscale"] = "clip"  # Astrolabe's aggregators
    normalize: bool = True  # (r - mean) / std with the checkpoint's inference_config stats, when it has them
    base: str | None = None  # LoRA checkpoint: the base weights (HF directory or hub id), else model_config.json's
    rubric: str | None = None  # the prompt template ({prompt}, {vq}, {mq}, {ta}); None: rewards.videoalign.RUBRIC

    @model_validator(mode="after")
    def _kind_settings(self):
        own = {"python": ("callable", "kwargs", "pythonpath"), "http": ("url", "token_env", "retries"),
               "videoalign": VIDEOALIGN_KEYS}
        for kind, keys in own.items():
            # not "set": a resolved config.yaml (a resumed run) spells out every default
            given = [k for k in keys if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
            if self.kind != kind and given:
                raise ValueError(f"{given[0]} applies to kind {kind}, not {self.kind}")
        if self.kind == "python":
            if not self.callable:
                raise ValueError("kind python needs callable: 'pkg.module:Class'")
            load_callable(self.callable, self.pythonpath)  # does it import, is it a scorer: before any work
        if self.kind == "http":
            from rewards.reward_http import check_url, read_token

            check_url(self.url)
            read_token(self.token_env)
        if self.kind == "videoalign":
            if not self.checkpoint:
                raise ValueError("kind videoalign needs checkpoint: a VideoAlign checkpoint directory (`videorl reward "
                                 "train --model videoalign` writes one)")
            if self.fps is not None and self.num_frames is not None:
                raise ValueError("fps and num_frames both set: frames are sampled by one of them")
            if self.rubric is not None:
                from rewards.videoalign import check_rubric

                check_rubric(self.rubric)
        return self

    def scorer_options(self) -> dict:
        """What `rewards.scorer.RewardScorer` needs beyond kind and checkpoint."""
        if self.kind == "python":
            return {"callable": self.callable, "kwargs": dict(self.kwargs), "pythonpath": list(self.pythonpath)}
        if self.kind == "http":
            return {"url": self.url, "token_env": self.token_env, "retries": self.retries}
        if self.kind == "videoalign":
            return {k: getattr(self, k) for k in VIDEOALIGN_KEYS}
        return {}


def _default_reward_models() -> dict[str, RewardModelSpec]:
    return {
        "videoreward": RewardModelSpec(kind="videoreward"),
        "feedback": RewardModelSpec(kind="feedback"),
        "oracle": RewardModelSpec(kind="oracle", prefix="oracle_", num_cpus=0.1),  # monitoring only
    }


class CalibrationConfig(Section):
    # 24 held-out prompts x 200 = 4800 clips: the seed-to-seed spread of τ is ~0.04σ (mean and σ both vary)
    samples_per_prompt: int = Field(200, gt=0)
    seed: int = 0


class RewardsConfig(Section):
    models: dict[str, RewardModelSpec] = Field(default_factory=_default_reward_models)
    profile: str = "video_generation"  # configs/profiles/<name>.yaml or a path: primary reward and constraints
    preference: PreferenceDataConfig = PreferenceDataConfig()
    reward_model: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
    engagement: EngagementConfig = EngagementConfig()
    videoalign: VideoAlignTrainConfig = VideoAlignTrainConfig()  # `videorl reward train --model videoalign`
    calibration: CalibrationConfig = CalibrationConfig()
    curriculum: CurriculumConfig | None = None  # Self-Paced GRPO channel weights over these rewards


def configured_dims(spec: RewardModelSpec, rewards: RewardsConfig) -> tuple[str, ...]:
    """The dimensions a reward model scores as the config says (a given videoreward checkpoint: those trained here;
    its own config.json decides once it is loaded); () when only the built scorer knows (a python class without
    class-level dims, an http service)."""
    if spec.kind == "python":
        return declared_dims(load_callable(spec.callable, spec.pythonpath)) or ()
    if spec.kind == "http":
        return ()
    fixed = {"oracle": ("vq", "mq", "ta"), "videoalign": ("vq", "mq", "ta"), "feedback": ("feedback",)}
    return fixed.get(spec.kind, tuple(rewards.reward_model.model.dims))


def known_reward_names(rewards: RewardsConfig) -> set[str] | None:
    """The reward names the run's models give, from the config alone; None when a given videoreward checkpoint or a
    plug-in decides its dimensions (then they are checked once the scorers are built)."""
    if any(s.kind == "videoreward" and s.checkpoint or not configured_dims(s, rewards) for s in rewards.models.values()):
        return None
    return {s.prefix + d for s in rewards.models.values() for d in configured_dims(s, rewards)}


class TrainConfig(Section):
    steps: int = Field(60, gt=0)
    groups_per_step: int = Field(4, gt=0)  # prompts per learner step; each brings rollout.group_size clips
    max_staleness: int = Field(1, ge=0)
    checkpoint_every: int = Field(10, gt=0)
    seed: int = 0
    run_dir: str = "runs/tiny"
    # one rollout actor (ray.rollout_workers is ignored), rollouts started only while the learner waits for a batch,
    # each group's rollout and rewards awaited in order, global RNGs seeded from `seed`: two runs of one config give
    # the same weights and metrics (timing columns aside), and so does a run killed and resumed
    deterministic: bool = False
    # a learner group that dies more often than this without the run reaching a new checkpoint ends it
    max_learner_restarts: int = Field(3, ge=0)


class RayConfig(Section):
    address: str | None = None  # None: $RAY_ADDRESS, else a local cluster
    rollout_workers: int = Field(2, ge=1)
    rollout_cpus: float = Field(0.4, gt=0)
    rollout_gpus: float = Field(0.0, ge=0)
    learner_cpus: float = Field(0.3, gt=0)  # per learner rank (Ray accounting; torch runs `threads` threads)
    learner_gpus: float = Field(0.0, ge=0)  # per learner rank
    learner_workers: int = Field(1, ge=1)  # learner ranks (learner.parallel: ddp replicas or fsdp2 shards)
    placement: Literal["pack", "spread"] = "pack"  # the learner ranks' placement group strategy
    num_cpus: int | None = None  # local cluster size (None: all cores)
    dashboard: bool = True  # a local cluster runs the Ray dashboard (off: its processes' CPU stays with the run)
    # the most rollout calls and learner updates computing at once. More busy actors than cores only time-slice
    # (2 rollout actors + the learner on 2 cores: the pipeline 6-13% slower uncapped, README), so "auto" caps it at
    # the cluster's CPUs / `threads` when the policy runs on CPUs (rollout_gpus = learner_gpus = 0), and sets no cap
    # on GPUs; null: no cap; N: N (orchestrator.cluster.compute_slots)
    compute_slots: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"


class WeightsConfig(Section):
    """How each new version reaches the rollout actors (orchestrator.pipeline): `object_store`, one object per
    version that every actor fetches; `broadcast`, learner rank 0 sends whole tensors over a process group of its own
    in buckets of bucket_mb (NCCL on GPU, gloo on CPU); `auto`, broadcast for full weights when the learner and
    the rollout actors have GPUs, the object store otherwise (LoRA adapters are small)."""

    sync: Literal["auto", "object_store", "broadcast"] = "auto"
    bucket_mb: float = Field(64.0, gt=0)
    # broadcast: a member waiting longer for a bucket (a peer died mid-version) gives up; the next version goes over
    # a new group, and the actors that missed this one run on their previous version meanwhile
    timeout_s: float = Field(60.0, gt=0)


class EvalConfig(Section):
    sampler: Literal[SAMPLERS] = "ode"
    eta: float = Field(0.0, ge=0)
    steps: int = Field(16, gt=0)
    shift: float = Field(1.0, gt=0)  # the sampling schedule's shift (Self-Forcing: 4 steps at shift 5)
    seeds_per_prompt: int = Field(4, gt=0)
    seed: int = 1234
    # the trained policy's constraint check: clips per held-out prompt, drawn like the calibration's
    constraint_samples_per_prompt: int = Field(32, gt=0)


MODEL_KINDS = ("videodit", "wan", "wan_causal")
DEFAULT_KINDS = {"model": "videodit"}  # a section's kind when its YAML names none
PolicyConfig = Annotated[Union[ModelConfig, WanConfig], Field(discriminator="kind")]


class Config(Section):
    model: PolicyConfig = ModelConfig(vocab=VOCAB)
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig | None = PretrainConfig()  # null: the base is model.path as it is (Wan)
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    constraints: ConstraintsConfig = ConstraintsConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    chaos: ChaosConfig = ChaosConfig()
    weights: WeightsConfig = WeightsConfig()
    eval: EvalConfig = EvalConfig()
    cache_dir: str | None = None  # None: $VIDEORL_CACHE or ~/.cache/videorl
    threads: int = Field(1, ge=1)  # torch threads per process while the actors compute; more oversubscribes small ops
    # torch threads of the driver's own compute, which runs while no actor computes (pretraining, preference data,
    # reward models, calibration, evaluation); None: $OMP_NUM_THREADS, else every core this process may use
    driver_threads: int | None = Field(None, ge=1)
    # one seed for every random choice of a run (data, pretraining, preference pairs, reward models, users,
    # calibration, training) where the section sets none itself; eval.seed stays: runs share one held-out draw
    seed: int | None = None

    def weight_sync(self) -> str:
        """`weights.sync` resolved: "broadcast" or "object_store"."""
        if self.weights.sync != "auto":
            return self.weights.sync
        from policy.backend import uses_lora

        on_gpus = self.ray.learner_gpus > 0 and self.ray.rollout_gpus > 0
        return "broadcast" if on_gpus and not uses_lora(self.model) else "object_store"

    def driver_torch_threads(self) -> int:
        """`driver_threads` resolved (see the key)."""
        if self.driver_threads is not None:
            return self.driver_threads
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)
        return usable_cores()

    def seeded_sections(self) -> list[BaseModel]:
        """The sections whose `seed` the top-level seed sets."""
        r = self.rewards
        return [self.data, *([self.pretrain] if self.pretrain else []), r.preference, r.reward_model, r.engagement,
                r.videoalign, r.calibration, self.train]

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.seed is not None:
            for section in self.seeded_sections():
                if "seed" not in section.model_fields_set:
                    section.seed = self.seed
        if self.model.kind == "videodit" and self.model.vocab != VOCAB:
            missing = sorted(set(VOCAB) - set(self.model.vocab))
            if missing:
                raise ValueError(f"model.vocab lacks the world's words {missing}")
        if self.pretrain is None and self.model.kind == "videodit":
            raise ValueError("pretrain: null needs a model with weights of its own (model.kind wan/wan_causal with "
                             "model.path); a videodit base is pretrained")
        if self.model.kind != "videodit" and self.model.path is None:
            if self.model.init is None:
                raise ValueError("model.path is required for Wan models (or model.init, to start from a random model)")
            self.model.path = str(cache_dir(self) / f"wan-init-{self.model.init.preset}-{self.model.init.seed}")
        if self.train.deterministic and self.rollout.groups_per_call != 1:
            raise ValueError("train.deterministic handles one group at a time: set rollout.groups_per_call=1")
        if self.model.kind == "wan" and self.rollout.mode != "bidirectional":
            raise ValueError("model.kind=wan attends over the whole clip: set rollout.mode=bidirectional "
                             "(or model.kind=wan_causal for chunk-causal streaming)")
        if self.rollout.group_size < 2 and self.learner.loss in ("flow_dpo", "sft"):
            raise ValueError(f"rollout.group_size={self.rollout.group_size}: learner.loss={self.learner.loss} needs a "
                             "winner (and a loser) in each group, so groups of at least 2")
        if self.constraints.sum_norm and self.learner.loss in ("flow_dpo", "sft"):
            raise ValueError(f"constraints.sum_norm rescales advantages, which learner.loss={self.learner.loss} only "
                             "ranks within each group: it would change nothing")
        if self.rollout.group_size < 2 and self.learner.advantage in ("grpo", "gdpo"):
            raise ValueError(f"rollout.group_size={self.rollout.group_size}: {self.learner.advantage} needs groups of at least 2")
        if self.learner.loss == "ppo" and self.rollout.sampler == "ode":
            raise ValueError("learner.loss=ppo needs a stochastic rollout.sampler (ode steps have no log-probability)")
        if self.rewards.curriculum is not None and (known := known_reward_names(self.rewards)) is not None:
            check_curriculum_rewards(self.rewards.curriculum, known)
        if self.learner.selective_kl is not None and (known := known_reward_names(self.rewards)) is not None:
            check_rewards(self.learner, known)  # a given videoreward checkpoint: checked when the actors start
        return self

    @model_validator(mode="after")
    def _streaming_and_guidance(self) -> Config:
        r, m = self.rollout, self.model
        if r.frames is not None:
            if m.kind != "videodit":
                raise ValueError(f"rollout.frames (streaming long tuning) is implemented for model.kind=videodit, "
                                 f"not {m.kind}")
            if r.frames % m.chunk or r.frames < m.frames:
                raise ValueError(f"rollout.frames={r.frames} must be a multiple of model.chunk={m.chunk} and at "
                                 f"least model.frames={m.frames}")
        if r.guidance is not None:
            if m.kind != "videodit":
                raise ValueError(f"rollout.guidance differentiates a pixel-space reward through x̂0: model.kind="
                                 f"videodit (latents are pixels), not {m.kind}")
            if self.learner.loss == "ppo":
                raise ValueError("rollout.guidance with learner.loss=ppo: the recorded log-probs are the guided "
                                 "sampler's, so the importance ratio of the unguided policy would not start at 1; use "
                                 "a loss on the clean clips (nft, flow_dpo, flow_rwr, sft)")
            guidance_source(self, r.guidance.reward, "rollout.guidance.reward")
        return self


DIFFERENTIABLE_KINDS = ("videoreward",)  # the oracle measures pixels by thresholds; feedback mixes sampled clicks


def guidance_source(cfg: Config, reward: str, key: str = "--guidance") -> tuple[str, str]:
    """The (reward model name, dimension) behind reward name `reward` (prefix + dimension), which must come from a
    differentiable model; ValueError naming `key` otherwise. A given videoreward checkpoint may have any of vq, mq,
    ta (the guide checks its config.json when it loads it)."""
    found = {spec.prefix + d: (name, spec.kind, d) for name, spec in cfg.rewards.models.items()
             for d in (("vq", "mq", "ta") if spec.kind == "videoreward" and spec.checkpoint
                       else configured_dims(spec, cfg.rewards))}
    if reward not in found:
        raise ValueError(f"{key}: unknown reward {reward!r}; this config's rewards are {sorted(found)}")
    name, kind, dim = found[reward]
    if kind not in DIFFERENTIABLE_KINDS:
        usable = sorted(r for r, (_, k, _) in found.items() if k in DIFFERENTIABLE_KINDS)
        raise ValueError(f"{key}: reward {reward!r} comes from rewards.models.{name} (kind {kind}), which is not "
                         f"differentiable; guide with a videoreward dimension ({', '.join(usable) or 'none configured'})")
    if not cfg.rewards.models[name].checkpoint and cfg.rewards.reward_model.ensemble:
        raise ValueError(f"{key}: guidance takes its gradient through one VideoReward model, and "
                         f"rewards.reward_model.ensemble makes rewards.models.{name} an ensemble; guide without it "
                         f"or give rewards.models.{name}.checkpoint one trained model")
    return name, dim


def default_config_path() -> Path:
    """configs/tiny.yaml, from the working directory when present (ray job --working-dir), else the package."""
    local = Path("configs/tiny.yaml")
    if local.is_file():
        return local
    return Path(str(resources.files("configs") / "tiny.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = list(e["loc"])
        if loc[:1] == ["model"] and len(loc) > 1 and loc[1] in MODEL_KINDS:  # the union's tag is not a key
            loc.pop(1)
        key = ".".join(str(p) for p in loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config key '{key}'")
        elif isinstance(e.get("input"), dict) or not key:  # a whole section: the message names the keys
            parts.append(f"{key + ': ' if key else ''}{msg}")
        else:
            parts.append(f"{key}: {msg} (got {e.get('input')!r})")
    return "; ".join(parts)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict; `base: other.yaml` (relative to this file) is read first and deep-merged under it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml(path.parent / base, (*seen, path.resolve()))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(into: dict, update: dict) -> None:
    """Merge `update` into `into`; a section of another `kind` (model, reward model) replaces the base's outright,
    since the two kinds take different keys. A section without `kind` keeps the base's (`model`: videodit)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            kind = into[key].get("kind", DEFAULT_KINDS.get(key))
            if value.get("kind", kind) == kind:
                _deep_merge(into[key], value)
                continue
        into[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML at `path` (default configs/tiny.yaml), apply overrides, validate."""
    path = Path(path) if path else default_config_path()
    raw = _read_yaml(path)
    rewards = raw.setdefault("rewards", {})
    if isinstance(rewards, dict) and "models" not in rewards:  # `rewards.models.X.replicas=3` tunes a default model
        rewards["models"] = {n: s.model_dump(mode="json", exclude_unset=True) for n, s in _default_reward_models().items()}
    for text in overrides:
        apply_override(raw, *parse_override(text))
    model = raw.setdefault("model", {})
    if isinstance(model, dict):
        if model.setdefault("kind", DEFAULT_KINDS["model"]) == "videodit":
            model.setdefault("vocab", VOCAB)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {path}: {_format_error(e)}") from None


def cache_dir(cfg: Config) -> Path:
    root = cfg.cache_dir or os.environ.get("VIDEORL_CACHE") or Path.home() / ".cache" / "videorl"
    return Path(root)


BASE_CODE = (*POLICY_CODE, "policy.pretrain", "rewards.world", "orchestrator.pretraining")


def model_source_key(cfg: Config) -> str:
    """Hash of the files a Wan model starts from (model.path, model.checkpoint); "" for videodit (random init)."""
    if cfg.model.kind == "videodit":
        return ""
    from orchestrator.hashing import tree_sha256

    parts = [tree_sha256(cfg.model.path)] + ([tree_sha256(cfg.model.checkpoint)] if cfg.model.checkpoint else [])
    return ":".join(parts)


def base_checkpoint_dir(cfg: Config) -> Path:
    """Where `videorl pretrain` puts (and later commands find) the base model for this config."""
    from policy.backend import base_model_config

    key = fingerprint(base_model_config(cfg.model), cfg.data, cfg.pretrain or "none", model_source_key(cfg),
                      code_version(*BASE_CODE))
    return cache_dir(cfg) / f"base-{key}"


def base_key(cfg: Config, base: Path | None) -> str:
    """Content key of the base the run starts from: the model as sampled (frames, window, dtype, ...) and its weights
    (the pretrained directory, or the model's own files)."""
    from orchestrator.hashing import tree_sha256
    from policy.backend import base_model_config

    return fingerprint(base_model_config(cfg.model), tree_sha256(base) if base is not None else model_source_key(cfg))
