"""orchestrator/calibrate.py end to end: sample a real VideoDiT on the held-out prompts, score, write τ per profile."""
import numpy as np
import pytest
import torch

from orchestrator.calibrate import calibrate_base_model, score_in_batches
from orchestrator.evaluation import evaluate
from policy.model import ModelConfig, VideoDiT
from policy.pretrain import pretrain
from policy.text import WordTokenizer
from rewards.calibration import available_profiles, load_profile, read_calibration
from rewards.oracle import score_batch
from rewards.world import VOCAB, heldout_prompts, sft_dataset, to_uint8

# the shipped profiles the oracle + feedback rewards below can serve (audio_sync needs its sync reward)
PROFILES = [p for p in map(load_profile, available_profiles()) if {p.primary, *p.constraints} <= {"vq", "mq", "ta", "feedback"}]
SAMPLING = dict(sampler="ode", eta=0.0, steps=2, mode="bidirectional")


def oracle_and_brightness(videos: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """vq/mq/ta from the world's oracle; `feedback` stands in as mean brightness in [0, 1] (a real,
    deterministic function of the clip: the user-feedback model needs a trained checkpoint)."""
    s = score_batch(videos, prompts)
    return {"vq": s["vq"], "mq": s["mq"], "ta": s["ta"], "feedback": videos.mean(axis=(1, 2, 3, 4)) / 255.0}


def tiny_model() -> VideoDiT:
    torch.manual_seed(0)
    return VideoDiT(ModelConfig(dim=16, depth=1, heads=1, vocab=VOCAB))


def test_writes_every_profile_and_matches_the_formula(tmp_path):
    ckpt = tmp_path / "base" / "model.safetensors"
    ckpt.parent.mkdir()
    tiny_model().save(ckpt)  # untrained: enough to check the plumbing and the arithmetic
    out = tmp_path / "calibration.json"
    res = calibrate_base_model(VideoDiT.load(ckpt), oracle_and_brightness, PROFILES, samples_per_prompt=3, seed=7,
                               out_path=out, source=str(ckpt), **SAMPLING)
    assert read_calibration(out) == res
    assert res["seed"] == 7 and res["base_checkpoint"] == str(ckpt) and res["n"] == 72
    assert res["prompts"] == [p.text for p in heldout_prompts()]
    assert set(res["profiles"]) == {"video_generation", "instruction", "retrieval"}
    assert set(res["scores"]) == {"vq", "mq", "ta", "feedback"}

    # recompute independently: the same seed draws the same clips
    again = evaluate(VideoDiT.load(ckpt), seeds_per_prompt=3, seed=7, **SAMPLING)
    scores = oracle_and_brightness(again.videos, again.prompts)
    for profile in PROFILES:
        got = res["profiles"][profile.name]["constraints"]
        for c, k in profile.constraints.items():
            mu, sigma = scores[c].mean(), scores[c].std(ddof=1)
            assert got[c]["tau"] == pytest.approx(mu + k * sigma, abs=1e-12)
            assert (got[c]["mu"], got[c]["sigma"], got[c]["k"], got[c]["n"]) == pytest.approx((mu, sigma, k, 72))
    assert res["scores"]["feedback"]["mean"] == pytest.approx(scores["feedback"].mean())
    # the video-generation and instruction modules share ta's μ, σ but not its τ
    vga, ins = (res["profiles"][p]["constraints"]["ta"] for p in ("video_generation", "instruction"))
    assert vga["mu"] == ins["mu"] and vga["sigma"] == ins["sigma"]
    assert vga["tau"] - ins["tau"] == pytest.approx(0.3 * vga["sigma"])


def test_bad_inputs_fail_before_or_while_scoring(tmp_path):
    model, out = tiny_model(), tmp_path / "c.json"
    kw = dict(samples_per_prompt=1, seed=0, out_path=out, **SAMPLING)
    with pytest.raises(ValueError, match="unique"):
        calibrate_base_model(model, oracle_and_brightness, PROFILES + PROFILES[:1], **kw)
    with pytest.raises(ValueError, match=r"no scores for reward\(s\) \['feedback'\]; scores given: \['mq', 'ta', 'vq'\]"):
        calibrate_base_model(model, lambda v, p: {k: s for k, s in oracle_and_brightness(v, p).items()
                                                  if k != "feedback"}, PROFILES, **kw)

    def nan_at_5(videos, prompts):
        s = oracle_and_brightness(videos, prompts)
        s["ta"][5] = np.nan
        return s

    with pytest.raises(ValueError, match=r"reward 'ta': non-finite score nan at sample 5"):
        calibrate_base_model(model, nan_at_5, PROFILES, **kw)
    assert not out.exists(), "nothing is written when calibration fails"


def test_score_in_batches_joins_and_checks():
    videos = np.zeros((5, 8, 16, 16, 3), np.uint8)
    calls = []

    def score(v, p):
        calls.append(len(p))
        return {"a": np.arange(len(p)) + 10 * len(calls)}

    joined = score_in_batches(score, videos, ["x"] * 5, batch_size=2)
    assert calls == [2, 2, 1]
    np.testing.assert_array_equal(joined["a"], [10, 11, 20, 21, 30])
    with pytest.raises(ValueError, match=r"score returned 'a' with shape \[3\], expected \[2\]"):
        score_in_batches(lambda v, p: {"a": np.zeros(3)}, videos, ["x"] * 5, batch_size=2)
    with pytest.raises(ValueError, match=r"rewards \['b'\].*\['a'\] before"):
        score_in_batches(lambda v, p: {"a" if len(p) == 4 else "b": np.zeros(len(p))}, videos, ["x"] * 5, batch_size=4)


@pytest.mark.slow
def test_recalibrating_with_another_seed_moves_tau_by_less_than_a_tenth_sigma(tmp_path):
    # An untrained VideoDiT outputs its initial noise (adaLN-Zero: v = 0); the oracle finds no object in
    # noise, so its scores are ~all 0 with rare spikes and σ itself never settles. 150 flow-matching steps
    # of a tiny model on 512 flawed renders (~5 s) give blobs on black whose scores are spread and
    # light-tailed, like a real base model's.
    videos, prompts = sft_dataset(512, seed=0)
    model = pretrain(VideoDiT(ModelConfig(dim=16, depth=1, heads=1, vocab=VOCAB)),
                     torch.from_numpy(to_uint8(videos)).permute(0, 1, 4, 2, 3).contiguous(),
                     WordTokenizer(VOCAB).encode([p.text for p in prompts]),
                     steps=150, batch_size=32, lr=1e-2, warmup=10, ema=0.0, causal_fraction=0.0, seed=0)
    # How many samples: τ̂ = μ̂ + k·σ̂. Every calibration draws the same 24 prompts, so μ̂'s error is the
    # within-prompt spread w·σ/√n (w ≈ 1 here); σ̂'s error is σ·√((κ − 1)/4n) (κ the kurtosis, 3 if
    # Gaussian). Two independent runs differ by √2 times that: sd(τ1 − τ2) ≈ √2·σ·√(w² + k²(κ − 1)/4)/√n.
    # With k = 1.1 and κ ≈ 3..5.4 (measured on this model) that is 1.8..2.1·σ/√n, so n = 24 × 300 = 7200
    # gives 0.021..0.025σ (bootstrap on 19 200 clips: ≤ 0.030σ for every constraint), and 0.1σ is
    # ≥ 3.3 standard deviations away. (n ≈ 500 would only pin μ: 0.045σ for one run, 0.12σ for τ1 − τ2.)
    runs = [calibrate_base_model(model, oracle_and_brightness, PROFILES, samples_per_prompt=300, seed=seed,
                                 out_path=tmp_path / f"seed{seed}.json", batch_size=256, **SAMPLING)
            for seed in (0, 1)]
    moved = []
    for profile in PROFILES:
        for c in profile.constraints:
            a, b = (r["profiles"][profile.name]["constraints"][c] for r in runs)
            assert a["sigma"] > 0.005, f"{profile.name}/{c}: base scores must be spread for the check to mean anything"
            moved.append(abs(a["tau"] - b["tau"]))
            assert abs(a["tau"] - b["tau"]) < 0.1 * a["sigma"], (profile.name, c, a, b)
    assert min(moved) > 0, "another seed must draw other clips"
    assert runs[0]["scores"]["feedback"]["mean"] != runs[1]["scores"]["feedback"]["mean"]


def test_calibration_cache_key_follows_only_what_the_measurement_uses(tmp_path):
    """Training-only keys (curriculum, replicas, learner) keep the cached τ; the rollout sampler and the calibration
    settings change it."""
    from types import SimpleNamespace

    from orchestrator.config import load_config
    from orchestrator.inputs import calibration_path

    base, ckpts = SimpleNamespace(key="base-k"), {"videoreward": "/r", "feedback": "/f", "oracle": None}

    def path(*overrides):
        return calibration_path(load_config(None, [f"cache_dir={tmp_path}", *overrides]), base, ckpts)

    plain = path()
    assert path("rewards.models.videoreward.replicas=3", "learner.lr=0.01", "train.steps=7",
                "rewards.curriculum={kind: self_paced, thresholds: [0.1, 0.2, 0.3]}") == plain
    assert path("rollout.eta=0.5") != plain
    assert path("rewards.calibration.samples_per_prompt=10") != plain
    # a python plug-in: editing its source recalibrates, though its callable and kwargs stay the same
    plugin = tmp_path / "plugins" / "sharp_scorer.py"
    plugin.parent.mkdir()
    plugin.write_text("class Sharp:\n    dims = ('sharp',)\n    def score(self, batch):\n        return {}\n")
    spec = f"rewards.models.sharp={{kind: python, callable: 'sharp_scorer:Sharp', pythonpath: [{plugin.parent}]}}"
    ckpts["sharp"] = None
    first = path(spec)
    assert first != plain and path(spec) == first
    plugin.write_text(plugin.read_text() + "# scores differently now\n")
    assert path(spec) != first
