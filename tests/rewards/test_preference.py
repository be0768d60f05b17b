"""rewards/preference.py: labels with ties and annotator noise, splits by prompt, pairs, the parquet format."""
import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from rewards import oracle, world
from rewards.preference import (DIMS, PAIR_KINDS, PairSet, PreferenceDataConfig, damage_base, label_pairs,
                                make_pairs, pair_table, read_preference_data, render_references, score_pool,
                                split_of, summary, write_preference_data)

HELD = [p.text for p in world.heldout_prompts()]
TRAIN = [p.text for p in world.train_prompts()]
VAL = [t for t in TRAIN if split_of(t) == "val"]


# ---------------------------------------------------------------- labels

def test_labels_follow_the_margin_with_ties():
    a = np.array([[0.5, 0.5, 0.5], [0.75, 0.5, 0.5], [0.2, 0.2, 0.9]])
    b = np.array([[0.44, 0.46, 0.56], [0.5, 0.75, 0.5], [0.9, 0.2, 0.2]])
    labels = label_pairs(a, b, tie_margin=0.05, label_noise=0.0, rng=np.random.default_rng(0))
    assert labels.dtype == np.int8
    np.testing.assert_array_equal(labels, [[1, 0, -1], [1, -1, 0], [-1, 0, 1]])
    # |Δ| == margin is a preference, not a tie (0.75 - 0.5 = 0.25 exactly)
    np.testing.assert_array_equal(label_pairs(a[1:2], b[1:2], 0.25, 0.0, np.random.default_rng(0)), [[1, -1, 0]])
    # margin 0: only exact equality ties
    np.testing.assert_array_equal(label_pairs(a[1:2], b[1:2], 0.0, 0.0, np.random.default_rng(0)), [[1, -1, 0]])


def test_annotator_noise_rate_and_uniform_replacement():
    rng = np.random.default_rng(1)
    a, b = rng.random((20000, 3)), rng.random((20000, 3))
    clean = label_pairs(a, b, 0.1, 0.0, rng)
    noisy = label_pairs(a, b, 0.1, 0.1, np.random.default_rng(7))
    wrong = noisy != clean
    assert abs(wrong.mean() - 0.1) < 0.006  # 60k entries: std of the rate 0.0012
    for value in (-1, 0, 1):  # a wrong label is one of the other two, each half the time
        flipped = noisy[wrong & (clean == value)]
        others = [v for v in (-1, 0, 1) if v != value]
        assert set(np.unique(flipped)) == set(others)
        assert abs((flipped == others[0]).mean() - 0.5) < 0.05
    assert np.isin(noisy, (-1, 0, 1)).all()
    np.testing.assert_array_equal(label_pairs(a, b, 0.1, 0.1, np.random.default_rng(7)), noisy)  # seeded


def test_label_pairs_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\[N, D\].*\(4, 3\) and \(4, 2\)"):
        label_pairs(np.zeros((4, 3)), np.zeros((4, 2)), 0.05, 0.1, rng)
    with pytest.raises(ValueError, match="NaN"):
        label_pairs(np.full((1, 3), np.nan), np.zeros((1, 3)), 0.05, 0.1, rng)
    with pytest.raises(ValueError, match="label_noise"):
        label_pairs(np.zeros((1, 3)), np.zeros((1, 3)), 0.05, 1.5, rng)


# ---------------------------------------------------------------- splits

def test_split_by_prompt_is_fixed_and_disjoint():
    splits = {p.text: split_of(p) for p in world.all_prompts()}
    assert [t for t, s in splits.items() if s == "heldout"] == sorted(HELD, key=list(splits).index)
    val = [t for t, s in splits.items() if s == "val"]
    assert len(val) == round(0.1 * 144) == 14 and set(val) <= set(TRAIN)
    assert sum(s == "train" for s in splits.values()) == 130
    assert [split_of(t) for t in splits] == list(splits.values())  # no RNG: the same every call
    assert split_of("A  Red square moving LEFT slowly") == splits["a red square moving left slowly"]
    assert sum(split_of(t, 0.0) == "val" for t in TRAIN) == 0
    assert sum(split_of(t, 0.25) == "val" for t in TRAIN) == 36
    with pytest.raises(ValueError, match="grammar"):
        split_of("a dog barking")


# ---------------------------------------------------------------- pairs

def _pool_layout(n_prompts=4, base=6, degraded=6):
    prompts, sources = [], []
    for p in TRAIN[:n_prompts]:
        for s, k in (("base", base), ("truth", 1), ("degraded", degraded)):
            prompts += [p] * k
            sources += [s] * k
    return prompts, sources


def test_make_pairs_mix_within_prompt_without_repeats():
    prompts, sources = _pool_layout()
    index, kinds = make_pairs(prompts, sources, 24, np.random.default_rng(0))
    assert index.shape == (4 * 24, 2) and index.dtype == np.int64 and len(kinds) == len(index)
    p, s = np.array(prompts), np.array(sources)
    assert (p[index[:, 0]] == p[index[:, 1]]).all() and (index[:, 0] != index[:, 1]).all()
    assert len({tuple(sorted(r)) for r in index.tolist()}) == len(index)  # no pair twice
    for (i, j), kind in zip(index.tolist(), kinds):
        assert sorted((s[i], s[j])) == sorted(kind.split("-"))
    # default mix 0.3/0.25/0.2/0.15/0.1 of 24, largest remainder: 7, 6, 5, 4, 2 per prompt
    counts = {k: kinds.count(k) for k in PAIR_KINDS}
    assert counts == {"base-base": 28, "base-degraded": 24, "degraded-degraded": 20, "truth-base": 16,
                      "truth-degraded": 8, "base-damaged": 0}  # no damaged clips in this pool
    first_is_better_source = np.mean([s[i] == "truth" for (i, j), k in zip(index.tolist(), kinds) if "truth" in k])
    assert 0.25 < first_is_better_source < 0.75  # a/b order is a coin flip


def test_make_pairs_hands_missing_kinds_share_to_others_and_caps_at_the_pool():
    prompts, sources = _pool_layout(n_prompts=2, base=0, degraded=4)  # no base samples: 10 candidates each
    index, kinds = make_pairs(prompts, sources, 8, np.random.default_rng(0))
    assert len(index) == 16 and set(kinds) == {"degraded-degraded", "truth-degraded"}
    index, kinds = make_pairs(prompts, sources, 50, np.random.default_rng(0))
    assert len(index) == 2 * 10  # every candidate once (C(4,2) + 4)
    index, kinds = make_pairs(prompts, sources, 6, np.random.default_rng(0), mix={"truth-degraded": 1.0})
    assert set(kinds) == {"truth-degraded"} and len(index) == 2 * 4  # weight 0 kinds are never used
    with pytest.raises(ValueError, match="unknown sources"):
        make_pairs(["a red square moving left slowly"], ["fake"], 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pair kinds"):
        make_pairs(prompts, sources, 4, np.random.default_rng(0), mix={"truth-truth": 1.0})


# ---------------------------------------------------------------- references, labelled pool

def test_damage_base_degrades_the_prompts_own_base_clips_with_distinct_kinds():
    rng = np.random.default_rng(0)
    prompts = [TRAIN[0]] * 2 + [TRAIN[1]] * 3
    clips = np.stack([world.to_uint8(world.render(p, world.random_start(p, rng))) for p in prompts])
    videos, meta = damage_base(clips, prompts, 4, np.random.default_rng(1), strength=(0.6, 1.0))
    assert videos.shape == (8, 8, 16, 16, 3) and videos.dtype == np.uint8
    assert meta["prompt"] == [TRAIN[0]] * 4 + [TRAIN[1]] * 4 and set(meta["source"]) == {"damaged"}
    for k in range(2):  # 4 of the 12 kinds, none twice in a prompt
        assert len(set(meta["degradation"][4 * k: 4 * k + 4])) == 4
    # each damaged clip is closer to one of its own prompt's base clips than to the other prompt's
    for i, text in enumerate(meta["prompt"]):
        dist = [np.abs(videos[i].astype(int) - c).mean() for c in clips]
        own = [d for d, p in zip(dist, prompts) if p == text]
        assert min(own) <= min(d for d, p in zip(dist, prompts) if p != text)
    assert (oracle.score_batch(videos, meta["prompt"])["overall"].mean()
            < oracle.score_batch(clips, prompts)["overall"].mean() - 0.05)  # the copies are worse
    # the key changes the data: 0 copies, none
    assert len(damage_base(clips, prompts, 0, np.random.default_rng(1))[0]) == 0


def test_render_references_truth_is_perfect_and_degradations_differ():
    rng = np.random.default_rng(0)
    videos, meta = render_references(TRAIN[:3], 5, rng, strength=(0.5, 0.9))
    assert videos.shape == (18, 8, 16, 16, 3) and videos.dtype == np.uint8
    assert meta["source"] == (["truth"] + ["degraded"] * 5) * 3
    scores = oracle.score_batch(videos, meta["prompt"])
    truth = np.array(meta["source"]) == "truth"
    assert scores["overall"][truth].min() > 0.99
    assert scores["overall"][~truth].mean() < scores["overall"][truth].mean() - 0.1
    for k in range(3):  # 5 of the 8 kinds, none twice in a prompt
        kinds = meta["degradation"][6 * k + 1: 6 * k + 6]
        assert len(set(kinds)) == 5 and set(kinds) <= set(world.DEGRADATIONS)
    strengths = np.array(meta["strength"])[~truth]
    assert strengths.min() >= 0.5 and strengths.max() <= 0.9


def _small_dataset(tmp_path, noise=0.2, prompts=None):
    prompts = prompts or TRAIN[:4] + VAL[:2] + HELD[:3]
    cfg = PreferenceDataConfig(degraded_per_prompt=4, pairs_per_prompt=8, label_noise=noise, seed=3)
    videos, meta = render_references(prompts, cfg.degraded_per_prompt, np.random.default_rng(0))
    meta["sampler"] = ["ode" if s == "truth" else "" for s in meta["source"]]  # any text survives the trip
    pool = score_pool(videos, meta)
    pairs = pair_table(pool, cfg)
    out = write_preference_data(tmp_path / "prefs", videos, pool, pairs, cfg)
    return out, videos, pool, pairs, cfg


def test_pair_table_heldout_is_noise_free_and_train_noisy():
    prompts = TRAIN[:40] + HELD
    cfg = PreferenceDataConfig(degraded_per_prompt=6, pairs_per_prompt=21, label_noise=0.3, val_fraction=0.5)
    videos, meta = render_references(prompts, 6, np.random.default_rng(0))
    pool = score_pool(videos, meta)
    pairs = pair_table(pool, cfg)
    split = np.array(pairs["split"])
    held = split == "heldout"
    assert held.sum() == 24 * 21
    np.testing.assert_array_equal(pairs["labels"][held], pairs["oracle_labels"][held])
    assert abs((pairs["labels"][~held] != pairs["oracle_labels"][~held]).mean() - 0.3) < 0.04  # 2520 entries
    s = np.stack([pool[d] for d in DIMS], 1)
    np.testing.assert_array_equal(pairs["oracle_labels"],
                                  label_pairs(s[pairs["index"][:, 0]], s[pairs["index"][:, 1]], 0.05, 0.0, None))
    prompt_of = np.array(pool["prompt"])[pairs["index"][:, 0]]
    owners = {}
    for p, sp in zip(prompt_of, split):
        owners.setdefault(p, set()).add(sp)
    assert all(len(v) == 1 for v in owners.values())  # no prompt in two splits
    assert {sp for v in owners.values() for sp in v} == {"train", "val", "heldout"}


# ---------------------------------------------------------------- disk format

def test_parquet_round_trip(tmp_path):
    out, videos, pool, pairs, cfg = _small_dataset(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["pairs.parquet", "pool.parquet", "videos.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["prefs"]  # no temp directory left
    np.testing.assert_array_equal(np.load(out / "videos.npy"), videos)
    rows = pq.read_table(out / "pool.parquet").to_pylist()
    assert rows[0]["index"] == 0 and rows[0]["source"] == "truth" and rows[0]["sampler"] == "ode"
    assert rows[1]["degradation"] in world.DEGRADATIONS and rows[1]["vq"] == pytest.approx(pool["vq"][1])
    split = np.array(pairs["split"])
    for name in ("train", "val", "heldout"):
        ps = read_preference_data(out, name)
        idx = pairs["index"][split == name]
        assert isinstance(ps, PairSet) and len(ps) == len(idx) > 0
        np.testing.assert_array_equal(ps.video_a, videos[idx[:, 0]])
        np.testing.assert_array_equal(ps.video_b, videos[idx[:, 1]])
        np.testing.assert_array_equal(ps.labels, pairs["labels"][split == name])
        np.testing.assert_array_equal(ps.oracle_labels, pairs["oracle_labels"][split == name])
        assert ps.labels.dtype == np.int8 and ps.score_a.dtype == np.float32
        np.testing.assert_array_equal(ps.score_a[:, 1], np.asarray(pool["mq"])[idx[:, 0]])
        assert ps.prompts == np.asarray(pool["prompt"])[idx[:, 0]].tolist()
        assert all(split_of(p) == name for p in ps.prompts)
    assert len(read_preference_data(out, "all")) == len(pairs["index"])
    info = summary(out)
    assert info["pairs"] == {s: int((split == s).sum()) for s in ("train", "val", "heldout")}
    assert info["prompts"]["heldout"] == 3 and info["videos"] == 45
    assert info["sources"] == {"base": 0, "truth": 9, "degraded": 36, "damaged": 0}
    assert info["noise_rate"]["configured"] == 0.2 and info["noise_rate"]["observed"]["heldout"] == 0.0
    clean = pairs["oracle_labels"][split == "heldout"]
    assert info["tie_rate"]["heldout"]["ta"] == pytest.approx((clean[:, 2] == 0).mean())
    assert sum(info["kinds"].values()) == len(pairs["index"])


def test_pairset_feeds_the_reward_model(tmp_path):
    torch = pytest.importorskip("torch")
    from rewards.reward_model import RewardModelConfig, VideoReward, _as_pairs, preference_loss

    out = _small_dataset(tmp_path)[0]
    ps = read_preference_data(out, "train")
    pairs = _as_pairs(ps)
    np.testing.assert_array_equal(pairs.video_a, ps.video_a)
    np.testing.assert_array_equal(pairs.labels, ps.labels)
    assert pairs.prompts == ps.prompts
    torch.manual_seed(0)
    model = VideoReward(RewardModelConfig(dim=16, depth=1, heads=2))
    loss = preference_loss(model, pairs.subset(np.arange(8)), "btt")
    assert torch.isfinite(loss) and loss.item() > 0


def test_rewrite_replaces_and_bad_pairs_leave_the_old_data(tmp_path):
    out, videos, pool, pairs, cfg = _small_dataset(tmp_path)
    before = (out / "pairs.parquet").read_bytes()
    bad = {**pairs, "index": pairs["index"] + len(videos)}
    with pytest.raises(ValueError, match="indices"):
        write_preference_data(out, videos, pool, bad, cfg)
    bad = {**pairs, "index": np.array([[0, 6]] * len(pairs["index"]))}  # videos of two different prompts
    with pytest.raises(ValueError, match="same prompt"):
        write_preference_data(out, videos, pool, bad, cfg)
    with pytest.raises(ValueError, match=r"uint8 \[N, T, H, W, 3\]"):
        write_preference_data(out, videos.astype(np.float32), pool, pairs, cfg)
    assert (out / "pairs.parquet").read_bytes() == before
    few = {**pairs, **{k: pairs[k][:5] for k in ("index", "labels", "oracle_labels", "kind", "split")}}
    write_preference_data(out, videos, pool, few, cfg)
    assert len(read_preference_data(out, "all")) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["prefs"]


@pytest.mark.parametrize("name", ["pairs.parquet", "pool.parquet", "videos.npy"])
def test_missing_or_corrupt_file_names_it(tmp_path, name):
    out = _small_dataset(tmp_path)[0]
    good = (out / name).read_bytes()
    (out / name).unlink()
    with pytest.raises(ValueError, match=f"missing file .*{name}"):
        read_preference_data(out, "train")
    (out / name).write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        read_preference_data(out, "train")


def test_wrong_content_is_named(tmp_path):
    out, videos, pool, pairs, cfg = _small_dataset(tmp_path)
    np.save(out / "videos.npy", videos[:10])
    with pytest.raises(ValueError, match=r"videos\.npy must hold uint8 \[N=45"):
        read_preference_data(out, "train")
    np.save(out / "videos.npy", videos)
    table = pq.read_table(out / "pairs.parquet")
    pq.write_table(table.drop(["label_mq"]), out / "pairs.parquet")
    with pytest.raises(ValueError, match=r"pairs\.parquet lacks columns \['label_mq'\]"):
        read_preference_data(out, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        read_preference_data(out, "test")


# ---------------------------------------------------------------- config

def test_config_validates_from_yaml_forms():
    cfg = PreferenceDataConfig.model_validate({"samplers": [["sage", 0.7], {"sde_type": "ode", "eta": 0}]})
    assert [(s.sde_type, s.eta) for s in cfg.samplers] == [("sage", 0.7), ("ode", 0.0)]
    assert PreferenceDataConfig().tie_margin == 0.05 and PreferenceDataConfig().label_noise == 0.1
    for bad, field in [({"samplers": [["euler", 0.5]]}, "sde_type"),
                       ({"samplers": [["ode", 0.5]]}, "eta must be 0"),
                       ({"samplers": [["sage", 0.7], ["sage", 0.7]]}, "samplers repeat"),
                       ({"samplers": [["sage"]]}, "sde_type, eta"),
                       ({"tie_margin": -0.1}, "tie_margin"),
                       ({"label_noise": 0.9}, "label_noise"),
                       ({"strength": [0.8, 0.2]}, "strength"),
                       ({"pair_mix": {"truth-truth": 1.0}}, "pair_mix"),
                       ({"pair_mix": {"base-base": 0.0}}, "pair_mix"),
                       ({"degradations": ["smear"]}, "degradations"),
                       ({"pairs_per_promt": 3}, "pairs_per_promt")]:
        with pytest.raises(ValidationError, match=field):
            PreferenceDataConfig.model_validate(bad)
