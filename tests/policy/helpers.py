"""What the policy tests share: a word list of their own and a small VideoDiT with every path switched on."""

import torch

from policy.model import ModelConfig, VideoDiT

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
