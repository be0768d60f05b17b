"""`videorl bench pipeline`: what the actor pipeline buys over a synchronous loop, and what it costs.

Two measurements (both need a connected Ray cluster; neither prints):
- real: the same work done twice in one process -- synchronously (rollout every group, then score
  them, then one learner step, as flow_grpo and DanceGRPO do) and through the actor pipeline
  (rollout actors -> reward pool -> learner actor, rollout running ahead within the staleness
  bound; with `ray.compute_slots` capping what computes at once, and once more without the cap). Both use the
  untrained policy of the config (time per step does not depend on the weights) and the
  oracle reward, so nothing needs to be cached. Reported: clips/s each way and their ratio.
- simulated: the real Pipeline, RewardPool, StalenessManager and Ledger drive actors whose device
  time is a given sleep (actors/simulated.py), so orchestration overhead is measured, not CPU
  contention. Reported: steady-state groups/s against the bound of the slowest stage,
      bound = min(n_rollout / rollout_s, reward_replicas / reward_s, groups_per_step / learner_s),
  efficiency = achieved / bound, per-stage utilisation and the ledger balance. The reward pool is
  resized mid-run the way `videorl train` resizes it (by hand through the control actor, or by the
  autoscaler), and reward throughput is reported per run of steps at one replica count.
Throughput is counted in steady state: from the end of step `warmup_steps` to the end of the run;
actor start-up is excluded (every actor answers a ping before the clock starts).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import ray

from orchestrator.autoscale import AutoscaleConfig, scale_step
from orchestrator.completions import Completions
from orchestrator.ledger import Ledger
from orchestrator.pipeline import Pipeline, PromptCursor
from orchestrator.reward_pool import RewardPool
from orchestrator.staleness import StalenessManager

SIM_COLUMNS = ["actors", "bound", "throughput", "efficiency", "sync_throughput", "speedup", "stale_fraction",
               "driver_ms_per_group", "rollout_calls_per_group", "reward_calls_per_group", "bottleneck", "idle_rollout",
               "idle_reward", "idle_learner", "balanced", "seconds"]
SIM_STEP_COLUMNS = ["step", "seconds", "reward_replicas", "reward_groups_per_s", "groups_per_s"]
SCALE_COLUMNS = ["reward_replicas", "first_step", "last_step", "measured_from_step", "reward_groups_per_s"]
REAL_COLUMNS = ["loop", "clips_per_s", "seconds_per_step", "ratio_vs_sync", "measured_steps", "clips", "busy_peak"]


def drive(pipe: Pipeline, learner, steps: int, groups_per_step: int, primary: str, pool: RewardPool | None = None,
          control=None, rules: dict | None = None, scale_at: dict[int, int] | None = None,
          count_processes: bool = False) -> list[dict]:
    """The training loop (orchestrator/train.py) without metrics or constraints: `Pipeline.learner_step` per step.
    With a `control` actor the reward pools are resized before every step as train_loop resizes them
    (`autoscale.scale_step`: requests from `videorl scale`, else the autoscaling `rules`); `scale_at` {step: n} sends the request `videorl scale
    --reward <pool>=n` would send, at that step. New replicas are not waited for.

    Returns one mark per step boundary (len steps + 1): {"t": perf_counter s, "cpu": the driver's CPU s, "scored":
    batches the pool has scored, "busy": rollout busy seconds, "replicas": pool size during the step that ended,
    "replicas_up": whether every replica added so far has answered a ping, "clocks": `Pipeline.clocks()`, "stale":
    groups dropped as stale so far, "produced": groups produced so far}; with `count_processes`, "processes":
    `process_cpu()` (off by default: listing processes would count in the driver's own CPU).
    """
    scale_at, rules, streaks, starting = scale_at or {}, rules or {}, {}, []
    if scale_at and control is None:
        raise ValueError("scale_at needs a control actor to send its requests to")

    def mark() -> dict:
        up = not starting or len(ray.wait(starting, num_returns=len(starting), timeout=0)[0]) == len(starting)
        return {"t": time.perf_counter(), "cpu": time.process_time(),  # the driver's own CPU seconds
                "main_cpu": time.thread_time(), "machine_cpu": _machine_cpu(),
                "scored": pool.counters.scored if pool else 0, "calls": pool.counters.calls if pool else 0,
                "rollout_calls": pipe.calls,
                "busy": pipe.rollout_busy_s,
                "replicas": pool.size if pool else 0, "replicas_up": up, "clocks": pipe.clocks(),
                "stale": pipe.ledger.balance(set()).get("dropped_stale", 0), "produced": len(pipe.ledger.produced),
                **({"processes": process_cpu()} if count_processes else {})}

    pipe.publish_from(learner, 0)
    marks = [mark()]
    for step in range(steps):
        if control is not None:
            if step in scale_at:
                ray.get(control.scale.remote(pool.model, scale_at[step]))
            known = set(pool.replicas)
            scale_step(control, pipe.pools, rules, streaks, steps_done=step)
            starting += [h.ping.remote() for name, h in pool.replicas.items() if name not in known]
        pipe.learner_step(learner, step, groups_per_step, primary, {}, {})
        marks.append(mark())
    return marks


def _machine_cpu() -> float:
    """CPU seconds every process on this machine has used (all cores), for the machine's load in a window."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


ROLES = {"RolloutActor": "rollout", "RewardWorker": "reward", "LearnerActor": "learner"}


def process_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process and every process under it, summed by role: "driver", "rollout",
    "reward", "learner" (the actors of a local cluster, by their process title), "ray" (raylet, GCS, dashboard,
    idle workers). A remote cluster's processes are not under this one and are not counted."""
    import psutil

    me, cpu = psutil.Process(), {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t, title = p.cpu_times(), " ".join(p.cmdline())
        except psutil.Error:  # it ended between listing and reading
            continue
        actor = title.split()[0].removeprefix("ray::").split(".")[0] if title.startswith("ray::") else ""
        role = "driver" if p.pid == me.pid else ROLES.get(actor, "ray")
        cpu[role] = cpu.get(role, 0.0) + t.user + t.system
    return cpu


def cpu_per_step(before: dict[str, float], after: dict[str, float], steps: int) -> dict[str, float]:
    """CPU seconds per step by role between two `process_cpu()` readings, and their "total"."""
    per = {role: (after[role] - before.get(role, 0.0)) / steps for role in after}
    return {**per, "total": sum(per.values())}


def _rate(marks: list[dict], a: int, b: int, key: str) -> float | None:
    """Per-second increase of marks[.][key] between step boundaries a < b (None for an empty window)."""
    if b <= a:
        return None
    return (marks[b][key] - marks[a][key]) / (marks[b]["t"] - marks[a]["t"])


def _stages(n_rollout: int, rollout_s: float, reward_s: float, reward_replicas: int, learner_s: float,
            groups_per_step: int, max_staleness: int, reward_batch_max: int = 4):
    """Validated simulated stages, started -> (rollout actors, the reward pool "simulated", the learner)."""
    if n_rollout < 1 or reward_replicas < 1 or groups_per_step < 1 or max_staleness < 0:
        raise ValueError(f"need n_rollout, reward_replicas, groups_per_step >= 1 and max_staleness >= 0, got "
                         f"{n_rollout}, {reward_replicas}, {groups_per_step}, {max_staleness}")
    if min(rollout_s, reward_s, learner_s) <= 0:
        raise ValueError(f"stage durations must be > 0 s, got rollout_s={rollout_s}, reward_s={reward_s}, learner_s={learner_s}")
    from actors.simulated import simulated_learner_actor, simulated_reward_actor, simulated_rollout_actor

    rollouts = [simulated_rollout_actor(i, rollout_s) for i in range(n_rollout)]
    pool = RewardPool("simulated", lambda name: simulated_reward_actor(name, reward_s), reward_replicas,
                      batch_max=reward_batch_max)
    learner = simulated_learner_actor(learner_s)
    ray.get([a.ping.remote() for a in [*rollouts, *pool.replicas.values(), learner]])  # start-up is not measured
    return rollouts, pool, learner


def _kill(pool: RewardPool, handles: list) -> None:
    pool.shutdown()
    for handle in handles:
        ray.kill(handle, no_restart=True)


def simulated_pipeline(n_rollout: int, rollout_s: float = 1.0, reward_s: float = 0.02, reward_replicas: int = 2,
                       learner_s: float = 0.05, groups_per_step: int = 8, max_staleness: int = 2, steps: int = 6,
                       warmup_steps: int = 1, scale_at: dict[int, int] | None = None,
                       autoscale: AutoscaleConfig | None = None, named_control: bool = False, per_worker: int = 1,
                       groups_per_call: int = 1, reward_batch_max: int = 4) -> dict:
    """One simulated run (groups of one clip) -> JSON-able dict: "row" (SIM_COLUMNS but the sync ones), "steps"
    (SIM_STEP_COLUMNS per step) and "reward_scaling" (reward groups/s per run of steps at one replica count,
    SCALE_COLUMNS). Durations are seconds of device time per group (rollout, reward) and per learner step; `per_worker`
    is the Pipeline's rollout calls queued per actor (train_loop uses its default), `groups_per_call` the groups each
    call carries (`rollout.groups_per_call`), `reward_batch_max` the groups a reward call carries at most
    (`RewardPool(batch_max)`). The reward pool ("simulated") is resized as in `videorl train`: `scale_at` {step:
    replicas} requests through the run's control actor, `autoscale` is the pool's autoscaler, and with `named_control`
    the control actor is `videorl-control`, so `videorl scale --address ... --reward simulated=N` reaches this run from
    another process."""
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"need 0 <= warmup_steps < steps, got warmup_steps={warmup_steps}, steps={steps}")
    scale_at = {int(k): int(v) for k, v in (scale_at or {}).items()}
    if any(not 0 <= k < steps or v < 1 for k, v in scale_at.items()):
        raise ValueError(f"scale_at needs {{step in [0, {steps}): replicas >= 1}}, got {scale_at}")
    from actors.control import control_actor

    rollouts, pool, learner = _stages(n_rollout, rollout_s, reward_s, reward_replicas, learner_s, groups_per_step,
                                      max_staleness, reward_batch_max)
    control = control_actor([pool.model], named=named_control)
    try:
        ledger = Ledger()
        prompts = PromptCursor([f"simulated {i}" for i in range(1000)], 0)  # one shuffle per 1000 groups, as in a run
        pipe = Pipeline(rollouts, {"simulated": pool}, {"simulated": ["score"]}, prompts,
                        StalenessManager(groups_per_step, max_staleness), ledger, seed=0, per_worker=per_worker,
                        groups_per_call=groups_per_call)
        marks = drive(pipe, learner, steps, groups_per_step, "score", pool=pool, control=control,
                      rules={pool.model: autoscale}, scale_at=scale_at)
        held_balance = ledger.balance(pipe.held())
        pipe.close()
    finally:
        _kill(pool, [*rollouts, learner, control])

    w, end = warmup_steps, steps
    window = marks[end]["t"] - marks[w]["t"]
    achieved = (end - w) * groups_per_step / window

    def bound_at(replicas: int) -> float:  # groups/s of the slowest stage
        return min(n_rollout / rollout_s, replicas / reward_s, groups_per_step / learner_s)

    # with resizes the bound moves: the ideal time is each step's groups at that step's bound
    ideal_s = sum(groups_per_step / bound_at(marks[i]["replicas"]) for i in range(w + 1, end + 1))
    bound = (end - w) * groups_per_step / ideal_s
    balance = ledger.balance(set())
    idle = Pipeline.idle(marks[w]["clocks"], marks[end]["clocks"])
    stages = {"rollout": "rollout", "reward_simulated": "reward", "learner": "learner"}
    idle_by_stage = {name: {k: idle[f"{stage}_{k}"] for k in ("input", "output")} for stage, name in stages.items()}
    produced = marks[end]["produced"] - marks[w]["produced"]
    row = {
        "actors": n_rollout, "bound": bound, "throughput": achieved, "efficiency": achieved / bound,
        "stale_fraction": (marks[end]["stale"] - marks[w]["stale"]) / max(1, produced),
        # the driver process's CPU time (every thread: Ray's own included) per consumed group, in the window
        "driver_ms_per_group": 1000 * (marks[end]["cpu"] - marks[w]["cpu"]) / ((end - w) * groups_per_step),
        "rollout_calls_per_group": (marks[end]["rollout_calls"] - marks[w]["rollout_calls"]) / max(1, produced),
        "reward_calls_per_group": (marks[end]["calls"] - marks[w]["calls"]) / max(1, marks[end]["scored"] - marks[w]["scored"]),
        "driver_main_ms_per_group": 1000 * (marks[end]["main_cpu"] - marks[w]["main_cpu"]) / ((end - w) * groups_per_step),
        "driver_cpu_util": (marks[end]["cpu"] - marks[w]["cpu"]) / window,  # 1.0: one core busy all the time
        "machine_cpu_util": (marks[end]["machine_cpu"] - marks[w]["machine_cpu"]) / (window * os.cpu_count()),
        # the stage that idled least: where the pipeline's time goes
        "bottleneck": min(idle_by_stage, key=lambda k: sum(idle_by_stage[k].values())),
        "idle": idle_by_stage,
        "balanced": held_balance["balanced"] and balance["balanced"],
        "seconds": round(marks[end]["t"] - marks[0]["t"], 2),
    }
    per_step = [{"step": i - 1, "seconds": marks[i]["t"] - marks[i - 1]["t"], "reward_replicas": marks[i]["replicas"],
                 "reward_groups_per_s": _rate(marks, i - 1, i, "scored"),
                 "groups_per_s": groups_per_step / (marks[i]["t"] - marks[i - 1]["t"])} for i in range(1, end + 1)]
    return {"mode": "simulated", "row": row, "steps": per_step, "reward_scaling": _scaling_segments(marks, w),
            "ledger": balance, "ledger_before_close": held_balance,
            "settings": {"rollout_s": rollout_s, "reward_s": reward_s, "reward_replicas": reward_replicas,
                         "learner_s": learner_s, "groups_per_step": groups_per_step, "max_staleness": max_staleness,
                         "steps": steps, "warmup_steps": warmup_steps, "per_worker": per_worker,
                         "groups_per_call": groups_per_call, "reward_batch_max": reward_batch_max,
                         "scale_at": {str(k): v for k, v in scale_at.items()},
                         "autoscale": autoscale.model_dump() if autoscale else None}}


def simulated_sync(n_rollout: int, rollout_s: float = 1.0, reward_s: float = 0.02, reward_replicas: int = 2,
                   learner_s: float = 0.05, groups_per_step: int = 8, steps: int = 4, warmup_steps: int = 1) -> dict:
    """The synchronous loop (flow_grpo, DanceGRPO) on the same simulated stages: each step generates its groups on
    the rollout actors, then scores them all, then trains, then publishes -> {"throughput": groups/s, "seconds"}."""
    rollouts, pool, learner = _stages(n_rollout, rollout_s, reward_s, reward_replicas, learner_s, groups_per_step, 0)
    try:
        marks, n = [], 0
        for step in range(steps + 1):
            marks.append(time.perf_counter())
            if step == steps:
                break
            weights = learner.weights.remote()
            gids = [f"g{n + i:06d}" for i in range(groups_per_step)]
            n += groups_per_step
            outs = [rollouts[i % n_rollout].generate.options(num_returns=3).remote(gid, "p", i, step, [weights])
                    for i, gid in enumerate(gids)]
            ray.get([meta for _, _, meta in outs])
            for gid, (batch, _, _) in zip(gids, outs):
                pool.submit(gid, batch)
            pool.drain()
            ray.get(learner.train_step.remote([payload for _, payload, _ in outs], [], "score", {}, {}))
    finally:
        _kill(pool, [*rollouts, learner])
    window = marks[steps] - marks[warmup_steps]
    return {"throughput": (steps - warmup_steps) * groups_per_step / window, "seconds": round(marks[-1] - marks[0], 2)}


def _scaling_segments(marks: list[dict], warmup_steps: int) -> list[dict]:
    """Runs of steps at one reward replica count -> SCALE_COLUMNS rows. Each run's reward groups/s is measured
    from its first step boundary after warm-up (after the resize's own step) at which every replica has started
    (start-up excluded) to its end; None when no such window is left (e.g. a one-step run while an autoscaler
    grows the pool)."""
    runs = []
    for i in range(1, len(marks)):  # marks[i] closes step i - 1
        if runs and runs[-1]["reward_replicas"] == marks[i]["replicas"]:
            runs[-1]["last_step"] = i - 1
        else:
            runs.append({"reward_replicas": marks[i]["replicas"], "first_step": i - 1, "last_step": i - 1})
    for r in runs:
        end = r["last_step"] + 1
        first = r["first_step"] + 1 if r["first_step"] else 0  # a resize counts from the end of its first step on
        start = next((j for j in range(max(first, warmup_steps), end) if marks[j]["replicas_up"]), end)
        r["measured_from_step"] = start
        r["reward_groups_per_s"] = _rate(marks, start, end, "scored")
    return runs


def table_row(row: dict) -> dict:
    """A sweep row for the printed table: idle per stage as "input/output"."""
    idle = {f"idle_{stage}": "{input:.2f}/{output:.2f}".format(**v) for stage, v in row["idle"].items()}
    return {**{k: v for k, v in row.items() if k != "idle"}, **idle}


def balanced_stages(n_rollout: int, rollout_s: float, reward_replicas: int, groups_per_step: int | None) -> dict:
    """Stage times where no stage is the bottleneck: rollout_s / actors = reward_s / replicas = learner_s / groups
    per step (one step's groups take as long in each stage); groups per step default to the actor count, so the
    staleness capacity (max_staleness + 1) * groups_per_step keeps every actor busy."""
    gps = groups_per_step or n_rollout
    return {"rollout_s": rollout_s, "reward_s": rollout_s * reward_replicas / n_rollout, "reward_replicas": reward_replicas,
            "learner_s": rollout_s * gps / n_rollout, "groups_per_step": gps}


def simulated_sweep(actor_counts: tuple[int, ...] = (1, 2, 4, 8, 16), measure_s: float = 4.0, warmup_steps: int = 1,
                    min_measured_steps: int = 3, steps: int | None = None, sync: bool = False, balanced: bool = False,
                    **kwargs) -> dict:
    """simulated_pipeline at each rollout actor count -> {"mode", "rows": [SIM_COLUMNS row per count], "runs"}.
    Each point measures >= `measure_s` s of work at the bound rate (and >= min_measured_steps steps) after warm-up,
    unless `steps` fixes the count (needed with scale_at). `sync`: also the synchronous loop on the same stages
    (its throughput and the pipeline's speed-up over it); `balanced`: reward and learner times follow the rollout
    time and the actor count (`balanced_stages`; kwargs' groups_per_step, if given, is kept). kwargs go to
    simulated_pipeline."""
    runs = []
    for n in actor_counts:
        kw = {**kwargs, **balanced_stages(n, kwargs.get("rollout_s", 1.0), kwargs.get("reward_replicas", 2),
                                          kwargs.get("groups_per_step"))} if balanced else kwargs
        gps = kw.get("groups_per_step", 8)
        bound = min(n / kw.get("rollout_s", 1.0), kw.get("reward_replicas", 2) / kw.get("reward_s", 0.02),
                    gps / kw.get("learner_s", 0.05))
        n_steps = steps or warmup_steps + max(min_measured_steps, math.ceil(measure_s * bound / gps))
        run = simulated_pipeline(n, steps=n_steps, warmup_steps=warmup_steps, **kw)
        row = run["row"]
        row["sync_throughput"] = row["speedup"] = None
        if sync:
            settings = {k: kw[k] for k in ("rollout_s", "reward_s", "reward_replicas", "learner_s", "groups_per_step")
                        if k in kw}
            run["sync"] = simulated_sync(n, steps=warmup_steps + max(2, min_measured_steps // 2), warmup_steps=warmup_steps,
                                         **settings)
            row["sync_throughput"] = run["sync"]["throughput"]
            row["speedup"] = row["throughput"] / row["sync_throughput"]
        runs.append(run)
    return {"mode": "simulated", "rows": [r["row"] for r in runs], "runs": runs}


def ray_call_floor(n_rollout: int = 8, per_worker: int = 2, groups: int = 2000) -> dict:
    """What the Ray calls alone cost the driver: a generate call with three returns per group, then a score call on its
    batch reference (one group per call: the pipeline's reward calls carry several when replicas are busy), on the
    simulated actors with no device time and no orchestration between them -> {"groups_per_s",
    "driver_ms_per_group", "driver_cpu_util"}."""
    rollouts, pool, learner = _stages(n_rollout, 1e-9, 1e-9, 1, 1e-9, 1, 0)
    replica = next(iter(pool.replicas.values()))
    done = Completions()
    try:
        t0, cpu0, started, finished = time.perf_counter(), time.process_time(), 0, 0

        def launch(w: int) -> None:
            nonlocal started
            batch, _, meta = rollouts[w].generate.options(num_returns=3).remote(f"g{started}", "p", started)
            done.watch(meta, ("rollout", w, batch))
            started += 1

        for w in [w for _ in range(per_worker) for w in range(n_rollout)]:
            launch(w)
        while finished < groups:
            for (stage, w, batch), _ in done.take(timeout=1.0):
                if stage == "rollout":
                    done.watch(replica.score_many.remote(batch), ("reward", w, None))
                    if started < groups:
                        launch(w)
                else:
                    finished += 1
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        _kill(pool, [*rollouts, learner])
    return {"groups_per_s": groups / seconds, "driver_ms_per_group": 1000 * cpu / groups, "driver_cpu_util": cpu / seconds}


def ceiling(n_rollout: int = 8, groups_per_step: int = 32, measure_s: float = 10.0) -> dict:
    """The most groups/s the pipeline sustains on this machine (every stage ~0 s of device time) and where that
    ceiling comes from, measured side by side: the driver's CPU per group and how busy it is (a driver at ~1.0 core
    is the limit), the same Ray calls with no orchestration (`ray_call_floor`), and the machine's CPU (actors and
    Ray's own processes share the cores)."""
    tiny = 1e-4
    steps = 2 + max(3, math.ceil(measure_s * 2000 / groups_per_step))  # more than enough: cut by the time limit below
    run = simulated_pipeline(n_rollout, rollout_s=tiny, reward_s=tiny, reward_replicas=2, learner_s=tiny,
                             groups_per_step=groups_per_step, max_staleness=4, steps=min(steps, 400), warmup_steps=2,
                             per_worker=2)
    floor = ray_call_floor(n_rollout)
    row = run["row"]
    return {"pipeline": {k: row[k] for k in ("throughput", "driver_ms_per_group", "driver_main_ms_per_group",
                                            "driver_cpu_util", "machine_cpu_util", "balanced")},
            "ray_calls_only": floor,
            "orchestration_ms_per_group": row["driver_ms_per_group"] - floor["driver_ms_per_group"],
            "settings": run["settings"]}


# -- real mode -------------------------------------------------------------------------------------

def _untrained_base(cfg, tmp: str) -> str | None:
    """Starting weights every process of a bench loads alike: a saved random VideoDiT, or (Wan) model.path itself."""
    from policy.backend import init_policy

    if cfg.model.kind != "videodit":
        return None
    return str(init_policy(cfg.model, device="cpu").save(Path(tmp) / "base"))


def real_pipeline(cfg, steps: int = 10, warmup_steps: int = 2) -> dict:
    """The same work (cfg.train.groups_per_step groups of cfg.rollout.group_size clips per step, same prompts and
    seeds) synchronously and through the actors -> {"rows": REAL_COLUMNS rows, "synchronous": ..., "pipeline": ...}.
    Uses the config's untrained policy and the oracle reward; the Ray cluster must be connected."""
    from orchestrator.config import Config

    if not isinstance(cfg, Config):
        raise ValueError(f"real_pipeline needs an orchestrator.config.Config, got {type(cfg).__name__}")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"need 0 <= warmup_steps < steps, got warmup_steps={warmup_steps}, steps={steps}")
    from orchestrator.cluster import compute_slots
    from orchestrator.inputs import training_prompts

    prompts = training_prompts(cfg)
    slots = compute_slots(cfg, ray.cluster_resources().get("CPU", 0.0))
    sync = _synchronous(cfg, prompts, steps, warmup_steps)
    actor = _actor_pipeline(cfg, prompts, steps, warmup_steps, slots)
    runs = [("synchronous", sync), (f"actor pipeline ({slots or 'no'} compute slots)", actor)]
    if slots is not None:  # what the cap buys, measured beside it
        runs.append(("actor pipeline (no cap)", _actor_pipeline(cfg, prompts, steps, warmup_steps, None)))
    tax = _sharing_tax(cfg, prompts)
    clips = cfg.train.groups_per_step * cfg.rollout.group_size
    rows = []
    for name, res in runs:
        rows.append({"loop": name, "clips_per_s": res["clips_per_s"], "seconds_per_step": clips / res["clips_per_s"],
                     "ratio_vs_sync": res["clips_per_s"] / sync["clips_per_s"], "measured_steps": steps - warmup_steps,
                     "clips": (steps - warmup_steps) * clips, "busy_peak": res.get("busy_peak")})
    # what the pipeline can reach: the stages overlap, so a step takes as long as its slowest stage (rollout spread
    # over the rollout actors), unless the cores run out first (every stage's seconds on `cores` cores). Stage times
    # are the synchronous loop's, measured in this process just before, on `threads` torch threads.
    stage = sync["stage_seconds_per_step"]
    cores = ray.cluster_resources().get("CPU", os.cpu_count()) / cfg.threads
    bound = clips / max(stage["rollout"] / cfg.ray.rollout_workers, stage["reward"], stage["learner"],
                        sum(stage.values()) / cores)
    # CPU seconds per step of every process (the cluster's own included): the same work can cost the pipeline more
    # than the loop (its processes share the cores), and what the cores allow it is cores / its CPU per step
    cpu = {name: res["cpu_seconds_per_step"]["total"] for name, res in (("synchronous", sync), ("pipeline", actor))}
    for name, res in (("synchronous", sync), ("pipeline", actor)):
        res["cores_busy"] = cpu[name] * res["clips_per_s"] / clips
    return {"mode": "real", "rows": rows, "ratio": actor["clips_per_s"] / sync["clips_per_s"],
            "bound_clips_per_s": bound, "efficiency": actor["clips_per_s"] / bound,
            "cpu_ratio": cpu["pipeline"] / cpu["synchronous"], "cpu_bound_clips_per_s": clips * cores / cpu["pipeline"],
            # the loop's work on all cores at once, each process slowed by the sharing tax: what a schedule can hope for
            "sharing_tax": tax, "tax_bound_clips_per_s": clips * cores / (cpu["synchronous"] * tax["tax"]),
            "synchronous": sync, "pipeline": actor,
            "note": f"untrained {cfg.model.kind} policy and the oracle reward: time per step does not depend on the weights",
            "settings": {"steps": steps, "warmup_steps": warmup_steps, "groups_per_step": cfg.train.groups_per_step,
                         "group_size": cfg.rollout.group_size, "rollout_workers": cfg.ray.rollout_workers,
                         "max_staleness": cfg.train.max_staleness, "sampler": cfg.rollout.sampler,
                         "rollout_steps": cfg.rollout.steps, "mode": cfg.rollout.mode, "loss": cfg.learner.loss,
                         "groups_per_call": cfg.rollout.groups_per_call, "threads": cfg.threads,
                         "compute_slots": slots}}


def _synchronous(cfg, prompts: list[str], steps: int, warmup_steps: int) -> dict:
    """flow_grpo / DanceGRPO order in one process: generate all groups, score them, one learner step, sync weights."""
    from policy.backend import init_policy, video_shape
    from policy.learner import Learner, ScoredGroup
    from policy.rollout import RolloutWorker, trajectory_from_payload, worker_options
    from rewards.scorer import RewardScorer

    r, gps = cfg.rollout, cfg.train.groups_per_step
    learner = Learner(init_policy(cfg.model), cfg.learner, steps, cfg.train.seed)
    with tempfile.TemporaryDirectory() as tmp:
        worker = RolloutWorker(cfg.model, _untrained_base(cfg, tmp), **worker_options(cfg))
    scorer = RewardScorer("oracle", frame_shape=(*video_shape(cfg.model), 3))
    cursor, n = PromptCursor(prompts, cfg.train.seed), 0
    stage = {"rollout": 0.0, "reward": 0.0, "learner": 0.0}
    worker.set_weights(0, learner.weights())
    marks, cpu = [time.perf_counter()], [process_cpu()]
    for step in range(steps):
        t0 = time.perf_counter()
        made = []
        for _ in range(gps):
            gid, seed = f"g{n:06d}", cfg.train.seed * 1_000_003 + n  # the pipeline's ids and seeds
            made.append(worker.generate(gid, cursor.next(), seed))
            n += 1
        t1 = time.perf_counter()
        groups = []
        for batch, payload, _ in made:
            scores = scorer.score(batch["videos"], batch["prompts"], batch["ids"])
            groups.append(ScoredGroup(payload["group_id"], payload["cond"],
                                      trajectory_from_payload(payload), dict(zip(scorer.dims, scores.T)), payload["version"]))
        t2 = time.perf_counter()
        learner.step(groups, "ta", {}, {})
        worker.set_weights(step + 1, learner.weights())
        t3 = time.perf_counter()
        marks.append(t3)
        cpu.append(process_cpu())
        if step >= warmup_steps:
            for key, dt in (("rollout", t1 - t0), ("reward", t2 - t1), ("learner", t3 - t2)):
                stage[key] += dt
    measured = steps - warmup_steps
    window = marks[steps] - marks[warmup_steps]
    return {"clips_per_s": measured * gps * r.group_size / window, "seconds": window,
            "stage_seconds_per_step": {k: v / measured for k, v in stage.items()},
            "cpu_seconds_per_step": cpu_per_step(cpu[warmup_steps], cpu[steps], measured)}


def _sharing_tax(cfg, prompts: list[str], groups: int = 8) -> dict:
    """CPU ms per group of a rollout actor computing alone and of two computing at once (each group started
    together): what processes that share the machine cost each other even with a core each (what they share in the
    host, not measured apart). It is the part of the pipeline's extra CPU that no schedule removes."""
    from actors.rollout import rollout_actor
    from policy.rollout import worker_options

    with tempfile.TemporaryDirectory() as tmp:
        base = _untrained_base(cfg, tmp)
        actors = [rollout_actor(i, cfg.model, base, worker_options(cfg), num_cpus=cfg.ray.rollout_cpus,
                                num_gpus=cfg.ray.rollout_gpus) for i in range(2)]
        ray.get([a.ping.remote() for a in actors])

    def cpu_ms_per_group(which: list) -> float:
        before = process_cpu().get("rollout", 0.0)
        for k in range(groups):
            ray.get([a.generate_many.options(num_returns=3).remote([(f"t{k}", prompts[k % len(prompts)], k)])[-1]
                     for a in which])
        return (process_cpu()["rollout"] - before) * 1000 / (groups * len(which))

    try:
        cpu_ms_per_group(actors)  # warm-up
        alone, together = cpu_ms_per_group(actors[:1]), cpu_ms_per_group(actors)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
    return {"alone_ms_per_group": alone, "together_ms_per_group": together, "tax": together / alone}


def _actor_pipeline(cfg, prompts: list[str], steps: int, warmup_steps: int, slots: int | None) -> dict:
    """Rollout actors + an oracle reward pool + a learner actor (as in orchestrator/cluster.py), driven like train_loop
    with `slots` compute slots."""
    from actors.learner import learner_group
    from actors.reward import reward_actor
    from actors.rollout import rollout_actor
    from policy.rollout import worker_options
    from orchestrator.config import RewardModelSpec

    r, gps = cfg.rollout, cfg.train.groups_per_step
    spec = next((s for s in cfg.rewards.models.values() if s.kind == "oracle"), RewardModelSpec(kind="oracle", num_cpus=0.1))
    rollout_kwargs = worker_options(cfg)
    pool = RewardPool("oracle", lambda name: reward_actor(name, "oracle", None, num_cpus=spec.num_cpus,
                                                          num_gpus=spec.num_gpus), spec.replicas)
    learners, rollouts = None, []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = _untrained_base(cfg, tmp)  # every actor loads the same starting weights
            rollouts = [rollout_actor(i, cfg.model, base, rollout_kwargs, num_cpus=cfg.ray.rollout_cpus,
                                      num_gpus=cfg.ray.rollout_gpus) for i in range(cfg.ray.rollout_workers)]
            learners = learner_group(cfg.model, base, cfg.learner.model_dump(), steps, cfg.train.seed,
                                     workers=cfg.ray.learner_workers, placement=cfg.ray.placement,
                                     num_cpus=cfg.ray.learner_cpus, num_gpus=cfg.ray.learner_gpus, threads=cfg.threads)
            learner = learners.head
            ray.get([a.ping.remote() for a in [*rollouts, *pool.replicas.values()]] + [learner.version.remote()])
        ledger = Ledger()
        pipe = Pipeline(rollouts, {"oracle": pool}, {"oracle": ["vq", "mq", "ta"]}, PromptCursor(prompts, cfg.train.seed),
                        StalenessManager(gps, cfg.train.max_staleness), ledger, seed=cfg.train.seed,
                        group_size=r.group_size, groups_per_call=r.groups_per_call, compute_slots=slots)
        marks = drive(pipe, learner, steps, gps, "ta", pool=pool, count_processes=True)
        pipe.close()
    finally:
        pool.shutdown()
        for handle in rollouts:
            ray.kill(handle, no_restart=True)
        if learners is not None:
            learners.shutdown()
    window = marks[steps]["t"] - marks[warmup_steps]["t"]
    balance = ledger.balance(set())
    return {"clips_per_s": (steps - warmup_steps) * gps * r.group_size / window, "seconds": window,
            "util_rollout": (marks[steps]["busy"] - marks[warmup_steps]["busy"]) / (len(rollouts) * window),
            "rollout_calls_per_group": pipe.rollout_calls_per_group(), "busy_peak": pipe.busy_peak, "ledger": balance,
            "cpu_seconds_per_step": cpu_per_step(marks[warmup_steps]["processes"], marks[steps]["processes"],
                                                 steps - warmup_steps)}
