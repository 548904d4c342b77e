"""What the policy side and the engines agree on: how weights are laid out in the flat buffers a sync moves, and
what an engine must offer to receive them. Pure: tensors and plans, no collectives, no DeepSpeed, no vLLM.

- Bucket / plan_buckets: whole parameters, packed in model order (sync_mode gather, colocated loads, checkpoints).
- ShardPlan / plan_shards: ZeRO-3 shards (sync_mode partitions). Policy rank j of P holds elements
  [j * s, (j + 1) * s) of every flattened parameter, s = ceil(numel / P) (the last one zero-padded). A bucket is a
  segment of `length` elements of each rank's shards; the engine receives the P segments side by side, and
  `join_shards` rebuilds each parameter from its P slices: the plan and its inverse, here together.
- WeightSink: the engine's side of a weight update, as the weight path (tgrpo/sync/weights.py) calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Bucket:
    dtype: str
    numel: int
    params: list[tuple[str, list[int], int, int]]  # (name, shape, offset, numel)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def plan_buckets(params: list[tuple[str, list[int], torch.dtype]], bucket_bytes: int) -> list[Bucket]:
    """Consecutive parameters of one dtype packed up to bucket_bytes; a larger parameter gets a bucket of its own.
    Model order is kept so that each vLLM layer's weights arrive close together."""
    buckets: list[Bucket] = []
    for name, shape, dtype in params:
        numel = 1
        for d in shape:
            numel *= d
        dtype_name = str(dtype).removeprefix("torch.")
        size = numel * dtype.itemsize
        last = buckets[-1] if buckets else None
        if last is None or last.dtype != dtype_name or (last.numel * dtype.itemsize + size > bucket_bytes
                                                        and last.params):
            last = Bucket(dtype_name, 0, [])
            buckets.append(last)
        last.params.append((name, list(shape), last.numel, numel))
        last.numel += numel
    return buckets



def max_bucket_bytes(plan: list[Bucket]) -> int:
    return max(b.numel * b.torch_dtype.itemsize for b in plan)


@dataclass
class ShardBucket:
    """One bucket of sync_mode partitions: a segment of `length` elements of every policy rank's shards."""
    dtype: str
    start: int  # zero-copy: where the segment starts in each policy rank's shard buffer
    length: int
    params: list[tuple[str, list[int], int, int]]  # (name, full shape, offset of its shard in the segment, numel)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class ShardPlan:
    parts: int  # policy ranks, each holding 1/parts of every parameter
    zero_copy: bool  # segments are broadcast straight from DeepSpeed's shard buffer; else copied into one first
    buckets: list[ShardBucket]

    def max_bytes(self) -> int:
        """Receive buffer size: the largest bucket's segments side by side."""
        return max(self.parts * b.length * b.torch_dtype.itemsize for b in self.buckets)


def plan_shards(entries: list[tuple[int, str, list[int], int, torch.dtype]], bucket_bytes: int, parts: int,
                zero_copy: bool) -> ShardPlan:
    """Buckets of whole shards, each segment at most bucket_bytes / parts. entries: (offset of the parameter's
    shard in the rank's shard buffer, name, full shape, numel, dtype), in the buffer's order. zero_copy: the offsets
    are where DeepSpeed keeps the shards, the same on every policy rank, and segments are ranges of that buffer;
    else they are packed offsets of a staging buffer."""
    buckets: list[ShardBucket] = []
    limit = max(1, bucket_bytes // parts)
    for offset, name, shape, numel, dtype in entries:
        size = shard_size(numel, parts)
        dtype_name = str(dtype).removeprefix("torch.")
        last = buckets[-1] if buckets else None
        if (last is None or last.dtype != dtype_name
                or (offset + size - last.start) * dtype.itemsize > limit and last.params):
            last = ShardBucket(dtype_name, offset, 0, [])
            buckets.append(last)
        last.params.append((name, shape, offset - last.start, numel))
        last.length = offset + size - last.start
    return ShardPlan(parts, zero_copy, buckets)


def shard_size(numel: int, parts: int) -> int:
    """Elements of one rank's shard of a parameter of `numel` elements (ZeRO-3 pads the last rank's)."""
    return -(-numel // parts)


def unpack_bucket(flat: torch.Tensor, metas: list, parts: int = 1, segment: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The parameters of one received bucket, (name, tensor of its full shape). parts == 1: `flat` holds whole
    parameters at their offsets (views, no copy). parts > 1: `flat` holds `parts` shard segments of `segment`
    elements side by side; each parameter is the concatenation of its slice of every segment, cut to its size (a
    new tensor)."""
    out = []
    for name, shape, off, numel in metas:
        if parts == 1:
            out.append((name, flat[off:off + numel].view(shape)))
        else:
            size = shard_size(numel, parts)
            whole = torch.cat([flat[j * segment + off:j * segment + off + size] for j in range(parts)])
            out.append((name, whole[:numel].view(shape)))
    return out


class WeightSink(Protocol):
    """An engine's side of a weight update (tgrpo.rollout.vllm_engine.RolloutEngine): begin, then per bucket write
    weight_buffer(...) (a broadcast or a copy lands there) and load_bucket(...), then finish. ensure_buffer makes the
    receive buffer without starting an update (transport-only timing)."""

    def ensure_buffer(self, max_bytes: int) -> None: ...

    def begin_update(self, max_bytes: int) -> None: ...

    def weight_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor: ...

    def load_bucket(self, numel: int, dtype: torch.dtype, metas: list, parts: int = 1, segment: int = 0) -> None: ...

    def finish_update(self) -> None: ...
