"""Supervised pretraining of the base (SFT) generator by flow matching.

x_t = (1 - t)·x0 + t·ε, target velocity v = ε - x0 (MATH.md notation). t is drawn
logit-normal (SD3), which spends the steps where denoising is hardest. One model learns
both attention modes: a share `causal_fraction` of batches is trained chunk-causally with
clean history (teacher forcing, each chunk its own t), the rest bidirectionally.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from policy.backend import Policy


def logit_normal_t(shape: tuple[int, ...], generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(mean + std * N(0, 1)) (SD3, Esser et al. 2024, eq. 19)."""
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator))


def flow_matching_loss(
    model: Policy, x0: torch.Tensor, cond: torch.Tensor, causal: bool, generator: torch.Generator,
    t_mean: float = 0.0, t_std: float = 1.0,
) -> torch.Tensor:
    """Mean squared velocity error on one batch. x0 [B, T, C, H, W] (latents; pixels in [-1, 1] in pixel space)."""
    b, frames = x0.shape[:2]
    chunk = model.shape.chunk
    if causal:  # one noise level per chunk, shared by its frames
        t = logit_normal_t((b, frames // chunk), generator, t_mean, t_std).repeat_interleave(chunk, dim=1)
    else:
        t = logit_normal_t((b, 1), generator, t_mean, t_std).expand(b, frames)
    eps = torch.randn(x0.shape, generator=generator)
    t, eps, x0 = t.to(model.device), eps.to(model.device), x0.to(model.device)
    tt = t[:, :, None, None, None]
    xt = (1 - tt) * x0 + tt * eps
    v = model.velocity_causal(xt, t, x0, cond) if causal else model.velocity(xt, t, cond)
    target = eps - x0
    return F.mse_loss(v.float(), target)


def pretrain(
    model: Policy,
    videos: torch.Tensor,
    cond: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema: float,
    causal_fraction: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    t_mean: float = 0.0,
    t_std: float = 1.0,
) -> Policy:
    """Train all of `model`'s weights in place and return its EMA copy (the weights to sample from).

    videos: uint8 [N, T, C, H, W] pixel-space clips (converted per batch to [-1, 1] to keep memory small);
    cond: [N, ...] from model.encode_prompts. `on_step(step, loss)` is called after every step (progress bars).
    """
    if videos.shape[0] != cond.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {cond.shape[0]} prompts")
    gen = torch.Generator().manual_seed(seed)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    # linear warmup then cosine decay to 10 %
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, warmup))
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    model.train()
    for step in range(steps):
        idx = torch.randint(0, videos.shape[0], (batch_size,), generator=gen)
        x0 = videos[idx].float() / 127.5 - 1.0
        causal = bool(torch.rand((), generator=gen) < causal_fraction)
        loss = flow_matching_loss(model, x0, cond[idx], causal, gen, t_mean, t_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))  # short memory early, when weights move fast
            for pe, p in zip(ema_model.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        if on_step:
            on_step(step, loss.item())
    model.eval()
    return ema_model.eval()
