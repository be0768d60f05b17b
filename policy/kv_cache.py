"""Rolling key/value cache for chunk-autoregressive video generation (MATH.md §7).

Chunks of `chunk` frames are generated in order. A chunk attends to itself plus the cache:
the first `sink` frames (kept forever) and the most recent frames, so that at most `window`
frames take part in one chunk's attention (sink + recent + the chunk itself). On overflow the
oldest non-sink frames are evicted (Self-Forcing / LongLive / Astrolabe).

One eviction rule, `retained_frames`, drives both the cache and `attended_frames` (from which the
teacher-forced attention mask is built), so the cached and the recomputed paths cannot disagree.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_rule(chunk: int, window: int, sink: int) -> None:
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if window < chunk + sink:
        raise ValueError(f"window must be >= chunk + sink = {chunk + sink} (it counts the chunk itself), got {window}")


def retained_frames(held: list[int], incoming: int, window: int, sink: int) -> list[int]:
    """The frames of `held` (in insertion order) still cached when `incoming` more frames attend.

    Keeps everything if len(held) + incoming <= window; otherwise the first `sink` frames plus the
    most recent window - incoming - sink frames (MATH.md §7).
    """
    room = window - incoming
    if len(held) <= room:
        return list(held)
    recent = room - sink
    return list(held[:sink]) + (list(held[len(held) - recent :]) if recent > 0 else [])


def attended_frames(num_frames: int, chunk: int, window: int, sink: int) -> list[list[int]]:
    """Per chunk, the sorted frame indices it attends to (cached frames + its own frames).

    Simulates the cache on frame indices with `retained_frames`, the rule RollingKVCache uses.
    MATH.md §7: attended_frames(12, 3, 6, 3) = [[0,1,2], [0..5], [0,1,2,6,7,8], [0,1,2,9,10,11]].
    A window >= num_frames gives full chunk-causal attention.
    """
    _check_rule(chunk, window, sink)
    if num_frames <= 0 or num_frames % chunk:
        raise ValueError(f"num_frames must be a positive multiple of chunk={chunk}, got {num_frames}")
    held: list[int] = []
    out = []
    for start in range(0, num_frames, chunk):
        held = retained_frames(held, chunk, window, sink)
        new = list(range(start, start + chunk))
        out.append(held + new)
        held = held + new
    return out


class RollingKVCache:
    """Per-layer keys/values of whole frames at absolute frame positions (keys after rotary encoding).

    Tensors are `[P, G, heads, n_frames * tokens_per_frame, head_dim]`: batch B = P*G, prompt-major.
    G is 1 until `expand(G)`, which broadcasts a frozen prefix to G candidates as `.expand()`-ed
    views of the same storage (no copy). Appending allocates new tensors, so the shared prefix is
    never written.

    Invariant: after every `append`, the cache holds exactly
    `retained_frames(all frames appended so far, chunk, window, sink)`, i.e. the frames the NEXT
    chunk attends to besides itself; so `frame_positions + next chunk == attended_frames(...)[j]`
    and the cache never holds more than window - chunk frames between chunks.
    """

    def __init__(self, num_layers: int, chunk: int, window: int, sink: int):
        _check_rule(chunk, window, sink)
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        self.num_layers, self.chunk, self.window, self.sink = num_layers, chunk, window, sink
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.frame_positions: list[int] = []
        self.next_frame = 0  # absolute index of the next frame to append (evicted frames still count)
        self.tokens_per_frame = 0
        self.group = 1

    @property
    def batch(self) -> int:
        """B = P*G, or 0 while empty."""
        k = self.keys[0]
        return 0 if k is None else k.shape[0] * k.shape[1]

    def read(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """Keys, values `[P, G, heads, n, head_dim]` of the cached frames for `layer`, or None if empty."""
        if self.keys[layer] is None:
            return None
        return self.keys[layer], self.values[layer]

    def append(self, positions: list[int], keys: list[Tensor], values: list[Tensor]) -> None:
        """Add whole frames for every layer, then evict to make room for the next chunk.

        positions: absolute frame indices of the new frames (consecutive, after the cached ones).
        keys, values: one `[B, heads, n_new_tokens, head_dim]` tensor per layer, B = P*G.
        """
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of keys/values, got {len(keys)}/{len(values)}")
        if not positions or positions != list(range(self.next_frame, self.next_frame + len(positions))):
            raise ValueError(f"new frames must be consecutive from frame {self.next_frame}, got {positions}")
        n_tok, rem = divmod(keys[0].shape[2], len(positions))
        if rem or (self.tokens_per_frame and n_tok != self.tokens_per_frame):
            raise ValueError(f"{keys[0].shape[2]} tokens do not make {len(positions)} whole frames")
        if self.batch and keys[0].shape[0] != self.batch:
            raise ValueError(f"batch mismatch: cache holds B={self.batch}, got {keys[0].shape[0]}")
        self.tokens_per_frame = n_tok
        held = self.frame_positions + list(positions)
        kept = retained_frames(held, self.chunk, self.window, self.sink)
        # Token slices to keep: the sink frames and the most recent frames (see retained_frames).
        evict = len(kept) < len(held)
        n_sink = self.sink * n_tok if evict else 0
        n_recent = len(kept) * n_tok - n_sink
        for layer in range(self.num_layers):
            for store, new in ((self.keys, keys[layer]), (self.values, values[layer])):
                b, h, n, d = new.shape
                new = new.reshape(b // self.group, self.group, h, n, d)
                # clone: never keep a view into the caller's (e.g. fused qkv) storage
                full = new.clone() if store[layer] is None else torch.cat([store[layer], new], dim=3)
                if evict:
                    full = torch.cat([full[:, :, :, :n_sink], full[:, :, :, full.shape[3] - n_recent :]], dim=3)
                store[layer] = full
        self.frame_positions = kept
        self.next_frame = positions[-1] + 1

    def expand(self, group: int) -> RollingKVCache:
        """A cache for G = `group` candidates per prompt sharing this (frozen) history without copying it.

        Candidate b = p*G + g (prompt-major). The tensors are `.expand()`-ed views of this cache's.
        """
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        if self.group != 1:
            raise ValueError(f"cache is already expanded to group {self.group}")
        out = RollingKVCache(self.num_layers, self.chunk, self.window, self.sink)
        out.frame_positions = list(self.frame_positions)
        out.next_frame = self.next_frame
        out.tokens_per_frame = self.tokens_per_frame
        out.group = group
        for layer in range(self.num_layers):
            for src, dst in ((self.keys, out.keys), (self.values, out.values)):
                t = src[layer]
                dst[layer] = None if t is None else t.expand(t.shape[0], group, *t.shape[2:])
        return out

    def detach(self) -> RollingKVCache:
        """Freeze the history in place (streaming long tuning: no gradient into past frames); returns self."""
        self.keys = [None if k is None else k.detach() for k in self.keys]
        self.values = [None if v is None else v.detach() for v in self.values]
        return self

    def nbytes(self) -> int:
        """Bytes of memory the cache holds: each distinct storage once (an expanded prefix counts once)."""
        seen, total = set(), 0
        for t in self.keys + self.values:
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total
