"""The BM25 retrieval server (real HTTP on 127.0.0.1, the bundled corpus) and its client: right passages, batching
and the in-flight limit, a slow or dead server handled as configured with one clear message."""
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from helpers import ROOT, free_port, run
from tgrpo.rollout.retriever import BM25Index, Retriever, RetrieverError, load_corpus, make_server

CORPUS = os.path.join(ROOT, "data", "search_corpus.jsonl")


@pytest.fixture(scope="module")
def server():
    httpd = make_server(BM25Index(load_corpus(CORPUS)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_bundled_questions_find_their_answers(server):
    """The corpus and the questions of the multi-turn example fit: searching the question itself, BM25's first
    hit holds the answer for 9 in 10 questions, its first two for all (the misses are names that are also values
    of other facts: the retriever is not an oracle)."""
    rows = json.load(open(os.path.join(ROOT, "data", "search_test.json")))
    client = Retriever(server, topk=3, batch_size=16, max_concurrency=2)
    passages = client.search([r["messages"][-1]["content"] for r in rows])
    assert len(passages) == len(rows) and all(len(p) == 3 for p in passages)
    assert sum(r["answer"] in p[0] for r, p in zip(rows, passages)) >= 0.9 * len(rows)
    assert all(r["answer"] in p[0] + p[1] for r, p in zip(rows, passages))
    assert client.service.requests == 4  # 60 queries in chunks of 16
    client.close()


def test_search_r1_request_format_and_bad_requests(server):
    reply = requests.post(server + "/retrieve", json={"queries": ["capital of Asease"], "topk": 2,
                                                     "return_scores": True}, timeout=5).json()
    hit = reply["result"][0][0]
    assert "Ostlin" in hit["document"]["contents"] and hit["score"] > 0
    assert requests.get(server + "/health", timeout=5).json() == {"ok": True, "documents": 480}
    for bad in ({"queries": "not a list"}, {"topk": 2}, {"queries": ["x"], "topk": 0}):
        reply = requests.post(server + "/retrieve", json=bad, timeout=5)
        assert reply.status_code == 400 and "bad request" in reply.json()["error"]


class Slow(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        time.sleep(2.0)
        self.send_response(200)
        self.end_headers()


def test_slow_or_dead_retriever_fails_with_one_line_or_goes_on_as_configured():
    slow = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{slow.server_address[1]}"
    with pytest.raises(RetrieverError, match=r"failed after 2 attempt\(s\): no reply within 0.3 s.*retriever_"):
        Retriever(url, timeout_s=0.3, retries=1).search(["q"])
    slow.shutdown()
    with socket.socket() as held:  # a port held but never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(RetrieverError, match="ConnectionError.*launch/retriever.sh start") as error:
            Retriever(dead, retries=1).search(["q"])
        assert "\n" not in str(error.value)
        client = Retriever(dead, retries=0, on_failure="empty")
        assert client.search(["a", "b"]) == [[Retriever.FAILED]] * 2 and client.failures == 2


def test_bad_corpus_is_one_clear_error(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"id": 1, "contents": "fine"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match="line 2 has no 'contents'"):
        load_corpus(str(bad))


@pytest.mark.slow
def test_launch_script_starts_one_server_per_node_and_stops_it(tmp_path):
    env = {"RETRIEVER_PORT": str(free_port()), "LOG_DIR": str(tmp_path), "PYTHON": sys.executable}
    started = run(["bash", "launch/retriever.sh", "start"], timeout=120, env=env)
    assert started.returncode == 0 and "retriever up" in started.stdout, started.stderr
    try:
        again = run(["bash", "launch/retriever.sh", "start"], timeout=60, env=env)
        assert "already up" in again.stdout  # one per node, not one per call
        url = f"http://127.0.0.1:{env['RETRIEVER_PORT']}"
        assert Retriever(url).search(["Who founded Asease?"])[0][0].startswith("Asease")
    finally:
        stopped = run(["bash", "launch/retriever.sh", "stop"], timeout=60, env=env)
    assert "stopped" in stopped.stdout
    assert run(["bash", "launch/retriever.sh", "status"], timeout=60, env=env).returncode == 1
    missing = run(["bash", "launch/retriever.sh", "start"], timeout=60, env={**env, "CORPUS": "nope.jsonl"})
    assert missing.returncode == 2 and missing.stderr.startswith("error: corpus 'nope.jsonl' not found")
