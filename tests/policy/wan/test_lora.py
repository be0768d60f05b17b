"""LoRA on the Wan policy (peft through diffusers' adapter API): what the learner trains, publishes and keeps."""

import numpy as np
import pytest
import torch

from policy.backend import load_policy, trainable_bytes
from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.sampling import sample
from policy.wan.config import LoraConfig

from .conftest import perturb_adapters, wan

LORA = LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
PROMPT = ["a red circle moving left quickly"]


def velocities(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 3, 16, 16, generator=g)
    cond = policy.encode_prompts(PROMPT * 2)
    with torch.no_grad():
        return policy.velocity_causal(x, torch.tensor([0.4, 0.9]), torch.randn(x.shape, generator=g), cond)


def test_a_fresh_adapter_and_a_disabled_one_are_the_base(model_dirs):
    base = wan(model_dirs["shapes"])
    policy = wan(model_dirs["shapes"], lora=LORA)
    assert torch.equal(velocities(policy), velocities(base))  # lora_B starts at 0
    perturb_adapters(policy)
    assert (velocities(policy) - velocities(base)).abs().max() > 1e-2
    reference = policy.frozen_copy("reference")
    assert torch.equal(velocities(reference), velocities(base))  # adapters off == the base model, exactly
    assert reference.trainable_state() == {} and reference.trainable_parameters() == []
    assert (velocities(policy) - velocities(base)).abs().max() > 1e-2  # the view gave "default" back


def test_only_adapter_tensors_are_trained_and_published(model_dirs):
    policy = wan(model_dirs["shapes"], lora=LORA, for_training=True)
    state = policy.trainable_state()
    assert state and all("lora_A" in k or "lora_B" in k for k in state)
    assert len(state) == 2 * 4 * 4 * 2  # (A, B) x 4 projections x 4 blocks x (self-, cross-attention)
    full = wan(model_dirs["shapes"]).trainable_state()
    assert trainable_bytes(state) < trainable_bytes(full) / 5
    params = {id(p) for p in policy.trainable_parameters()}
    assert all(p.requires_grad == (id(p) in params) for p in policy.transformer.parameters())


def _group(policy, seed=0):
    cond = policy.encode_prompts(PROMPT)
    traj = sample(policy, cond, steps=3, sde_type="sage", eta=0.7, mode="causal", group_size=4, prefix_chunks=1,
                  generator=torch.Generator().manual_seed(seed))
    rewards = {"r": np.array([0.1, 0.9, 0.4, 0.6], dtype=np.float32)}
    return ScoredGroup("g0", cond, traj, rewards, 0)


@pytest.mark.parametrize("loss", ["nft", "ppo"])
def test_a_learner_step_moves_the_adapter_not_the_base_and_the_old_adapter_lags(model_dirs, loss):
    policy = wan(model_dirs["shapes"], lora=LORA, for_training=True)
    base_before = {k: v.clone() for k, v in policy.transformer.state_dict().items() if "lora_" not in k}
    learner = Learner(policy, LearnerConfig(loss=loss, lr=1e-2, kl="dual", nft_old_ema=0.5), total_steps=10)
    adapter_before = policy.trainable_state()
    stats = learner.step([_group(policy)], "r", {}, {})
    assert stats["weights/bytes_per_version"] == trainable_bytes(adapter_before)
    after = policy.trainable_state()
    assert max((after[k] - adapter_before[k]).abs().max() for k in after) > 0
    for k, v in policy.transformer.state_dict().items():
        if "lora_" not in k and k in base_before:
            assert torch.equal(v, base_before[k]), k  # base weights never move
    if loss == "nft":  # old <- 0.5 old + 0.5 new: halfway between the initial adapter and the updated one
        old = learner.old.trainable_state()
        for k in after:
            torch.testing.assert_close(old[k], 0.5 * adapter_before[k] + 0.5 * after[k])
    assert torch.equal(velocities(learner.reference), velocities(wan(model_dirs["shapes"])))


def test_the_adapter_round_trip_to_a_fresh_worker_reproduces_the_learners_velocities(model_dirs):
    learner_policy = wan(model_dirs["shapes"], lora=LORA, for_training=True)
    Learner(learner_policy, LearnerConfig(lr=1e-2), total_steps=5).step([_group(learner_policy)], "r", {}, {})
    worker = wan(model_dirs["shapes"], lora=LORA)  # a rollout worker: the same base, a fresh adapter
    worker.load_trainable_state({k: v.numpy() for k, v in learner_policy.trainable_state().items()})  # via the store
    assert torch.equal(velocities(worker), velocities(learner_policy))
    with pytest.raises(ValueError, match="adapter state does not fit"):
        worker.load_trainable_state({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64)})


def test_saved_adapter_loads_back_with_its_base(model_dirs, tmp_path):
    policy = wan(model_dirs["shapes"], lora=LORA)
    perturb_adapters(policy)
    out = policy.save(tmp_path / "final")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "videorl_policy.json"]
    again = load_policy(policy.cfg, out, device="cpu")
    assert torch.equal(velocities(again), velocities(policy))
    with pytest.raises(ValueError, match="adapter made with lora"):
        load_policy(policy.cfg.model_copy(update={"lora": LoraConfig(rank=8)}), out, device="cpu")


def test_gradient_checkpointing_gives_the_same_gradients(model_dirs):
    """Blocks are recomputed in backward; the per-call attention state rides in rotary_emb, a block input, so the
    recomputation sees the forward's mask, cache and history detach even after other calls ran in between."""
    grads, adapter = [], None
    for checkpointing in (False, True):
        policy = wan(model_dirs["shapes"], lora=LORA, for_training=True, gradient_checkpointing=checkpointing,
                     window=6, sink=2).train()
        assert policy.transformer.gradient_checkpointing == checkpointing
        if adapter is None:  # peft draws lora_A at random: both runs get the same adapter
            perturb_adapters(policy)
            adapter = policy.trainable_state()
        policy.load_trainable_state(adapter)
        g = torch.Generator().manual_seed(3)
        x, clean = torch.randn(2, 8, 3, 16, 16, generator=g), torch.randn(2, 8, 3, 16, 16, generator=g)
        cond = policy.encode_prompts(PROMPT * 2)
        loss = policy.velocity_causal(x, torch.tensor([0.3, 0.7]), clean, cond, detach_history=True).square().mean()
        policy.frozen_copy("old").velocity(x, torch.tensor([0.5, 0.5]), cond)  # another call between forward and backward
        loss.backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert max((a - b).abs().max() for a, b in zip(*grads)) < 1e-7
    assert sum(g.abs().sum() for g in grads[0]) > 0
