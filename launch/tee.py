"""node.sh's tee: python launch/tee.py LOG QUIET_FLAG [OPEN_FLAG] < output

Every byte of the job's output goes to LOG as it comes, and to the console until QUIET_FLAG exists: node.sh makes it
when a signal (Ctrl-C, SIGTERM) stops the job, after which torchrun's traceback about that signal is for the log only.
Chunks, not lines, so that a progress bar's carriage returns show at once. Ignores the signals node.sh interprets.

Rank 0's progress bar leaves its line open (it redraws it with a carriage return): a line that another rank, or
rank 0 itself, prints meanwhile would be glued to the bar, so it is put on a line of its own. OPEN_FLAG holds 1 while
the bar's line is open, 0 otherwise, for node.sh's own lines (its acknowledgement of a signal, its last word).
"""
import os
import signal
import sys

for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(stop, signal.SIG_IGN)
log_path, quiet = sys.argv[1], sys.argv[2]
open_flag = sys.argv[3] if len(sys.argv) > 3 else None
console = True
bar_open = False  # the last line written is a bar's, drawn after a carriage return and not ended


def mark(now: bool) -> None:
    if open_flag:
        with open(open_flag, "w") as f:
            f.write("1" if now else "0")


mark(False)
with open(log_path, "ab", buffering=0) as log:
    while chunk := os.read(0, 1 << 16):
        if bar_open and chunk[:1] not in (b"\r", b"\n"):
            chunk = b"\n" + chunk
        tail = chunk.rsplit(b"\n", 1)[-1]
        now = b"\r" in tail and bool(tail.rsplit(b"\r", 1)[-1].strip())
        if now != bar_open:
            bar_open = now
            mark(now)
        log.write(chunk)
        if console and not os.path.exists(quiet):
            try:
                os.write(1, chunk)
            except OSError:  # the console is gone (a closed terminal): the log goes on
                console = False
