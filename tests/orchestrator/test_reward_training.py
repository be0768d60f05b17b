"""orchestrator/reward_training.py (+ the symmetry augmentation and schedule in rewards/reward_model.py):
preference data -> reward models per loss -> held-out benchmark; click logs -> engagement predictor."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from orchestrator.reward_training import (EngagementConfig, RewardTrainConfig, engagement_logs,
                                          ensure_engagement_model, ensure_preference_data, ensure_reward_model,
                                          fit_tie_threshold, reward_bench, reward_bench_seeds, seed_summary)
from policy.model import ModelConfig, VideoDiT
from rewards import oracle, world
from rewards.feedback import EngagementPredictor
from rewards.preference import PreferenceDataConfig, read_preference_data
from rewards.reward_model import (WORLD_SYMMETRIES, PreferencePairs, RewardModelConfig, VideoReward, allowed_symmetries,
                                  apply_symmetry, augment_pairs, score_differences, symmetric_prompt, warmup_cosine)

DIMS = ("vq", "mq", "ta")


def _clips(prompts, rng):
    """True renders, degraded renders (every kind) and a pure-noise clip of the given prompts."""
    out, texts = [], []
    for i, p in enumerate(prompts):
        truth = world.render(p, world.random_start(p, rng))
        kind = world.DEGRADATIONS[i % len(world.DEGRADATIONS)]
        out += [truth, world.degrade(truth, kind, rng.uniform(0.3, 1.0), rng), rng.random(truth.shape, np.float32)]
        texts += [p.text] * 3
    return world.to_uint8(np.stack(out)), texts


def _scores(videos, prompts):
    s = oracle.score_batch(videos, prompts)
    return np.stack([s[d] for d in DIMS], 1)


def test_world_symmetries_map_prompts_as_the_pixels_move():
    assert len(WORLD_SYMMETRIES) == 12 and WORLD_SYMMETRIES[0] == ((0, 1, 2), False)
    p = "a red triangle moving left slowly"
    images = {symmetric_prompt(p, k) for k in range(12)}
    assert images == {f"a {c} triangle moving {d} slowly" for c in ("red", "green", "blue") for d in ("left", "right")}
    k = WORLD_SYMMETRIES.index(((1, 2, 0), True))  # new R = old G, new G = old B, new B = old R; mirrored
    assert symmetric_prompt("a yellow square moving right quickly", k) == "a magenta square moving left quickly"
    assert symmetric_prompt("a white circle moving up slowly", k) == "a white circle moving up slowly"
    video = np.zeros((1, 2, 4, 4, 3), np.uint8)
    video[0, :, 1, 0] = (255, 128, 0)  # an orange pixel in the left column
    moved = apply_symmetry(video, k)
    assert moved[0, 0, 1, 3].tolist() == [128, 0, 255] and moved.sum() == video.sum()


def test_oracle_is_invariant_to_every_world_symmetry():
    rng = np.random.default_rng(0)
    prompts = [world.all_prompts()[i] for i in rng.choice(168, 16, replace=False)]
    videos, texts = _clips(prompts, rng)
    before = _scores(videos, texts)
    for k in range(len(WORLD_SYMMETRIES)):
        after = _scores(np.ascontiguousarray(apply_symmetry(videos, k)), [symmetric_prompt(t, k) for t in texts])
        np.testing.assert_allclose(after, before, atol=2e-3, err_msg=f"symmetry {WORLD_SYMMETRIES[k]}")


def test_augmentation_never_shows_a_prompt_outside_the_training_pairs():
    train = [p.text for p in world.train_prompts()]
    allowed = allowed_symmetries(train)
    held = {p.text for p in world.heldout_prompts()}
    assert all(0 in ks for ks in allowed.values())
    assert all(symmetric_prompt(p, k) not in held for p, ks in allowed.items() for k in ks)
    # symmetries are not wasted: on average ~10 of the 12 keep a training prompt a training prompt
    assert 9.0 < np.mean([len(ks) for ks in allowed.values()]) < 12.0
    rng = np.random.default_rng(1)
    prompts = [world.as_prompt(t) for t in rng.choice(train, 8)]
    va, texts = _clips(prompts, rng)
    vb = va[::-1].copy()
    pairs = PreferencePairs(va, vb, texts, rng.integers(-1, 2, (len(texts), 3)))
    out = augment_pairs(pairs, rng, allowed_symmetries(train))
    assert set(out.prompts) <= set(train) and out.prompts != pairs.prompts
    np.testing.assert_array_equal(out.labels, pairs.labels)
    for i, (p, q) in enumerate(zip(pairs.prompts, out.prompts)):  # both clips moved by one symmetry
        assert any(symmetric_prompt(p, k) == q and np.array_equal(apply_symmetry(va[i:i + 1], k)[0], out.video_a[i])
                   and np.array_equal(apply_symmetry(vb[i:i + 1], k)[0], out.video_b[i]) for k in range(12))


def test_warmup_cosine_schedule_numbers():
    f = [warmup_cosine(s, 100, 0.05) for s in range(100)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == pytest.approx(0.5 * (1 + math.cos(math.pi / 96)))
    assert f[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 96)))  # = 0.5, half way down
    assert f[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 95 / 96))) and f[99] < 1e-3
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_fit_tie_threshold_numbers():
    delta = np.array([[0.1], [-0.2], [0.3], [1.5], [-2.0], [0.05]])
    labels = np.array([[0], [0], [0], [1], [-1], [1]])
    # ties below |0.3|: 5 of 6 right whatever threshold in (0.3, 1.5); the 0.05 "win" is lost as a tie
    t = fit_tie_threshold(delta, labels)
    assert 0.3 < t < 1.5
    assert fit_tie_threshold(np.array([[1.0], [-2.0]]), np.array([[1], [-1]])) == 0.0  # no ties: threshold 0


def test_seed_summary_numbers():
    rows = lambda vq, mq: [{"loss": "btt", "ties": "without", "vq": vq, "mq": mq, "ta": 0.9, "overall": 0.8}]  # noqa: E731
    out = seed_summary([rows(0.9, 0.80), rows(0.8, 0.86), rows(0.85, 0.92)])
    assert len(out) == 1 and out[0]["loss"] == "btt" and out[0]["ties"] == "without" and out[0]["seeds"] == 3
    assert out[0]["vq_mean"] == pytest.approx(0.85) and out[0]["vq_std"] == pytest.approx(0.05)  # sample std
    assert out[0]["mq_mean"] == pytest.approx(0.86) and out[0]["mq_std"] == pytest.approx(0.06)
    assert out[0]["mq_min"] == 0.80 and out[0]["ta_std"] == pytest.approx(0.0)
    assert out[0]["overall_mean"] == pytest.approx(0.8)
    assert seed_summary([rows(0.9, 0.8)])[0]["vq_std"] == 0.0  # one seed: no spread
    with pytest.raises(ValueError, match="same losses"):
        seed_summary([rows(0.9, 0.8), [{**rows(0.9, 0.8)[0], "loss": "bt"}]])


def test_configs_name_the_bad_field():
    with pytest.raises(ValidationError, match="loss"):
        RewardTrainConfig(loss="hinge")
    with pytest.raises(ValidationError, match="steps"):
        RewardTrainConfig(steps=0)
    with pytest.raises(ValidationError, match="impression_rate"):
        EngagementConfig(impression_rate=0.0)
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        EngagementConfig(users=3)
    assert RewardTrainConfig().loss == "btt" and RewardTrainConfig().model == RewardModelConfig()


def test_engagement_predictor_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = EngagementPredictor(width=8).eval()
    model.save(tmp_path / "e" / "model.safetensors")
    loaded = EngagementPredictor.load(tmp_path / "e" / "model.safetensors")
    assert loaded.net[0].weight.shape[0] == 8
    videos = np.random.default_rng(0).random((3, 8, 16, 16, 3), np.float32)
    np.testing.assert_array_equal(loaded.predict(videos), model.predict(videos))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="net.0.weight"):
        EngagementPredictor.load(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- end to end on a tiny untrained base model

def _tiny_base(path):
    from orchestrator.hashing import tree_sha256
    from orchestrator.pretraining import Base

    torch.manual_seed(0)
    model = VideoDiT(ModelConfig(vocab=world.VOCAB, dim=16, depth=1, heads=2))
    with torch.no_grad():  # adaLN-Zero starts at v = 0; give the output layer weights so samples depend on the model
        model.out.weight.normal_(0, 0.5)
    model.save(path)
    return Base(model.cfg, path.parent, tree_sha256(path.parent))


@pytest.mark.slow
def test_tiny_end_to_end_train_bench_and_cache(tmp_path):
    torch.set_num_threads(1)
    base = _tiny_base(tmp_path / "base" / "model.safetensors")
    cache = tmp_path / "cache"
    pref = PreferenceDataConfig(samples_per_prompt=1, samplers=[["ode", 0.0]], degraded_per_prompt=3, pairs_per_prompt=6)
    data = ensure_preference_data(pref, base, cache, mode="bidirectional", steps=2, progress=False)
    assert (data / "pairs.parquet").is_file() and json.loads((data / "summary.json").read_text())["pairs"]["heldout"] == 144
    stamp = (data / "pairs.parquet").stat().st_mtime_ns
    assert ensure_preference_data(pref, base, cache, mode="bidirectional", steps=2, progress=False) == data
    assert (data / "pairs.parquet").stat().st_mtime_ns == stamp  # cached: not rebuilt

    cfg = RewardTrainConfig(steps=60, batch_size=16, lr=3e-3, model=RewardModelConfig(dim=16, depth=1, heads=2))
    dirs = {loss: ensure_reward_model(cfg, data, cache, loss=loss, progress=False) for loss in ("regression", "bt", "btt")}
    assert len(set(dirs.values())) == 3
    for loss, d in dirs.items():
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "train.json"]
        info = json.loads((d / "train.json").read_text())
        assert info["loss"] == loss and info["steps"] == 60 and info["seconds"] > 0
        assert np.isfinite(info["loss_final"])
    stamp = (dirs["btt"] / "model.safetensors").stat().st_mtime_ns
    assert ensure_reward_model(cfg, data, cache, progress=False) == dirs["btt"]  # default loss: btt, cached
    assert (dirs["btt"] / "model.safetensors").stat().st_mtime_ns == stamp
    assert ensure_reward_model(cfg.model_copy(update={"seed": 1}), data, cache, progress=False) != dirs["btt"]
    _check_ensemble(cfg, pref, dirs, data, base, cache)

    rows, result = reward_bench(dirs, data, progress=False)
    assert [(r["loss"], r["ties"]) for r in rows] == [(l, t) for l in dirs for t in ("without", "with")]
    assert all(set(r) == {"model", "loss", "ties", "vq", "mq", "ta", "overall"} and r["model"] == "videoreward" for r in rows)
    counts = result["counts"]
    assert counts["pairs"] == 144 and counts["prompts"] == 24
    assert all(counts["non_tie"][d] + counts["tie"][d] == 144 for d in DIMS)
    models = result["models"]
    assert models["btt"]["tie_threshold"] == pytest.approx(math.log(4.6))
    assert models["regression"]["tie_threshold"] == pytest.approx(pref.tie_margin)
    assert models["bt"]["tie_threshold"] >= 0.0 and "validation" in models["bt"]["tie_threshold_from"]
    for loss in dirs:
        assert models[loss]["without_ties"]["overall"] > 0.5  # held-out prompts, noise-free labels
        assert set(models[loss]["without_ties_by_kind"]) == set(counts["kinds"])
    # by the oracle term that decides each pair: the terms split each kind's non-tie pairs, and the pairs a term
    # decides are the ones where its difference is the largest of its dimension's three
    held = read_preference_data(data, "heldout")
    ta, tb = (oracle.score_terms(v, held.prompts) for v in (held.video_a, held.video_b))
    delta = np.asarray(score_differences(VideoReward.load(dirs["btt"]), PreferencePairs(
        held.video_a, held.video_b, held.prompts, held.labels)))
    by_term = models["btt"]["without_ties_by_kind_term"]
    for kind in counts["kinds"]:
        of_kind = np.asarray(held.kind) == kind
        for j, d in enumerate(DIMS):
            split = by_term[kind][d]
            assert list(split) == list(oracle.TERMS[d])
            assert sum(v["pairs"] for v in split.values()) == int((of_kind & (held.labels[:, j] != 0)).sum())
            gaps = np.stack([np.abs(ta[t] - tb[t]) for t in oracle.TERMS[d]], 1)
            for i, term in enumerate(oracle.TERMS[d]):
                m = of_kind & (held.labels[:, j] != 0) & (gaps.argmax(1) == i)
                assert split[term]["pairs"] == int(m.sum())
                if m.any():
                    assert split[term]["accuracy"] == pytest.approx(np.mean(np.sign(delta[m, j]) == held.labels[m, j]))
    json.dumps(result)  # JSON-ready

    # over 2 seeds: seed 0 is the bench above (cached data and models), seed 1 its own data and models
    from orchestrator.config import RewardsConfig
    summary, multi = reward_bench_seeds(RewardsConfig(preference=pref, reward_model=cfg), base, cache, 2,
                                        losses=("bt", "btt"), mode="bidirectional", steps=2, progress=False)
    runs = multi["seeds"]
    assert [(s["preference_seed"], s["reward_model_seed"]) for s in runs] == [(0, 0), (1, 1)]
    assert runs[0]["rows"] == [r for r in rows if r["loss"] in ("bt", "btt")]  # seed 0 = the single-seed bench
    assert runs[0]["data"] == str(data) and runs[1]["data"] != str(data)
    assert runs[1]["models"]["btt"]["dir"] != models["btt"]["dir"]
    assert [(r["loss"], r["ties"], r["seeds"]) for r in summary] == [(l, t, 2) for l in ("bt", "btt") for t in ("without", "with")]
    for i, row in enumerate(summary):
        for d in (*DIMS, "overall"):
            values = [s["rows"][i][d] for s in runs]
            assert row[f"{d}_mean"] == pytest.approx(np.mean(values))
            assert row[f"{d}_std"] == pytest.approx(np.std(values, ddof=1)) and row[f"{d}_min"] == min(values)
    assert multi["summary"] == summary
    json.dumps(multi)


def _check_ensemble(cfg, pref, dirs, data, base, cache):
    """rewards.reward_model.ensemble: the members are the per-loss models above (their keys ignore the ensemble), each
    standardised by its mean and std over the data's clips; the scorer averages them; a run's inputs follow the key."""
    import pyarrow.parquet as pq

    from orchestrator.config import load_config
    from orchestrator.inputs import reward_checkpoints
    from orchestrator.reward_training import bench_dirs, ensure_reward_ensemble
    from policy.rollout import RewardGuide
    from rewards.scorer import RewardScorer

    ens_cfg = cfg.model_copy(update={"ensemble": ["bt", "regression"]})
    assert ensure_reward_model(ens_cfg, data, cache, progress=False) == dirs["btt"]
    ens = ensure_reward_ensemble(ens_cfg, data, cache, progress=False)
    assert sorted(p.name for p in ens.iterdir()) == ["bt", "btt", "ensemble.json", "regression"]
    assert ensure_reward_ensemble(ens_cfg, data, cache, progress=False) == ens  # cached
    pool = np.load(data / "videos.npy")
    texts = pq.read_table(data / "pool.parquet").column("prompt").to_pylist()
    stats = json.loads((ens / "ensemble.json").read_text())["members"]
    held = read_preference_data(data, "heldout")
    expected = 0.0
    for loss in ("btt", "bt", "regression"):
        model = VideoReward.load(dirs[loss])
        on_pool = model.score_videos(pool, texts)
        assert stats[loss]["mean"] == pytest.approx(on_pool.mean(0).tolist(), rel=1e-5)
        assert stats[loss]["std"] == pytest.approx(on_pool.std(0).tolist(), rel=1e-5)
        expected = expected + (model.score_videos(held.video_a, held.prompts) - on_pool.mean(0)) / on_pool.std(0) / 3
    ids, shape = [f"h{i}" for i in range(len(held.prompts))], held.video_a.shape[1:]
    got = RewardScorer("videoreward", ens, frame_shape=shape).score(held.video_a, held.prompts, ids)
    assert got == pytest.approx(expected, abs=1e-4)
    other = RewardScorer("videoreward", ens, frame_shape=shape).score(held.video_b, held.prompts, ids)
    rows, result = reward_bench(bench_dirs(ens_cfg, data, cache, ("btt",), progress=False), data, progress=False)
    assert [r["loss"] for r in rows] == ["btt", "btt", "ensemble", "ensemble"]
    for j, d in enumerate(DIMS):  # the bench scores the ensemble as the run does
        decided = held.labels[:, j] != 0
        accuracy = np.mean(np.sign(got - other)[decided, j] == held.labels[decided, j])
        assert result["models"]["ensemble"]["without_ties"][d] == pytest.approx(accuracy, abs=1e-9)
    single = RewardScorer("videoreward", dirs["btt"], frame_shape=shape).score(held.video_a, held.prompts, ids)
    assert np.array_equal(single, VideoReward.load(dirs["btt"]).score_videos(held.video_a, held.prompts))

    run = load_config(None, [f"cache_dir={cache}", "rollout.mode=bidirectional", "rollout.steps=2"])
    run.rewards.models = {"videoreward": run.rewards.models["videoreward"]}
    run.rewards.preference = pref
    for train_cfg, want in ((ens_cfg, ens), (cfg, dirs["btt"])):
        run.rewards.reward_model = train_cfg
        assert reward_checkpoints(run, base, progress=False) == {"videoreward": str(want)}

    broken = cache / "broken-ensemble"
    shutil.copytree(ens, broken)
    bad = json.loads((broken / "ensemble.json").read_text())
    bad["members"]["bt"]["std"][1] = 0.0
    (broken / "ensemble.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="positive std"):
        RewardScorer("videoreward", broken, frame_shape=shape)
    with pytest.raises(ValueError, match="is an ensemble"):
        RewardGuide.from_checkpoint(str(ens), "ta", 1.0, 1.0)
    with pytest.raises(ValidationError, match="each once"):
        RewardTrainConfig(ensemble=["bt", "bt"])


@pytest.mark.slow
def test_engagement_predictor_beats_a_constant_on_heldout_logs_and_is_cached(tmp_path):
    torch.set_num_threads(1)
    base = _tiny_base(tmp_path / "base" / "model.safetensors")
    cfg = EngagementConfig(log_clips=168 * 12, impression_rate=0.6, steps=150)
    logs = engagement_logs(cfg, base, mode="bidirectional", steps=2, progress=False)
    n = len(logs["clicks"])
    assert n == 168 * 12 and logs["heldout"].sum() == 24 * 12
    seen = ~np.isnan(logs["clicks"])
    assert abs(seen.mean() - 0.6) < 0.05 and (logs["users"][seen] >= 0).all() and (logs["users"][~seen] == -1).all()
    path, metrics = ensure_engagement_model(cfg, base, tmp_path / "cache", progress=False, mode="bidirectional", steps=2)
    assert metrics["auc_constant"] == 0.5
    assert metrics["auc_predictor"] > 0.6 and metrics["auc_true_probability"] > 0.6
    assert metrics["heldout_impressions"] + metrics["train_impressions"] == int(seen.sum())
    assert json.loads((path / "engagement.json").read_text())["auc_predictor"] == metrics["auc_predictor"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again, metrics2 = ensure_engagement_model(cfg, base, tmp_path / "cache", progress=False, mode="bidirectional", steps=2)
    assert again == path and metrics2 == metrics and (path / "model.safetensors").stat().st_mtime_ns == stamp
    # the RewardScorer's "feedback" kind loads what was written
    from rewards.scorer import RewardScorer
    scorer = RewardScorer("feedback", path, device="cpu")
    out = scorer.score(logs["videos"][:4], logs["prompts"][:4], ["a", "b", "c", "d"])
    assert out.shape == (4, 1) and np.isfinite(out).all()


def test_augmented_training_is_deterministic_given_the_seed():
    rng = np.random.default_rng(2)
    prompts = [world.as_prompt(t) for t in rng.choice([p.text for p in world.train_prompts()], 6)]
    va, texts = _clips(prompts, rng)
    pairs = PreferencePairs(va, va[::-1].copy(), texts, rng.integers(-1, 2, (len(texts), 3)))
    from rewards.reward_model import VideoReward, train_reward_model

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VideoReward(RewardModelConfig(dim=16, depth=1, heads=2))
        runs.append(train_reward_model(model, pairs, "btt", steps=4, batch_size=8, seed=3, progress=False, augment=True))
    assert runs[0] == runs[1]
