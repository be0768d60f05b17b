"""policy.rollout.RolloutWorker: groups of G clips per prompt, payloads for the learner, the shared-prefix switch."""

import numpy as np
import torch

from policy.rollout import RolloutWorker, trajectory_from_payload

from .helpers import make_model


def worker(tmp_path, **kw):
    model = make_model()
    model.save(tmp_path / "base")
    return RolloutWorker(model.cfg, str(tmp_path / "base"), mode="causal", sampler="sage", eta=0.7, steps=2, shift=1.0,
                         group_size=3, **kw)


def test_groups_share_a_random_prefix_unless_told_not_to(tmp_path):
    shared = worker(tmp_path)
    prefixes = [shared.generate(f"g{i}", "a red circle moving left quickly", seed=i)[1]["prefix_chunks"]
                for i in range(12)]
    assert set(prefixes) == {0, 1, 2, 3}  # history lengths 0 .. n_chunks - 1
    batch, payload, meta = shared.generate("g", "a red circle moving left quickly", seed=5)
    p = payload["prefix_chunks"]
    frames = slice(0, p * shared.policy.shape.chunk)
    lat = payload["latents"]
    assert p > 0 and np.array_equal(lat[0, :, frames], lat[2, :, frames])  # the candidates share the history
    assert batch["videos"].shape == (3, 8, 16, 16, 3) and batch["videos"].dtype == np.uint8
    traj = trajectory_from_payload(payload)
    assert torch.equal(traj.videos, torch.from_numpy(lat[:, -1])) and payload["cond"].shape == (1, 8)

    independent = worker(tmp_path, shared_prefix=False)
    outs = [independent.generate(f"g{i}", "a red circle moving left quickly", seed=i)[1] for i in range(6)]
    assert {o["prefix_chunks"] for o in outs} == {0}
    assert all(not np.array_equal(o["latents"][0, :, :2], o["latents"][1, :, :2]) for o in outs)  # differ from frame 0


def test_the_rollout_dtype_is_the_workers_own(tmp_path):
    """rollout.dtype: the worker's copy runs in its own dtype; the learner's config (float32 here) is untouched."""
    w = worker(tmp_path, dtype="float64")
    assert w.policy.dtype == torch.float64 and next(w.policy.parameters()).dtype == torch.float64
    _, payload, _ = w.generate("g", "a red circle moving left quickly", seed=0)
    assert payload["latents"].dtype == np.float64
    assert worker(tmp_path).policy.dtype == torch.float32
