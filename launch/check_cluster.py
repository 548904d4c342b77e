"""Cluster readiness check, one process per slot, started by launch/check.sh through torchrun.

Every process reports its host, global rank, local rank and device; rank 0 prints them as a table. Then all ranks
run all-reduce and broadcast on real torch.distributed collectives (NCCL with CUDA, gloo without), check that the
all-reduce sum and the broadcast payload are exactly right, and time a few sizes. Rank 0 prints a bandwidth table and
one JSON line. Problems end every rank with exit status 1 and one line on stderr that starts with `error: `.

Bandwidth is algorithm bandwidth: algbw = S / t, S the tensor's size in bytes, t the mean wall time of one
operation on the slowest rank (after warm-up; CUDA synchronised before the clock is read). For all-reduce the
table also gives the bus bandwidth busbw = algbw * 2 (n - 1) / n (n = world size), the ring's traffic per link,
which is comparable across world sizes (nccl-tests' convention); for broadcast busbw = algbw.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

MIB = 1 << 20
CPU_SIZES_MIB = [1, 4, 16, 64]
GPU_SIZES_MIB = [16, 64, 256, 1024]


class CheckError(Exception):
    """A failed check: its message becomes the one `error: ` line."""


def device_of(local_rank: int) -> tuple[torch.device, str]:
    if not torch.cuda.is_available():
        return torch.device("cpu"), "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise CheckError(f"local rank {local_rank} on {socket.gethostname()} has no GPU: this node has {count} "
                         f"(set the host's slots in the hostfile to at most {count})")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank), f"cuda:{local_rank} {torch.cuda.get_device_name(local_rank)}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_error(error: str, world: int) -> str:
    """The lowest rank's error, on every rank, so that all ranks stop together and rank 0 can say why."""
    errors: list[str] = [""] * world
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def check_values(world: int, rank: int, size_mib: int, device: torch.device) -> str:
    """Exact results of one all-reduce and one broadcast of size_mib; '' when right, else what was wrong here.
    Small integers in float32 add exactly, so any difference is a transport fault, not rounding. Both collectives
    run on every rank whatever the first gave: a rank that skipped one would leave the others waiting."""
    n = size_mib * MIB // 4
    x = torch.arange(n, device=device, dtype=torch.float32).remainder_(7).add_(rank + 1)
    dist.all_reduce(x)
    expected = torch.arange(n, device=device, dtype=torch.float32).remainder_(7).mul_(world)
    expected.add_(world * (world + 1) // 2)
    bad_sum = int((x != expected).sum().item())
    y = torch.full((n,), 3.0, device=device) if rank == 0 else torch.zeros(n, device=device)
    dist.broadcast(y, src=0)
    bad_copy = int((y != 3.0).sum().item())
    if bad_sum:
        return f"all-reduce of {size_mib} MiB on rank {rank}: {bad_sum} of {n} values wrong"
    if bad_copy:
        return f"broadcast of {size_mib} MiB on rank {rank}: {bad_copy} of {n} values wrong"
    return ""


def time_op(op: str, size_mib: int, device: torch.device, world: int) -> float:
    """Mean seconds of one op on the slowest rank."""
    n = size_mib * MIB // 4
    # zeros: repeated summing never overflows, and nothing but the collective runs inside the clock
    x = torch.zeros(n, device=device)
    iters = max(3, min(20, (256 if device.type == "cuda" else 64) * 4 // size_mib))
    run = (lambda: dist.all_reduce(x)) if op == "all_reduce" else (lambda: dist.broadcast(x, src=0))
    for _ in range(2):  # warm-up: connection set-up and allocator growth stay out of the clock
        run()
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    sync(device)
    t = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def table(header: list[str], rows: list[list[object]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expected", type=int, required=True, help="processes the cluster should have")
    parser.add_argument("--timeout", type=int, default=60, help="seconds for init and for each collective")
    parser.add_argument("--sizes_mib", default="",
                        help="comma-separated sizes in MiB (default: 1,4,16,64 on CPU, 16,64,256,1024 on GPU)")
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    node = int(os.environ.get("GROUP_RANK", "0"))
    host = socket.gethostname()
    try:
        device, device_name = device_of(local_rank)
    except CheckError as e:
        # before init: this node's torchrun stops its other ranks, the other nodes' ranks time out
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    backend = os.environ.get("CHECK_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "gloo":
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=args.timeout))
    try:
        infos: list[dict] = [{}] * world
        dist.all_gather_object(infos, {"host": host, "node": node, "rank": rank, "local_rank": local_rank,
                                       "device": device_name, "pid": os.getpid()})
        if rank == 0:
            print(table(["rank", "node", "host", "local", "device", "pid"],
                        [[i["rank"], i["node"], i["host"], i["local_rank"], i["device"], i["pid"]] for i in infos]),
                  flush=True)
        if world != args.expected:
            hosts = sorted({i["host"] for i in infos})
            raise CheckError(f"world size is {world} ({len(hosts)} host(s): {', '.join(hosts)}), expected "
                             f"{args.expected}: fix the hostfile's slots or the expected count")

        sizes = [int(s) for s in args.sizes_mib.split(",") if s] or (
            GPU_SIZES_MIB if device.type == "cuda" else CPU_SIZES_MIB)
        for size in sizes:
            wrong = first_error(check_values(world, rank, size, device), world)
            if wrong:
                raise CheckError(wrong)
        results: dict[str, list[dict]] = {"all_reduce": [], "broadcast": []}
        for op in results:
            for size in sizes:
                t = time_op(op, size, device, world)
                algbw = size * MIB / t / 1e9
                busbw = algbw * 2 * (world - 1) / world if op == "all_reduce" else algbw
                results[op].append({"size_mib": size, "time_ms": round(t * 1e3, 3), "algbw_gbps": round(algbw, 3),
                                    "busbw_gbps": round(busbw, 3)})
        if rank == 0:
            rows = [[op, r["size_mib"], f"{r['time_ms']:.2f}", f"{r['algbw_gbps']:.2f}", f"{r['busbw_gbps']:.2f}"]
                    for op, rs in results.items() for r in rs]
            print(f"\n{backend} collectives over {world} processes (values checked exact; "
                  "algbw = bytes / time of one op on the slowest rank)"
                  + (": one process moves no data, so these numbers mean nothing" if world == 1 else ""), flush=True)
            print(table(["op", "MiB", "ms", "algbw GB/s", "busbw GB/s"], rows), flush=True)
            print(json.dumps({"check": "ok", "world_size": world, "expected": args.expected, "backend": backend,
                              "hosts": sorted({i["host"] for i in infos}),
                              "devices": [i["device"] for i in infos], **results}), flush=True)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    except CheckError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        # no teardown: every rank reached the same verdict through the collectives above and stops
        sys.stdout.flush()
        os._exit(1)
    except Exception as e:  # a collective timed out or a peer died: say it once per rank, in one line
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: rank {rank} on {host}: {type(e).__name__}: {cause}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
