"""What the policy tests share: a word list of their own, a small VideoDiT with every path switched on, and the
rollout overrides of an SDE sampler."""

import torch

from policy.model import ModelConfig, VideoDiT

# tiny.yaml samples rollouts with the ODE; PPO (and the importance-ratio check) needs an SDE's log-probs
SDE_ROLLOUTS = ["rollout.sampler=sage", "rollout.eta=0.7"]

VOCAB = (
    "a moving red green blue yellow cyan magenta white square circle triangle left right up down slowly quickly"
).split()


def make_model(seed: int = 0, **kw) -> VideoDiT:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = VideoDiT(ModelConfig(vocab=VOCAB, dim=32, depth=2, heads=2, **kw))
        with torch.no_grad():  # adaLN-Zero starts at v = 0: perturb every weight so every path matters
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model
