"""`videorl bench payload`: bytes per group through the object store, before and after the payload work.

One group of the config's untrained policy (the bytes do not depend on the weights), made once by a local RolloutWorker
with every level kept; each row stores that same trajectory as `trajectory_payload` would:
- before: what rollouts stored until the payload work: float32 latents at every sigma level [G, K+1, T, C, H, W] and
  log-probs of every chunk [G, n_chunks, K], whatever the loss;
- after: `policy.rollout.trajectory_payload` for each loss family (x0 only for nft / flow_dpo / flow_rwr / sft, every
  level for ppo) and each rollout.payload_dtype.
The reward batch (uint8 frames, ids, prompts) is the same in every row.
"""

from __future__ import annotations

import tempfile

from policy.rollout import (PAYLOAD_DTYPES, RolloutWorker, buffer_bytes, trajectory_from_payload, trajectory_payload,
                            worker_options)

COLUMNS = ["payload", "learner_reads", "payload_dtype", "batch_bytes", "latents", "log_probs", "cond", "sigmas",
           "payload_bytes", "vs_before"]
READS = {False: "x0 (nft, flow_dpo, flow_rwr, sft)", True: "every step (ppo)"}


def payload_bench(cfg, seed: int = 0, prompt: str | None = None) -> dict:
    """-> {"rows": COLUMNS rows (bytes per group), "settings": ...}; rows[0] is "before"."""
    from orchestrator.bench import _untrained_base
    from orchestrator.inputs import training_prompts

    r = cfg.rollout
    prompt = prompt or training_prompts(cfg)[0]
    with tempfile.TemporaryDirectory() as tmp:  # one group, every level and log-prob: each row is cut from it
        worker = RolloutWorker(cfg.model, _untrained_base(cfg, tmp),
                               **dict(worker_options(cfg), keep_steps=True, payload_dtype="float32"))
        batch, whole, _ = worker.generate("g0", prompt, seed)
    traj = trajectory_from_payload(whole)  # every level, log-probs of every chunk (the prefix's are stand-ins)
    before = {"latents": traj.latents.numel() * 4, "log_probs": traj.log_probs.numel() * 4,
              "cond": buffer_bytes(whole["cond"]), "sigmas": traj.sigmas.numel() * 4}
    before_total = sum(before.values())
    rows = [{"payload": "before", "learner_reads": "every step (all losses)", "payload_dtype": "float32",
             "batch_bytes": buffer_bytes(batch), **before, "payload_bytes": before_total, "vs_before": 1.0}]
    for keep in (False, True):
        for dtype in PAYLOAD_DTYPES:
            payload = {"cond": whole["cond"], **trajectory_payload(traj, keep_steps=keep, dtype=dtype)}  # as generate
            fields = {k: buffer_bytes(payload[k]) for k in ("latents", "log_probs", "cond", "sigmas")}
            total = buffer_bytes(payload)
            if sum(fields.values()) != total:  # every buffer is in one of the columns
                raise AssertionError(f"payload fields {fields} do not add up to its {total} bytes")
            rows.append({"payload": "after", "learner_reads": READS[keep], "payload_dtype": dtype,
                         "batch_bytes": buffer_bytes(batch), **fields, "payload_bytes": total,
                         "vs_before": round(total / before_total, 4)})
    return {"rows": rows, "settings": {
        "model": cfg.model.kind, "group_size": r.group_size, "steps": r.steps, "mode": r.mode,
        "prefix_chunks": whole["prefix_chunks"], "latent_shape": list(whole["latents"].shape),
        "video_shape": list(batch["videos"].shape), "loss": cfg.learner.loss,
        "this_config": {"learner_reads": READS[cfg.learner.reads_steps], "payload_dtype": r.payload_dtype},
        "seed": seed, "prompt": prompt}}
