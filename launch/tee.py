"""node.sh's tee: python launch/tee.py LOG QUIET_FLAG < output

Every byte of the job's output goes to LOG as it comes, and to the console until QUIET_FLAG exists: node.sh makes it
when a signal (Ctrl-C, SIGTERM) stops the job, after which torchrun's traceback about that signal is for the log only.
Chunks, not lines, so that a progress bar's carriage returns show at once. Ignores the signals node.sh interprets.
"""
import os
import signal
import sys

for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(stop, signal.SIG_IGN)
log_path, quiet = sys.argv[1], sys.argv[2]
console = True
with open(log_path, "ab", buffering=0) as log:
    while chunk := os.read(0, 1 << 16):
        log.write(chunk)
        if console and not os.path.exists(quiet):
            try:
                os.write(1, chunk)
            except OSError:  # the console is gone (a closed terminal): the log goes on
                console = False
