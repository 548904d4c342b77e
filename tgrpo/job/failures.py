"""The root cause of a failed torchrun job, in one line, from its log (torchrun's failure summary and the ranks'
own `[rank N role] error:` lines).

    python -m tgrpo.job.failures LOG [FROM_BYTE [OOM_KILLS_BEFORE [LOWEST_AVAILABLE_KB]]]

A rank the watchdog named as silent (no heartbeat) is the cause: the job hung. Otherwise a rank killed by a signal
(not torchrun's own SIGTERM to the rest) is named before the survivors whose collectives then failed; otherwise the
first rank that reported an error of its own (`[rank N role] error: ...`), else the job's own one-line error that
every rank met alike (rank 0's `error: ...`: bad input found late, a NaN stop), else torchrun's root cause (its
first observed failure; never a rank that torchrun itself stopped, whose status is 143 or 130).
A rank killed by SIGKILL is named as the kernel's OOM killer's when the evidence says so: the kernel log names its
pid, the memory cgroup's OOM-kill count grew during the job (node.sh passes the count it started with), or the
host's memory was nearly full at its lowest during the job (node.sh samples it). Prints nothing when the log holds
no failure. Imports nothing from tgrpo.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys

_ENTRY = re.compile(r"host\s*:\s*(?P<host>\S+)\s+rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local>\d+)\)\s+"
                    r"exitcode\s*:\s*(?P<code>-?\d+) \(pid: (?P<pid>\d+)\)")
# tgrpo/job/watchdog.py's line when a rank stops sending heartbeats
_HANG = re.compile(r"^error: no heartbeat for over (?P<seconds>\S+) s from rank (?P<rank>\d+) \((?P<what>[^)]*)\)"
                   r".*where every rank waits: (?P<report>\S+)$", re.MULTILINE)
_RANK_ERROR = re.compile(r"^\[rank (?P<rank>\d+) (?P<role>[\w+]+)\] error: (?P<cause>.*)$", re.MULTILINE)
# rank_life.fail_once: an error every rank met alike, said once by rank 0 (node.sh's own lines end with "(log: ...)")
_JOB_ERROR = re.compile(r"^error: (?!no heartbeat for over )(?P<cause>[^\r\n]*)", re.MULTILINE)
_NODE_SH = re.compile(r"\(log: [^()]*\)$")
_STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT}  # a rank's status after torchrun's SIGTERM (or a Ctrl-C)


NEARLY_FULL = 0.05  # the host's available memory at its lowest, as a share of the whole, that points at the OOM killer


def oom_kills() -> int | None:
    """The OOM kills the kernel has counted in this process's memory cgroup (v2 memory.events, v1
    memory.oom_control); None where neither can be read."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    paths = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            paths.append(f"/sys/fs/cgroup{path}/memory.events")
        elif "memory" in controllers.split(","):
            paths.append(f"/sys/fs/cgroup/memory{path}/memory.oom_control")
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _kernel_says_oom(pid: str) -> str | None:
    """The kernel log's line about the OOM killer killing pid, where the log can be read."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in reversed(log.splitlines()):
        if re.search(rf"(Killed process {pid}\b|oom-kill:.*\bpid={pid}\b)", line):
            return line.split("]", 1)[-1].strip()
    return None


def oom_evidence(pid: str, kills_before: int | None, lowest_available_kb: int | None) -> str | None:
    """Why a SIGKILL of pid was the kernel's OOM killer's, or None if nothing says so."""
    line = _kernel_says_oom(pid)
    if line:
        return f"the kernel's OOM killer (kernel log: {line.split(' total-vm')[0][:160]})"
    now = oom_kills()
    if kills_before is not None and now is not None and now > kills_before:
        return f"the kernel's OOM killer ({now - kills_before} OOM kill{'s' * (now - kills_before > 1)} in this " \
               "job's memory cgroup)"
    if lowest_available_kb is not None:
        try:
            with open("/proc/meminfo") as f:
                total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        except (OSError, StopIteration, ValueError):
            return None
        if lowest_available_kb < NEARLY_FULL * total_kb:
            return (f"SIGKILL with this host's memory nearly full ({lowest_available_kb / 2**20:.1f} GiB of "
                    f"{total_kb / 2**20:.0f} GiB available at the lowest): most likely the kernel's OOM killer")
    return None


def root_cause(text: str, kills_before: int | None = None, lowest_available_kb: int | None = None) -> str | None:
    """One line: a hang (the watchdog named a silent rank before the job ended: the collectives that then timed
    out, and torchrun's SIGKILL of the frozen rank, are its consequences), an OOM kill, a crash (a rank killed by a
    signal, or its own error), in that order of precedence; None when the text holds no failure."""
    entries = [m.groupdict() for m in _ENTRY.finditer(text)]
    hang = _HANG.search(text)
    if hang:
        pid = re.search(r"pid (\d+)", hang["what"])
        oom = oom_evidence(pid.group(1), kills_before, lowest_available_kb) if pid and any(
            e["pid"] == pid.group(1) and int(e["code"]) == -signal.SIGKILL for e in entries) else None
        if oom is None:
            return (f"rank {hang['rank']} ({hang['what']}) hung: no heartbeat for over {hang['seconds']} s (frozen, "
                    f"e.g. stopped or stuck in native code, or its host gone); the other ranks stopped when their "
                    f"collectives timed out; where every rank waited: {hang['report']}")
    roles = {m["rank"]: m["role"] for m in _RANK_ERROR.finditer(text)}
    own = [m for m in _RANK_ERROR.finditer(text)]
    # torchrun stops the other ranks with SIGTERM once one fails: those are not causes
    killed = [e for e in entries if int(e["code"]) < 0 and -int(e["code"]) != signal.SIGTERM]
    if not killed:
        root = text.rfind("Root Cause")
        killed = [e for e in _ENTRY.finditer(text, root) if int(e["code"]) < 0] if root >= 0 and not own else []
        killed = [e.groupdict() for e in killed]
    if killed:
        e = killed[-1] if len(killed) == 1 else min(killed, key=lambda e: int(e["rank"]))
        number = -int(e["code"])
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        others = len({x["rank"] for x in entries}) - 1
        role = roles.get(e["rank"], "")
        oom = oom_evidence(e["pid"], kills_before, lowest_available_kb) if number == signal.SIGKILL else None
        return (f"rank {e['rank']}{' ' + role if role else ''} (local rank {e['local']} on {e['host']}, pid "
                f"{e['pid']}) was killed by {oom or name}"
                + (f"; {others} other rank{'s' * (others > 1)} stopped after it" if others > 0 else "")
                + ("; the job needed more memory than its host (or memory cgroup) had: shrink what uses host memory "
                   "(offload_optimizer, ranks per node, other jobs there)" if oom else ""))
    if own:
        first = own[0]
        return f"rank {first['rank']} {first['role']} failed: {first['cause']}"
    summary = min((i for i in (text.find("Failures:"), text.find("Root Cause")) if i >= 0), default=len(text))
    said = [m["cause"] for m in _JOB_ERROR.finditer(text, 0, summary) if not _NODE_SH.search(m["cause"])]
    if said and entries:
        return said[-1]
    root = text.rfind("Root Cause")
    first = [e.groupdict() for e in _ENTRY.finditer(text, root)] if root >= 0 else []
    candidates = [e for e in first + entries if int(e["code"]) not in _STOPPED and int(e["code"]) > 0]
    if candidates or entries:
        e = (candidates or entries)[0]
        return f"rank {e['rank']} (local rank {e['local']} on {e['host']}) exited with status {e['code']}"
    return None


def main() -> None:
    if sys.argv[1:] == ["--oom-kills"]:  # node.sh, before the job: the count to compare with afterwards
        print(oom_kills() if oom_kills() is not None else "")
        return
    path = sys.argv[1]
    start = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    number = lambda i: int(sys.argv[i]) if len(sys.argv) > i and sys.argv[i].isdigit() else None  # noqa: E731
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    line = root_cause(text, number(3), number(4))
    if line:
        print(line)


if __name__ == "__main__":
    main()
