"""Heartbeats and a hang report.

Every rank publishes, every HEARTBEAT_S seconds from a thread of its own, where it is (step, phase, since when) in
the job's c10d store (the key-value store torchrun's rendezvous made, reachable from every node). Rank 0 reads them
all. When a rank falls silent (frozen, e.g. SIGSTOP, or its host gone) or a phase lasts longer than `hang_report_s`,
rank 0 writes one report, `output_dir/logs/hang-report.txt` (every rank: step, phase, for how long, last heard),
asks every rank still alive to write its Python stacks next to it (`stacks-rankR.txt`) and, on GPUs, NCCL's flight
recorder (`nccl-trace-rankR`: the last collectives of every NCCL group, those still waiting among them), and prints
one line naming the ranks that have not arrived. Long before `dist_timeout_s` ends the job, the report says where it waits.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import threading
import time

from tgrpo import console

HEARTBEAT_S = 2.0
_PREFIX = "tgrpo/heartbeat/"
_DUMP = "tgrpo/dump-stacks"


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, role: str, log_dir: str, report_after_s: float,
                 nccl_trace=None):
        """nccl_trace() -> bytes | None: this rank's NCCL flight recorder, written beside the stacks."""
        self.store, self.rank, self.world_size, self.role = store, rank, world_size, role
        self.nccl_trace = nccl_trace
        self.log_dir, self.report_after_s = log_dir, report_after_s
        self.step, self.phase, self.since = 0, "start-up", time.time()
        self.started = self.since
        self.reported: tuple = ()  # the (silent, stalled) ranks last reported: each new situation once
        self._dumped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tgrpo-watchdog", daemon=True)
        self._thread.start()

    def at(self, step: int, phase: str) -> None:
        """This rank now works on `phase` of `step`."""
        self.step, self.phase, self.since = step, phase, time.time()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.set(_PREFIX + str(self.rank), json.dumps(
                    {"t": time.time(), "step": self.step, "phase": self.phase, "since": self.since,
                     "role": self.role, "host": host, "pid": pid}))
                if not self._dumped and self.store.check([_DUMP]):
                    self._dumped = True
                    os.makedirs(self.log_dir, exist_ok=True)
                    with open(os.path.join(self.log_dir, f"stacks-rank{self.rank}.txt"), "w") as f:
                        faulthandler.dump_traceback(file=f, all_threads=True)
                    trace = self.nccl_trace() if self.nccl_trace is not None else None
                    if trace:
                        with open(os.path.join(self.log_dir, f"nccl-trace-rank{self.rank}"), "wb") as f:
                            f.write(trace)
                if self.rank in (0, 1):  # rank 1 reports when rank 0 is the silent one
                    self._check()
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending, nothing left to watch
                return

    def _check(self) -> None:
        now = time.time()
        beats = {}
        for r in range(self.world_size):
            key = _PREFIX + str(r)
            if self.store.check([key]):
                beats[r] = json.loads(self.store.get(key))
        late = max(self.report_after_s, 3 * HEARTBEAT_S)
        silent = sorted(r for r in range(self.world_size) if (now - self.started > late) if r not in beats
                        or now - beats[r]["t"] > late)
        # start-up (model downloads, engine compilation) may take long; a rank that never joins fails the job anyway
        stalled = sorted(r for r, b in beats.items() if r not in silent and b["phase"] != "start-up"
                         and now - b["since"] > self.report_after_s)
        if (not silent and not stalled) or (self.rank == 1 and 0 not in silent) or (silent, stalled) == self.reported:
            return
        self.reported = (silent, stalled)
        self.store.set(_DUMP, "1")
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "hang-report.txt")
        with open(path, "w") as f:
            f.write(f"hang report, {time.strftime('%Y-%m-%d %H:%M:%S')}: silent ranks {silent}, ranks in one phase "
                    f"for over {self.report_after_s:g} s {stalled}\n")
            for r in range(self.world_size):
                b = beats.get(r)
                if b is None:
                    f.write(f"rank {r}: never heard from\n")
                    continue
                f.write(f"rank {r} {b['role']} on {b['host']} (pid {b['pid']}): step {b['step']}, {b['phase']} for "
                        f"{now - b['since']:.0f} s, last heard {now - b['t']:.0f} s ago\n")
            f.write("Python stacks of the ranks still running: stacks-rankR.txt beside this file; on GPUs, NCCL's flight "
                    "recorder of each rank: nccl-trace-rankR (python -m torch.distributed.flight_recorder.fr_trace "
                    f"{self.log_dir} --prefix nccl-trace-rank)\n")
        if silent:
            who = ", ".join(_describe(r, beats.get(r)) for r in silent)
            line = (f"error: no heartbeat for over {self.report_after_s:g} s from {who}: frozen or gone; where every "
                    f"rank waits: {path}")
        else:
            who = ", ".join(_describe(r, beats[r]) for r in stalled)
            line = f"warning: {who} in one phase for over {self.report_after_s:g} s; where every rank waits: {path}"
        console.error("\n" + line)  # rank 0's progress bar may hold the console's current line


def _describe(rank: int, beat: dict | None) -> str:
    if beat is None:
        return f"rank {rank} (never heard from)"
    return (f"rank {rank} ({beat['role']} on {beat['host']}, pid {beat['pid']}, last at step {beat['step']}, "
            f"{beat['phase']})")
