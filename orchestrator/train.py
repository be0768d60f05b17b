"""`videorl train`: the asynchronous RL loop over rollout, reward, controller and learner actors.

    publish weights v0
    for step:
        batch  = next scored groups (rollout keeps running ahead, at most max_staleness versions)
        w      = curriculum.update(batch means)  # optional self-paced channel weights (competence EMA)
        stats  = learner.update(batch, λ, w)     # GDPO over (R_f, -ReLU(τ - R_c)[, curriculum]) weighted (1, λ[, w])
        λ      = controller.update(batch means)  # PID Lagrangian on the constraint violations
        publish weights v(step+1)
        log, checkpoint
The driver holds only object references and small metadata; rollout and reward actors keep
working while the learner trains (the driver pumps the pipeline while it waits).

Resume is exact: a checkpoint holds, besides the learner's and controller's state, the groups in flight (re-queued,
not skipped: same ids, prompts, seeds and weights versions, whose weights it also holds), the prompts awaiting
re-sampling, the driver's global RNG states, the reward pools' replica counts and autoscaler streaks, and the
`videorl scale` requests not yet applied. With `train.deterministic` a run killed and resumed ends with the
uninterrupted run's weights and metrics (tests/orchestrator/test_exact_resume.py).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from tqdm import tqdm

from actors.failures import LearnerCrashLoop
from orchestrator.autoscale import restore_scaling, scale_step, scaling_state
from orchestrator.chaos import ChaosMonkey
from orchestrator.checkpoint import (Checkpoint, latest_checkpoint, restore_rng, rng_state, save_checkpoint,
                                     seed_global_rngs)
from orchestrator.cluster import RunActors, compute_slots, start_actors
from orchestrator.config import Config
from orchestrator.ledger import Ledger
from orchestrator.metrics import DashboardMetrics, MetricsLog
from orchestrator.pipeline import BroadcastSync, Group, Pipeline, PromptCursor
from orchestrator.staleness import StalenessManager
from rewards.curriculum import SelfPacedCurriculum, check_curriculum_rewards


class Run:
    """Everything one training run holds across steps, and how it is saved and restored."""

    def __init__(self, cfg: Config, run_dir: Path, actors: RunActors, prompts: list[str], primary: str,
                 taus: dict[str, float]):
        self.cfg, self.dir, self.actors, self.primary, self.taus = cfg, run_dir, actors, primary, taus
        self.ledger = Ledger()
        self.cursor = PromptCursor(prompts, cfg.train.seed)
        self.step, self.next_group, self.rollout_rows = 0, 0, []
        self.lambdas = {c: 0.0 for c in taus}
        self.controller_state = ray.get(actors.controller.state_dict.remote())  # as of the last update: survives a controller restart
        self.curriculum = SelfPacedCurriculum(cfg.rewards.curriculum) if cfg.rewards.curriculum else None
        self.samples = 0
        self.reward_versions: dict[str, list[str]] = {}  # per reward model, the versions that scored its batches
        self.streaks = {name: 0 for name in actors.pools}  # the autoscaler's (autoscale.decide)
        self.requeue: tuple[dict, dict[int, ray.ObjectRef]] | None = None  # after restore: for Pipeline.requeue
        self.learner: dict[str, int] = {}  # learner restarts and what they replayed (train_loop)
        self.started = time.perf_counter()

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, pipe: Pipeline) -> None:
        tensors, learner_state = ray.get(self.actors.learner.state.remote())
        for version, weights in pipe.weights_in_flight().items():  # older versions that groups in flight run on
            tensors[f"{IN_FLIGHT_WEIGHTS}{version}"] = ray.get(weights)
        tensors["driver_rng"], driver_rng = rng_state()
        state = {
            "step": self.step, "next_group": self.next_group, "cursor": self.cursor.state_dict(),
            "pipeline": pipe.state_dict(), "ledger": self.ledger.state_dict(), "learner": learner_state,
            "samples": self.samples, "controller": self.controller_state, "lambdas": self.lambdas,
            "curriculum": self.curriculum.state_dict() if self.curriculum else None, "driver_rng": driver_rng,
            "scaling": scaling_state(self.actors.control, pipe.pools, self.streaks),
        }
        _write_parquet(self.rollout_rows, self.dir / "rollouts.parquet")  # before the checkpoint, as metrics are
        save_checkpoint(self.dir, self.step, tensors, state)

    def restore(self, ckpt: Checkpoint) -> None:
        for path, reason in ckpt.skipped:
            print(f"skipping corrupt checkpoint {path}: {reason}")
        s = ckpt.state
        ray.get(self.actors.learner.load_state.remote(ckpt.tensors, s["learner"]))
        ray.get(self.actors.controller.load_state_dict.remote(s["controller"]))
        self.controller_state = s["controller"]
        self.step, self.next_group, self.samples, self.lambdas = s["step"], s["next_group"], s["samples"], s["lambdas"]
        self.cursor.epoch, self.cursor.index = s["cursor"]["epoch"], s["cursor"]["index"]
        self.ledger = Ledger.from_state_dict(s["ledger"])
        if self.curriculum and s.get("curriculum"):
            self.curriculum.load_state_dict(s["curriculum"])
        if "pipeline" in s:
            self._restore_in_flight(ckpt)
        else:  # a checkpoint from before exact resume: what the pipeline held is gone
            for gid in s["held"]:
                self.ledger.drop(gid, "interrupted")
        rollouts = self.dir / "rollouts.parquet"
        if rollouts.exists():
            self.rollout_rows = [r for r in pq.read_table(rollouts).to_pylist() if r["step"] < self.step]
        print(f"resumed {self.dir} at step {self.step} (checkpoint {ckpt.path.name})")

    def _restore_in_flight(self, ckpt: Checkpoint) -> None:
        """Everything the driver had on the move: groups in flight (re-queued once the pipeline exists), the global
        RNGs, reward replica counts and autoscaler streaks, and the unapplied `videorl scale` requests."""
        s = ckpt.state
        weights = {int(name.removeprefix(IN_FLIGHT_WEIGHTS)): ray.put(t) for name, t in ckpt.tensors.items()
                   if name.startswith(IN_FLIGHT_WEIGHTS)}
        self.requeue = (s["pipeline"], weights)
        restore_rng(ckpt.tensors["driver_rng"], s["driver_rng"])
        restore_scaling(s["scaling"], self.actors.control, self.actors.pools, self.streaks)
        print(f"re-queued {len(s['pipeline']['in_flight'])} groups in flight at the checkpoint")


IN_FLIGHT_WEIGHTS = "in_flight_weights_v"  # checkpoint tensor groups: the weights of older versions still in flight


def _write_parquet(rows: list[dict], path: Path) -> None:
    if rows:
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(path)


def batch_means(batch: list[Group]) -> dict[str, float]:
    names = batch[0].rewards.keys()
    return {n: float(np.mean(np.concatenate([g.rewards[n] for g in batch]))) for n in names}


class LearnerDied(Exception):
    """A rank of the learner group died (or hangs in a collective with a dead one); `run` is where the run was."""

    def __init__(self, run: Run, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        self.run = run


def train_loop(cfg: Config, run_dir: Path, actors: RunActors, prompts: list[str], primary: str,
               taus: dict[str, float], resume_from: Checkpoint | None = None, progress: bool = True,
               stop: threading.Event | None = None) -> Run:
    """Run the RL steps; returns the finished Run (ledger, lambdas, rows) for the summary.

    `stop` (set by Ctrl-C / SIGTERM in the CLI) ends the run after the current step, with a checkpoint.
    When the learner dies, a new learner group starts and the run goes on from the latest checkpoint as a resume
    would (metrics rows and rollouts after it are rewritten, the groups since are generated and trained again, each
    once in the surviving run); a learner that dies more than `train.max_learner_restarts` times without the run
    reaching a new checkpoint ends it (a crash loop). `run.learner` counts what was replayed.
    """
    replayed = {"restarts": 0, "steps_replayed": 0, "groups_replayed": 0}
    chaos = ChaosMonkey(cfg.chaos, actors.rollouts, actors.pools, actors.controller, learners=actors.learners.ranks)
    in_a_row, last_back = 0, -1  # restarts since the run last reached a new checkpoint
    by_chaos, kills_seen = 0, 0  # of those, deaths that followed chaos killing a learner rank
    started = time.perf_counter()  # this process's wall clock goes on across learner restarts
    while True:
        try:
            run = _train_steps(cfg, run_dir, actors, prompts, primary, taus, resume_from, progress, stop, replayed,
                               chaos, started)
            run.learner = replayed
            return run
        except LearnerDied as died:
            for pool in actors.pools.values():  # scores of the abandoned groups must not meet their regenerated ids
                pool.drain()
            resume_from = latest_checkpoint(run_dir)
            back_to = (resume_from.state["step"], resume_from.state["next_group"]) if resume_from else (0, 0)
            killed = int(any(name.startswith("learner") for name in chaos.kills[kills_seen:]))
            kills_seen = len(chaos.kills)
            in_a_row, by_chaos = (1, killed) if back_to[0] > last_back else (in_a_row + 1, by_chaos + killed)
            last_back = back_to[0]
            if in_a_row > cfg.train.max_learner_restarts:
                hint = (f"; chaos killed a learner rank before {by_chaos} of them: with learner in chaos.roles, raise "
                        f"train.max_learner_restarts or chaos.kill_every_s" if by_chaos else "")
                raise LearnerCrashLoop(f"the learner died {in_a_row} times without the run reaching a new checkpoint "
                                       f"(train.max_learner_restarts={cfg.train.max_learner_restarts}){hint}: {died}"
                                       ) from None
            actors.restart_learner()
            chaos.learners = list(actors.learners.ranks)
            replayed["restarts"] += 1
            replayed["steps_replayed"] += died.run.step - back_to[0]
            replayed["groups_replayed"] += died.run.next_group - back_to[1]
            print(f"learner died at step {died.run.step} ({died}); restarted, going on from step {back_to[0]}")


def _train_steps(cfg: Config, run_dir: Path, actors: RunActors, prompts: list[str], primary: str,
                 taus: dict[str, float], resume_from: Checkpoint | None, progress: bool,
                 stop: threading.Event | None, replayed: dict[str, int], chaos: ChaosMonkey, started: float) -> Run:
    run = Run(cfg, run_dir, actors, prompts, primary, taus)
    run.started = started
    if resume_from is not None:
        run.restore(resume_from)
    elif cfg.train.deterministic:
        seed_global_rngs(cfg.train.seed)
    # groups admitted before a restart were consumed or dropped, so admission restarts from the step
    staleness = StalenessManager(cfg.train.groups_per_step, cfg.train.max_staleness,
                                 started=run.step * cfg.train.groups_per_step)
    curriculum = cfg.rewards.curriculum
    channels = dict.fromkeys([primary, *taus, *(curriculum.rewards if curriculum else [])])  # what the learner trains on
    pipe = Pipeline(actors.rollouts, actors.pools, actors.reward_names, run.cursor, staleness, run.ledger,
                    seed=cfg.train.seed, next_group=run.next_group, group_size=cfg.rollout.group_size,
                    dynamic_grouping=cfg.rollout.dynamic_grouping, signal_rewards=list(channels),
                    fail_after={n: s.max_consecutive_failures for n, s in cfg.rewards.models.items()},
                    describe={n: f"{n!r} ({s.url})" if s.url else repr(n) for n, s in cfg.rewards.models.items()},
                    in_order=cfg.train.deterministic, sync=_weight_sync(cfg, actors),
                    groups_per_call=cfg.rollout.groups_per_call,
                    compute_slots=compute_slots(cfg, ray.cluster_resources().get("CPU", 0.0)))
    channel_weights = (lambda batch: run.curriculum.update(batch_means(batch))) if run.curriculum else None
    log = MetricsLog(run_dir, start_step=run.step)
    dash = DashboardMetrics()
    pipe.publish_from(actors.learner, run.step)
    if run.requeue is not None:
        pipe.requeue(*run.requeue)
    bar = tqdm(total=cfg.train.steps, initial=run.step, desc="train", unit="step", disable=not progress)
    scored_before = {name: 0 for name in pipe.pools}
    clocks = pipe.clocks()
    try:
        while run.step < cfg.train.steps and not (stop and stop.is_set()):
            t0 = time.perf_counter()
            try:
                batch, stats, _ = pipe.learner_step(actors.learner, run.step, cfg.train.groups_per_step, primary,
                                                         taus, run.lambdas, channel_weights)
            except ray.exceptions.RayError as e:
                raise _learner_died(run, pipe, actors, e) from e
            means = batch_means(batch)
            lambdas_used = dict(run.lambdas)
            run.lambdas, run.controller_state = ray.get(
                actors.controller.update.remote({c: means[c] for c in taus}, run.controller_state))
            run.step += 1
            run.samples += sum(len(g.rewards[primary]) for g in batch)
            run.next_group = pipe.next_group
            scored = {name: pool.counters.scored for name, pool in pipe.pools.items()}
            row = _metrics_row(run, batch, means, stats, lambdas_used, pipe, time.perf_counter() - t0)
            clocks, before = pipe.clocks(), clocks
            row.update({f"idle/{k}": v for k, v in pipe.idle(before, clocks).items()})  # since the last row
            row.update(_scale_reward_pools(cfg, actors, pipe, run.step, scored_before, scored, time.perf_counter() - t0,
                                           run.streaks))
            row.update({f"reward_version/{name}": pool.version for name, pool in pipe.pools.items()})  # latest batch's
            if pipe.sync is not None:
                row.update(pipe.sync.stats())
            scored_before = scored
            if victim := chaos.maybe_kill():
                bar.write(f"chaos: killed {victim}")  # on its own line, not after the bar
            row["chaos/kills"] = len(chaos.kills)
            row["learner/restarts"] = replayed["restarts"]
            log.log(row)
            _dashboard(dash, row, pipe)
            run.rollout_rows += _rollout_rows(run.step - 1, batch, lambdas_used)
            bar.set_postfix({primary: f"{means[primary]:.3f}", **{f"λ{c}": f"{v:.2f}" for c, v in run.lambdas.items()},
                             "clips/s": f"{row['throughput/samples_per_s']:.1f}"}, refresh=False)  # shown by update
            bar.update(1)
            if run.step % cfg.train.checkpoint_every == 0 or run.step == cfg.train.steps or (stop and stop.is_set()):
                log.flush()  # metrics up to the checkpoint are on disk with it
                try:
                    run.save(pipe)
                except ray.exceptions.RayError as e:
                    raise _learner_died(run, pipe, actors, e) from e
    finally:
        bar.close()
        log.close()  # a dying learner's rows after the latest checkpoint are discarded by the next MetricsLog
    pipe.close()
    run.held = pipe.held()
    run.reward_versions = {name: list(pool.versions) for name, pool in pipe.pools.items()}
    return run


def _weight_sync(cfg: Config, actors: RunActors) -> BroadcastSync | None:
    """weights.sync: None for the object store; a broadcast group keeps the versions groups may still run on."""
    if cfg.weight_sync() != "broadcast":
        return None
    return BroadcastSync(actors.learner, keep=cfg.train.max_staleness + 2, bucket_bytes=int(cfg.weights.bucket_mb * 2**20),
                         timeout_s=cfg.weights.timeout_s)


def _learner_died(run: Run, pipe: Pipeline, actors: RunActors, error: BaseException) -> BaseException:
    """LearnerDied when a learner rank is gone (the error came from the learner group), else the error itself. The
    pipeline is closed either way: a restart builds a new one."""
    dead = not actors.learners.alive()
    pipe.close()
    return LearnerDied(run, error) if dead else error


def _metrics_row(run: Run, batch: list[Group], means, stats, lambdas, pipe: Pipeline, seconds: float) -> dict:
    staleness = [run.step - 1 - g.version for g in batch]
    wall = time.perf_counter() - run.started
    row = {"step": run.step - 1, **{f"reward/{k}": v for k, v in means.items()},
           **{f"lambda/{c}": v for c, v in lambdas.items()}, **{f"tau/{c}": v for c, v in run.taus.items()},
           **{k: v for k, v in stats.items() if k != "version"},
           "staleness/mean": float(np.mean(staleness)), "staleness/max": float(np.max(staleness)),
           "throughput/samples_per_s": sum(len(g.rewards[run.primary]) for g in batch) / seconds,
           "throughput/total_samples_per_s": run.samples / wall,
           "payload/bytes_per_group": (pipe.bytes["batch"] + pipe.bytes["payload"]) / max(1, pipe.bytes["groups"]),
           **{f"queue/{k}": v for k, v in pipe.depths().items()},
           "pipeline/rollout_calls_per_group": pipe.rollout_calls_per_group(), "pipeline/busy_peak": pipe.busy_peak,
           **{f"ledger/{k}": v for k, v in run.ledger.balance(pipe.held()).items() if isinstance(v, int)}}
    if run.curriculum:  # the weights this step trained with, and the competence they came from
        row["curriculum/competence"] = run.curriculum.competence
        row.update({f"curriculum/w_{r}": w for r, w in run.curriculum.weights().items()})
    return row


def _scale_reward_pools(cfg: Config, actors: RunActors, pipe: Pipeline, steps_done: int, before: dict, after: dict,
                        seconds: float, streaks: dict) -> dict:
    """Apply `videorl scale` requests and autoscaling; report replicas and reward throughput per model."""
    rules = {n: s.autoscale for n, s in cfg.rewards.models.items()}
    sizes = scale_step(actors.control, pipe.pools, rules, streaks, steps_done)
    row = {f"replicas/{name}": n for name, n in sizes.items()}
    row.update({f"throughput/reward_{name}_batches_per_s": (after[name] - before[name]) / seconds for name in sizes})
    return row


def _dashboard(dash: DashboardMetrics, row: dict, pipe: Pipeline) -> None:
    for key, value in row.items():
        if key != "step" and not isinstance(value, str):  # reward_version/*: text
            dash.set(key, float(value))
    for name, pool in pipe.pools.items():
        for replica, load in pool.load.items():
            dash.set("queue_depth", load, tags={"stage": "reward", "actor": replica})
        dash.set("replicas", pool.size, tags={"model": name})
    for i, worker_load in enumerate(pipe.worker_loads()):
        dash.set("queue_depth", worker_load, tags={"stage": "rollout", "actor": f"rollout-{i}"})
    dash.set("policy_version", row["step"] + 1)


def _rollout_rows(step: int, batch: list[Group], lambdas: dict[str, float]) -> list[dict]:
    rows = []
    for g in batch:
        for j in range(len(next(iter(g.rewards.values())))):
            rows.append({"step": step, "group_id": g.gid, "sample": j, "prompt": g.prompt, "version": g.version,
                         "staleness": step - g.version, "prefix_chunks": g.prefix_chunks,
                         **{f"reward_{k}": float(v[j]) for k, v in g.rewards.items()},
                         **{f"lambda_{c}": v for c, v in lambdas.items()}})
    return rows


def write_resolved_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_training(cfg: Config, run_dir: Path, *, resume: bool = False, address: str | None = None,
                 progress: bool = True, stop: threading.Event | None = None) -> dict:
    """Everything `videorl train` does: inputs (cached), actors, the loop, before/after evaluation, report."""
    from orchestrator.cluster import check_fits, connect
    from orchestrator.evaluation import evaluate
    from orchestrator.inputs import check_rewards_fit, held_out_reward_means, prepare, training_prompts
    from orchestrator.report import write_report
    from policy.backend import check_dtype, check_policy_config, default_device, torch_threads

    # before anything runs: the model directory, frames, LoRA targets; dtype and attention backend in this driver
    # (it encodes prompts, calibrates and evaluates), and the dtypes of the actors that run on CPUs
    check_policy_config(cfg.model, device=default_device())
    if cfg.ray.learner_gpus == 0 or (cfg.ray.rollout_gpus == 0 and not cfg.rollout.dtype):
        check_dtype(cfg.model.dtype, "cpu")
    if cfg.ray.rollout_gpus == 0 and cfg.rollout.dtype:
        check_dtype(cfg.rollout.dtype, "cpu", key="rollout.dtype")
    check_rewards_fit(cfg)
    training_prompts(cfg)  # a bad prompt file is named before a cluster starts
    cfg = one_rollout_actor_if_deterministic(cfg)
    resume_from = _check_resumable(cfg, run_dir) if resume else None
    connect(cfg, address)
    check_fits(cfg)  # before hours of pretraining, not after
    with torch_threads(cfg.driver_torch_threads()):  # no actor computes yet
        inputs = prepare(cfg, progress=progress)
    if resume_from is not None:
        _check_same_base(cfg, resume_from, inputs.base.key)
    write_resolved_config(cfg, run_dir)
    if cfg.rewards.curriculum:  # a given reward checkpoint's dimensions are known only now, before any actor
        check_curriculum_rewards(cfg.rewards.curriculum, {cfg.rewards.models[n].prefix + d
                                                          for n, dims in inputs.reward_dims.items() for d in dims})
    actors = start_actors(cfg, inputs.base, inputs.reward_checkpoints, inputs.reward_dims, inputs.taus)
    try:
        with _stop_on_signals(stop):
            run = train_loop(cfg, run_dir, actors, inputs.prompts, inputs.primary, inputs.taus, resume_from, progress, stop)
        final = ray.get(actors.learner.weights.remote())
    finally:
        actors.shutdown()
    e = cfg.eval
    model = inputs.base.load()
    scores, terms = {}, {}
    with torch_threads(cfg.driver_torch_threads()):  # the actors are gone
        for when, weights in (("before", None), ("after", final)):
            if weights is not None:
                model.load_trainable_state(weights)
            res = evaluate(model, sampler=e.sampler, eta=e.eta, steps=e.steps, shift=e.shift, mode=cfg.rollout.mode,
                           seeds_per_prompt=e.seeds_per_prompt, seed=e.seed)
            scores[when] = res.means()
            terms[when] = res.term_means()
            (run_dir / "samples").mkdir(exist_ok=True)
            np.savez_compressed(run_dir / "samples" / f"{when}.npz", videos=res.videos, prompts=np.array(res.prompts))
        # τ was measured on the base model's held-out rollouts; "final" is the same measurement on the trained policy
        held_out, skipped = held_out_reward_means(cfg, inputs.reward_checkpoints, model)
    model.save(run_dir / "final")
    (run_dir / "final" / "base.json").write_text(json.dumps({"base": inputs.base.path and str(inputs.base.path), "base_key": inputs.base.key}))
    last_quarter = batch_means_from_rows(run.rollout_rows[-len(run.rollout_rows) // 4 or None:])
    summary = {
        "oracle": scores,
        "oracle_terms": terms,  # the nine terms each dimension averages (rewards.oracle.TERMS): what moved, and how
        "constraints": {c: {"tau": tau, "final": held_out.get(c, float("nan")), "satisfied": held_out.get(c, float("-inf")) >= tau,
                            "training_batches": last_quarter.get(c, float("nan")), "skipped_samples": len(skipped)}
                        for c, tau in inputs.taus.items()},
        "primary": {"name": inputs.primary, "final": held_out.get(inputs.primary, float("nan")),
                    "training_batches": last_quarter.get(inputs.primary)},
        "lambdas": run.lambdas,
        "ledger": run.ledger.balance(run.held),
        "learner": run.learner,  # restarts, and the steps and groups generated again after each
        "reward_versions": run.reward_versions,  # per reward model, every version that scored a batch of this process
        "throughput": {"samples": run.samples, "seconds": round(time.perf_counter() - run.started, 1),
                       "samples_per_s": run.samples / (time.perf_counter() - run.started)},
        "steps": run.step,
        "profile": cfg.rewards.profile,
    }
    write_summary(run_dir, summary)
    write_report(run_dir)
    return summary


def one_rollout_actor_if_deterministic(cfg: Config) -> Config:
    """`train.deterministic` runs one rollout actor whatever ray.rollout_workers says (its calls run in the order they
    were made, so no group's weights version depends on how the work was spread); the resolved config.yaml records 1."""
    if not cfg.train.deterministic or cfg.ray.rollout_workers == 1:
        return cfg
    print(f"train.deterministic: one rollout actor (ray.rollout_workers={cfg.ray.rollout_workers} ignored)")
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"rollout_workers": 1})})


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event | None):
    """During the RL steps, Ctrl-C or SIGTERM sets `stop` (finish the step, checkpoint, summarise); a second one
    exits. Installed after ray.init, which sets a SIGTERM handler of its own; only the main thread can."""
    if stop is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: sys.exit(130) if stop.is_set() else stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_resumable(cfg: Config, run_dir: Path) -> Checkpoint:
    """Before any actor starts: the run's latest good checkpoint, which must fit the configured model."""
    from orchestrator.checkpoint import check_compatible
    from policy.backend import trainable_shapes

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}")
    try:
        check_compatible(ckpt.tensors["policy"], trainable_shapes(cfg.model))
    except ValueError as e:
        raise ValueError(f"cannot resume {ckpt.path}: {e}") from None
    return ckpt


def _check_same_base(cfg: Config, ckpt: Checkpoint, base_key: str) -> None:
    """Adapters are only meaningful on the base they were trained on (full weights carry everything themselves)."""
    from policy.backend import uses_lora

    saved = ckpt.state["learner"].get("base_key")
    if uses_lora(cfg.model) and saved != base_key:
        raise ValueError(f"cannot resume {ckpt.path}: its LoRA adapters were trained on the base {saved}, the config "
                         f"now gives the base {base_key} (model.path, model.checkpoint, the model or its pretraining "
                         "changed)")


def batch_means_from_rows(rows: list[dict]) -> dict[str, float]:
    """Mean of every reward column over rollout rows (here: the last quarter of the run's training batches)."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("reward_")]
    return {k.removeprefix("reward_"): float(np.mean([r[k] for r in rows])) for k in keys}
