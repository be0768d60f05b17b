"""The rollout payload (policy.rollout.trajectory_payload): its reported bytes are its buffers', float16 / bfloat16
storage halves the latents and the learner still computes in float32, a payload holding only what the learner reads
trains exactly as the whole trajectory does, object-store arrays are read without copies, rollout.payload_dtype is
validated and reaches the rollout worker."""

import warnings

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, load_config
from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.rollout import RolloutWorker, buffer_bytes, payload_options, trajectory_from_payload

from .helpers import SDE_ROLLOUTS, make_model

PROMPT = "a red circle moving left quickly"
REWARDS = np.array([0.1, 0.9, 0.4, 0.6], dtype=np.float32)
STEPS, G = 4, 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("payload") / "base"
    make_model().save(path)
    return str(path)


def generate(base, seed=3, **kw):
    w = RolloutWorker(make_model().cfg, base, mode="causal", sampler="sage", eta=0.7, steps=STEPS, shift=1.0,
                      group_size=G, **kw)
    return w.generate("g", PROMPT, seed)


def read_only(payload):
    """What ray.get returns: numpy arrays are read-only views of the object store."""
    for v in payload.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    return payload


def step(loss, payload, **kw):
    """One learner step (fresh model, seed 0) on the payload's group -> (stats, flat gradient)."""
    lrn = Learner(make_model(), LearnerConfig(loss=loss, **kw), total_steps=10, seed=0)
    traj = trajectory_from_payload(payload)
    stats = lrn.step([ScoredGroup("g", payload["cond"], traj, {"r": REWARDS}, 0)], "r", {}, {})
    return stats, torch.cat([p.grad.reshape(-1) for p in lrn.model.trainable_parameters() if p.grad is not None])


def test_the_bytes_reported_are_the_buffers_sizes(base):
    batch, payload, meta = generate(base)
    k1, t = STEPS + 1, 8  # the test model: 8 frames of 3 x 16 x 16, 4 chunks of 2
    trained_chunks = 4 - payload["prefix_chunks"]
    assert payload["latents"].shape == (G, k1, t, 3, 16, 16) and payload["log_probs"].shape == (G, trained_chunks, STEPS)
    assert meta["payload_bytes"] == (G * k1 * t * 3 * 16 * 16 * 4 + G * trained_chunks * STEPS * 4 + k1 * 4
                                     + payload["cond"].numel() * 8)  # latents, log-probs, sigmas float32, cond int64
    assert meta["batch_bytes"] == G * t * 16 * 16 * 3 == batch["videos"].nbytes  # uint8 frames; ids, prompts: none
    nested = {"a": np.zeros((2, 3), np.float16), "b": [torch.zeros(5, dtype=torch.float64), "text", 7],
              "c": {"d": (np.zeros(4, np.uint8),)}}
    assert buffer_bytes(nested) == 12 + 40 + 4


@pytest.mark.parametrize("dtype, numpy_dtype, rtol", [("float16", np.float16, 2.0**-11), ("bfloat16", np.uint16, 2.0**-8)])
def test_narrow_storage_halves_the_latents_and_the_learner_reads_float32(base, dtype, numpy_dtype, rtol):
    _, full, meta32 = generate(base)
    _, narrow, meta = generate(base, payload_dtype=dtype)
    assert narrow["latents"].dtype == numpy_dtype and narrow["latents"].nbytes * 2 == full["latents"].nbytes
    assert meta32["payload_bytes"] - meta["payload_bytes"] == full["latents"].nbytes // 2
    assert narrow["log_probs"].dtype == np.float32 and np.array_equal(narrow["log_probs"], full["log_probs"])
    ref, got = trajectory_from_payload(full), trajectory_from_payload(read_only(narrow))
    assert got.latents.dtype == torch.float32 and got.log_probs.dtype == torch.float32
    err = ((got.latents - ref.latents).abs() / ref.latents.abs().clamp_min(1e-3)).max().item()
    assert 0 < err <= rtol  # rounded to nearest: half an ulp of the stored dtype at most
    a, b = step("nft", full)[0], step("nft", narrow)[0]
    assert a["loss/policy"] != b["loss/policy"] and a["loss/policy"] == pytest.approx(b["loss/policy"], rel=20 * rtol)


@pytest.mark.parametrize("loss", ["nft", "flow_rwr", "sft", "flow_dpo"])
def test_a_clean_clip_payload_trains_exactly_as_the_whole_trajectory(base, loss):
    """The forward-process losses read x0 only: the payload without the sampler steps gives the same loss and
    gradients, bit for bit, at (K+1) times fewer latent bytes and no log-probs."""
    _, whole, meta_whole = generate(base)
    _, clean, meta = generate(base, keep_steps=False)
    assert clean["latents"].shape[1] == 1 and clean["log_probs"] is None and clean["levels"] == [STEPS]
    assert np.array_equal(clean["latents"][:, 0], whole["latents"][:, -1])
    assert meta["payload_bytes"] < meta_whole["payload_bytes"] / STEPS
    (sa, ga), (sb, gb) = step(loss, whole), step(loss, clean)
    assert sa["loss/policy"] == sb["loss/policy"] and torch.equal(ga, gb) and ga.abs().sum() > 0


def test_ppo_never_reads_the_prefix_chunks_log_probs_and_refuses_a_clean_clip_payload(base):
    """The payload drops the shared prefix's log-probs; the learner's NaN stand-ins never reach the loss: the step
    equals one with any other numbers there, and the first (on-policy) ratio is exactly 1."""
    _, payload, _ = generate(base, seed=5)
    assert payload["prefix_chunks"] > 0 and payload["log_probs"].shape[1] == 4 - payload["prefix_chunks"]
    assert torch.isnan(trajectory_from_payload(payload).log_probs[:, : payload["prefix_chunks"]]).all()
    stats, grad = step("ppo", payload, kl="dual")
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["clip_fraction"] == 0.0
    lrn = Learner(make_model(), LearnerConfig(loss="ppo", kl="dual"), total_steps=10, seed=0)
    traj = trajectory_from_payload(payload)
    traj.log_probs = torch.nan_to_num(traj.log_probs, nan=123.0)
    other = lrn.step([ScoredGroup("g", payload["cond"], traj, {"r": REWARDS}, 0)], "r", {}, {})
    other_grad = torch.cat([p.grad.reshape(-1) for p in lrn.model.trainable_parameters() if p.grad is not None])
    assert other["loss/policy"] == stats["loss/policy"] and torch.equal(other_grad, grad) and torch.isfinite(grad).all()
    _, clean, _ = generate(base, keep_steps=False)
    with pytest.raises(ValueError, match="learner.loss=ppo re-scores sampler steps"):
        step("ppo", clean)


def test_object_store_arrays_are_read_without_a_copy_or_a_warning(base):
    _, payload, _ = generate(base)
    payload = read_only(payload)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a read-only array unless the reader handles it
        traj = trajectory_from_payload(payload)
    assert traj.latents.data_ptr() == payload["latents"].ctypes.data  # the store's buffer itself
    assert traj.sigmas.data_ptr() == payload["sigmas"].ctypes.data
    _, narrow, _ = generate(base, payload_dtype="bfloat16")
    assert trajectory_from_payload(read_only(narrow)).latents.data_ptr() != narrow["latents"].ctypes.data  # a cast


def test_rollout_payload_dtype_is_validated_and_reaches_the_worker(base):
    with pytest.raises(ConfigError, match="rollout.payload_dtype"):
        load_config(None, ["rollout.payload_dtype=float8"])
    with pytest.raises(ValueError, match="rollout.payload_dtype must be one of"):
        generate(base, payload_dtype="float8")
    assert load_config(None, []).rollout.payload_dtype == "float32"
    shapes = {}
    ppo = ["learner.loss=ppo", *SDE_ROLLOUTS]
    for overrides in ([], ["rollout.payload_dtype=bfloat16"], ppo):
        _, payload, meta = generate(base, **payload_options(load_config(None, overrides)))
        shapes[tuple(overrides)] = (payload["latents"].dtype, payload["latents"].shape[1], meta["payload_bytes"])
    (d0, l0, b0), (d1, l1, b1), (d2, l2, b2) = shapes.values()
    assert (d0, l0) == (np.float32, 1) and (d1, l1) == (np.uint16, 1) and (d2, l2) == (np.float32, STEPS + 1)
    assert b1 < b0 < b2  # tiny.yaml trains nft: the clean clip only; ppo keeps every level


def test_the_payload_bench_reports_before_and_after_from_the_same_group():
    from orchestrator.payload_bench import payload_bench

    rows = payload_bench(load_config(None, ["rollout.group_size=2", "rollout.steps=2"]))["rows"]
    before, after = rows[0], {(r["learner_reads"].startswith("every"), r["payload_dtype"]): r for r in rows[1:]}
    assert before["latents"] == 2 * 3 * 8 * 3 * 16 * 16 * 4 and before["log_probs"] == 2 * 4 * 2 * 4  # [G, K+1, ...]
    assert after[False, "float32"]["latents"] == before["latents"] // 3  # x0: one level of K+1
    assert after[False, "bfloat16"]["latents"] == after[True, "float16"]["latents"] // 3 == before["latents"] // 6
    assert all(r["batch_bytes"] == 2 * 8 * 16 * 16 * 3 for r in rows)  # the uint8 reward batch, once
