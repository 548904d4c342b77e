"""The root cause of a failed torchrun job, in one line, from its log (torchrun's failure summary and the ranks'
own `[rank N role] error:` lines).

    python -m tgrpo.failures LOG [FROM_BYTE]

A rank killed by a signal (not torchrun's own SIGTERM to the rest) is named before the survivors whose
collectives then failed; otherwise the first rank that reported an error of its own, else torchrun's root cause.
Prints nothing when the log holds no failure. Imports nothing from tgrpo.
"""
from __future__ import annotations

import re
import signal
import sys

_ENTRY = re.compile(r"host\s*:\s*(?P<host>\S+)\s+rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local>\d+)\)\s+"
                    r"exitcode\s*:\s*(?P<code>-?\d+) \(pid: (?P<pid>\d+)\)")
_RANK_ERROR = re.compile(r"^\[rank (?P<rank>\d+) (?P<role>[\w+]+)\] error: (?P<cause>.*)$", re.MULTILINE)


def root_cause(text: str) -> str | None:
    entries = [m.groupdict() for m in _ENTRY.finditer(text)]
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
        return (f"rank {e['rank']}{' ' + role if role else ''} (local rank {e['local']} on {e['host']}, pid "
                f"{e['pid']}) was killed by {name}" + (f"; {others} other rank{'s' * (others > 1)} stopped after it"
                                                       if others > 0 else ""))
    if own:
        first = own[0]
        return f"rank {first['rank']} {first['role']} failed: {first['cause']}"
    if entries:
        e = entries[0]
        return f"rank {e['rank']} (local rank {e['local']} on {e['host']}) exited with status {e['code']}"
    return None


def main() -> None:
    path = sys.argv[1]
    start = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    line = root_cause(text)
    if line:
        print(line)


if __name__ == "__main__":
    main()
