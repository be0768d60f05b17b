"""Starting the run's actors on a Ray cluster: roles are data, placement is config (OpenRLHF, verl).

Names are readable in the dashboard: rollout-<i>, reward-<model>-<i>, learner, constraint-controller.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray._private.utils import get_dashboard_dependency_error

from actors.control import NAMESPACE, control_actor
from actors.controller import controller_actor
from actors.learner import LearnerGroup, learner_group
from actors.reward import reward_actor
from actors.rollout import rollout_actor
from orchestrator.config import Config, guidance_source
from orchestrator.reward_pool import RewardPool
from policy.backend import video_shape
from policy.learner import check_rewards
from policy.rollout import worker_options


def connect(cfg: Config, address: str | None = None) -> None:
    """Join the cluster at --address / ray.address / $RAY_ADDRESS, or start a local one; a local one runs the Ray
    dashboard on 127.0.0.1 when ray[default] is installed, and its URL is printed once."""
    if ray.is_initialized():
        return
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        return
    off = None if cfg.ray.dashboard else "ray.dashboard=false"
    if off is None and (missing := get_dashboard_dependency_error()):  # the check Ray makes: a minimal install has none
        off = f"pip install 'ray[default]' for it: {missing}"
    ctx = ray.init(address="local", num_cpus=cfg.ray.num_cpus, namespace=NAMESPACE, include_dashboard=off is None,
                   dashboard_host="127.0.0.1", log_to_driver=True, configure_logging=False)
    print(dashboard_line(ctx.dashboard_url, ctx.address_info["metrics_export_port"], off), flush=True)


def dashboard_line(url: str | None, metrics_port: int, off: str | None) -> str:
    """What a local run says about its dashboard (off: why not) and its Prometheus endpoint (README "Watching a run")."""
    metrics = f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics"
    return f"Ray dashboard: http://{url}  ({metrics})" if url else f"Ray dashboard: off ({off})  ({metrics})"


@dataclass
class RunActors:
    rollouts: list
    pools: dict[str, RewardPool]
    reward_names: dict[str, list[str]]  # pool -> reward names, in score-column order
    learner: object  # the learner group's rank 0: the one actor the loop calls
    controller: object
    control: object  # the named control actor `videorl scale` talks to
    learners: LearnerGroup
    prompt_table: list | None = None  # [ObjectRef] held for the run: restarted rollout actors read it again
    start_learners: Callable[[], LearnerGroup] | None = None  # a fresh learner group (restart after a death)

    def restart_learner(self) -> None:
        """Replace the learner group (every rank: a process group cannot take a newcomer) with a fresh one."""
        self.learners.shutdown()
        self.learners = self.start_learners()
        self.learner = self.learners.head

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self.learners.shutdown()
        for handle in [*self.rollouts, self.controller, self.control]:
            ray.kill(handle, no_restart=True)


CONTROLLER_CPUS = 0.05 + 0.01  # constraint-controller + videorl-control


def check_fits(cfg: Config) -> None:
    """Every actor must be placeable at once, or the run would wait forever for the last one."""
    need_cpu = (cfg.ray.rollout_workers * cfg.ray.rollout_cpus + cfg.ray.learner_workers * cfg.ray.learner_cpus
                + CONTROLLER_CPUS
                + sum(s.replicas * s.num_cpus for s in cfg.rewards.models.values()))
    need_gpu = (cfg.ray.rollout_workers * cfg.ray.rollout_gpus + cfg.ray.learner_workers * cfg.ray.learner_gpus
                + sum(s.replicas * s.num_gpus for s in cfg.rewards.models.values()))
    have = ray.cluster_resources()
    for what, need in (("CPU", need_cpu), ("GPU", need_gpu)):
        if need > have.get(what, 0.0) + 1e-9:
            raise ValueError(f"the run's actors need {need:g} {what}s but the cluster has {have.get(what, 0.0):g}: "
                             f"lower ray.rollout_workers / ray.learner_workers / ray.*_{what.lower()}s / "
                             f"rewards.models.*.num_{what.lower()}s")


def compute_slots(cfg: Config, cluster_cpus: float) -> int | None:
    """`ray.compute_slots` resolved on a cluster of `cluster_cpus` CPUs: the most rollout calls and learner updates
    the pipeline lets compute at once (None: no cap)."""
    slots = cfg.ray.compute_slots
    if slots != "auto":
        return slots
    if cfg.ray.rollout_gpus > 0 or cfg.ray.learner_gpus > 0:  # each actor computes on its own device
        return None
    return max(1, int(cluster_cpus // cfg.threads))


def guidance_kwargs(cfg: Config, reward_checkpoints: dict[str, str | None]) -> dict | None:
    """What a rollout worker needs to guide its sampler (rollout.guidance): the reward model's checkpoint, the
    dimension, w and β; None when unguided."""
    g = cfg.rollout.guidance
    if g is None:
        return None
    name, dim = guidance_source(cfg, g.reward, "rollout.guidance.reward")
    return {"checkpoint": reward_checkpoints[name], "dim": dim, "weight": g.weight, "beta": g.beta}


def start_actors(cfg: Config, base, reward_checkpoints: dict[str, str | None],
                 reward_dims: dict[str, tuple[str, ...]], taus: dict[str, float]) -> RunActors:
    """Every actor of a run (call `check_fits` first: an actor that cannot be placed waits forever).
    base: `orchestrator.pretraining.Base`; its prompt table goes to the store once and every rollout actor reads it."""
    # the learner's extra reward names (selective KL) are known to exist only now (a checkpoint's dims): before any actor
    check_rewards(cfg.learner, [s.prefix + d for n, s in cfg.rewards.models.items() for d in reward_dims[n]])
    base_path = None if base.path is None else str(base.path)
    table = None if base.prompt_table is None else [ray.put(base.prompt_table)]  # one copy in the store for all actors
    rollout_kwargs = dict(worker_options(cfg), prompt_table=table, guidance=guidance_kwargs(cfg, reward_checkpoints))
    rollouts = [rollout_actor(i, cfg.model, base_path, rollout_kwargs, num_cpus=cfg.ray.rollout_cpus,
                              num_gpus=cfg.ray.rollout_gpus) for i in range(cfg.ray.rollout_workers)]
    pools, names = {}, {}
    shape = (*video_shape(cfg.model), 3)
    for name, spec in cfg.rewards.models.items():
        def spawn(actor_name, spec=spec, ckpt=reward_checkpoints.get(name)):
            return reward_actor(actor_name, spec.kind, ckpt, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                delay_s=spec.delay_s, frame_shape=shape, options=spec.scorer_options())
        pools[name] = RewardPool(name, spawn, spec.replicas)
        names[name] = [spec.prefix + d for d in reward_dims[name]]
    def start_learners():
        return learner_group(cfg.model, base_path, cfg.learner.model_dump(), cfg.train.steps, cfg.train.seed,
                             workers=cfg.ray.learner_workers, placement=cfg.ray.placement,
                             num_cpus=cfg.ray.learner_cpus, num_gpus=cfg.ray.learner_gpus, base_key=base.key,
                             sum_norm=cfg.constraints.sum_norm)
    learners = start_learners()
    controller = controller_actor(cfg.constraints.model_dump(), taus)
    return RunActors(rollouts, pools, names, learners.head, controller, control_actor(list(pools)), learners, table,
                     start_learners)
