"""Word-level tokenizer for the prompt grammar of the embedded world (colour, shape, motion)."""

from __future__ import annotations

import torch

PAD_ID = 0


class WordTokenizer:
    """Maps whitespace-separated, lower-cased words to ids 1..len(vocab); 0 is padding.

    The vocabulary is an argument (the world owns it: `rewards.world.VOCAB`), so `policy` never
    imports `rewards`. A prompt has at most `max_words` words.
    """

    def __init__(self, vocab: list[str], max_words: int = 8):
        if not vocab:
            raise ValueError("vocab must not be empty")
        if len(set(vocab)) != len(vocab):
            dup = sorted({w for w in vocab if vocab.count(w) > 1})
            raise ValueError(f"vocab has duplicate words: {dup}")
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        self.vocab = list(vocab)
        self.max_words = max_words
        self._ids = {w: i + 1 for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Number of ids including padding: len(vocab) + 1."""
        return len(self.vocab) + 1

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts (B strings) -> LongTensor [B, max_words], padded with 0 (a fixed width, so batches concatenate)."""
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, got a single string")
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt")
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            if not words:
                raise ValueError(f"empty prompt {prompt!r}")
            if len(words) > self.max_words:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than max_words={self.max_words}")
            for w in words:
                if w not in self._ids:
                    raise ValueError(f"unknown word {w!r} in prompt {prompt!r}")
            rows.append([self._ids[w] for w in words])
        out = torch.full((len(rows), self.max_words), PAD_ID, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """LongTensor [B, L] -> prompts (padding dropped)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L], got shape {list(ids.shape)}")
        return [" ".join(self.vocab[i - 1] for i in row.tolist() if i != PAD_ID) for row in ids]
