"""Weights from the policy to the rollout engines: ZeRO-3 gather a bucket at a time, one broadcast per bucket.

The bucket plan (names, shapes, offsets) is made once per run from the partitioned parameters' full shapes and
sent to every rank once; a sync then moves only flat buffers. Per-parameter round trips, not bandwidth, are what
make the peers' syncs slow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tgrpo import deepspeed_engine


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


def model_plan(model: torch.nn.Module, bucket_bytes: int) -> list[Bucket]:
    return plan_buckets([(n, deepspeed_engine.full_shape(p), p.dtype) for n, p in model.named_parameters()],
                        bucket_bytes)


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


def send_weights(model: torch.nn.Module, plan: list[Bucket], group, group_src: int, is_source: bool,
                 device: torch.device) -> int:
    """Policy side; called by every policy rank. Returns the bytes the source broadcast."""
    sent = 0
    for bucket, flat in iter_gathered_buckets(model, plan, device, fill=is_source):
        if is_source:
            dist.broadcast(flat, group=group, group_src=group_src)
            sent += flat.numel() * flat.element_size()
    return sent


def load_colocated(model: torch.nn.Module, plan: list[Bucket], engine, device: torch.device) -> None:
    """Colocated: every policy rank gathers each bucket anyway, so a rank that drives an engine copies it straight
    into the engine's buffer; nothing is broadcast. Ranks without an engine (tensor-parallel helpers) pass None."""
    if engine is not None:
        engine.begin_update()
    for bucket, _ in iter_gathered_buckets(model, plan, device, fill=engine is not None,
                                           buffer=engine.weight_buffer if engine is not None else None):
        if engine is not None:
            engine.load_bucket(bucket.numel, bucket.torch_dtype, bucket.params)
    if engine is not None:
        engine.finish_update()


def receive_weights(engine, plan: list[Bucket], group, group_src: int, device: torch.device) -> None:
    """Rollout side: each bucket lands in the engine's shared buffer and is loaded before the next arrives.
    NCCL receives on the GPU, so there the bucket is staged on the device and copied over."""
    engine.begin_update()
    for bucket in plan:
        buffer = engine.weight_buffer(bucket.numel, bucket.torch_dtype)
        if device.type == "cuda":
            staging = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=device)
            dist.broadcast(staging, group=group, group_src=group_src)
            buffer.copy_(staging)
        else:
            dist.broadcast(buffer, group=group, group_src=group_src)
        engine.load_bucket(bucket.numel, bucket.torch_dtype, bucket.params)
    engine.finish_update()
