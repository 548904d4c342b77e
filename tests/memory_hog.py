"""A user reward that takes more memory than its memory cgroup allows, so that the kernel's OOM killer kills the
rollout rank that scores it (tests/test_oom.py). It allocates only inside a cgroup whose limit is below 12 GiB, so
that it can never fill the host instead."""
import os

CHUNK = 256 << 20
_held: list = []


def _limit() -> int | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in ([f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"] if "memory" in controllers.split(",")
                         else [f"/sys/fs/cgroup{path}/memory.max"] if controllers == "" else []):
                try:
                    text = open(name).read().strip()
                except OSError:
                    continue
                if text.isdigit():
                    return int(text)
    return None


def reward(completion: str, answer: str) -> float:
    limit = _limit()
    if limit is None or limit > 12 << 30:
        return 0.0
    while len(_held) * CHUNK < limit + (1 << 30):
        _held.append(bytearray(b"\1") * CHUNK)  # written, so the pages are really taken
    return 0.0
