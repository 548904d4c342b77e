"""Process start-up and shutdown: init with timeouts, rank-0 printing, one-line errors with rank and role."""
from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from tgrpo import console


def adopt_slurm_env() -> None:
    """Started by srun (one task per GPU) rather than torchrun: take rank and world from SLURM's variables.
    The master is MASTER_ADDR if set, else the node srun was launched from (the allocation's first node)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0]
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", "29631")


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_world_size() -> int | None:
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else None


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(backend: str, timeout_s: int) -> None:
    """The world's default group; a rank that never joins makes the others fail after timeout_s."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def default_store():
    """The world's c10d key-value store (torchrun's rendezvous store), for heartbeats. Private torch API: here
    alone. Taken before any rank swaps its default group."""
    return dist.distributed_c10d._get_default_store()


def make_default_group(group: dist.ProcessGroup) -> None:
    """Make `group` this rank's default group. DeepSpeed ZeRO-3 issues some collectives on the default group (a
    barrier in stage-3 set-up, a broadcast in assert_ints_same_as_other_ranks), so it only runs on a subset of the
    world if that subset is the default group. Private torch API: kept here alone, and tested."""
    dist.distributed_c10d._update_default_pg(group)


def report_error_and_exit(rank: int, role: str, exc: BaseException, log_dir: str) -> None:
    """One line on stderr naming rank, role and cause; the traceback goes to a per-rank file. Exits at once without
    tearing down process groups, which would wait on the peers that this failure leaves hanging."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"error-rank{rank}.log")
    with open(path, "w") as f:
        traceback.print_exception(exc, file=f)
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # rank 0's progress bar leaves its line open: start a new one so the error stands alone
    console.error(("\n" if rank == 0 else "") + f"[rank {rank} {role}] error: {type(exc).__name__}: {cause} "
                  f"(traceback: {path})")
    sys.stdout.flush()
    os._exit(1)
