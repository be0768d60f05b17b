"""`videorl` command line: pretrain, eval, bench.

Every subcommand takes `--config PATH` (default configs/tiny.yaml) and trailing
`key.sub=value` overrides; the config is validated before any work starts. User errors
(bad config, missing checkpoint, bad input file) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


from actors.failures import LearnerCrashLoop
from orchestrator.config import ConfigError, load_config, usable_cores
from orchestrator.progress import progress_interval, redraw_every


def _config(args, driver: bool = True):
    """The command's config; torch threads: `driver_threads` for the driver's own compute (pretraining, reward models,
    calibration, evaluation), `threads` where actors compute beside it (train, whose stages set their own) or where
    a bench compares with them."""
    import torch

    from policy.backend import check_policy_config

    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.driver_torch_threads() if driver else cfg.threads)
    check_policy_config(cfg.model)  # model files, frames, LoRA targets: one line now, not a traceback later
    return cfg


def cmd_pretrain(args) -> None:
    from orchestrator.pretraining import ensure_base_model

    cfg = _config(args)
    if cfg.pretrain is None:
        raise ValueError(f"the config has pretrain: null: the base is {cfg.model.path} as it is")
    path = ensure_base_model(cfg, force=args.force)
    print(f"base model: {path}")


def cmd_eval(args) -> None:
    from orchestrator.evaluation import DIMENSIONS, evaluate
    from orchestrator.media import save_gif
    from orchestrator.tables import format_table, write_json
    from policy.backend import load_policy

    cfg = _config(args)
    checkpoint = _checkpoint_arg(cfg, args.checkpoint)
    guide = _guide_arg(cfg, args)
    model = load_policy(cfg.model, checkpoint)
    if guide is not None:
        guide.model.to(model.device)
    samplers = args.sampler or [cfg.eval.sampler]
    eta = cfg.eval.eta if args.eta is None else args.eta
    out = Path(args.out)
    if args.frames is not None:
        return _eval_long(cfg, args, model, checkpoint, guide, samplers, eta, out)
    rows, results = [], {}
    for sampler in samplers:
        start = time.perf_counter()
        res = evaluate(model, sampler=sampler, eta=eta if sampler != "ode" else 0.0, steps=cfg.eval.steps, shift=cfg.eval.shift,
                       mode=args.mode or cfg.rollout.mode, seeds_per_prompt=cfg.eval.seeds_per_prompt, seed=cfg.eval.seed,
                       guide=guide)
        means = res.means()
        rows.append({"sampler": sampler, "eta": eta if sampler != "ode" else 0.0, **means, "clips": len(res.prompts),
                     "seconds": round(time.perf_counter() - start, 1)})
        results[sampler] = {"eta": rows[-1]["eta"], **means, "per_prompt": _per_prompt(res)}
        save_gif(res.videos[:: cfg.eval.seeds_per_prompt], out / f"samples_{sampler}.gif")
    print(format_table(rows, ["sampler", "eta", *DIMENSIONS, "clips", "seconds"]))
    write_json({"checkpoint": str(checkpoint or cfg.model.path), "mode": args.mode or cfg.rollout.mode,
                "guidance": _guidance_info(args), "results": results}, out / "eval.json")
    print(f"wrote {out / 'eval.json'} and GIF grids in {out}/")


def _guidance_info(args) -> dict | None:
    if args.guidance is None:
        return None
    return {"reward": args.guidance, "weight": args.guidance_weight, "beta": args.guidance_beta}


def _reward_checkpoints(cfg, names: list[str]) -> dict[str, str | None]:
    """Checkpoints of the named reward models: the configured ones, else trained once and cached (as `videorl train`
    does; that needs the cached base)."""
    from orchestrator.inputs import reward_checkpoints
    from orchestrator.pretraining import base_policy

    specs = {n: cfg.rewards.models[n] for n in names}
    if all(s.checkpoint or s.kind not in ("videoreward", "feedback") for s in specs.values()):  # nothing to train
        return {n: s.checkpoint for n, s in specs.items()}
    sub = cfg.model_copy(deep=True)
    sub.rewards.models = specs
    return reward_checkpoints(sub, base_policy(sub))


def _guide_arg(cfg, args):
    """--guidance NAME (a differentiable reward of the config) -> a RewardGuide, or None. Checked before any work."""
    if args.guidance is None:
        return None
    from orchestrator.config import guidance_source
    from policy.rollout import RewardGuide

    if cfg.model.kind != "videodit":
        raise ValueError(f"--guidance differentiates a pixel-space reward: model.kind=videodit, not {cfg.model.kind}")
    if args.guidance_weight < 0 or args.guidance_beta <= 0:
        raise ValueError(f"--guidance-weight must be >= 0 and --guidance-beta > 0, got {args.guidance_weight} and "
                         f"{args.guidance_beta}")
    name, dim = guidance_source(cfg, args.guidance)
    checkpoint = _reward_checkpoints(cfg, [name])[name]
    return RewardGuide.from_checkpoint(checkpoint, dim, args.guidance_weight, args.guidance_beta)


def _eval_long(cfg, args, model, checkpoint, guide, samplers, eta, out: Path) -> None:
    """`videorl eval --frames N`: stream N-frame videos, score every clip-length window (oracle and, unless
    --oracle-only, the learned reward models); table, long_eval.json, long_eval.png, a GIF; the run's report too."""
    from orchestrator.evaluation import LONG_EVAL_FILE, evaluate_long, long_eval_json, long_eval_rows, plot_long_eval
    from orchestrator.inputs import score_all
    from orchestrator.media import save_gif
    from orchestrator.tables import format_table, write_json
    from policy.backend import video_shape
    from rewards.scorer import RewardScorer

    if (args.mode or cfg.rollout.mode) != "causal":
        raise ValueError("--frames streams long videos with the rolling KV cache: it needs --mode causal")
    if len(samplers) > 1:
        raise ValueError("--frames evaluates one sampler at a time; pass a single --sampler")
    sampler = samplers[0]
    score = None
    learned = [n for n, s in cfg.rewards.models.items() if s.kind != "oracle"]
    if learned and not args.oracle_only:
        ckpts = _reward_checkpoints(cfg, learned)
        models = {n: RewardScorer(cfg.rewards.models[n].kind, ckpts[n], (*video_shape(cfg.model), 3),
                                  **cfg.rewards.models[n].scorer_options()) for n in learned}

        def score(videos, prompts):
            return score_all(cfg, models, videos, prompts)

    start = time.perf_counter()
    res = evaluate_long(model, frames=args.frames, stride=args.stride, sampler=sampler,
                        eta=eta if sampler != "ode" else 0.0, steps=cfg.eval.steps, shift=cfg.eval.shift,
                        seeds_per_prompt=cfg.eval.seeds_per_prompt, seed=cfg.eval.seed, score=score, guide=guide)
    data = long_eval_json(res, checkpoint=str(checkpoint or cfg.model.path), sampler=sampler,
                          guidance=_guidance_info(args), seconds=round(time.perf_counter() - start, 1))
    rows = long_eval_rows(data)
    print(f"{args.frames}-frame videos ({len(res.prompts)} clips, {sampler}), scored per {res.window}-frame window "
          f"(stride {data['stride']})")
    print(format_table(rows))
    paths = [write_json(data, out / LONG_EVAL_FILE)]
    plot_long_eval(data).savefig(out / "long_eval.png", dpi=100)
    save_gif(res.videos[:: cfg.eval.seeds_per_prompt], out / f"long_samples_{sampler}.gif")
    run_dir = Path(checkpoint).parent if checkpoint is not None and Path(checkpoint).name == "final" else None
    if run_dir is not None and (run_dir / "summary.json").is_file():  # a run's final policy: its report shows the plot
        from orchestrator.report import write_report

        paths.append(write_json(data, run_dir / LONG_EVAL_FILE))
        paths.append(write_report(run_dir))
    print(f"wrote {', '.join(map(str, paths))}, {out / 'long_eval.png'} and a GIF in {out}/")


def _checkpoint_arg(cfg, given: str | None) -> Path | None:
    """--checkpoint (a run's final/, a base directory, a VideoDiT model.safetensors), else the config's cached base
    (None: the model as model.path holds it, for configs without pretraining)."""
    from orchestrator.config import base_checkpoint_dir
    from orchestrator.pretraining import DONE

    if given:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    if cfg.pretrain is None:
        return None
    path = base_checkpoint_dir(cfg)
    if not (path / DONE).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (run `videorl pretrain` first, or pass --checkpoint)")
    return path


def _per_prompt(res) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, list[float]]] = {}
    for i, p in enumerate(res.prompts):
        row = table.setdefault(p, {k: [] for k in res.scores})
        for k, v in res.scores.items():
            row[k].append(float(v[i]))
    return {p: {k: sum(v) / len(v) for k, v in row.items()} for p, row in table.items()}


def cmd_train(args) -> None:
    from orchestrator.tables import format_table
    from orchestrator.train import run_training
    from rewards.oracle import TERMS

    cfg = _config(args, driver=False)
    run_dir = Path(args.resume or cfg.train.run_dir)
    if args.resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        from orchestrator.config import load_config

        cfg = load_config(run_dir / "config.yaml", args.overrides)  # the run's own config, plus overrides
    stop = threading.Event()  # set by Ctrl-C / SIGTERM during the RL steps: finish the step, checkpoint, summarise
    summary = run_training(cfg, run_dir, resume=bool(args.resume), address=args.address, stop=stop)
    o = summary["oracle"]
    rows = [{"policy": k, **o[k]} for k in ("before", "after")]
    rows.append({"policy": "change", **{d: o["after"][d] - o["before"][d] for d in o["after"]}})
    print("held-out oracle\n" + format_table(rows, ["policy", "vq", "mq", "ta", "overall"]))
    t = summary["oracle_terms"]
    rows = [{"dimension": dim, "term": term, "before": t["before"][term], "after": t["after"][term],
             "change": t["after"][term] - t["before"][term]} for dim, names in TERMS.items() for term in names]
    print("\nheld-out oracle terms\n" + format_table(rows, ["dimension", "term", "before", "after", "change"]))
    cons = [{"constraint": c, **v} for c, v in summary["constraints"].items()]
    if cons:
        print("\nconstraints\n" + format_table(cons, ["constraint", "tau", "final", "satisfied", "training_batches"]))
    print(f"\nledger: {summary['ledger']}")
    print(f"run directory: {run_dir}  (report: {run_dir / 'report.html'})")


def cmd_calibrate(args) -> None:
    from orchestrator.inputs import ensure_calibration, reward_checkpoints
    from orchestrator.pretraining import base_policy
    from orchestrator.tables import format_table
    from rewards.calibration import read_calibration

    cfg = _config(args)
    base = base_policy(cfg)
    out = Path(args.out) if args.out else None
    path = ensure_calibration(cfg, base, reward_checkpoints(cfg, base), force=True, seed=args.seed, out=out)
    cal = read_calibration(path)
    rows = [{"profile": name, "constraint": c, **{k: v[k] for k in ("k", "mu", "sigma", "tau")}}
            for name, prof in cal["profiles"].items() for c, v in prof["constraints"].items()]
    print(format_table(rows, ["profile", "constraint", "k", "mu", "sigma", "tau"]))
    print(f"wrote {path}")


def cmd_doctor(args) -> None:
    from orchestrator.config import base_checkpoint_dir
    from orchestrator.pretraining import DONE
    from orchestrator.tables import format_table, write_json
    from policy.doctor import run_checks

    cfg = _config(args)
    weights = Path(args.checkpoint) if args.checkpoint else None
    if weights is None and cfg.pretrain is not None:
        cached = base_checkpoint_dir(cfg)
        weights = cached if (cached / DONE).is_file() else None  # the cached base when there is one
    if weights is not None and not weights.exists():
        raise FileNotFoundError(f"checkpoint not found: {weights}")
    # an untrained VideoDiT predicts v = 0 (adaLN-Zero): perturbed so every path is exercised
    trained = weights is not None or cfg.model.kind != "videodit"
    r = cfg.rollout
    checks = run_checks(cfg.model, weights, mode=r.mode, sampler=r.sampler, eta=r.eta, steps=r.steps, shift=r.shift,
                        group_size=r.group_size, clip_range=cfg.learner.clip_range, rollout_dtype=r.dtype,
                        trained=trained, seed=args.seed)
    rows = [c.row() for c in checks]
    print(f"videorl doctor: {cfg.model.kind} ({weights or getattr(cfg.model, 'path', None) or 'untrained, perturbed'}), "
          f"{r.mode} {r.sampler} eta {r.eta}, {r.steps} steps, dtype {cfg.model.dtype} / rollout {r.dtype or cfg.model.dtype}")
    print(format_table([{**row, "value": f"{row['value']:.3g}", "tolerance": f"{row['tolerance']:.3g}",
                         "passed": "ok" if row["passed"] else "FAIL"} for row in rows],
                       ["check", "value", "tolerance", "passed", "note"]))
    path = write_json({"config": str(args.config or "configs/tiny.yaml"), "weights": str(weights), "checks": rows},
                      Path(args.out) / "doctor.json")
    failed = [c.name for c in checks if not c.passed]
    print(f"wrote {path}; " + (f"{len(failed)} check(s) FAILED: {', '.join(failed)}" if failed else "every check passed"))
    if failed:
        raise SystemExit(1)


def cmd_model_init(args) -> None:
    from policy.wan.init import write_random_model

    info = write_random_model(args.out, preset=args.preset, seed=args.seed, kind=args.kind)
    size = sum(info["files"].values())
    params = ", ".join(f"{k} {v:,}" for k, v in info["params"].items())
    print(f"wrote a random {args.kind} model (preset {args.preset}, seed {args.seed}) to {args.out}: {size / 1e6:.1f} MB; "
          f"parameters: {params}; {'latent (VAE)' if info['latent'] else 'pixel space (no VAE)'}")
    if args.preset == "shapes" and args.kind == "wan_causal":
        print(f"use it with: videorl train --config configs/wan_shapes.yaml model.path={args.out}")
    else:
        print(f"use it with a config whose model section has kind: {args.kind} and path: {args.out}")


def cmd_scale(args) -> None:
    import ray

    from actors.control import NAMESPACE, find_control

    wanted = {}
    for item in args.reward:
        name, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--reward takes NAME=N (a reward model and a replica count), got {item!r}")
        wanted[name] = int(n)
    ray.init(address=args.address or "auto", namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    control = find_control()
    for name, n in wanted.items():
        ray.get(control.scale.remote(name, n))
    print(f"requested {wanted}; the job applies it at its next learner step (now: {ray.get(control.get_status.remote())})")


def cmd_reward(args) -> None:
    from orchestrator.config import cache_dir
    from orchestrator.pretraining import base_policy
    from orchestrator.reward_training import (bench_dirs, ensure_engagement_model, ensure_preference_data,
                                              ensure_reward_ensemble, ensure_reward_model, ensure_videoalign_model,
                                              reward_bench, reward_bench_seeds)
    from orchestrator.tables import format_table, write_json
    from rewards.preference import summary

    cfg = _config(args)
    r, cache, out = cfg.rewards, cache_dir(cfg), Path(args.out)
    base = base_policy(cfg)
    if args.action == "train" and args.model == "engagement":
        path, metrics = ensure_engagement_model(r.engagement, base, cache, force=args.force, mode=cfg.rollout.mode,
                                                steps=cfg.rollout.steps, shift=cfg.rollout.shift)
        print(format_table([{"predictor": k.removeprefix("auc_"), "held-out AUC": v} for k, v in metrics.items()
                            if k.startswith("auc")]))
        print(f"engagement predictor: {path}")
        write_json(metrics, out / "engagement.json")
        return
    data = ensure_preference_data(r.preference, base, cache, cfg.rollout.mode, cfg.rollout.steps,
                                  force=args.force and args.action == "data", shift=cfg.rollout.shift)
    if args.action == "data":
        print(json.dumps(summary(data), indent=2))
        print(f"preference data: {data}")
    elif args.action == "train" and args.model == "videoalign":
        path = ensure_videoalign_model(r.videoalign, data, cache, loss=args.loss, force=args.force)
        print(f"videoalign reward model ({args.loss or r.videoalign.loss}): {path}")
    elif args.action == "train":
        if args.loss is None and r.reward_model.ensemble:  # the run's reward: every member, then the ensemble
            path = ensure_reward_ensemble(r.reward_model, data, cache, force=args.force)
        else:
            path = ensure_reward_model(r.reward_model, data, cache, loss=args.loss, force=args.force)
        print(f"reward model ({args.loss or '+'.join([r.reward_model.loss, *r.reward_model.ensemble])}): {path}")
    elif args.seeds > 1 and args.models != ["videoreward"]:
        raise ValueError("--seeds > 1 benches VideoReward (--models videoreward) only")
    elif args.seeds > 1:  # bench over seeds: own data and models per seed
        rows, result = reward_bench_seeds(r, base, cache, args.seeds, args.losses, cfg.rollout.mode, cfg.rollout.steps,
                                          shift=cfg.rollout.shift)
        print(f"held-out pairwise accuracy over {args.seeds} seeds (rewards.preference.seed and "
              f"rewards.reward_model.seed + 0..{args.seeds - 1}): mean ± std, and the worst seed")
        print(format_table([{"loss": x["loss"], "ties": x["ties"],
                             **{d: f"{x[d + '_mean']:.3f} ± {x[d + '_std']:.3f}" for d in ("vq", "mq", "ta", "overall")},
                             "min vq/mq/ta": "/".join(f"{x[d + '_min']:.3f}" for d in ("vq", "mq", "ta"))} for x in rows]))
        print(f"wrote {write_json(result, out / 'reward_bench_seeds.json')}")
    else:  # bench
        dirs = bench_dirs(r.reward_model, data, cache, args.losses) if "videoreward" in args.models else {}
        vlm = {loss: ensure_videoalign_model(r.videoalign, data, cache, loss=loss)
               for loss in args.losses if "videoalign" in args.models}
        rows, result = reward_bench(dirs, data, videoalign_dirs=vlm)
        print("held-out pairwise accuracy (a tie counts right when |delta| is under the model's tie threshold)")
        print(format_table(rows))
        print(f"wrote {write_json(result, out / 'reward_bench.json')}")


def cmd_reward_serve(args) -> None:
    from orchestrator.reward_service import serve

    serve(_config(args), args.model, host=args.host, port=args.port, token_env=args.token_env)


def cmd_compare(args) -> None:
    from orchestrator.compare import COLUMNS, control_stats, plot_lambdas
    from orchestrator.metrics import read_metrics
    from orchestrator.tables import format_table, write_json

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not r.is_dir():
            raise FileNotFoundError(f"run directory not found: {r}")
    metrics = {r.name: read_metrics(r) for r in runs}
    rows = [row for r in runs for row in control_stats(r, metrics[r.name], smooth=args.smooth)]
    print(f"λ control loops (violation τ − batch mean R; smoothed: trailing mean of {args.smooth} steps, sign changes "
          f"beyond its noise)")
    print(format_table(rows, COLUMNS))
    out = Path(args.out)
    path = write_json({"smooth": args.smooth, "rows": rows}, out / "compare.json")
    plot_lambdas(metrics, smooth=args.smooth).savefig(out / "compare_lambda.png", dpi=110)
    print(f"\nwrote {path} and {out / 'compare_lambda.png'}")


def cmd_claims(args) -> None:
    from orchestrator.claims import evaluate_claim, load_claims, run_claims, side_sweeps, summary_rows, write_results
    from orchestrator.tables import format_table

    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    names = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    claims = load_claims(names, args.claims_dir, seeds=args.seeds, overrides=overrides)  # every run checked first
    out = Path(args.out)
    start = time.perf_counter()
    same = [*args.items, *(["--seeds", str(args.seeds)] if args.seeds else []),
            *(["--claims-dir", args.claims_dir] if args.claims_dir else [])]
    if args.jobs > 1 and not os.environ.get("OMP_NUM_THREADS"):  # each run's driver_threads default: a share of cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // args.jobs))
    sweeps = side_sweeps(same, out, args.jobs - 1)  # the same sweep beside this one: the run locks split the runs
    failed = run_claims(claims, out)
    for i, (proc, log) in enumerate(sweeps, 1):
        if proc.wait():
            failed.append(f"sweep {i} exited {proc.returncode} (log: {log})")
    if sweeps:  # every sweep's runs, now that all have finished
        write_results(out, {c.name: evaluate_claim(c, out) for c in claims}, seconds=time.perf_counter() - start)
    print(format_table(summary_rows(out, [c.name for c in claims]), ["claim", "verdict", "why"]))
    print(f"\nwrote {out / 'claims.json'}, {out / 'claims.html'} and {out / 'claims.md'} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"{len(failed)} run(s) failed:\n" + "\n".join(failed), file=sys.stderr)
        raise SystemExit(1)


def cmd_bench_kvcache(args) -> None:
    from orchestrator.tables import format_table, write_json
    from policy.backend import init_policy
    from policy.kv_bench import kvcache_benchmark

    cfg = _config(args, driver=False)  # a rollout actor's threads
    model = init_policy(cfg.model).eval()  # timing needs no training
    rows = kvcache_benchmark(model, group_size=cfg.rollout.group_size, steps=cfg.rollout.steps)
    shape = model.shape
    lengths = [{k: v for k, v in r.items() if k != "bench"} for r in rows if r["bench"] == "length"]
    groups = [{k: v for k, v in r.items() if k != "bench"} for r in rows if r["bench"] == "group"]
    print(f"rolling KV cache (window {shape.window} frames, sink {shape.sink}): per-chunk time and cache size "
          f"at 4x, 8x, 16x the training length\n" + format_table(lengths))
    print("\nG candidates sharing a frozen prefix vs G independent rollouts\n" + format_table(groups))
    path = write_json({"lengths": lengths, "group": groups}, Path(args.out) / "bench_kvcache.json")
    print(f"\nwrote {path}")


def cmd_bench_payload(args) -> None:
    from orchestrator.payload_bench import COLUMNS, payload_bench
    from orchestrator.tables import format_table, write_json

    result = payload_bench(_config(args), seed=args.seed)
    st = result["settings"]
    print(f"bytes per group through the object store ({st['model']}, G={st['group_size']}, K={st['steps']} steps, "
          f"latents {st['latent_shape']}, prefix {st['prefix_chunks']} chunks); this config: {st['this_config']}\n"
          + format_table(result["rows"], COLUMNS))
    path = write_json(result, Path(args.out) / "bench_payload.json")
    print(f"\nwrote {path}")


def cmd_bench_pipeline(args) -> None:
    from orchestrator import bench
    from orchestrator.cluster import connect
    from orchestrator.tables import format_table, write_json

    cfg = _config(args, driver=False)  # the synchronous loop on the actors' threads
    connect(cfg, args.address)
    result = {}
    if args.mode in ("real", "both"):
        real = bench.real_pipeline(cfg, steps=args.steps, warmup_steps=args.warmup_steps)
        print(f"real: the same work synchronously and through the actor pipeline ({real['note']})")
        print(format_table(real["rows"], bench.REAL_COLUMNS) + f"\npipeline / synchronous = {real['ratio']:.2f}; "
              f"efficiency {real['efficiency']:.2f} of the slowest stage's {real['bound_clips_per_s']:.2f} clips/s "
              f"(stage s/step: " + ", ".join(f"{k} {v:.2f}" for k, v in real["synchronous"]["stage_seconds_per_step"].items())
              + ")")
        for name in ("synchronous", "pipeline"):
            res = real[name]
            print(f"CPU s/step, {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res["cpu_seconds_per_step"].items())
                  + f" ({res['cores_busy']:.2f} cores busy)")
        tax = real["sharing_tax"]
        print(f"the pipeline spends {real['cpu_ratio']:.2f}x the loop's CPU on the same work: the cores allow it "
              f"{real['cpu_bound_clips_per_s']:.2f} clips/s at most")
        print(f"sharing the machine: a rollout actor spends {tax['alone_ms_per_group']:.1f} CPU ms per group alone, "
              f"{tax['together_ms_per_group']:.1f} with another computing at once ({tax['tax']:.2f}x): the loop's "
              f"work on all cores at that cost is {real['tax_bound_clips_per_s']:.2f} clips/s = "
              f"{real['tax_bound_clips_per_s'] / real['synchronous']['clips_per_s']:.2f}x the loop here\n")
        result["real"] = real
    if args.mode in ("simulated", "both"):
        kw = dict(rollout_s=args.rollout_s, reward_s=args.reward_s, reward_replicas=args.reward_replicas,
                  learner_s=args.learner_s, groups_per_step=args.groups_per_step, max_staleness=args.max_staleness,
                  per_worker=args.per_worker, groups_per_call=args.groups_per_call,
                  reward_batch_max=args.reward_batch_max)
        if args.scale_at or args.autoscale or args.control:
            scale_at = dict(map(int, item.split("=")) for item in args.scale_at or [])
            run = bench.simulated_pipeline(args.actors[-1], steps=args.sim_steps or 12, scale_at=scale_at,
                                           autoscale=_autoscale_arg(args.autoscale), named_control=args.control,
                                           **{k: v for k, v in kw.items() if v is not None})
            print(format_table(run["steps"], bench.SIM_STEP_COLUMNS))
            print("\nreward throughput per replica count\n" + format_table(run["reward_scaling"], bench.SCALE_COLUMNS))
            result["simulated"] = run
        else:
            kw = {k: v for k, v in kw.items() if v is not None and not (args.balanced and k in ("reward_s", "learner_s"))}
            sweep = bench.simulated_sweep(tuple(args.actors), measure_s=args.measure_s, sync=args.sync,
                                          balanced=args.balanced, **kw)
            print("simulated device time: efficiency = throughput / bound (the slowest stage's groups/s); idle per "
                  "stage as waiting for input / blocked on output")
            print(format_table([bench.table_row(r) for r in sweep["rows"]], bench.SIM_COLUMNS))
            result["simulated"] = sweep
        if args.ceiling:
            top = bench.ceiling(args.actors[-1], measure_s=min(args.measure_s, 10.0))
            pipe, floor = top["pipeline"], top["ray_calls_only"]
            print(f"\nceiling ({args.actors[-1]} actors, every stage ~0 s): {pipe['throughput']:.0f} groups/s; driver "
                  f"{pipe['driver_ms_per_group']:.2f} ms CPU per group ({pipe['driver_main_ms_per_group']:.2f} in its "
                  f"main thread), {pipe['driver_cpu_util']:.2f} cores busy; machine {pipe['machine_cpu_util']:.0%} busy\n"
                  f"the same Ray calls without orchestration: {floor['groups_per_s']:.0f} groups/s, "
                  f"{floor['driver_ms_per_group']:.2f} ms CPU per group; orchestration adds "
                  f"{top['orchestration_ms_per_group']:.2f} ms")
            result["ceiling"] = top
    path = write_json(result, Path(args.out) / "bench_pipeline.json")
    print(f"\nwrote {path}")


def _autoscale_arg(text: str | None):
    """A YAML mapping of AutoscaleConfig fields, e.g. '{min: 1, max: 3, upscale_patience: 3}' (None for None)."""
    if text is None:
        return None
    import yaml

    from orchestrator.autoscale import AutoscaleConfig

    fields = yaml.safe_load(text)
    if not isinstance(fields, dict):
        raise ValueError(f"--autoscale takes a mapping such as '{{min: 1, max: 3}}', got {text!r}")
    return AutoscaleConfig(**fields)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videorl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="YAML config (default configs/tiny.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=func)
        return p

    p = add("pretrain", cmd_pretrain, "pretrain the base (SFT) generator by flow matching, cached per config")
    p.add_argument("--force", action="store_true", help="retrain even when the cached checkpoint exists")

    p = add("eval", cmd_eval, "sample held-out prompts, print oracle scores, write JSON and a GIF grid")
    p.add_argument("--checkpoint", help="model.safetensors (default: the cached base model of the config)")
    p.add_argument("--sampler", action="append", choices=["ode", "flow_grpo", "dance_grpo", "sage", "cps"],
                   help="sampler (repeat to compare several; default eval.sampler)")
    p.add_argument("--eta", type=float, help="SDE noise level (default eval.eta)")
    p.add_argument("--mode", choices=["bidirectional", "causal"], help="attention mode (default rollout.mode)")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--frames", type=int, help="long-video evaluation: stream N-frame videos (causal) and score every "
                                              "training-clip-length window; writes long_eval.json and long_eval.png")
    p.add_argument("--stride", type=int, help="--frames: frames between window starts (default: the clip length, "
                                              "consecutive windows; a multiple of model.chunk)")
    p.add_argument("--oracle-only", action="store_true", help="--frames: skip the learned reward models")
    p.add_argument("--guidance", metavar="REWARD", help="reward-guided sampling (VideoAlign) through this "
                                                        "differentiable reward (a videoreward dimension, e.g. ta)")
    p.add_argument("--guidance-weight", type=float, default=1.0, help="guidance weight w (default 1)")
    p.add_argument("--guidance-beta", type=float, default=1.0, help="guidance temperature β (default 1)")

    p = add("train", cmd_train, "RL post-training on a Ray cluster (default: configs/tiny.yaml on a local cluster)")
    p.add_argument("--address", help="Ray cluster address (default: ray.address, $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest good checkpoint")

    reward = sub.add_parser("reward", help="preference data, reward models, engagement predictor, reward bench")
    rsub = reward.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (("data", "build oracle-labelled preference pairs (cached)"),
                              ("train", "train a VideoReward model (or the engagement predictor), cached"),
                              ("bench", "held-out pairwise accuracy of each loss, with and without ties")):
        p = rsub.add_parser(action, help=help_text, description=help_text)
        p.add_argument("--config")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value")
        p.add_argument("--out", default="runs/reward")
        p.add_argument("--force", action="store_true", help="rebuild even when cached")
        p.set_defaults(func=cmd_reward)
        if action == "train":
            p.add_argument("--loss", choices=["regression", "bt", "btt"],
                           help="default rewards.reward_model.loss (rewards.videoalign.loss with --model videoalign)")
            p.add_argument("--model", choices=["videoreward", "videoalign", "engagement"], default="videoreward",
                           help="videoalign: a tiny VideoAlign VLM reward (rewards.videoalign), see rewards.videoalign.*")
        if action == "bench":
            p.add_argument("--losses", nargs="+", default=["regression", "bt", "btt"], choices=["regression", "bt", "btt"])
            p.add_argument("--models", nargs="+", default=["videoreward"], choices=["videoreward", "videoalign"],
                           help="reward models to bench at each loss (videoalign: trained with rewards.videoalign.*)")
            p.add_argument("--seeds", type=int, default=1, help="seeds of data and reward models (> 1: mean ± std, "
                           "writes reward_bench_seeds.json)")

    help_text = "serve a configured reward model over HTTP for `kind: http` (msgpack + raw frames, no pickle)"
    p = rsub.add_parser("serve", help=help_text, description=help_text)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--model", required=True, help="a name in rewards.models")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-env", metavar="VAR", help="require the bearer token held in environment variable VAR")
    p.set_defaults(func=cmd_reward_serve)

    p = add("calibrate", cmd_calibrate, "SCRL thresholds: score base-model samples, write tau = mu + k sigma per profile")
    p.add_argument("--seed", type=int, help="sampling seed (default rewards.calibration.seed)")
    p.add_argument("--out", help="JSON path (default: the cached calibration of the config)")

    p = add("doctor", cmd_doctor, "consistency checks of the configured policy and sampler: importance ratio, "
                                  "cache vs teacher forcing, shared prefix, adapter sync, VAE; exit 1 if one fails")
    p.add_argument("--checkpoint", help="weights to check (default: the config's cached base, else its starting point)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/doctor")

    model = sub.add_parser("model", help="real-model utilities: write a random Wan model to try the real path offline")
    msub = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = msub.add_parser("init", help="write a small random Wan model in diffusers format (nothing downloaded)",
                        description="write a small random Wan model in diffusers format (transformer, VAE for latent "
                                    "presets, text encoder, an offline tokenizer, scheduler config)")
    p.add_argument("--kind", choices=["wan", "wan_causal"], default="wan_causal")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--preset", choices=["shapes", "tiny", "wan2.1-1.3b"], default="shapes",
                   help="shapes: pixel space for the shapes world (default); tiny: latent with a tiny VAE; "
                        "wan2.1-1.3b: the real 1.3B transformer shape (3.4 GB, for GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_model_init)

    p = sub.add_parser("scale", help="change a running job's reward replicas", description="change a running job's reward replicas")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or the local cluster)")
    p.add_argument("--reward", action="append", required=True, metavar="NAME=N", help="reward model and replica count")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("compare", help="λ control loops of finished runs side by side (PID vs primal-dual ablation)",
                       description="λ control loops of finished runs side by side (PID vs primal-dual ablation)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--smooth", type=int, default=10, help="trailing-mean window for the smoothed violation (steps)")
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(func=cmd_compare)

    help_text = "test each paper's claim over seeds (configs/claims/*.yaml): claims.json, claims.html and claims.md"
    p = sub.add_parser("claims", help=help_text, description=help_text + "; finished runs are reused")
    p.add_argument("items", nargs="*", metavar="NAME | key.sub=value",
                   help="claims to run (default: all) and overrides for every run (e.g. train.steps=20)")
    p.add_argument("--seeds", type=int, help="seeds per claim (default: each claim's `seeds`)")
    p.add_argument("--out", default="runs/claims", help="output folder (default runs/claims)")
    p.add_argument("--claims-dir", help="folder of claim YAMLs (default configs/claims)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once: this many sweeps side by side, each a run at a "
                   "time on its own local Ray cluster (default 1; 2 on 2 cores: runs that build cached inputs use "
                   "one core)")
    p.set_defaults(func=cmd_claims)

    bench = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bsub.add_parser("kvcache", help="rolling KV cache: per-chunk time and cache bytes vs length; shared-prefix groups")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_kvcache)
    p = bsub.add_parser("payload", help="bytes per group through the object store: reward batch and learner payload, "
                                        "by field, before and after (loss family x rollout.payload_dtype)")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--seed", type=int, default=0, help="the group's seed (its prefix length)")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_payload)
    p = bsub.add_parser("pipeline", help="synchronous vs actor pipeline throughput; simulated-device efficiency")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--mode", choices=["real", "simulated", "both"], default="both")
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--steps", type=int, default=10, help="real mode: learner steps per loop")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="simulated: rollout actor counts")
    p.add_argument("--rollout-s", type=float, default=1.0, help="simulated seconds per rollout group")
    p.add_argument("--reward-s", type=float, help="simulated seconds per reward batch (default 0.02)")
    p.add_argument("--reward-replicas", type=int, default=2)
    p.add_argument("--learner-s", type=float, help="simulated seconds per learner step (default 0.05)")
    p.add_argument("--groups-per-step", type=int, help="default 8; with --balanced, the actor count")
    p.add_argument("--max-staleness", type=int, default=2)
    p.add_argument("--per-worker", type=int, default=1, help="simulated: rollout calls queued per actor")
    p.add_argument("--groups-per-call", type=int, default=1,
                   help="simulated: groups per generate call (rollout.groups_per_call)")
    p.add_argument("--reward-batch-max", type=int, default=4, help="simulated: groups per reward call at most")
    p.add_argument("--balanced", action="store_true",
                   help="simulated: reward and learner times such that no stage is the bottleneck "
                        "(rollout-s / actors = reward-s / replicas = learner-s / groups-per-step)")
    p.add_argument("--sync", action="store_true", help="simulated: also the synchronous loop, for the speed-up")
    p.add_argument("--ceiling", action="store_true",
                   help="simulated: also the most groups/s the pipeline sustains here (stage times ~0) and what bounds it")
    p.add_argument("--measure-s", type=float, default=30.0,
                   help="simulated: seconds of work (at the bound) measured per row after a warm-up step")
    p.add_argument("--sim-steps", type=int, help="simulated steps when scaling (default 12)")
    p.add_argument("--scale-at", action="append", metavar="STEP=REPLICAS",
                   help="simulated: request reward replicas at a step through the control actor, as `videorl scale` "
                        "does (one run at the largest --actors)")
    p.add_argument("--autoscale", metavar="'{min: 1, max: 3, ...}'",
                   help="simulated: let the autoscaler size the reward pool (one run at the largest --actors)")
    p.add_argument("--control", action="store_true",
                   help="simulated: name the run's control actor so `videorl scale --address ... --reward simulated=N` "
                        "from another shell resizes it (one run at the largest --actors)")
    p.set_defaults(func=cmd_bench_pipeline)
    return parser


class _ProgressLines:
    """stderr when it is not a terminal (a log file, `ray job logs`): each progress-bar redraw becomes its own line
    (at most one every $VIDEORL_PROGRESS_S seconds per bar: orchestrator.progress), instead of one long line of
    carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text.replace("\r", "\n").replace("\n\n", "\n"))

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not sys.stderr.isatty() and not isinstance(sys.stderr, _ProgressLines):
            redraw_every(progress_interval())
            sys.stderr = _ProgressLines(sys.stderr)
        args.func(args)
    # ConnectionError: a reward service (`kind: http`) that did not answer within its retries
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, ConnectionError, LearnerCrashLoop) as e:
        if os.environ.get("VIDEORL_DEBUG"):
            raise
        print(f"videorl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
