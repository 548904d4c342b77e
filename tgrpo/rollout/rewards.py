"""Rewards for GRPO: answer extraction, math-verify correctness, output format, user functions, a remote service."""
import asyncio
import atexit
import functools
import importlib
import inspect
import itertools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from tgrpo.rollout.http_client import JsonService

TIMEOUT_S = 3  # math-verify's limit per parse and per comparison
HARD_TIMEOUT_S = 30.0  # calls off the main thread: wall limit on one whole check in a worker interpreter
MAX_ANSWER_CHARS = 500  # gold answers are short; longer extractions are garbage that is slow to parse
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_BRACE = {"{": 1, "}": -1}
_FORMAT = re.compile(r"(?:<think>.*</think>\s*)?<answer>.*</answer>", re.DOTALL)
_NUMBER = r"[-+]?(?:\\?\$\s*)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+|\\d?frac\{\d+\}\{\d+\}|\d+/\d+)"
_WITH_UNIT = re.compile(rf"^\s*({_NUMBER})\s*((?:\\(?:text|mathrm)\{{[^{{}}]*\}}|[A-Za-z]+|\^\{{?\d+\}}?|/|\.|\s)+)$")
_SI_LETTERS = frozenset("mgsLlhKAJNWV")  # one-letter units; other single letters ("2x", "3 n") are algebra
_MATH_WORDS = frozenset({"pi", "sqrt", "frac", "sin", "cos", "tan", "log", "ln", "exp", "infty", "cdot", "times",
                         "i", "e", "or", "and"})
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
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


def _without_units(text: str) -> str:
    """"5 dollars", "10 m/s", "12 cm^2", "3/4 \\text{ cup}" -> the number; anything else unchanged. A unit is a tail of
    words (two letters or more, or an SI symbol) with "/", powers and \\text{...}; "2x", "2 \\pi" or "3 apples and 2
    pears" are not numbers with units."""
    match = _WITH_UNIT.match(text)
    if not match:
        return text
    words = re.findall(r"[A-Za-z]+", re.sub(r"\\(?:text|mathrm)", " ", match.group(2)))
    if words and all((len(w) > 1 or w in _SI_LETTERS) and w.lower() not in _MATH_WORDS for w in words):
        return match.group(1)
    return text


def _parse(text: str, timeout: int | None) -> list:
    kwargs = dict(extraction_config=_CONFIG, parsing_timeout=timeout)
    if any(d in text.replace("\\$", "") for d in ("$", "\\(", "\\[")):
        return parse(text, **kwargs)
    text = _without_units(text)
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


def normalize_answer(text: str) -> str:
    """SQuAD's (and Search-R1's) normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in str(text).lower() if c not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def em_reward(completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals the gold one after normalize_answer (exact match, for short text
    answers such as the search example's); gold answers separated by '|' are alternatives."""
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    return float(normalize_answer(pred) in {normalize_answer(a) for a in str(answer).split("|")} - {""})


REWARD_FUNCS: dict[str, Callable[[str, str], float]] = {"math": math_reward, "format": format_reward,
                                                        "em": em_reward}


BUILTIN = tuple(REWARD_FUNCS)  # names that need no import


def answer_reward(parts) -> str | None:
    """The configured reward that checks answers (math, else em), which decides what counts as correct."""
    return next((name for name in ("math", "em") if name in parts), None)
REMOTE = "remote"


class RewardError(RuntimeError):
    """A reward could not be computed: a user function raised or the remote service stayed down."""


def _line(text: object, limit: int = 300) -> str:  # errors are shown as one line
    return " ".join(str(text).split())[:limit]


@dataclass
class Row:
    """What a reward function written for TRL gets besides a completion's text: its prompt as the dataset gave it
    (chat messages, or a string), its token ids, and every other column of its row by name."""
    prompt: list[dict] | str
    completion_ids: list[int]
    columns: dict


def trl_style(func: Callable) -> bool:
    """A function written for TRL's GRPOTrainer, `f(prompts, completions, completion_ids, **columns)` on a batch:
    its signature names `prompts` or `completions`. Otherwise tgrpo's `f(completion, answer) -> float`."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "completions" in params or "prompts" in params


def _load(name: str) -> Callable[[str, str], float]:
    """The function behind a builtin or 'module:function' name; ConfigError (one line) if there is none."""
    from tgrpo.errors import ConfigError  # here, not on top: math worker interpreters run this file without tgrpo

    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"unknown reward '{name}' in reward_funcs: choose from {list(BUILTIN)}, '{REMOTE}' "
                          "(needs reward_url), 'judge' (needs judge_model), a reward model's folder (no folder "
                          f"'{name}' with a config.json here) or 'module:function' naming your f(completion, "
                          "answer) -> float")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward '{name}': cannot import module '{module_name}' ({_line(e)}): put the folder "
                          f"that holds it on PYTHONPATH (working directory: {os.getcwd()})") from None
    except Exception as e:  # the module itself is broken: a traceback would hide which reward it was
        raise ConfigError(f"reward '{name}': importing module '{module_name}' raised {type(e).__name__}: "
                          f"{_line(e)}: fix that module") from None
    where = f"module '{module_name}' ({getattr(module, '__file__', None) or 'no file'})"
    try:
        func = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise ConfigError(f"reward '{name}': {where} has no '{attr}': check the function's name") from None
    if not callable(func):
        raise ConfigError(f"reward '{name}': '{attr}' in {where} is a {type(func).__name__}, not a function: name "
                          "an f(completion, answer) -> float") from None
    return func


def check_reward_config(cfg) -> None:
    """Raise ConfigError (one line naming the problem and the fix) on any bad reward_* field; imports user rewards."""
    from tgrpo.errors import ConfigError

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    names, weights = list(cfg.reward_funcs), list(cfg.reward_weights)
    check(len(names) > 0, "reward_funcs is empty: name at least one reward, e.g. [math, format]")
    check(len(names) == len(weights), f"reward_funcs has {len(names)} names but reward_weights has {len(weights)} "
                                      "weights: give one weight per reward")
    check(all(math.isfinite(w) for w in weights), f"reward_weights must be finite numbers, got {weights}")
    check(len(set(names)) == len(names), f"reward_funcs names a reward twice ({names}): name each once and "
                                         "set its weight instead")
    from tgrpo.reward_spec import JUDGE, is_reward_model

    for name in names:
        if name not in (REMOTE, JUDGE) and not is_reward_model(name):
            _load(name)
    if REMOTE in names:
        url = urllib.parse.urlparse(cfg.reward_url)
        check(bool(cfg.reward_url), "reward 'remote' needs reward_url: set it to the service's http(s):// URL, "
                                    "e.g. --reward_url http://127.0.0.1:8000/score")
        check(url.scheme in ("http", "https") and bool(url.netloc),
              f"reward_url '{cfg.reward_url}' is not an http(s):// URL: give e.g. http://127.0.0.1:8000/score")
    for field in ("reward_workers", "reward_max_concurrency", "reward_batch_size"):
        check(getattr(cfg, field) >= 1, f"{field} must be >= 1, got {getattr(cfg, field)}")
    check(cfg.reward_retries >= 0, f"reward_retries must be >= 0, got {cfg.reward_retries}")
    check(cfg.reward_timeout_s > 0, f"reward_timeout_s must be > 0 seconds, got {cfg.reward_timeout_s}")
    check(cfg.reward_on_failure in ("fail", "zero"),
          f"reward_on_failure must be 'fail' or 'zero', got '{cfg.reward_on_failure}'")
    _check_model_rewards(cfg, check)


def _check_model_rewards(cfg, check) -> None:
    """Reward models and the judge: their ranks, folders and options (builds the embedded tiny-rm if named)."""
    from tgrpo.reward_spec import (JUDGE, check_reward_model_folder, entries, judge_dir, resolve, template_fields,
                                   verdict_ids)

    models = entries(cfg)
    reward_models = [m for m in models if m.entry != JUDGE]
    check(bool(reward_models) or not cfg.reward_ranks,
          f"reward_ranks='{cfg.reward_ranks}' but reward_funcs names no reward model: add a reward model's folder "
          "to reward_funcs, or leave reward_ranks empty")
    judged = any(m.entry == JUDGE for m in models)
    check(judged or not cfg.judge_ranks, f"judge_ranks='{cfg.judge_ranks}' but reward_funcs has no 'judge': add "
                                         "'judge' (and its weight), or leave judge_ranks empty")
    if models:
        check(not cfg.dynamic_sampling, "dynamic_sampling drops groups on the rollout ranks before rewards from "
                                        "models are scored (after the gather): turn one of them off")
        check(cfg.reward_model_batch_tokens >= 1, "reward_model_batch_tokens must be >= 1")
        check(cfg.reward_model_max_length >= 8, "reward_model_max_length must be >= 8 tokens")
    names = [m.name for m in models]
    check(len(set(names)) == len(names), f"two reward models share the name {names}: give their folders different "
                                         "base names (the metrics name them so)")
    for m in reward_models:
        problem = check_reward_model_folder(resolve(cfg, m.entry))
        check(not problem, problem + ".")
    if judged:
        check(bool(cfg.judge_model), "reward 'judge' needs judge_model: a causal LM's folder (or 'tiny-judge'), "
                                     "e.g. --judge_model /models/Qwen2.5-7B-Instruct")
        check(bool(cfg.judge_ranks), "reward 'judge' needs judge_ranks: ranks of their own for its vLLM engine, e.g. "
                                     "launch one more process and set --judge_ranks 3")
        folder = judge_dir(cfg)
        check(os.path.isfile(os.path.join(folder, "config.json")),
              f"judge_model '{cfg.judge_model}' is not a model folder (no config.json there): give a causal LM's "
              "folder or 'tiny-judge'")
        template_fields(cfg.judge_template)
        if cfg.judge_parser == "verdict":
            from transformers import AutoTokenizer

            verdict_ids(AutoTokenizer.from_pretrained(folder), cfg.judge_verdict_tokens, cfg.judge_model)
        check(cfg.judge_score_max > 0 and cfg.judge_max_tokens >= 1,
              "judge_score_max must be > 0 and judge_max_tokens >= 1")
        check(0 < cfg.judge_gpu_memory_utilization <= 1, "judge_gpu_memory_utilization must be in (0, 1]")


def _as_score(value: object) -> float | None:
    """A finite float, or None for anything else (strings, None, NaN): a reward is a number or a bug."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        out = float(value)  # int, bool, numpy and 0-d torch scalars too
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _awaited(value):
    """An async reward function's result (its coroutine run to the end in this pool thread), else the value."""
    return asyncio.run(value) if inspect.isawaitable(value) else value


def _run_trl(name: str, func: Callable, completions: list[str], rows: list[Row]) -> list[float]:
    """A TRL-style function on a batch, called as TRL calls it: prompts, completions (for chat prompts each one an
    assistant message list, as TRL gives them), completion_ids and every other dataset column by name. A None in
    what it returns means 'does not apply' (NaN here: left out of the weighted sum, as TRL leaves it out)."""
    chat = bool(rows) and not isinstance(rows[0].prompt, str)
    kwargs = {key: [r.columns[key] for r in rows] for key in (rows[0].columns if rows else {})}
    kwargs.update(prompts=[r.prompt for r in rows], completion_ids=[r.completion_ids for r in rows],
                  completions=[[{"role": "assistant", "content": c}] for c in completions] if chat else completions)
    try:
        values = _awaited(func(**kwargs))
    except Exception as e:  # a crash in a user reward is a bug to fix, not a zero to train on
        called = ", ".join(["prompts", "completions", "completion_ids", *(rows[0].columns if rows else {})])
        raise RewardError(f"reward function '{name}' raised {type(e).__name__}: {_line(e)} on a batch of "
                          f"{len(completions)} completions (called as TRL calls it, with {called}): fix it") from e
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        raise RewardError(f"reward function '{name}' returned {_line(repr(values), 80)} for {len(completions)} "
                          "completions: it must return a list of one float (or None) per completion")
    out = []
    for value, completion in zip(values, completions):
        score = math.nan if value is None else _as_score(value)
        if score is None:
            raise RewardError(f"reward function '{name}' returned {_line(repr(value), 80)} for completion "
                              f"{completion[:60]!r}: it must return a finite float, or None where it does not apply")
        out.append(score)
    return out


def _run_local(name: str, func: Callable[[str, str], float], completions: list[str],
               answers: list[str]) -> list[float]:
    out = []
    for completion, answer in zip(completions, answers):
        where = lambda: f"on completion {completion[:60]!r} with answer {str(answer)[:60]!r}"  # noqa: E731
        try:
            value = _awaited(func(completion, answer))
        except Exception as e:  # a crash in a user reward is a bug to fix, not a zero to train on
            raise RewardError(f"reward function '{name}' raised {type(e).__name__}: {_line(e)} {where()}: fix it; "
                              "a reward must return a float for every completion") from e
        if (score := _as_score(value)) is None:
            raise RewardError(f"reward function '{name}' returned {_line(repr(value), 80)} {where()}: it must "
                              "return a finite float")
        out.append(score)
    return out


class RemoteReward:
    """Client of a reward service: POST {prompts, completions, answers} -> {"scores": [...]} in chunks, a bounded
    number in flight, each retried with backoff on connection errors, timeouts, 5xx and malformed replies."""

    def __init__(self, cfg):
        self.url, self.timeout_s = cfg.reward_url, float(cfg.reward_timeout_s)
        self.batch_size, self.on_failure = cfg.reward_batch_size, cfg.reward_on_failure
        self.service = JsonService(cfg.reward_url, timeout_s=cfg.reward_timeout_s, retries=cfg.reward_retries,
                                   max_concurrency=cfg.reward_max_concurrency, name="reward-remote")

    @property
    def requests(self) -> int:
        return self.service.requests

    @property
    def retried(self) -> int:
        return self.service.retried

    def check(self, prompt: str, answer: str) -> str:
        """'' if the service scores one completion (the empty one of a real prompt), else one line naming the cause
        and the fix: node.sh's pre-flight asks, so that a service that is down stops the run before any engine."""
        (_, cause), = self.service.map([{"prompts": [prompt], "completions": [""], "answers": [answer]}],
                                       _parse_scores)
        if not cause:
            return ""
        return (f"remote reward {self.url} {cause}: start the service, check reward_url and reward_timeout_s, or set "
                "reward_on_failure=zero to train with failed chunks scored 0")

    def score(self, prompts: list[str], completions: list[str], answers: list[str],
              images: list[list] | None = None) -> tuple[list[float], int]:
        """Scores of every completion, and how many were scored 0.0 because the service stayed down. images
        (vision-language prompts): each completion's prompt's image references (paths as the data named them),
        sent as "images" beside the texts."""
        starts = range(0, len(completions), self.batch_size)
        payloads = [{"prompts": prompts[i:i + self.batch_size], "completions": completions[i:i + self.batch_size],
                     "answers": answers[i:i + self.batch_size],
                     **({"images": images[i:i + self.batch_size]} if images is not None else {})} for i in starts]
        scores: list[float] = []
        failures = 0
        for payload, (chunk, cause) in zip(payloads, self.service.map(payloads, _parse_scores)):
            n = len(payload["completions"])
            if cause:
                message = (f"remote reward {self.url} {cause}: check that the service is up and answers POST "
                           f"{{prompts, completions, answers}} with {{\"scores\": [{n} floats]}} within "
                           f"reward_timeout_s={self.timeout_s:g}, or set reward_on_failure=zero to score such chunks 0")
                if self.on_failure == "fail":
                    raise RewardError(message)
                chunk, failures = [0.0] * n, failures + n
            scores.extend(chunk)
        return scores, failures

    def close(self) -> None:
        self.service.close()


def _parse_scores(body: object, payload: dict) -> list[float]:
    n = len(payload["completions"])
    scores = body.get("scores", body.get("rewards")) if isinstance(body, dict) else None
    if not isinstance(scores, list):
        raise ValueError("reply has no \"scores\" list")
    values = [_as_score(v) for v in scores]
    if len(values) != n or None in values:
        raise ValueError(f"reply has {len(values)} scores for {n} completions or a non-number among them")
    return values


class RewardScorer:
    """The configured rewards, resolved once: local ones on a thread pool in chunks, the remote one beside them.

    Local rewards run off the main thread (math_reward then checks in its worker interpreters), so a user
    function must be thread-safe; with reward_workers=1 they run one at a time."""

    def __init__(self, cfg):
        """Rewards from models (reward models, the judge) are not scored here: the job adds them once the step's
        samples are gathered (tgrpo.job.model_rewards)."""
        from tgrpo.reward_spec import entries

        check_reward_config(cfg)
        models = {m.index for m in entries(cfg)}
        kept = [(n, float(w)) for i, (n, w) in enumerate(zip(cfg.reward_funcs, cfg.reward_weights)) if i not in models]
        self.names, self.weights = [n for n, _ in kept], [w for _, w in kept]
        self.local = {name: _load(name) for name in self.names if name != REMOTE}
        self.batched = {name for name, func in self.local.items() if trl_style(func)}
        self.workers = cfg.reward_workers
        self.pool = ThreadPoolExecutor(cfg.reward_workers, thread_name_prefix="reward")
        self.remote = RemoteReward(cfg) if REMOTE in self.names else None

    @property
    def wants_rows(self) -> bool:
        """Whether a reward function written for TRL is configured: submit() and score() then need `rows`."""
        return bool(self.batched)

    def submit(self, completions: list[str], answers: list[str], rows: list[Row] | None = None,
               ) -> dict[str, list[Future]]:
        """Start scoring the local rewards of these completions on the pool; score() collects them. Completions
        handed over as they finish are scored while generation goes on. rows: one per completion, if wants_rows."""
        if self.batched and (rows is None or len(rows) != len(completions)):
            raise ValueError("a reward function written for TRL needs one Row per completion")
        # several chunks per worker, so one slow check holds up only its own small chunk
        size = max(1, math.ceil(len(completions) / (4 * self.workers)))
        starts = range(0, len(completions), size)
        return {name: [self.pool.submit(_run_trl, name, func, completions[i:i + size], rows[i:i + size])
                       if name in self.batched else
                       self.pool.submit(_run_local, name, func, completions[i:i + size], answers[i:i + size])
                       for i in starts] for name, func in self.local.items()}

    def score(self, prompts: list[str], completions: list[str], answers: list[str],
              submitted: list[dict[str, list[Future]]] | None = None, rows: list[Row] | None = None,
              images: list[list] | None = None) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
        """(weighted total per completion, raw values per configured name, stats: remote_failures, reward_s...).
        submitted: what submit() returned for consecutive runs of these completions, in order (else scored now).
        images: each completion's image references, for the remote reward (vision-language prompts).
        A raw value is NaN where a TRL-style function returned None: it is left out of that completion's total."""
        if not len(prompts) == len(completions) == len(answers):
            raise ValueError(f"got {len(prompts)} prompts, {len(completions)} completions and {len(answers)} "
                             "answers: give one prompt and one answer per completion")
        t0 = time.perf_counter()
        parts = submitted if submitted is not None else [self.submit(completions, answers, rows)]
        futures = {name: [f for part in parts for f in part[name]] for name in self.local}
        stats = {"remote_failures": 0.0}
        try:
            raw: dict[str, list[float]] = {}
            if self.remote is not None:  # in this thread, while the pool scores the local rewards
                requests_before, retried_before = self.remote.requests, self.remote.retried
                raw[REMOTE], failures = self.remote.score(prompts, completions, answers, images)
                stats.update(remote_failures=float(failures),
                             remote_requests=float(self.remote.requests - requests_before),
                             remote_retries=float(self.remote.retried - retried_before))
            for name, chunks in futures.items():
                raw[name] = [s for f in chunks for s in f.result()]
        finally:
            for chunks in futures.values():  # after a failure: skip what has not started
                for f in chunks:
                    f.cancel()
        raw = {name: raw[name] for name in self.names}
        totals = [float(sum(w * raw[n][i] for n, w in zip(self.names, self.weights) if not math.isnan(raw[n][i])))
                  for i in range(len(completions))]
        stats["reward_s"] = time.perf_counter() - t0
        return totals, raw, stats

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # worker of _equal_in_subprocess: JSON [pred, gold, timeout] lines in, 1/0 out
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints from sympy must not corrupt the replies
    for line in sys.stdin:
        print(int(_equal(*json.loads(line))), file=out, flush=True)
