"""orchestrator/reward_data.py: base-model sampling -> pool -> labelled pairs on disk (untrained tiny VideoDiT)."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.reward_data import build_preference_dataset, sample_base_pool
from policy.model import ModelConfig, VideoDiT, model_to_videos
from policy.sampling import sample
from policy.text import WordTokenizer
from rewards import oracle, world
from rewards.preference import PreferenceDataConfig, read_preference_data, split_of

SAMPLERS = [["ode", 0.0], ["sage", 0.7]]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = VideoDiT(ModelConfig(vocab=world.VOCAB, dim=16, depth=1, heads=2))
    with torch.no_grad():  # adaLN-Zero starts at v = 0; give the output layer weights so samples depend on the model
        model.out.weight.normal_(0, 0.5)
    return model.eval()


def test_sample_base_pool_is_the_sampler_output_seeded_per_sampler():
    torch.set_num_threads(1)
    model = _tiny_model()
    prompts = [p.text for p in world.all_prompts()[:5]]
    cfg = PreferenceDataConfig(samples_per_prompt=2, samplers=SAMPLERS, seed=4)
    videos, meta = sample_base_pool(model, prompts, cfg, mode="bidirectional", steps=3, batch_size=4, progress=False)
    assert videos.shape == (20, 8, 16, 16, 3) and videos.dtype == np.uint8
    assert meta["prompt"][:4] == [prompts[0]] * 2 + [prompts[1]] * 2 and meta["prompt"][10:12] == [prompts[0]] * 2
    assert meta["sampler"] == ["ode"] * 10 + ["sage"] * 10 and meta["eta"] == [0.0] * 10 + [0.7] * 10
    assert set(meta["source"]) == {"base"}
    # the first ode batch again, by hand: same seeds -> the same pixels
    seed = int(np.random.SeedSequence([4, 3, 0]).generate_state(1)[0])
    ids = WordTokenizer(world.VOCAB).encode(meta["prompt"][:4])
    traj = sample(model, ids, steps=3, sde_type="ode", mode="bidirectional", generator=torch.Generator().manual_seed(seed))
    np.testing.assert_array_equal(videos[:4], world.to_uint8(model_to_videos(traj.videos)))
    assert not np.array_equal(videos[:10], videos[10:])  # samplers draw different noise
    again, _ = sample_base_pool(model, prompts, cfg, mode="bidirectional", steps=3, batch_size=16, progress=False)
    np.testing.assert_array_equal(again, videos)  # batching does not change the pool


@pytest.mark.slow
def test_build_preference_dataset_end_to_end(tmp_path):
    torch.set_num_threads(1)
    _tiny_model().save(tmp_path / "base" / "model.safetensors")
    cfg = PreferenceDataConfig(samples_per_prompt=1, samplers=SAMPLERS, degraded_per_prompt=2, damaged_per_prompt=3,
                               pairs_per_prompt=5, label_noise=0.2)
    out = tmp_path / "prefs"
    base = VideoDiT.load(tmp_path / "base" / "model.safetensors")
    info = build_preference_dataset(cfg, base, out, steps=2, progress=False)
    per_prompt = 2 * 1 + 3 + 1 + 2
    assert info["videos"] == 168 * per_prompt
    assert info["sources"] == {"base": 336, "damaged": 504, "truth": 168, "degraded": 336}
    assert info["kinds"]["base-damaged"] > 0
    assert info["prompts"] == {"train": 130, "val": 14, "heldout": 24}
    assert info["pairs"] == {"train": 130 * 5, "val": 14 * 5, "heldout": 24 * 5}
    assert info["noise_rate"]["observed"]["heldout"] == 0.0
    assert 0.1 < info["noise_rate"]["observed"]["train"] < 0.3  # 1950 labels at 0.2
    pool = pq.read_table(out / "pool.parquet").to_pydict()
    videos = np.load(out / "videos.npy")
    scores = oracle.score_batch(videos, pool["prompt"])  # stored scores are the oracle's on the stored pixels
    np.testing.assert_allclose(pool["ta"], scores["ta"], atol=1e-6)
    base = np.array(pool["source"]) == "base"
    assert set(np.array(pool["sampler"])[base]) == {"ode", "sage"} and set(np.array(pool["sampler"])[~base]) == {""}
    # each damaged clip is a degraded copy of one of its prompt's base clips: nearer to them than to its renders
    source, prompt = np.array(pool["source"]), np.array(pool["prompt"])
    near = {s: [] for s in ("base", "truth", "degraded")}
    for i in np.flatnonzero(source == "damaged"):
        for s in near:
            near[s].append(min(np.abs(videos[i].astype(int) - videos[j]).mean()
                               for j in np.flatnonzero((source == s) & (prompt == prompt[i]))))
    assert np.median(near["base"]) < min(np.median(near["truth"]), np.median(near["degraded"])), \
        {s: np.median(v) for s, v in near.items()}
    held = read_preference_data(out, "heldout")
    assert {split_of(p) for p in held.prompts} == {"heldout"}
    np.testing.assert_array_equal(held.labels, held.oracle_labels)
    assert {s for pair in zip(held.source_a, held.source_b) for s in pair} == {"base", "truth", "degraded", "damaged"}

