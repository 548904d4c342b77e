"""The weight layouts a sync moves, on real tensors without processes: a plan and its join are inverses. ZeRO-3's
partitioning is reproduced as DeepSpeed does it (flatten, zero-pad to parts * ceil(numel / parts), rank j holds
the j-th slice), the senders' segments are laid side by side as the engine's buffer receives them, and
tgrpo.sync.buckets.unpack_bucket must give back every parameter exactly."""
import pytest
import torch

from tgrpo.sync.buckets import max_bucket_bytes, plan_buckets, plan_shards, shard_size, unpack_bucket


def _model(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [("embed", [37, 16]), ("q", [16, 16]), ("q.bias", [16]), ("odd", [7, 3]), ("one", [1]),
              ("mlp.up", [16, 45]), ("mlp.down", [45, 16]), ("norm", [16])]
    params = [(name, torch.randn(shape, generator=g)) for name, shape in shapes]
    params.append(("rotary.inv_freq", torch.randn(8, generator=g).double()))  # a second dtype
    return params


def _partition(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """ZeRO-3's shards of a parameter: rank j's slice of the flattened, zero-padded tensor."""
    size = shard_size(tensor.numel(), parts)
    flat = torch.zeros(size * parts, dtype=tensor.dtype)
    flat[:tensor.numel()] = tensor.flatten()
    return list(flat.split(size))


def _shard_buffers(params, parts: int, gap: int):
    """Each rank's flat shard buffer, as DeepSpeed keeps it (per dtype; `gap` elements of alignment padding after
    each shard), and the (offset, name, shape, numel, dtype) entries of the plan, in the buffer's order."""
    buffers, entries, offsets = {}, [], {}
    for name, tensor in params:
        shards = _partition(tensor, parts)
        at = offsets.get(tensor.dtype, 0)
        for j, shard in enumerate(shards):
            buffers.setdefault((j, tensor.dtype), []).append(torch.cat([shard, torch.full((gap,), 99.0,
                                                                                    dtype=tensor.dtype)]))
        entries.append((at, name, list(tensor.shape), tensor.numel(), tensor.dtype))
        offsets[tensor.dtype] = at + len(shards[0]) + gap
    flat = {key: torch.cat(chunks) for key, chunks in buffers.items()}
    return flat, entries


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket_bytes", [64, 1000, 1 << 20])
@pytest.mark.parametrize("gap", [0, 5])
def test_every_parameter_comes_back_from_its_shards(parts, bucket_bytes, gap):
    params = _model()
    flat, entries = _shard_buffers(params, parts, gap)
    plan = plan_shards(entries, bucket_bytes, parts, zero_copy=True)
    seen = []
    for bucket in plan.buckets:
        # what each policy rank broadcasts: its buffer's segment; the engine receives them side by side
        received = torch.cat([flat[(j, bucket.torch_dtype)][bucket.start:bucket.start + bucket.length]
                              for j in range(parts)])
        assert received.numel() * received.element_size() <= plan.max_bytes()
        for name, tensor in unpack_bucket(received, bucket.params, parts, bucket.length):
            assert torch.equal(tensor, dict(params)[name]), name
            seen.append(name)
        # a bucket holds at most bucket_bytes / parts per segment, unless one shard alone is larger
        if len(bucket.params) > 1:
            assert bucket.length * bucket.torch_dtype.itemsize <= max(1, bucket_bytes // parts)
    assert sorted(seen) == sorted(name for name, _ in params)  # every parameter once


def test_packed_shards_of_a_staging_buffer():
    """Not zero-copy (offsets differ between ranks): shards are packed in model order into a staging buffer."""
    params, parts = _model(1), 3
    entries, packed = [], 0
    for name, tensor in params:
        entries.append((packed, name, list(tensor.shape), tensor.numel(), tensor.dtype))
        packed += shard_size(tensor.numel(), parts)
    plan = plan_shards(entries, 256, parts, zero_copy=False)
    assert not plan.zero_copy
    by_name = dict(params)
    for bucket in plan.buckets:
        segments = []
        for j in range(parts):  # what sync.send_shards copies into its staging buffer on rank j
            segment = torch.zeros(bucket.length, dtype=bucket.torch_dtype)
            for name, _, offset, _ in bucket.params:
                shard = _partition(by_name[name], parts)[j]
                segment[offset:offset + shard.numel()] = shard
            segments.append(segment)
        for name, tensor in unpack_bucket(torch.cat(segments), bucket.params, parts, bucket.length):
            assert torch.equal(tensor, by_name[name])


def test_whole_parameter_buckets_are_views_in_model_order():
    params = _model(2)
    plan = plan_buckets([(name, list(t.shape), t.dtype) for name, t in params], 600)
    names = [name for b in plan for name, *_ in b.params]
    assert names == [name for name, _ in params]  # model order: a vLLM layer's weights arrive together
    assert all(b.numel * b.torch_dtype.itemsize <= 600 or len(b.params) == 1 for b in plan)
    by_name = dict(params)
    for bucket in plan:
        flat = torch.empty(max_bucket_bytes(plan), dtype=torch.uint8)[:bucket.numel * bucket.torch_dtype.itemsize]
        flat = flat.view(bucket.torch_dtype)
        for name, _, offset, numel in bucket.params:
            flat[offset:offset + numel] = by_name[name].flatten()
        for name, tensor in unpack_bucket(flat, bucket.params):
            assert torch.equal(tensor, by_name[name])
            assert tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # a view, no copy
