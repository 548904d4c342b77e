"""The remote reward client against a real HTTP service on 127.0.0.1: chunking, the in-flight limit, retries with
backoff, timeouts, malformed replies, 4xx, and nothing listening, under reward_on_failure fail and zero."""
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tgrpo.config import Config
from tgrpo.rollout.rewards import RewardError, RewardScorer

pytestmark = pytest.mark.timeout(60)


class Service:
    """Scores 1.0 where the completion contains the answer; fails its first `fail_first` requests with `status`,
    waits `delay` s per request, or answers `reply(body) -> bytes` instead. Counts requests and those in flight."""

    def __init__(self, fail_first: int = 0, status: int = 500, delay: float = 0.0,
                 reply: Callable[[dict], bytes] | None = None):
        self.fail_first, self.status, self.delay, self.reply = fail_first, status, delay, reply
        self.lock = threading.Lock()
        self.requests = self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service.lock:
                    service.requests += 1
                    number = service.requests
                    service.bodies.append(body)
                    service.in_flight += 1
                    service.max_in_flight = max(service.max_in_flight, service.in_flight)
                time.sleep(service.delay)
                with service.lock:  # before replying: the client may send its next request once it has the reply
                    service.in_flight -= 1
                if number <= service.fail_first:
                    return self._send(service.status, b"not now")
                if service.reply is not None:
                    return self._send(200, service.reply(body))
                scores = [float(a in c) for c, a in zip(body["completions"], body["answers"])]
                self._send(200, json.dumps({"scores": scores}).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a handler still sleeping must not hold up the test's end
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)  # quick shutdown

    def __enter__(self) -> "Service":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _scorer(url: str, **overrides) -> RewardScorer:
    values = dict(reward_funcs=["remote"], reward_weights=[1.0], reward_url=url, reward_timeout_s=5.0,
                  reward_retries=0, reward_max_concurrency=2, reward_batch_size=64, reward_on_failure="fail",
                  reward_workers=2)
    return RewardScorer(Config(**{**values, **overrides}))


@contextlib.contextmanager
def _refused_url():
    """A port held but never listening: connections are refused. (A port merely free could be taken meanwhile by
    another job's listening socket, pytest -n running them side by side, which would answer otherwise.)"""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/score"


COMPLETIONS = [f"the answer is {i}" for i in range(10)]
ANSWERS = [str(i if i % 3 else 99) for i in range(10)]
EXPECTED = [0.0 if i % 3 == 0 else 1.0 for i in range(10)]
PROMPTS = [f"prompt {i}" for i in range(10)]


def test_scores_in_chunks_with_bounded_concurrency():
    with Service(delay=0.3) as service, _scorer(service.url, reward_funcs=["remote", "format"],
                                                reward_weights=[1.0, 0.5], reward_batch_size=3) as scorer:
        totals, raw, stats = scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
    assert raw["remote"] == EXPECTED and raw["format"] == [0.0] * 10
    assert totals == EXPECTED
    assert service.requests == 4 and stats["remote_requests"] == 4  # 3 + 3 + 3 + 1
    assert service.max_in_flight == 2  # reward_max_concurrency, reached and never passed
    assert sorted(len(b["completions"]) for b in service.bodies) == [1, 3, 3, 3]
    sent = {p: (c, a) for b in service.bodies for p, c, a in zip(b["prompts"], b["completions"], b["answers"])}
    assert sent == {p: (c, a) for p, c, a in zip(PROMPTS, COMPLETIONS, ANSWERS)}
    assert stats["remote_failures"] == 0 and stats["remote_retries"] == 0


def test_accepts_rewards_key():
    reply = lambda body: json.dumps({"rewards": [0.25] * len(body["completions"])}).encode()  # noqa: E731
    with Service(reply=reply) as service, _scorer(service.url) as scorer:
        assert scorer.score(PROMPTS, COMPLETIONS, ANSWERS)[1]["remote"] == [0.25] * 10


def test_remote_runs_beside_local_rewards():
    # the service takes 1 s, the local checks 0.5 s (4 of 0.5 s on 4 workers): side by side ~1 s, in turn 1.5 s
    with Service(delay=1.0) as service, _scorer(service.url, reward_funcs=["remote", "reward_fixtures:slow_reward"],
                                                reward_weights=[1.0, 1.0], reward_workers=4) as scorer:
        totals, _, stats = scorer.score(PROMPTS[:4], COMPLETIONS[:4], ANSWERS[:4])
    assert totals == [2.0 if e else 1.0 for e in EXPECTED[:4]]
    assert 1.0 <= stats["reward_s"] < 1.4


def test_retries_recover_from_5xx_with_backoff():
    with Service(fail_first=2, status=503) as service, _scorer(service.url, reward_retries=3) as scorer:
        start = time.monotonic()
        _, raw, stats = scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
    assert raw["remote"] == EXPECTED
    assert service.requests == 3 and stats["remote_retries"] == 2 and stats["remote_failures"] == 0
    assert time.monotonic() - start >= 1.5  # waited 0.5 s, then 1 s


def test_slow_service_fails_within_bounded_time():
    with Service(delay=3.0) as service, _scorer(service.url, reward_timeout_s=0.3, reward_retries=1) as scorer:
        start = time.monotonic()
        with pytest.raises(RewardError) as err:
            scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
        assert time.monotonic() - start < 2.5  # 0.3 + 0.5 backoff + 0.3, not the service's 3 s
    message = str(err.value)
    assert "\n" not in message and service.url in message and "after 2 attempt(s)" in message
    assert "no reply within 0.3 s" in message and "reward_on_failure=zero" in message


def test_slow_service_zero_counts_failures():
    with Service(delay=3.0) as service, _scorer(service.url, reward_timeout_s=0.3, reward_batch_size=4,
                                                reward_max_concurrency=3, reward_on_failure="zero",
                                                reward_funcs=["remote", "reward_fixtures:contains_answer"],
                                                reward_weights=[1.0, 1.0]) as scorer:
        start = time.monotonic()
        totals, raw, stats = scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
        assert time.monotonic() - start < 2.0  # the three chunks time out side by side
    assert raw["remote"] == [0.0] * 10 and totals == EXPECTED  # the local reward still counts
    assert stats["remote_failures"] == 10 and service.requests == 3


@pytest.mark.parametrize("reply,cause", [
    (lambda body: json.dumps({"scores": [1.0] * (len(body["completions"]) - 1)}).encode(), "9 scores for 10"),
    (lambda body: b"<html>oops</html>", "reply is not JSON: '<html>oops</html>'"),
    (lambda body: json.dumps({"score": 1.0}).encode(), 'reply has no "scores" list'),
    (lambda body: json.dumps({"scores": ["high"] * len(body["completions"])}).encode(), "a non-number"),
])
def test_malformed_reply_is_retried_then_handled(reply, cause):
    with Service(reply=reply) as service, _scorer(service.url, reward_retries=1) as scorer:
        with pytest.raises(RewardError, match="after 2 attempt") as err:
            scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
    assert cause in str(err.value) and service.requests == 2
    with Service(reply=reply) as service, _scorer(service.url, reward_on_failure="zero") as scorer:
        _, raw, stats = scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
    assert raw["remote"] == [0.0] * 10 and stats["remote_failures"] == 10


def test_4xx_is_not_retried():
    with Service(fail_first=100, status=400) as service, _scorer(service.url, reward_retries=3) as scorer:
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"after 1 attempt\(s\): HTTP 400 'not now'"):
            scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
        assert service.requests == 1 and time.monotonic() - start < 0.5  # no backoff either
    with Service(fail_first=100, status=422) as service, _scorer(service.url, reward_retries=3,
                                                                 reward_on_failure="zero") as scorer:
        _, raw, stats = scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
    assert raw["remote"] == [0.0] * 10 and stats["remote_failures"] == 10 and service.requests == 1


def test_nothing_listening():
    with _refused_url() as url:
        with _scorer(url, reward_retries=1) as scorer:
            refused = r"after 2 attempt\(s\): ConnectionError \(\[Errno 111\] Connection refused\)"
            with pytest.raises(RewardError, match=refused) as err:
                scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
        assert url in str(err.value) and "\n" not in str(err.value)
        with _scorer(url, reward_batch_size=4, reward_on_failure="zero") as scorer:
            totals, raw, stats = scorer.score(PROMPTS, COMPLETIONS, ANSWERS)
        assert totals == [0.0] * 10 and stats["remote_failures"] == 10 and stats["remote_requests"] == 3
