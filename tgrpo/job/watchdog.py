"""Heartbeats and a hang report.

Every rank publishes, every HEARTBEAT_S seconds from a thread of its own, where it is (step, phase, since when) in
the job's c10d store (the key-value store torchrun's rendezvous made, reachable from every node). Rank 0 reads them
all. When a rank falls silent (frozen, e.g. SIGSTOP, or its host gone) or a phase lasts longer than `hang_report_s`,
rank 0 writes one report, `output_dir/logs/hang-report.txt` (every rank: step, phase, for how long, last heard),
asks every rank still alive to write its Python stacks next to it (`stacks-rankR.txt`) and, on GPUs, NCCL's flight
recorder (`nccl-trace-rankR`: the last collectives of every NCCL group, those still waiting among them), and prints
one line naming the ranks that have not arrived. Long before `dist_timeout_s` ends the job, the report says where it waits.
Start-up is covered too: each rank names what it is starting ("start-up: ..."), and one still in such a phase after
`startup_report_s` is named with its stacks. Each silent rank is named once (the ranks then stuck waiting for it are
not news).
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


def limits(hang_report_s: float, startup_report_s: float, dist_timeout_s: float) -> tuple[float, float]:
    """The seconds after which a silent or stalled rank, and a rank still starting, are reported: as configured, but
    at most 0.8 x dist_timeout_s, so that the report comes before a collective's timeout ends the job unnamed."""
    cap = 0.8 * dist_timeout_s
    return min(hang_report_s, cap), min(startup_report_s, cap)


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, role: str, log_dir: str, report_after_s: float,
                 nccl_trace=None, startup_after_s: float = 0.0):
        """nccl_trace() -> bytes | None: this rank's NCCL flight recorder, written beside the stacks.
        startup_after_s: a rank in a start-up phase ("start-up: ...") longer than this is named (0: never)."""
        self.store, self.rank, self.world_size, self.role = store, rank, world_size, role
        self.nccl_trace = nccl_trace
        self.log_dir, self.report_after_s, self.startup_after_s = log_dir, report_after_s, startup_after_s
        self.step, self.phase, self.since = 0, "start-up", time.time()
        self.started = self.since
        self.named_silent: set[int] = set()  # every silent rank is named once, however long it stays silent
        self.reported_stalled: list[int] = []  # the stalled ranks last reported: each new situation once
        self._dumped = 0  # the last stack-dump request this rank answered (each report asks anew)
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
                asked = int(self.store.get(_DUMP)) if self.store.check([_DUMP]) else 0
                if asked != self._dumped:
                    self._dumped = asked
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

    def _stalled(self, beat: dict, now: float) -> bool:
        if beat["phase"].startswith("start-up"):
            return self.startup_after_s > 0 and now - beat["since"] > self.startup_after_s
        return now - beat["since"] > self.report_after_s

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
        # stalled: alive (a recent heartbeat) in one phase too long; a rank whose beats stopped is not stalled but,
        # once `late`, silent (else a frozen rank would be named twice: its phase began before its last beat)
        stalled = sorted(r for r, b in beats.items()
                         if r not in silent and now - b["t"] < 3 * HEARTBEAT_S and self._stalled(b, now))
        if self.rank == 1 and 0 not in silent:
            return  # rank 1 speaks only for a silent rank 0
        if silent:
            # the ranks waiting for a silent one stall in their collectives: a consequence, not news
            if set(silent) <= self.named_silent:
                return
            self.named_silent |= set(silent)
        elif not stalled or stalled == self.reported_stalled:
            return
        self.reported_stalled = stalled
        self.store.add(_DUMP, 1)
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
        starting = [r for r in stalled if beats[r]["phase"].startswith("start-up")]
        if silent:
            who = ", ".join(_describe(r, beats.get(r)) for r in silent)
            line = (f"error: no heartbeat for over {self.report_after_s:g} s from {who}: frozen or gone; where every "
                    f"rank waits: {path}")
        elif starting and len(starting) == len(stalled):
            who = ", ".join(_describe(r, beats[r]) for r in starting)
            line = (f"warning: {who} still starting after {self.startup_after_s:g} s (startup_report_s); its Python "
                    f"stacks: {self.log_dir}/stacks-rankR.txt, every rank: {path}")
        else:
            who = ", ".join(_describe(r, beats[r]) for r in stalled)
            line = f"warning: {who} in one phase for over {self.report_after_s:g} s; where every rank waits: {path}"
        console.error("\n" + line)  # rank 0's progress bar may hold the console's current line


def _describe(rank: int, beat: dict | None) -> str:
    if beat is None:
        return f"rank {rank} (never heard from)"
    return (f"rank {rank} ({beat['role']} on {beat['host']}, pid {beat['pid']}, last at step {beat['step']}, "
            f"{beat['phase']})")
