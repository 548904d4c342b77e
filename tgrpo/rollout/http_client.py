"""JSON over HTTP to a service the run depends on (a reward model, a retriever): requests in chunks, a bounded
number in flight, each retried with exponential backoff on connection errors, timeouts, 5xx and malformed replies;
a 4xx is not retried (the request itself is wrong)."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import requests

RETRY_BASE_S = 0.5


def line(text, limit: int) -> str:
    """First line of a message, shortened: replies and exceptions go into one-line errors."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[:limit] + "..."


class JsonService:
    """POST JSON payloads to `url`; `parse(body, payload)` returns the payload's result or raises ValueError naming
    what is wrong with the reply (then it is retried)."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, max_concurrency: int, name: str):
        self.url, self.timeout_s, self.retries, self.name = url, float(timeout_s), retries, name
        self.session = requests.Session()
        # one pooled connection per request in flight: urllib3's default of 10 would drop connections above that
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max_concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # the pool's size is the in-flight limit; backoff sleeps hold a slot, which only eases the load on the service
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix=name)
        self._lock = threading.Lock()
        self.requests = self.retried = 0

    def map(self, payloads: list[dict], parse: Callable[[object, dict], object]) -> list[tuple[object, str]]:
        """(result, "") or (None, cause after the last attempt) for every payload, in order."""
        futures = [self.pool.submit(self._one, payload, parse) for payload in payloads]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:  # after a failure: do not send what has not started
                f.cancel()

    def _one(self, payload: dict, parse) -> tuple[object, str]:
        cause = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(RETRY_BASE_S * 2 ** (attempt - 1))
            with self._lock:
                self.requests += 1
                self.retried += attempt > 0
            result, cause, retry = self._post(payload, parse)
            if not cause:
                return result, ""
            if not retry:
                break
        return None, f"failed after {attempt + 1} attempt(s): {cause}"

    def _post(self, payload: dict, parse) -> tuple[object, str, bool]:
        """(result, "", _) on success, else (None, cause, whether a retry may help)."""
        try:
            reply = self.session.post(self.url, json=payload, timeout=self.timeout_s)
        except requests.Timeout:
            return None, f"no reply within {self.timeout_s:g} s", True
        except requests.RequestException as e:  # refused, reset, DNS...
            errno = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
            return None, f"{type(e).__name__} ({errno.group(0).strip() if errno else line(e, 200)})", True
        if reply.status_code >= 300:
            return None, f"HTTP {reply.status_code} {line(reply.text, 200)!r}", not 400 <= reply.status_code < 500
        try:
            body = reply.json()
        except ValueError:
            return None, f"reply is not JSON: {line(reply.text, 100)!r}", True
        try:
            return parse(body, payload), "", False
        except ValueError as e:
            return None, f"{e}: {line(reply.text, 100)!r}", True

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.session.close()
