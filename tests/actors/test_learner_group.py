"""The learner group (actors/learner.py, policy/parallel.py): 2 ranks in Ray actors over gloo, DDP and FSDP2, give the
updates one learner gives on the same batch; checkpoints move between group sizes.

The batch has 3 groups, so the ranks train 2 and 1 (FSDP2: rank 1 repeats a group with weight 0 to stay in step).
Two steps, so the second also runs the NFT old policy the first step's EMA moved.
"""

import numpy as np
import pytest
import ray
import torch

from actors.learner import learner_group
from orchestrator.config import load_config
from policy.backend import load_policy
from policy.rollout import RolloutWorker
from policy.wan.config import LoraConfig, WanConfig
from policy.wan.init import write_random_model

pytestmark = pytest.mark.slow
PROMPTS = ["a red circle moving left quickly", "a blue square moving right slowly", "a red square moving up quickly"]
LORA = LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (model config, base weights or None)}: the embedded VideoDiT (full fine-tuning) and a causal Wan with
    LoRA, both written to disk and read back by the real loader."""
    root = tmp_path_factory.mktemp("group")
    dit = load_config(None, ["model.dim=32", "model.depth=2"]).model
    load_policy(dit, None, device="cpu").save(root / "dit")
    write_random_model(root / "wan", "shapes", seed=0)
    wan = WanConfig(kind="wan_causal", path=str(root / "wan"), frames=8, height=16, width=16, text_len=8, chunk=2,
                    lora=LORA)
    return {"videodit": (dit, str(root / "dit")), "wan_lora": (wan, None)}


def batch(model_cfg, base, seed=0):
    """3 scored groups of 4 from a real rollout worker: payload refs in the object store and their rewards."""
    worker = RolloutWorker(model_cfg, base, mode="causal", sampler="sage", eta=0.7, steps=3, shift=1.0, group_size=4)
    worker.version = 0
    rng = np.random.default_rng(seed)
    refs, rewards = [], []
    for i, prompt in enumerate(PROMPTS):
        _, payload, _ = worker.generate(f"g{i}", prompt, seed + i)
        refs.append(ray.put(payload))
        rewards.append({"r": rng.normal(size=4).astype(np.float32), "q": rng.normal(size=4).astype(np.float32)})
    return refs, rewards


def run_steps(group, refs, rewards, steps=2):
    stats = [ray.get(group.head.train_step.remote(refs, rewards, "r", {"q": 0.2}, {"q": 1.5})) for _ in range(steps)]
    return ray.get(group.head.weights.remote()), stats


def start(model_cfg, base, workers, parallel="ddp", loss="nft", placement="pack"):
    cfg = {"parallel": parallel, "loss": loss, "lr": 1e-3}  # Adam scales a gradient's rounding by lr / |g|
    return learner_group(model_cfg, base, cfg, total_steps=10, seed=3, workers=workers, num_cpus=0.2,
                         placement=placement, name=f"learner-test-{workers}")


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("model,parallel,loss", [("videodit", "ddp", "nft"), ("videodit", "fsdp2", "nft"),
                                                 ("videodit", "fsdp2", "ppo"), ("wan_lora", "ddp", "nft"),
                                                 ("wan_lora", "fsdp2", "nft")])
def test_two_ranks_update_the_weights_one_rank_would(ray_cluster, models, model, parallel, loss):
    model_cfg, base = models[model]
    refs, rewards = batch(model_cfg, base)
    one, two = start(model_cfg, base, 1, loss=loss), start(model_cfg, base, 2, parallel, loss=loss)
    try:
        before = ray.get(one.head.weights.remote())
        w1, s1 = run_steps(one, refs, rewards)
        w2, s2 = run_steps(two, refs, rewards)
        assert max_diff(w1, before) > 1e-4  # the steps moved the weights
        assert max_diff(w1, w2) <= 1e-6
        local = "learner/local_params"  # fsdp2: rank 0 holds half of every trainable tensor (+ padding), ddp all
        assert s2[0][local] == (s1[0][local] if parallel == "ddp" else pytest.approx(s1[0][local] / 2, rel=0.05))
        for a, b in zip(s1, s2):  # the group's stats are over every group, as one learner's are
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a if k != local), (a, b)
        if model == "wan_lora":
            assert all("lora_" in k for k in w2)  # only adapters are published
    finally:
        one.shutdown()
        two.shutdown()


def test_a_checkpoint_of_two_fsdp2_ranks_resumes_on_one_and_back(ray_cluster, models):
    """state() gathers whole tensors on rank 0 (policy, copies, optimiser); any group size loads them."""
    model_cfg, base = models["videodit"]
    refs, rewards = batch(model_cfg, base, seed=5)
    two = start(model_cfg, base, 2, "fsdp2", placement="spread")
    one = start(model_cfg, base, 1)
    assert ray.util.placement_group_table(two.pg)["strategy"] == "SPREAD"  # ray.placement (one node: both on it)
    try:
        run_steps(two, refs, rewards, steps=1)
        tensors, plain = ray.get(two.head.state.remote())
        assert plain["learner_workers"] == 2 and plain["version"] == 1
        ray.get(one.head.load_state.remote(tensors, plain))
        w1, _ = run_steps(one, refs, rewards, steps=1)  # the step after the checkpoint, on one rank ...
        w2, _ = run_steps(two, refs, rewards, steps=1)  # ... and on the two that wrote it
        assert max_diff(w1, w2) <= 1e-6
        ray.get(two.head.load_state.remote(*ray.get(one.head.state.remote())))  # one rank's checkpoint on two
        assert max_diff(ray.get(two.head.weights.remote()), w1) == 0.0
        assert ray.get(two.head.version.remote()) == 2
    finally:
        one.shutdown()
        two.shutdown()


def test_fsdp2_for_a_model_without_blocks_names_it():
    from policy.parallel import shard

    class Blockless:  # a policy whose model has no transformer blocks to shard
        def fsdp_units(self):
            return torch.nn.Linear(2, 2), [], ()

    with pytest.raises(ValueError, match="per transformer block, but Linear names none"):
        shard([Blockless()])
