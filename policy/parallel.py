"""Data-parallel learning over torch.distributed (no Ray here: `actors/learner.py` starts the ranks).

A learner group of N ranks trains one step on a step's G groups:
- group i is trained by rank i mod N: a group never splits, so group-relative advantages stay exact, and the
  advantages themselves (whitened over the whole step, as GDPO needs) come from every group's rewards, which each
  rank receives (they are small); only its own trajectories are fetched;
- gradients are summed over ranks: `ddp` all-reduces them (every rank keeps a full replica), `fsdp2` shards every
  parameter, its gradient and the optimiser state (`fully_shard` per block, then the root) and reduce-scatters;
- each group's randomness (t, ε, trained SDE steps) is a function of (seed, version, group index), so N ranks draw
  exactly what one rank would: one step on N ranks equals the step on one (up to float summation order).
FSDP2 runs every forward and backward as a collective, so ranks must make the same calls in the same order: a rank
with fewer groups repeats one with weight 0 (`Ranks.passes`).
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

PARALLEL = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the learner group; the default is a learner on its own."""

    rank: int = 0
    world: int = 1
    parallel: str = "ddp"

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp2" and self.world > 1

    @property
    def loss_scale(self) -> float:
        """Gradients must sum over ranks (each rank's loss already carries its groups' share of the step): FSDP2's
        reduce-scatter averages, so its losses are scaled by N (a divide factor of 1 needs PREMUL_SUM, which gloo
        lacks); DDP's all-reduce here sums."""
        return float(self.world) if self.sharded else 1.0

    def share(self, n_groups: int) -> list[int]:
        """The step's groups this rank trains."""
        return list(range(self.rank, n_groups, self.world))

    def passes(self, n_groups: int) -> list[tuple[int, bool]]:
        """(group index, counted) in training order: this rank's share, then, when sharded, repeats of a group with
        weight 0 (counted False) until every rank makes ceil(G / N) passes."""
        own = [(i, True) for i in self.share(n_groups)]
        if not self.sharded:
            return own
        pad = -(-n_groups // self.world) - len(own)
        return own + [(own[0][0] if own else 0, False)] * pad


def group_generator(seed: int, version: int, index: int) -> torch.Generator:
    """The random stream of group `index` in the update that makes `version + 1`: the same on whichever rank trains
    it, and after a resume."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, version, index]).generate_state(1)[0]))


def init_world(address: str, port: int, rank: int, world: int, timeout_s: float = 300.0) -> None:
    """Join the learner group's process group: NCCL when this process has a GPU, gloo otherwise. A collective that
    waits longer than timeout_s (a rank died) raises instead of hanging the run."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def shard(policies: Sequence, mixed_bf16: bool = False) -> list[nn.Module]:
    """FSDP2 over the policy and its frozen copies, in place: each distinct root (LoRA copies share their base's)
    gets `fully_shard` per block, then itself; returns the roots. mixed_bf16 (GPU): bf16 compute, fp32 gradient
    reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    for policy in policies:
        root, blocks, _ = policy.fsdp_units()
        if not blocks:
            raise ValueError(f"learner.parallel=fsdp2 shards a model per transformer block, but {type(root).__name__} "
                             "names none (Policy.fsdp_units): use learner.parallel=ddp")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16
          else MixedPrecisionPolicy())
    # our blocks return views (attention outputs, their keys and values) that no caller modifies in place: the
    # equality tests (tests/actors/test_learner_group.py) hold; the per-call warning would flood the logs
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    roots: list[nn.Module] = []
    for policy in policies:
        root, blocks, methods = policy.fsdp_units()
        if any(root is r for r in roots):
            continue
        roots.append(root)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, mp_policy=mp)
        for name in methods:  # entry points other than forward() that run the model
            register_fsdp_forward_method(root, name)
    return roots


def reshard(roots: Sequence[nn.Module]) -> None:
    """Back to shards: FSDP2 keeps a root's own weights gathered after a forward without backward (the frozen
    copies'), and the EMA and copy loads work shard by shard."""
    for root in roots:
        root.reshard()

def all_reduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """DDP: sum every gradient over the ranks, in one flat buffer (a rank with no groups contributes zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def gather_stats(per_group: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Every rank's {group index: stats} on every rank (so all ranks take the same decisions from them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return per_group
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, per_group)
    return {i: s for part in parts for i, s in part.items()}


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a sharded one (a collective: every rank calls it, in the same order); others as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: full_tensor(v) for k, v in state.items()}


def local_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of `full`, placed as `like` is (a DTensor); `full` itself when `like` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    full = torch.as_tensor(full).to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # every rank has it all


def local_numel(params: Sequence[Tensor]) -> int:
    """Elements of these parameters this rank holds (its shards under FSDP2)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)


def scalar(t: Tensor | float) -> float:
    """A float from a maybe-sharded scalar (clip_grad_norm_ of DTensor gradients returns a DTensor)."""
    return float(full_tensor(t)) if isinstance(t, Tensor) else float(t)


class WeightBroadcast:
    """A process group of its own, beside the learner's: learner rank 0 (rank 0 here) sends each version's whole
    tensors to the rollout actors (ranks 1..R), in buckets of at most `bucket_bytes`; NCCL on GPU, gloo on CPU.

    Every member calls `send` / `receive` once per version, in version order (a collective). A header goes first:
    receivers check the version they were told to expect, and the tensor count, before taking any weights.
    """

    def __init__(self, address: str, port: int, rank: int, world: int, timeout_s: float = 60.0):
        """timeout_s: a member that waits longer for a bucket (a peer died mid-version) raises instead of hanging."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        store = dist.PrefixStore("weight_sync", store)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.group = (dist.ProcessGroupNCCL(store, rank, world) if self.device.type == "cuda"
                      else dist.ProcessGroupGloo(store, rank, world, timeout))
        self.rank, self._store = rank, store  # the store must outlive the group

    def _broadcast(self, t: Tensor) -> None:
        self.group.broadcast([t], dist.BroadcastOptions()).wait()

    def send(self, version: int, state: Mapping[str, Tensor], bucket_bytes: int = 64 << 20) -> None:
        keys = sorted(state)
        self._broadcast(torch.tensor([version, len(keys)], dtype=torch.int64, device=self.device))
        for bucket in buckets([state[k] for k in keys], bucket_bytes):
            self._broadcast(torch.cat([t.detach().reshape(-1) for t in bucket]).to(self.device))

    def receive(self, version: int, like: Mapping[str, Tensor], bucket_bytes: int = 64 << 20) -> dict[str, Tensor]:
        """The tensors of `version`, shaped and typed as `like` (this side's own trainable state: same keys)."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        got, count = int(header[0]), int(header[1])
        if got != version or count != len(like):
            raise ValueError(f"weight broadcast: expected version {version} with {len(like)} tensors, the learner "
                             f"sent version {got} with {count}")
        keys = sorted(like)
        out: dict[str, Tensor] = {}
        for bucket in buckets([like[k] for k in keys], bucket_bytes):
            flat = torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            for t in bucket:
                out[keys[len(out)]] = flat[offset: offset + t.numel()].view(t.shape).cpu()
                offset += t.numel()
        return out


def buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive runs of tensors of one dtype, each at most bucket_bytes (a larger tensor alone): both sides cut
    the same buckets from the same shapes."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or t.dtype != buckets[-1][0].dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets
