"""Weights from the policy to the rollout engines, a bucket at a time.

The bucket plan (names, shapes, offsets) is made once per run from the partitioned parameters' full shapes and
sent to every rank once; a sync then moves only flat buffers. Per-parameter round trips, not bandwidth, are what
make the peers' syncs slow. Two ways to move a bucket (sync_mode):
- partitions (default): no gather. Each policy rank copies its ZeRO-3 shards of the bucket's parameters into one
  flat segment and broadcasts it to the engines (one group per policy rank); the engine side receives the P segments
  side by side and rebuilds each parameter from its P slices while loading it. The link carries the model's bytes
  once, as a raw broadcast would, and the policy group does no all-gather.
- gather: ZeRO-3 gathers the bucket, a sender copies it into a flat buffer and broadcasts it; with sync_senders
  = k, k policy ranks each send to a share of the engines.
Colocated ranks and checkpoints always gather (every rank needs whole tensors there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tgrpo.policy import deepspeed_engine, lora
from tgrpo.sync.buckets import Bucket, ShardPlan, WeightSink, max_bucket_bytes, plan_buckets, plan_shards, shard_size


def synced(model: torch.nn.Module, adapter_only: bool = False,
           everything: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a sync sends: those that train (a frozen vision tower never changes: the engines keep the
    one they loaded), or with adapter_only (use_lora) the LoRA adapter's alone. everything: every parameter (a
    checkpoint's export)."""
    if adapter_only:
        return [(n, p) for n, p in model.named_parameters() if lora.is_adapter(n, p)]
    return [(n, p) for n, p in model.named_parameters() if everything or p.requires_grad]


def model_plan(model: torch.nn.Module, bucket_bytes: int, adapter_only: bool = False,
               everything: bool = False) -> list[Bucket]:
    return plan_buckets([(n, deepspeed_engine.full_shape(p), p.dtype)
                         for n, p in synced(model, adapter_only, everything)], bucket_bytes)


def iter_gathered_buckets(model: torch.nn.Module, plan: list[Bucket], device: torch.device, fill: bool,
                          buffer=None):
    """Yield (bucket, flat tensor or None) with the bucket's parameters gathered. Every policy rank must iterate
    (the gather is a collective); only ranks with fill=True pay for the copy into the flat tensor, which is
    buffer(numel, dtype) when given (an engine's shared buffer), else a new tensor on device."""
    by_name = dict(model.named_parameters())
    for bucket in plan:
        params = [by_name[name] for name, *_ in bucket.params]
        with deepspeed_engine.gathered(params):
            flat = None
            if fill:
                flat = (buffer(bucket.numel, bucket.torch_dtype) if buffer is not None else
                        torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=device))
                for (_, _, offset, numel), param in zip(bucket.params, params):
                    flat[offset:offset + numel].copy_(param.data.reshape(-1))
            yield bucket, flat


def send_weights(model: torch.nn.Module, plan: list[Bucket], group, group_src: int, is_sender: bool,
                 device: torch.device) -> int:
    """Policy side; called by every policy rank (the gather is theirs together). Senders copy each gathered bucket
    into one flat buffer and broadcast it to their sync group. Returns the bytes this rank broadcast."""
    sent = 0
    staging = torch.empty(max_bucket_bytes(plan), dtype=torch.uint8, device=device) if is_sender else None
    for bucket, flat in iter_gathered_buckets(model, plan, device, fill=is_sender,
                                              buffer=lambda n, dt: staging[:n * dt.itemsize].view(dt)):
        if is_sender:
            dist.broadcast(flat, group=group, group_src=group_src)
            sent += flat.numel() * flat.element_size()
    return sent


def shard_layout(model: torch.nn.Module) -> list[int] | None:
    """Where this rank's shards sit in DeepSpeed's flat shard buffer (None if they are not in one)."""
    found = deepspeed_engine.shard_offsets([p for _, p in model.named_parameters()])
    return found[1] if found else None


def shard_plan(model: torch.nn.Module, bucket_bytes: int, parts: int, zero_copy: bool,
               adapter_only: bool = False) -> ShardPlan:
    """The model's ShardPlan (tgrpo.sync.buckets.plan_shards, where the engine's join lives too). zero_copy (every policy
    rank's shards sit at the same offsets of one flat buffer): segments are ranges of that buffer, in its order; else
    shards are packed in model order into a staging buffer. adapter_only (use_lora): the adapter's shards alone,
    packed."""
    offsets = shard_layout(model) if zero_copy and not adapter_only else None
    if offsets is not None and len(synced(model)) != len(offsets):
        offsets = None  # frozen parameters (a vision tower) lie among the shards: the trained ones are packed
    entries, packed = [], 0
    for i, (name, param) in enumerate(synced(model, adapter_only)):
        if offsets is None:
            offset, packed = packed, packed + shard_size(param.ds_numel, parts)
        else:
            offset = offsets[i]
        entries.append((offset, name, deepspeed_engine.full_shape(param), param.ds_numel, param.dtype))
    if offsets is not None:
        entries.sort(key=lambda e: e[0])
    return plan_shards(entries, bucket_bytes, parts, offsets is not None)


_shard_buffers: dict = {}


def _shard_buffer(model: torch.nn.Module) -> torch.Tensor:
    """DeepSpeed's flat shard buffer as one tensor, found once per run (walking every parameter costs about a
    millisecond per few hundred tensors, as much as broadcasting a gigabyte over NVLink); found again if DeepSpeed
    has moved it (the first shard no longer lies in the cached buffer)."""
    first = next(model.parameters()).ds_tensor
    cached = _shard_buffers.get(id(model))
    if cached is None or cached.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        found = deepspeed_engine.shard_offsets([p for _, p in model.named_parameters()])
        if found is None:
            raise RuntimeError("DeepSpeed's ZeRO-3 shards are no longer in one buffer (offloaded?): set sync_mode "
                               "gather")
        cached = _shard_buffers[id(model)] = found[0]
    return cached


def send_shards(model: torch.nn.Module, plan: ShardPlan, group, group_src: int, device: torch.device) -> int:
    """sync_mode partitions, policy side: this rank's segment of each bucket, one broadcast per bucket on this
    rank's own group to the engines. Returns the bytes broadcast."""
    sent = 0
    if plan.zero_copy:
        flat = _shard_buffer(model)
        for bucket in plan.buckets:
            segment = flat[bucket.start:bucket.start + bucket.length]
            dist.broadcast(segment, group=group, group_src=group_src)
            sent += segment.numel() * segment.element_size()
        return sent
    by_name = dict(model.named_parameters())
    staging = torch.empty(plan.max_bytes() // plan.parts, dtype=torch.uint8, device=device)
    for bucket in plan.buckets:
        flat = staging[:bucket.length * bucket.torch_dtype.itemsize].view(bucket.torch_dtype)
        for name, _, offset, _ in bucket.params:
            shard = deepspeed_engine.local_partition(by_name[name], plan.parts)
            flat[offset:offset + shard.numel()].copy_(shard)
        dist.broadcast(flat, group=group, group_src=group_src)
        sent += flat.numel() * flat.element_size()
    return sent


def receive_shards(engine: WeightSink, plan: ShardPlan, part_groups: list[tuple]) -> None:
    """sync_mode partitions, engine side: the policy ranks' segments of each bucket land side by side in the
    engine's buffer (one broadcast per policy rank's group), then vLLM loads the bucket from there, joining each
    parameter's slices (tgrpo.sync.buckets.unpack_bucket)."""
    parts = plan.parts
    engine.begin_update(plan.max_bytes())
    for bucket in plan.buckets:
        buffer = engine.weight_buffer(parts * bucket.length, bucket.torch_dtype)
        for j, (group, src) in enumerate(part_groups):
            dist.broadcast(buffer[j * bucket.length:(j + 1) * bucket.length], group=group, group_src=src)
        engine.load_bucket(parts * bucket.length, bucket.torch_dtype, bucket.params, parts=parts,
                           segment=bucket.length)
    engine.finish_update()


def load_colocated(model: torch.nn.Module, plan: list[Bucket], engine: WeightSink | None,
                   device: torch.device) -> None:
    """Colocated: every policy rank gathers each bucket anyway, so a rank that drives an engine copies it straight
    into the engine's buffer; nothing is broadcast. Ranks without an engine (tensor-parallel helpers) pass None."""
    if engine is not None:
        engine.begin_update(max_bucket_bytes(plan))
    for bucket, _ in iter_gathered_buckets(model, plan, device, fill=engine is not None,
                                           buffer=engine.weight_buffer if engine is not None else None):
        if engine is not None:
            engine.load_bucket(bucket.numel, bucket.torch_dtype, bucket.params)
    if engine is not None:
        engine.finish_update()


def receive_weights(engine: WeightSink, plan: list[Bucket], group, group_src: int) -> None:
    """Rollout side: each bucket is received straight into the engine's buffer (GPU memory that the vLLM workers
    opened by CUDA IPC, or a shared-memory file on CPU) and loaded before the next bucket arrives."""
    engine.begin_update(max_bucket_bytes(plan))
    for bucket in plan:
        dist.broadcast(engine.weight_buffer(bucket.numel, bucket.torch_dtype), group=group, group_src=group_src)
        engine.load_bucket(bucket.numel, bucket.torch_dtype, bucket.params)
    engine.finish_update()
