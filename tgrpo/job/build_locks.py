"""Build locks of torch's C++ extensions (DeepSpeed builds its CPU ops with them on first use), found before
DeepSpeed starts.

torch holds `<extensions folder>/<op>/lock` open while one process builds an op; every other process that loads the op
waits until the file is gone, with no limit and no word. A build killed midway (a rank stopped by a signal) leaves the
file behind, and every later job then waits at start-up until its collectives time out. Here a lock no process holds
open is removed, saying so in one line; one a live build holds is waited for, its holder named once, and removed if
the holder dies meanwhile.

    wait_for_build_locks(say=console.warn, starting=lambda what: ...)

Imports nothing from tgrpo.
"""
from __future__ import annotations

import os
import time

SETTLE_S = 1.0  # a holder closes the file just before it removes it: a lock without one is looked at twice
POLL_S = 1.0


def extensions_root() -> str:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else its per-user cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def find_locks(root: str) -> list[str]:
    """The build locks under root (root/<op>/lock, or one folder deeper: torch adds a pyXY_<device> level)."""
    found = []
    if not os.path.isdir(root):
        return found
    for first in os.scandir(root):
        if not first.is_dir():
            continue
        if os.path.exists(os.path.join(first.path, "lock")):
            found.append(os.path.join(first.path, "lock"))
        for second in os.scandir(first.path):
            if second.is_dir() and os.path.exists(os.path.join(second.path, "lock")):
                found.append(os.path.join(second.path, "lock"))
    return found


def holders(path: str) -> list[tuple[int, str]]:
    """(pid, command) of every process of this host that has `path` open (those whose /proc we may read)."""
    target = os.path.realpath(path)
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fds = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fds):
                try:
                    if os.readlink(os.path.join(fds, fd)) == target:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                        out.append((int(pid), cmd[:120]))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return out


def wait_for_build_locks(say, starting=lambda what: None, root: str | None = None) -> list[str]:
    """Remove every build lock under the extensions folder that no process holds, and wait for those a live build
    holds (starting(what) tells the watchdog what this rank waits for). Returns the locks removed."""
    root = root or extensions_root()
    removed, named = [], set()
    while True:
        waiting = []
        for lock in find_locks(root):
            if holders(lock):
                waiting.append(lock)
                continue
            time.sleep(SETTLE_S)  # a build ending now closes its lock, then removes it
            if os.path.exists(lock) and not holders(lock):
                try:
                    os.remove(lock)
                except FileNotFoundError:
                    continue
                removed.append(lock)
                say(f"removed a stale build lock that no process holds (a build of {os.path.basename(os.path.dirname(lock))} "
                    f"stopped midway): {lock}")
        if not waiting:
            return removed
        for lock in waiting:
            if lock not in named:
                named.add(lock)
                who = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders(lock)) or "a process now gone"
                say(f"waiting for the build of {os.path.basename(os.path.dirname(lock))}, whose lock {lock} is held by {who}"
                    "; removed if that process dies")
                starting(f"waiting for a build lock held by {who}: {lock}")
        time.sleep(POLL_S)
