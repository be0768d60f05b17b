"""weights.sync=broadcast: rollout actors take version k from learner rank 0 over a process group of their own
(orchestrator.pipeline.BroadcastSync, policy.parallel.WeightBroadcast) and generate exactly what the object-store
path gives them."""

import numpy as np
import pytest
import ray
import torch

from actors.learner import learner_group
from actors.rollout import rollout_actor
from orchestrator.config import load_config
from orchestrator.pipeline import BroadcastSync
from policy.backend import load_policy
import threading

from policy.parallel import WeightBroadcast, buckets

pytestmark = pytest.mark.slow
ROLLOUT = dict(mode="causal", sampler="sage", eta=0.7, steps=3, shift=1.0, group_size=4)


def test_buckets_cut_by_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(1)]
    sizes = [[t.numel() for t in b] for b in buckets(ts, bucket_bytes=80)]
    assert sizes == [[10, 10], [30], [5], [1]]  # 40+40 bytes fill one; a larger tensor goes alone; dtypes split


def test_a_member_waiting_for_a_version_that_never_comes_gives_up_after_timeout_s():
    """A learner that died mid-version must not leave the rollout actors waiting forever (weights.timeout_s)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    groups = {}
    threads = [threading.Thread(target=lambda r=r: groups.__setitem__(r, WeightBroadcast("127.0.0.1", port, r, 2, 1.0)))
               for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(RuntimeError):  # rank 0 never sends
        groups[1].receive(3, {"w": torch.zeros(4)})


def test_broadcast_version_equals_the_object_store_version(ray_cluster, tmp_path):
    model_cfg = load_config(None, ["model.dim=32", "model.depth=2"]).model
    base = str(load_policy(model_cfg, None, device="cpu").save(tmp_path / "base"))
    group = learner_group(model_cfg, base, {"parallel": "fsdp2", "lr": 1e-2}, total_steps=5, seed=0, workers=2,
                          num_cpus=0.2, name="learner-sync")
    workers = [rollout_actor(90 + i, model_cfg, base, ROLLOUT, num_cpus=0.1) for i in range(3)]
    try:
        learner = group.head
        for w in workers:
            ray.get(w.set_weights.remote(0, learner.weights.remote()))
        _, payload, _ = workers[0].generate.options(num_returns=3).remote("g0", "a red square moving up slowly", 1)
        rewards = [{"r": np.array([0.1, 0.9, 0.4, 0.6], dtype=np.float32)}]
        ray.get(learner.train_step.remote([payload], rewards, "r", {}, {}))  # version 1 differs from the base

        sync = BroadcastSync(learner, keep=2, bucket_bytes=16 << 10)  # 16 KiB buckets: the weights take several
        sync.open(workers[:2])
        sync.publish(1, workers[:2])
        ray.get(workers[2].set_weights.remote(1, learner.weights.remote()))  # the object-store path
        outs = [ray.get(list(w.generate.options(num_returns=3).remote("g1", "a blue circle moving left quickly", 7)))
                for w in workers]
        assert [meta["version"] for _, _, meta in outs] == [1, 1, 1]
        latents = [p["latents"] for _, p, _ in outs]
        assert np.array_equal(latents[0], latents[2]) and np.array_equal(latents[1], latents[2])
        stats = sync.stats()
        assert stats["weights/broadcast_bytes"] == sum(t.numel() * 4 for t in ray.get(learner.weights.remote()).values())
        assert not np.array_equal(latents[2], ray.get(payload)["latents"])  # not the base's sample again

        # a restarted rollout actor cannot rejoin: the group is opened anew, and version 2 arrives the same way
        ray.get(learner.train_step.remote([payload], rewards, "r", {}, {}))
        sync.open(workers[:2])
        sync.publish(2, workers[:2])
        ray.get(workers[2].set_weights.remote(2, learner.weights_of.remote(2)))  # kept for object-store fetches
        outs = [ray.get(list(w.generate.options(num_returns=3).remote("g2", "a blue circle moving left quickly", 7)))
                for w in workers]
        assert [meta["version"] for _, _, meta in outs] == [2, 2, 2]
        assert np.array_equal(outs[0][1]["latents"], outs[2][1]["latents"])
        assert sync.stats()["weights/broadcast_seconds"] > 0  # version 1's send finished and was timed
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w, no_restart=True)
