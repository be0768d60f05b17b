"""Prompt encoding for Wan: the text encoder (UMT5) runs once per prompt, its states are reused by reference.

Exactly as diffusers' WanPipeline (`_get_t5_prompt_embeds`): tokenize with padding to `text_len`, run the encoder
with its attention mask, cut each prompt's `last_hidden_state` at its real length and zero-pad the rows back to
`text_len`. The padded rows are zeros on purpose: the transformer's text embedder maps them to MLP(0) and the
cross-attention (no mask) reads them, as Wan was trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def clean_prompt(prompt: str) -> str:
    """Whitespace-normalised prompt (WanPipeline also fixes text with ftfy, which videorl does not depend on)."""
    return " ".join(prompt.split())


class PromptEncoder:
    """tokenizer + text encoder from a diffusers Wan directory; `encode` -> `[P, text_len, D]` zero-padded states."""

    def __init__(self, tokenizer, text_encoder, text_len: int):
        self.tokenizer, self.text_encoder, self.text_len = tokenizer, text_encoder.eval(), text_len

    @classmethod
    def from_model_dir(cls, path: str | Path, text_len: int, dtype: str = "float32",
                       device: str | torch.device = "cpu") -> PromptEncoder:
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(path)
        for sub in ("tokenizer", "text_encoder"):
            if not (root / sub).is_dir():
                raise ValueError(f"model directory {root} has no {sub}/: Wan prompts need the tokenizer and text encoder")
        from policy.wan.loading import quiet

        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
            # the encoder's dtype follows the transformer's (bf16 UMT5-XXL is what Wan pipelines run); float32 else
            encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder",
                                                       dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        return cls(tokenizer, encoder.to(device), text_len)

    @torch.no_grad()
    def states(self, prompts: Sequence[str]) -> list[Tensor]:
        """Each prompt's encoder states at its real length `[L_i, D]` (float32, CPU)."""
        enc = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = enc.attention_mask.to(device)
        hidden = self.text_encoder(enc.input_ids.to(device), mask).last_hidden_state
        return [h[:n].float().cpu() for h, n in zip(hidden, mask.sum(dim=1).tolist())]

    def table(self, prompts: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
        """{prompt: float32 [L_i, D]} for distinct prompts: computed once, shipped to rollout actors by reference."""
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(prompts))
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            out.update({p: s.numpy() for p, s in zip(chunk, self.states(chunk))})
        return out


def pad_states(states: Sequence[Tensor | np.ndarray], text_len: int) -> Tensor:
    """[L_i, D] per prompt -> `[P, text_len, D]`, zero rows after each prompt's real length (WanPipeline's padding)."""
    rows = []
    for s in states:
        s = (s if isinstance(s, Tensor) else torch.from_numpy(np.array(s)))[:text_len]  # a copy: store arrays are read-only
        rows.append(torch.cat([s, s.new_zeros(text_len - s.shape[0], s.shape[1])]))
    return torch.stack(rows)


class PromptStates:
    """Prompt -> padded text-encoder states, from a precomputed table where it has the prompt, else from the text
    encoder, loaded on first need (so a rollout actor with a complete table never loads it). Shared, not copied, by
    the learner's frozen copies (deepcopy returns the same object)."""

    def __init__(self, model_dir: str, text_len: int, dtype: str, table: Mapping[str, np.ndarray] | None = None):
        self.model_dir, self.text_len, self.dtype = model_dir, text_len, dtype
        self.table = dict(table or {})
        self.encoder: PromptEncoder | None = None

    def __deepcopy__(self, memo) -> PromptStates:
        return self

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.table]
        if missing:
            if self.encoder is None:
                self.encoder = PromptEncoder.from_model_dir(self.model_dir, self.text_len, self.dtype)
            self.table.update(self.encoder.table(missing))
        return pad_states([self.table[p] for p in prompts], self.text_len)
