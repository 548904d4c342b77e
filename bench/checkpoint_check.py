"""What checking a checkpoint's content costs on resume: the xxh3-64 of every file against its manifest.

    python bench/checkpoint_check.py CHECKPOINT [--repeats 3]

CHECKPOINT is a folder a run saved (output_dir/checkpoints/step-N: the HF model, DeepSpeed's states, the manifest).
Times, on this machine, with the files in the page cache (each mode once unmeasured first), or with --cold from the
disk (the page cache dropped before every repetition: needs root), as a resume after a restart reads them:
  read      every file read in 16 MiB chunks, nothing computed (the ceiling: what any check must pay)
  content   tgrpo.job.checkpoint.damage(path): sizes and every file's xxh3-64, as resume does
  sizes     damage(path, content=False): sizes only, as node.sh's pre-flight does
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNK = 16 << 20


def _read_all(path: str) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    total += n
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="A checkpoint folder (output_dir/checkpoints/step-N).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions of each mode (median kept).")
    parser.add_argument("--cold", action="store_true", help="Drop the page cache before every repetition (root).")
    args = parser.parse_args()
    if args.cold and os.geteuid() != 0:
        sys.exit("error: --cold drops the page cache (/proc/sys/vm/drop_caches), which needs root: run as root or "
                 "leave --cold out")
    from tgrpo.job import checkpoint

    if not os.path.isfile(os.path.join(args.checkpoint, checkpoint.MANIFEST)):
        sys.exit(f"error: {args.checkpoint} has no {checkpoint.MANIFEST}: name a checkpoint folder a run saved")
    with open(os.path.join(args.checkpoint, checkpoint.MANIFEST)) as f:
        files = json.load(f)["files"]
    size = sum(entry[0] for entry in files.values())
    modes = {"read": lambda: _read_all(args.checkpoint),
             "content": lambda: checkpoint.damage(args.checkpoint),
             "sizes": lambda: checkpoint.damage(args.checkpoint, content=False)}
    seconds = {}
    for name, fn in modes.items():
        result = fn()  # warm-up: the page cache, the import of xxhash
        if name != "read" and result is not None:
            sys.exit(f"error: {args.checkpoint} is damaged ({result})")
        times = []
        for _ in range(args.repeats):
            if args.cold:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        seconds[name] = statistics.median(times)
    print(f"checkpoint {args.checkpoint}: {len(files)} files, {size / 2**30:.2f} GiB "
          f"({'from the disk' if args.cold else 'page cache warm'}), "
          f"median of {args.repeats}")
    print(f"{'mode':<8} {'seconds':>9} {'GiB/s':>8}")
    for name, s in seconds.items():
        print(f"{name:<8} {s:>9.3f} {size / 2**30 / s:>8.2f}")
    print(json.dumps({"files": len(files), "bytes": size, "cold": args.cold, **{f"{k}_s": round(v, 4) for k, v in seconds.items()},
                      "content_gib_s": round(size / 2**30 / seconds["content"], 3),
                      "read_gib_s": round(size / 2**30 / seconds["read"], 3),
                      "content_vs_read": round(seconds["read"] / seconds["content"], 3)}))


if __name__ == "__main__":
    main()
