"""Rolling KV cache (MATH.md §7): the eviction rule, its agreement with generation, no-copy group expansion."""

import pytest
import torch

from policy.kv_cache import RollingKVCache, attended_frames, retained_frames
from policy.sampling import sample
from tests.policy.helpers import make_model


def test_math_section_7_traces():
    with_sink = attended_frames(12, chunk=3, window=6, sink=3)
    assert with_sink == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 7, 8], [0, 1, 2, 9, 10, 11]]
    no_sink = attended_frames(12, chunk=3, window=6, sink=0)
    assert no_sink == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [6, 7, 8, 9, 10, 11]]


def test_window_covering_clip_is_full_chunk_causal():
    for window in (8, 20):
        assert attended_frames(8, chunk=2, window=window, sink=1) == [list(range(2 * j + 2)) for j in range(4)]


def test_partial_window_keeps_sinks_and_most_recent_frames():
    # window 5 = 1 sink + 2 recent + chunk of 2
    assert attended_frames(8, chunk=2, window=5, sink=1) == [[0, 1], [0, 1, 2, 3], [0, 2, 3, 4, 5], [0, 4, 5, 6, 7]]
    assert retained_frames([0, 1, 2, 3, 4, 5], incoming=2, window=5, sink=1) == [0, 4, 5]
    assert retained_frames([0, 1], incoming=2, window=5, sink=1) == [0, 1]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_frames=12, chunk=3, window=5, sink=3), "window"),
        (dict(num_frames=12, chunk=0, window=6, sink=0), "chunk"),
        (dict(num_frames=12, chunk=3, window=6, sink=-1), "sink"),
        (dict(num_frames=10, chunk=3, window=6, sink=0), "num_frames"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs, name):
    with pytest.raises(ValueError, match=name):
        attended_frames(**kwargs)


def _frame_keys(positions, batch=2, tokens=3):
    """Keys/values whose every entry is the frame's absolute index (so the cache content is checkable)."""
    t = torch.tensor(positions, dtype=torch.float32).repeat_interleave(tokens)
    k = t[None, None, :, None].expand(batch, 2, -1, 4).clone()
    return [k, k.clone()], [k + 100, k + 100]


@pytest.mark.parametrize("window, sink", [(6, 3), (6, 0), (5, 1), (12, 2)])
def test_cache_holds_what_attended_frames_says(window, sink):
    chunk, tokens = 3, 3
    cache = RollingKVCache(num_layers=2, chunk=chunk, window=window, sink=sink)
    trace = attended_frames(24, chunk, window, sink)
    for j, seen in enumerate(trace):
        # before chunk j: cached frames + chunk j's own frames = what chunk j attends to
        assert cache.frame_positions + list(range(j * chunk, (j + 1) * chunk)) == seen
        k, v = cache.read(0) if j else (None, None)
        if j:  # the stored tensors really hold those frames, token by token, for every layer
            expect = torch.tensor(cache.frame_positions, dtype=torch.float32).repeat_interleave(tokens)
            assert torch.equal(k[0, 0, 0, :, 0], expect)
            assert torch.equal(cache.read(1)[1][1, 0, 1, :, 3], expect + 100)
        keys, values = _frame_keys(list(range(j * chunk, (j + 1) * chunk)), tokens=tokens)
        cache.append(list(range(j * chunk, (j + 1) * chunk)), keys, values)
    assert cache.next_frame == 24
    assert len(cache.frame_positions) <= window - chunk


def test_cache_memory_is_bounded_by_the_window():
    cache = RollingKVCache(num_layers=2, chunk=2, window=6, sink=2)
    sizes = []
    for j in range(20):
        keys, values = _frame_keys([2 * j, 2 * j + 1])
        cache.append([2 * j, 2 * j + 1], keys, values)
        sizes.append(cache.nbytes())
    # 4 frames x 3 tokens x (batch 2 x 2 heads x 4 dims) x 4 bytes x (k, v) x 2 layers, once full
    assert sizes[1:] == [4 * 3 * 16 * 4 * 2 * 2] * 19


def test_append_rejects_gaps_and_wrong_batch():
    cache = RollingKVCache(num_layers=2, chunk=2, window=6, sink=0)
    keys, values = _frame_keys([0, 1])
    cache.append([0, 1], keys, values)
    with pytest.raises(ValueError, match="consecutive from frame 2"):
        cache.append([3, 4], *_frame_keys([3, 4]))
    with pytest.raises(ValueError, match="batch"):
        cache.append([2, 3], *_frame_keys([2, 3], batch=3))


def test_expand_shares_the_prefix_storage_and_writes_allocate_new_tensors():
    cache = RollingKVCache(num_layers=2, chunk=2, window=8, sink=0)
    cache.append([0, 1], *_frame_keys([0, 1], batch=2))  # P = 2 prompts
    prefix_k = cache.read(0)[0].clone()
    group = cache.expand(4)
    k, v = group.read(0)
    assert k.shape == (2, 4, 2, 6, 4) and group.batch == 8
    # no copy: same storage, candidates broadcast with stride 0
    assert k.data_ptr() == cache.read(0)[0].data_ptr()
    assert k.untyped_storage().data_ptr() == cache.read(0)[0].untyped_storage().data_ptr()
    assert k.stride(1) == 0
    assert group.nbytes() == cache.nbytes()
    # candidates write their own frames: new per-candidate tensors, the shared prefix untouched
    keys, values = _frame_keys([2, 3], batch=8)
    keys = [kk + torch.arange(8.0)[:, None, None, None] for kk in keys]  # each candidate different
    group.append([2, 3], keys, values)
    new_k = group.read(0)[0]
    assert new_k.data_ptr() != cache.read(0)[0].data_ptr() and new_k.stride(1) != 0
    assert torch.equal(cache.read(0)[0], prefix_k) and cache.frame_positions == [0, 1]
    assert group.frame_positions == [0, 1, 2, 3]
    assert torch.equal(new_k[1, 2, 0, 6:, 0], torch.tensor([2.0, 2, 2, 3, 3, 3]) + 6)  # candidate 1*4+2
    assert torch.equal(new_k[1, 2, 0, :6], prefix_k[1, 0, 0])  # the prefix copied into each candidate


def test_detach_freezes_history():
    cache = RollingKVCache(num_layers=1, chunk=1, window=4, sink=0)
    k = torch.randn(1, 1, 2, 4, requires_grad=True)
    cache.append([0], [k * 2], [k * 3])
    assert cache.read(0)[0].requires_grad
    cache.detach()
    assert not cache.read(0)[0].requires_grad and not cache.read(0)[1].requires_grad


@pytest.mark.parametrize("window, sink", [(8, 0), (6, 2), (4, 0)])
def test_generation_holds_exactly_the_attended_frames(window, sink):
    model = make_model(window=window, sink=sink)
    held = []
    ids = torch.tensor([[1, 3, 10]])
    sample(model, ids, steps=1, mode="causal", num_frames=16, on_chunk=lambda j, c: held.append(c.frame_positions))
    trace = attended_frames(16, 2, window, sink)
    assert len(held) == 8
    for j, frames in enumerate(held):
        assert frames + [2 * j, 2 * j + 1] == trace[j]
