"""What a person sees, and where the rest goes.

The console gets rank 0's progress bar, start-up milestones, evaluations, saves, errors and actionable warnings
(each once). Everything else that this process and the engine processes it starts print (library logs, warnings,
vLLM's and DeepSpeed's notices) goes to the node's log file: `divert` points file descriptors 1 and 2 at that file
and keeps the terminal for `stdout()` and `stderr()`. TGRPO_VERBOSE=1 (or `verbose: true`) leaves everything on
the console.

This module imports nothing from tgrpo.
"""
from __future__ import annotations

import os
import sys
import warnings

_TGRPO_DIR = os.path.dirname(os.path.abspath(__file__))
_said: set[str] = set()
_logged: set[tuple[str, str]] = set()
_log_path: str | None = None
_teed = False  # the console already reaches the log file (launch/node.sh tees it there)
_out = None  # the terminal once fds 1 and 2 are diverted; before that, sys.stdout and sys.stderr as they are now
_err = None
_bar_open = False  # rank 0's progress bar is drawn: it holds the console's line open until it is closed


def bar_drawn(drawn: bool) -> None:
    """metrics: the progress bar is drawn (True) or closed (False); a line said while it is drawn starts on a new
    line, never glued to the bar."""
    global _bar_open
    _bar_open = drawn


def stdout():
    return _out or sys.stdout


def stderr():
    return _err or sys.stderr


def verbose_from_env() -> bool:
    return os.environ.get("TGRPO_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def divert(log_path: str, verbose: bool = False, teed: bool = False) -> str | None:
    """From now on, fds 1 and 2 (this process's prints and those of every child it starts) append to log_path;
    stdout()/stderr() write to the terminal (teed: which is copied to log_path already). Returns the log's path,
    or None with verbose (nothing diverted)."""
    global _out, _err, _log_path, _teed
    if verbose or _log_path is not None:
        return _log_path
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    _out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log_path, _teed = log_path, teed
    warnings.showwarning = _show_warning
    return log_path


def copy_to_log() -> bool:
    """Whether console lines must also be written to the log file (diverted, and not teed there already)."""
    return _log_path is not None and not _teed


def say(text: str) -> None:
    """A line for people: on the console, and in the log file when the console is diverted."""
    if _bar_open and not text.startswith("\n"):
        text = "\n" + text
    print(text, file=stdout(), flush=True)
    if copy_to_log():
        print(text, file=sys.stdout, flush=True)


def error(text: str) -> None:
    if _bar_open and not text.startswith("\n"):
        text = "\n" + text
    print(text, file=stderr(), flush=True)
    if copy_to_log():
        print(text, file=sys.stderr, flush=True)


def warn_once(text: str) -> None:
    """An actionable warning, shown once per process however often it recurs."""
    if text in _said:
        return
    _said.add(text)
    error(f"warning: {text}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings: tgrpo's own reach the console once; libraries' go to the log file, each text once
    (DeepSpeed's deprecated collectives would warn on every call)."""
    if os.path.abspath(filename).startswith(_TGRPO_DIR):
        warn_once(str(message))
    elif (key := (category.__name__, str(message))) not in _logged:
        _logged.add(key)
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")
