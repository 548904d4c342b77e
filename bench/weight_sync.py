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

    torchrun --nproc_per_node 3 bench/weight_sync.py --config configs/default.yaml --random_model 60m \\
        --sync_bucket_mb 64
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
    from tgrpo import rank_life
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

    from tgrpo import buckets, console, sync, trainer
    from tgrpo.placement import build_partition_groups, build_sync_groups

    fanout = min(placement.num_policy, placement.num_engines)
    # the modes' own groups, made while every rank's default group is still the world (before ZeRO-3 starts)
    connection = trainer.connect(cfg, placement, rank)
    backend = connection.backend
    one = build_sync_groups(placement, 1, backend, cfg.dist_timeout_s)
    alt = build_sync_groups(placement, fanout, backend, cfg.dist_timeout_s) if fanout > 1 else None
    part_groups = build_partition_groups(placement, backend, cfg.dist_timeout_s)
    job = trainer.setup(cfg, placement, rank, connection)
    groups, plan, device = job.groups, job.plan, job.device
    total_bytes = sum(b.numel * b.torch_dtype.itemsize for b in plan)
    per_param_plan = buckets.plan_buckets([(n, shape, b.torch_dtype) for b in plan for n, shape, _, _ in b.params], 1)

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

    def raw(sync_group):
        group, src, is_sender = sync_group
        buffer = torch.ones(buckets.max_bucket_bytes(plan), dtype=torch.uint8, device=device) if group else None

        def run():
            if group is None:
                return
            for b in plan:
                dist.broadcast(buffer[:b.numel * b.torch_dtype.itemsize], group=group, group_src=src)
        return run

    def path(the_plan, sync_group):
        group, src, is_sender = sync_group

        def run():
            if job.policy is not None:
                sync.send_weights(job.policy.model, the_plan, group, src, is_sender, device)
            elif job.engine is not None:
                sync.receive_weights(job.engine, the_plan, group, src)
        return run

    shard_plan = job.shard_plan  # the trainer's (sync_mode partitions, checked in adjust)

    def partitions(load: bool = True):
        def run():
            if job.policy is not None:
                (group, src), = part_groups
                sync.send_shards(job.policy.model, shard_plan, group, src, device)
            elif job.engine is not None:
                if load:
                    sync.receive_shards(job.engine, shard_plan, part_groups)
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
                job.engine.begin_update(shard_plan.max_bytes())
                for b in shard_plan.buckets:
                    job.engine.load_bucket(shard_plan.parts * b.length, b.torch_dtype, b.params,
                                           parts=shard_plan.parts, segment=b.length)
                job.engine.finish_update()
        return run

    def parts(gather: bool, broadcast: bool, sync_group):
        """Pieces of the bucketed path, to show where its time goes: gather (+ copy) only, or also broadcast into
        a plain buffer (no engine load)."""
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

    modes = [("raw", 1, raw(one)), ("transport", placement.num_policy, partitions(load=False)),
             ("load-only", 1, load_only()), ("partitions", placement.num_policy, partitions()),
             ("gather-only", 1, parts(True, False, one)), ("gather", 1, path(plan, one))]
    if alt is not None:
        modes += [("raw", fanout, raw(alt)), ("gather", fanout, path(plan, alt))]
    if not ours.skip_per_param:
        modes.append(("per-param", 1, path(per_param_plan, one)))
    results = [(name, senders, timed(fn)) for name, senders, fn in modes]
    trainer.finish(job)
    if rank != 0:
        return
    gbps = {(n, k): total_bytes / t / 1e9 for n, k, t in results}
    console.say(f"\nmodel {cfg.model}: {total_bytes / 1e6:.1f} MB in {len(plan)} buckets of <= {cfg.sync_bucket_mb} MiB, "
          f"{len(per_param_plan)} parameters; {placement.num_engines} engines, {placement.num_policy} policy ranks, "
          f"{backend}; partitions: {len(shard_plan.buckets)} buckets, "
          f"{'zero-copy from DeepSpeed' if shard_plan.zero_copy else 'copied'}")
    console.say(f"{'mode':<12}{'senders':>8}{'seconds':>10}{'GB/s':>10}{'vs raw':>8}")
    for name, k, t in results:
        base = gbps.get(("raw", k), gbps[("raw", 1)])
        console.say(f"{name:<12}{k:>8}{t:>10.4f}{gbps[(name, k)]:>10.3f}{gbps[(name, k)] / base:>8.2f}")
    result = {"bench": "weight_sync", "model": os.path.basename(cfg.model), "bytes": total_bytes,
              "buckets": len(plan), "bucket_mb": cfg.sync_bucket_mb, "zero_copy": shard_plan.zero_copy, "backend": backend,
              "engines": placement.num_engines, "policy_ranks": placement.num_policy,
              "gbps": {f"{n}/{k}": v for (n, k), v in gbps.items()},
              "sync_mode_default": "partitions",
              # the trainer's default path (partitions) against a raw broadcast of the same bytes: up to the engine's
              # receive buffer, and with vLLM's load of the weights from there
              "transport_over_raw": gbps[("transport", placement.num_policy)] / gbps[("raw", 1)],
              "end_to_end_over_raw": gbps[("partitions", placement.num_policy)] / gbps[("raw", 1)],
              "load_only_s": dict(((n, k), t) for n, k, t in results)[("load-only", 1)],
              "gather_over_raw": gbps[("gather", 1)] / gbps[("raw", 1)]}
    if ("per-param", 1) in gbps:
        result["bucketed_over_per_param"] = gbps[("partitions", placement.num_policy)] / gbps[("per-param", 1)]
    if alt is not None:
        result[f"gather_senders_{fanout}_over_1"] = gbps[("gather", fanout)] / gbps[("gather", 1)]
    console.say(json.dumps(result))


if __name__ == "__main__":
    main()
