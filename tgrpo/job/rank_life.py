"""A rank's life: its start (config and job checks, the node log, signal handlers), its process group (init with
timeouts, the default-group swap, the c10d store), the object collectives every role uses, and its end (one line
per failure, exit status 2 for bad input, 1 otherwise).

    rank_life.run(lambda: load_config(argv), body)   # body(cfg, placement, rank) is the job
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from tgrpo import console
from tgrpo.errors import ConfigError, JobError


def run(make_config, body) -> None:
    """One rank: make_config() -> Config, the job's checks (tgrpo.job.checks.check_job), the node log, signal handlers,
    then body(cfg, placement, rank). A ConfigError (from the config, the checks or the body) is printed once by
    rank 0 and every rank exits 2; a JobError likewise with 1; any other failure prints one line per failing rank
    (its traceback in output_dir/logs/error-rankR.log) and exits 1."""
    from tgrpo.job.checks import check_job

    adopt_slurm_env()
    for stop in (signal.SIGTERM, signal.SIGINT):  # torchrun passes SIGTERM and Ctrl-C on to each rank's group
        signal.signal(stop, _stopped_by_signal)
    # token-budget micro-batches vary in size from one to the next: without expandable segments the CUDA caching
    # allocator fragments and flushes its cache (seen on H200), stalling the GPU; vLLM's engines do without it
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # NCCL's flight recorder: the last collectives of every NCCL group, for the hang report (tgrpo/job/watchdog.py)
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    rank, world_size = env_rank(), env_world_size()
    try:
        cfg = make_config()
        placement = check_job(cfg, world_size, env_local_world_size(), data=False)
    except ConfigError as e:
        fail_once(rank, e, status=2)
    role = placement.role_name(rank)
    log_file = console.divert(node_log_path(cfg), verbose=cfg.verbose or console.verbose_from_env(),
                              teed=bool(os.environ.get("TGRPO_LOG_FILE")))
    if rank == 0 and log_file and not os.environ.get("TGRPO_LOG_FILE"):  # node.sh has named its log already
        console.say(f"details and library output: {log_file} (TGRPO_VERBOSE=1 shows them here)")
    _quiet_libraries()
    signal.signal(signal.SIGUSR1, lambda *_: _PREEMPT_SIGNAL.set())  # a preemption warning: save at the step's end
    logs = os.path.join(cfg.output_dir, "logs")
    _stack_dumps(logs, rank)
    _fatal_signals(logs, rank)
    try:
        body(cfg, placement, rank)
    except (ConfigError, JobError) as e:
        fail_once(rank, e, status=2 if isinstance(e, ConfigError) else 1)
    except BaseException as e:  # noqa: BLE001 - every other failure: one line per failing rank, then exit
        report_error_and_exit(rank, role, e, logs)


def node_log_path(cfg) -> str:
    """This node's log: launch/node.sh names it (TGRPO_LOG_FILE), else output_dir/logs/node<N>.log."""
    return os.environ.get("TGRPO_LOG_FILE") or os.path.join(
        cfg.output_dir, "logs", f"node{os.environ.get('GROUP_RANK', '0')}.log")


PREEMPTED = "preempted"  # written into output_dir/logs when a preemption request stopped the run; node.sh reads it
_PREEMPT_SIGNAL = threading.Event()


def preemption_requested() -> bool:
    """SLURM's warning before the time limit, passed on by launch/slurm.sbatch as a file (TGRPO_PREEMPT_FILE), or
    SIGUSR1 to this rank."""
    path = os.environ.get("TGRPO_PREEMPT_FILE")
    return _PREEMPT_SIGNAL.is_set() or bool(path and os.path.exists(path))


def _stopped_by_signal(signum: int, _frame) -> None:
    """SIGTERM or SIGINT: stop now, with one line from rank 0 (no error line, no traceback), and the shell's status
    for it (143, 130). torchrun sends SIGKILL 30 s later to a rank blocked in native code meanwhile; either
    way launch/node.sh then removes what the ranks leave in /dev/shm."""
    _drop_empty_fatal_logs()
    if env_rank() == 0:  # under plain torchrun, the one line about it (node.sh says its own)
        name = "Ctrl-C/SIGINT" if signum == signal.SIGINT else signal.Signals(signum).name
        console.error(f"stopped by {name}: steps after the newest checkpoint are not kept; continue with "
                      "--resume auto")
    sys.stdout.flush()
    os._exit(128 + signum)


def fail_once(rank: int, error: Exception, status: int) -> None:
    """A failure every rank meets alike (bad input, a failed check): rank 0 prints it, every rank exits `status`."""
    _drop_empty_fatal_logs()
    if rank == 0:
        console.error(f"error: {error}")
    else:
        # torchrun stops every rank when one exits: rank 0's line first. Rank 0 exits as soon as it has said it, and
        # torchrun then stops this rank: the wait ends early unless rank 0 is slow to get here (a loaded host; 3 s
        # were seen to be too few, and rank 0 was stopped before its line)
        time.sleep(30)
    sys.stdout.flush()
    os._exit(status)


def _fatal_signals(logs: str, rank: int) -> None:
    """A crash in native code (a segfault in a CUDA or NCCL call) kills a rank with no Python exception: its Python
    stacks go to output_dir/logs/fatal-rankR.log, which a clean exit removes (torchrun names the signal)."""
    import atexit

    os.makedirs(logs, exist_ok=True)
    path = os.path.join(logs, f"fatal-rank{rank}.log")
    faulthandler.enable(file=open(path, "w"), all_threads=True)
    _FATAL_LOGS.append(path)
    atexit.register(_drop_empty_fatal_logs)


_FATAL_LOGS: list[str] = []


def _drop_empty_fatal_logs() -> None:
    for path in _FATAL_LOGS:
        if os.path.exists(path) and os.path.getsize(path) == 0:
            os.unlink(path)


def _stack_dumps(logs: str, rank: int) -> None:
    """TGRPO_STACK_DUMP_S=N: every N seconds each rank writes its Python stacks to output_dir/logs/stacks-rankR.txt,
    which shows where a hung job waits (a collective, an engine call) without attaching a debugger."""
    every = float(os.environ.get("TGRPO_STACK_DUMP_S", "0") or 0)
    if every > 0:
        os.makedirs(logs, exist_ok=True)
        faulthandler.dump_traceback_later(every, repeat=True, file=open(
            os.path.join(logs, f"stacks-rank{rank}.txt"), "w"))


def _quiet_libraries() -> None:
    """Rank 0's progress bar is the output; engines log warnings and errors only."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


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


def nccl_trace() -> bytes | None:
    """NCCL's flight recorder of this process (every NCCL group's last collectives: which ran, which wait), pickled
    as torch's analyser reads it (python -m torch.distributed.flight_recorder.fr_trace); None without NCCL groups.
    Private torch API: here alone."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        return None
    try:
        return torch._C._distributed_c10d._dump_nccl_trace()
    except (AttributeError, RuntimeError):
        return None


def make_default_group(group: dist.ProcessGroup) -> None:
    """Make `group` this rank's default group. DeepSpeed ZeRO-3 issues some collectives on the default group (a
    barrier in stage-3 set-up, a broadcast in assert_ints_same_as_other_ranks), so it only runs on a subset of the
    world if that subset is the default group. Private torch API: kept here alone, and tested."""
    dist.distributed_c10d._update_default_pg(group)


def gather_objects(obj, group) -> list:
    """Every rank's `obj`, in group-rank order, on every rank of `group` (pickled: small things only)."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def broadcast_object(obj, group, src: int):
    """`obj` of global rank `src`, on every rank of `group`."""
    box = [obj]
    dist.broadcast_object_list(box, group=group, src=src)
    return box[0]


def report_error_and_exit(rank: int, role: str, exc: BaseException, log_dir: str) -> None:
    """One line on stderr naming rank, role and cause; the traceback goes to a per-rank file. Exits at once without
    tearing down process groups, which would wait on the peers that this failure leaves hanging."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"error-rank{rank}.log")
    with open(path, "w") as f:
        traceback.print_exception(exc, file=f)
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    console.error(f"[rank {rank} {role}] error: {type(exc).__name__}: {cause} (traceback: {path})")
    sys.stdout.flush()
    os._exit(1)
