"""Rewards for GRPO: answer extraction, math-verify correctness, and output format."""
import atexit
import itertools
import json
import re
import select
import subprocess
import sys
import threading
from collections.abc import Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

TIMEOUT_S = 3  # math-verify's limit per parse and per comparison
HARD_TIMEOUT_S = 30.0  # calls off the main thread: wall limit on one whole check in a worker interpreter
MAX_ANSWER_CHARS = 500  # gold answers are short; longer extractions are garbage that is slow to parse
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_BRACE = {"{": 1, "}": -1}
_FORMAT = re.compile(r"(?:<think>.*</think>\s*)?<answer>.*</answer>", re.DOTALL)
_RUN_FILE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"  # skips tgrpo/__init__
_idle: list[subprocess.Popen] = []  # started worker interpreters that no thread is using
atexit.register(lambda: [proc.communicate() for proc in _idle])  # EOF ends each idle worker's loop


def extract_answer(completion: str) -> str | None:
    """Stripped content of the last <answer>...</answer>, else of the last \\boxed{...}, else None."""
    close = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, close) if close >= 0 else -1
    if start >= 0:
        return completion[start + len("<answer>"):close].strip()
    box = completion.rfind("\\boxed{")
    end = _closing(completion, box + len("\\boxed")) if box >= 0 else -1
    return completion[box + len("\\boxed{"):end].strip() if end >= 0 else None  # unclosed box: no answer


def _closing(text: str, start: int) -> int:  # index of the "}" closing text[start], or -1
    depths = itertools.accumulate(_BRACE.get(c, 0) for c in text[start:])
    return next((start + i for i, depth in enumerate(depths) if depth == 0), -1)


def _parse(text: str, timeout: int | None) -> list:
    kwargs = dict(extraction_config=_CONFIG, parsing_timeout=timeout)
    if any(d in text.replace("\\$", "") for d in ("$", "\\(", "\\[")):
        return parse(text, **kwargs)
    # Without math delimiters math-verify's LaTeX extractor misses "\dfrac{3}{4}" and its plain-expression
    # fallback reads "3^{2}" as 3, so bare answers are wrapped in $...$ and only fall back to the raw text.
    wrapped = parse(f"${text}$", **kwargs)
    return wrapped if any(not isinstance(p, str) for p in wrapped) else parse(text, **kwargs) or wrapped


def _equal(pred: str, gold: str, timeout: int | None) -> bool:
    try:
        return verify(_parse(gold, timeout), _parse(pred, timeout), timeout_seconds=timeout)
    except (Exception, TimeoutException):  # an alarm landing outside math-verify's own handlers included
        return False


def _equal_in_subprocess(pred: str, gold: str) -> bool:
    # math-verify's SIGALRM timeouts only work in a main thread, and without them sympy can spin for minutes
    # ("9^{9^{9^{9}}}"). A worker interpreter runs the check in its main thread and is killed if even the alarm
    # does not fire; a plain subprocess rather than multiprocessing never re-imports the caller's __main__.
    try:
        proc = _idle.pop()  # list.pop/append are atomic, so no two threads get the same worker
    except IndexError:
        proc = subprocess.Popen([sys.executable, "-c", _RUN_FILE, __file__], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        print(json.dumps([pred, gold, TIMEOUT_S]), file=proc.stdin, flush=True)
        reply = proc.stdout.readline() if select.select([proc.stdout], [], [], HARD_TIMEOUT_S)[0] else ""
    except OSError:  # the worker died
        reply = ""
    if reply.strip() in ("0", "1"):
        _idle.append(proc)
        return reply.strip() == "1"
    proc.kill()  # stuck past the alarm, or dead: never reuse it
    proc.communicate()  # reap it and close its pipes
    return False


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals the gold answer according to math-verify, else 0.0."""
    pred = extract_answer(completion) or ""
    # math-verify would guess at an unbalanced "\\frac{1}{2" or "7}"; a malformed answer earns nothing
    malformed = _closing("{" + pred + "}", 0) != len(pred) + 1
    if not pred or len(pred) > MAX_ANSWER_CHARS or malformed or not str(answer).strip():
        return 0.0
    in_main = threading.current_thread() is threading.main_thread()
    return float(_equal(pred, str(answer), TIMEOUT_S) if in_main else _equal_in_subprocess(pred, str(answer)))


def format_reward(completion: str, answer: str | None = None) -> float:
    """1.0 for an optional <think> block then exactly one <answer> block and nothing else; ignores `answer`."""
    text = completion.strip()
    once = text.count("<answer>") == text.count("</answer>") == 1 and text.count("<think>") <= 1
    return float(once and text.count("</think>") <= 1 and _FORMAT.fullmatch(text) is not None)


REWARD_FUNCS: dict[str, Callable[[str, str], float]] = {"math": math_reward, "format": format_reward}


def score(completions: list[str], answers: list[str], names: list[str],
          weights: list[float]) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the named rewards per completion, and each named reward's raw values."""
    if len(names) != len(weights):
        raise ValueError(f"got {len(names)} reward names but {len(weights)} weights: give one weight per reward")
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers: give one answer each")
    if unknown := [n for n in names if n not in REWARD_FUNCS]:
        raise ValueError(f"unknown reward {unknown[0]!r}: choose from {sorted(REWARD_FUNCS)}")
    raw = {name: [REWARD_FUNCS[name](c, a) for c, a in zip(completions, answers)] for name in names}
    totals = [float(sum(w * raw[n][i] for n, w in zip(names, weights))) for i in range(len(completions))]
    return totals, raw


if __name__ == "__main__":  # worker of _equal_in_subprocess: JSON [pred, gold, timeout] lines in, 1/0 out
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints from sympy must not corrupt the replies
    for line in sys.stdin:
        print(int(_equal(*json.loads(line))), file=out, flush=True)
