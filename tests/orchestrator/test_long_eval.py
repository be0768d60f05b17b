"""Long-video evaluation (Astrolabe): stream 4x the training clip with the rolling cache, score every window with the
oracle (and learned rewards), print the table, write JSON and the plot; the run report shows it."""

import json

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.evaluation import LONG_EVAL_FILE, evaluate_long, long_eval_json, plot_long_eval
from orchestrator.report import write_report
from policy.model import ModelConfig, VideoDiT
from rewards.reward_model import RewardModelConfig, VideoReward
from rewards.scorer import RewardScorer
from rewards.world import VOCAB

PROMPTS = ["a red circle moving left quickly", "a blue square moving up slowly"]


def tiny_policy(seed=0) -> VideoDiT:
    torch.manual_seed(seed)
    model = VideoDiT(ModelConfig(vocab=VOCAB, dim=32, depth=2, heads=2, window=6, sink=2)).eval()
    with torch.no_grad():  # adaLN-Zero starts at v = 0: perturbed so the clips are not all grey
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_every_window_of_a_32_frame_video_is_scored(tmp_path):
    torch.manual_seed(1)
    VideoReward(RewardModelConfig()).save(tmp_path / "rm")
    scorer = RewardScorer("videoreward", tmp_path / "rm")
    model = tiny_policy()
    res = evaluate_long(model, frames=32, sampler="ode", eta=0.0, steps=2, seeds_per_prompt=2, seed=0,
                        prompts=PROMPTS, score=lambda v, p: dict(zip(scorer.dims, scorer.score(v, p, list(range(len(p)))).T)))
    assert res.videos.shape == (4, 32, 16, 16, 3) and res.starts == [0, 8, 16, 24] and res.window == 8
    assert res.oracle["overall"].shape == (4, 4) and set(res.rewards) == {"vq", "mq", "ta"}
    # each window is scored as its own clip: window 2 of the video is frames 16..23
    from rewards.oracle import score_batch

    np.testing.assert_allclose(res.oracle["vq"][2], score_batch(res.videos[:, 16:24], res.prompts)["vq"])
    np.testing.assert_allclose(res.rewards["ta"][3], scorer.score(res.videos[:, 24:], res.prompts, list(range(4)))[:, 2])
    assert not np.allclose(res.rewards["ta"][0], res.rewards["ta"][3])  # different windows, different scores

    data = long_eval_json(res, checkpoint="x")
    assert [w["start"] for w in data["windows"]] == [0, 8, 16, 24] and data["stride"] == 8
    assert data["windows"][1]["oracle"]["overall"] == pytest.approx(float(res.oracle["overall"][1].mean()))
    chunked = evaluate_long(model, frames=32, stride=2, sampler="ode", eta=0.0, steps=2, seeds_per_prompt=1, seed=0,
                            prompts=PROMPTS[:1])
    assert chunked.starts == list(range(0, 25, 2))  # stride = chunk: 13 overlapping windows
    fig = plot_long_eval(data)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4 + 1  # vq, mq, ta, overall; the clip-length marker
    with pytest.raises(ValueError, match="multiple of the chunk"):
        evaluate_long(model, frames=33, sampler="ode", eta=0.0, steps=2, seeds_per_prompt=1, seed=0, prompts=PROMPTS)


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, ray_cluster):
    """A few `videorl train` steps with streaming rollouts (2x the clip) guided by a VideoReward checkpoint."""
    from orchestrator.config import load_config
    from orchestrator.train import run_training

    root = tmp_path_factory.mktemp("stream")
    torch.manual_seed(0)
    VideoReward(RewardModelConfig()).save(root / "rm")
    (root / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    cfg = load_config(None, [
        "model.dim=32", "model.depth=2", "model.window=6", "model.sink=2", "data.sft_clips=64", "pretrain.steps=10",
        "pretrain.batch_size=8", "rollout.steps=2", "rollout.group_size=3", "rollout.frames=16",
        "rollout.guidance={reward: vr_ta, weight: 1.0, beta: 1.0}",
        f"rewards.models={{oracle: {{kind: oracle}}, vr: {{kind: videoreward, prefix: vr_, checkpoint: {root / 'rm'}}}}}",
        f"rewards.profile={root / 'profile.yaml'}", "rewards.calibration.samples_per_prompt=1",
        "train.steps=3", "train.groups_per_step=2", "train.checkpoint_every=3", "ray.rollout_workers=1",
        "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=2", "eval.seeds_per_prompt=1",
        "eval.constraint_samples_per_prompt=1", f"cache_dir={root / 'cache'}",
    ])
    run_training(cfg, root / "run", progress=False)
    return root


@pytest.mark.slow
def test_streaming_guided_training_then_videorl_eval_frames_and_the_report(streamed_run, capsys):
    import pyarrow.parquet as pq

    run, out = streamed_run / "run", streamed_run / "eval"
    rows = pq.read_table(run / "rollouts.parquet").to_pylist()
    assert {r["prefix_chunks"] for r in rows} <= set(range(5))  # history 0..4 chunks before the 8-frame window
    assert "reward_vr_ta" in rows[0] and max(r["prefix_chunks"] for r in rows) > 3  # beyond the clip's 0..3
    rc = main(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run / "final"), "--frames", "32",
               "--out", str(out), "eval.steps=2", "eval.seeds_per_prompt=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "24-31" in printed and "overall" in printed and "vr_ta" in printed  # one row per window, learned too
    data = json.loads((out / LONG_EVAL_FILE).read_text())
    assert len(data["windows"]) == 4 and data["clips"] == 24  # the held-out prompts, one seed each
    assert all(0 <= w["oracle"]["overall"] <= 1 and "vr_ta" in w["rewards"] for w in data["windows"])
    assert (out / "long_eval.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((run / LONG_EVAL_FILE).read_text()) == data  # the run directory gets it too
    page = write_report(run).read_text()
    assert "Long videos: quality per 8-frame window of 32 frames" in page
    assert (run / "plots" / "long_eval.png").is_file()


def test_eval_refuses_bad_long_and_guidance_arguments_in_one_line(tmp_path, capsys):
    tiny_policy().save(tmp_path / "m")
    ckpt = str(tmp_path / "m")
    for extra, message in ((["--guidance", "oracle_ta"], "not differentiable"),
                           (["--guidance", "feedback"], "not differentiable"),
                           (["--guidance", "nope"], "unknown reward 'nope'"),
                           (["--frames", "32", "--mode", "bidirectional"], "needs --mode causal"),
                           (["--frames", "32", "--sampler", "ode", "--sampler", "sage"], "one sampler")):
        assert main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "e"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
