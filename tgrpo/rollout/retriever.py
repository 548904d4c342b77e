"""Retrieval for multi-turn tool rollouts: a BM25 server over HTTP (rank_bm25) and the client a rollout rank uses.

The API is Search-R1's, so its retrieval servers (dense or BM25) work as they are:
    POST /retrieve  {"queries": ["...", ...], "topk": 3, "return_scores": true}
      -> {"result": [[{"document": {"id": "...", "contents": "..."}, "score": 1.2}, ...], ...]}  (one list per query)
    GET  /health    -> {"ok": true, "documents": N}

Start one per node, each over the same corpus (`bash launch/retriever.sh start`), so that rollout ranks never
cross the network for a search:
    python -m tgrpo.rollout.retriever --corpus data/search_corpus.jsonl --port 8321
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tgrpo.rollout.http_client import JsonService

_WORD = re.compile(r"\w+")
MAX_TOPK = 100


class RetrieverError(RuntimeError):
    """The retriever stayed down, slow or wrong after every retry (retriever_on_failure=fail)."""


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def load_corpus(path: str) -> list[dict]:
    """JSON lines of {"id", "contents"} (or {"id", "title", "text"}); an error names the bad line."""
    if not os.path.isfile(path):
        raise ValueError(f"corpus '{path}' does not exist: give a .jsonl file of {{\"id\", \"contents\"}} rows")
    docs = []
    with open(path) as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError:
                raise ValueError(f"corpus '{path}' line {number} is not JSON") from None
            if not isinstance(row, dict):
                raise ValueError(f"corpus '{path}' line {number} is not an object")
            contents = row.get("contents") or "\n".join(str(row[k]) for k in ("title", "text") if row.get(k))
            if not isinstance(contents, str) or not contents.strip():
                raise ValueError(f"corpus '{path}' line {number} has no 'contents' (or 'title'/'text')")
            docs.append({"id": str(row.get("id", len(docs))), "contents": contents})
    if not docs:
        raise ValueError(f"corpus '{path}' holds no documents")
    return docs


class BM25Index:
    def __init__(self, docs: list[dict]):
        from rank_bm25 import BM25Okapi

        self.docs = docs
        self.bm25 = BM25Okapi([tokenize(d["contents"]) for d in docs])
        self._lock = threading.Lock()  # rank_bm25 is plain Python; one query at a time keeps it simple and safe

    def search(self, query: str, k: int) -> list[tuple[dict, float]]:
        with self._lock:
            scores = self.bm25.get_scores(tokenize(query))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return [(self.docs[i], float(scores[i])) for i in order]


def make_server(index: BM25Index, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the trainer's log is the output
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"ok": True, "documents": len(index.docs)})
            else:
                self._reply(404, {"error": "GET /health or POST /retrieve"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/retrieve":
                return self._reply(404, {"error": "POST /retrieve"})
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                queries, k = request["queries"], int(request.get("topk", 3))
                if not (isinstance(queries, list) and all(isinstance(q, str) for q in queries)):
                    raise ValueError("queries must be a list of strings")
                if not 1 <= k <= MAX_TOPK:
                    raise ValueError(f"topk must be in 1..{MAX_TOPK}")
            except (ValueError, KeyError, TypeError) as e:
                return self._reply(400, {"error": f"bad request: {e}; send {{\"queries\": [...], \"topk\": k}}"})
            with_scores = bool(request.get("return_scores", True))
            result = [[{"document": doc, **({"score": score} if with_scores else {})} for doc, score in
                       index.search(q, k)] for q in queries]
            self._reply(200, {"result": result})

    return ThreadingHTTPServer((host, port), Handler)


def connect(cfg) -> tuple["Retriever", str]:
    """The client a run's config describes, checked with one search before anything expensive starts: (client,
    '') or (client, the one line naming the failure and its fix)."""
    retriever = Retriever(cfg.retriever_url, topk=cfg.retriever_topk, timeout_s=cfg.retriever_timeout_s,
                          retries=cfg.retriever_retries, max_concurrency=cfg.retriever_max_concurrency,
                          batch_size=cfg.retriever_batch_size, on_failure=cfg.retriever_on_failure)
    cause = retriever.check()
    if cause:
        cause = (f"retriever {cfg.retriever_url} {cause}: start one on every node (bash launch/retriever.sh start), "
                 "check retriever_url and retriever_timeout_s, or set retriever_on_failure=empty to train without "
                 "search results")
    return retriever, cause


class Retriever:
    """Client: passages for many queries at once, in chunks of batch_size, max_concurrency in flight, each retried
    with backoff. on_failure: 'fail' raises RetrieverError naming the cause; 'empty' gives failed queries a
    placeholder passage (the episode goes on) and counts them in `failures`."""

    FAILED = "(search failed)"

    def __init__(self, url: str, *, topk: int = 3, timeout_s: float = 10.0, retries: int = 2,
                 max_concurrency: int = 8, batch_size: int = 32, on_failure: str = "fail"):
        self.url, self.topk, self.batch_size, self.on_failure = url.rstrip("/"), topk, batch_size, on_failure
        self.timeout_s = timeout_s
        endpoint = self.url if self.url.endswith("/retrieve") else self.url + "/retrieve"
        self.service = JsonService(endpoint, timeout_s=timeout_s, retries=retries, max_concurrency=max_concurrency,
                                   name="retriever")
        self.failures = 0

    def check(self) -> str:
        """'' if the retriever answers a one-query search (any Search-R1 server does; no /health needed), else
        the cause after every retry."""
        (_, cause), = self.service.map([{"queries": ["health check"], "topk": self.topk, "return_scores": False}],
                                       _parse_passages)
        return cause

    def search(self, queries: list[str]) -> list[list[str]]:
        """topk passages (their contents) for each query."""
        chunks = [queries[i:i + self.batch_size] for i in range(0, len(queries), self.batch_size)]
        payloads = [{"queries": chunk, "topk": self.topk, "return_scores": False} for chunk in chunks]
        passages: list[list[str]] = []
        for chunk, (result, cause) in zip(chunks, self.service.map(payloads, _parse_passages)):
            if cause:
                if self.on_failure == "fail":
                    raise RetrieverError(
                        f"retriever {self.url} {cause}: start it on this node (bash launch/retriever.sh start), "
                        f"check retriever_url, raise retriever_timeout_s ({self.timeout_s:g} s), or set "
                        "retriever_on_failure=empty to go on without results")
                self.failures += len(chunk)
                result = [[self.FAILED]] * len(chunk)
            passages.extend(result)
        return passages

    def close(self) -> None:
        self.service.close()


def _parse_passages(body: object, payload: dict) -> list[list[str]]:
    result = body.get("result") if isinstance(body, dict) else None
    if not isinstance(result, list) or len(result) != len(payload["queries"]):
        raise ValueError(f"reply has no \"result\" list of {len(payload['queries'])} entries")
    passages = []
    for hits in result:
        if not isinstance(hits, list):
            raise ValueError("a result entry is not a list of hits")
        texts = []
        for hit in hits:
            doc = hit.get("document", hit) if isinstance(hit, dict) else hit
            text = doc.get("contents") if isinstance(doc, dict) else doc
            if not isinstance(text, str):
                raise ValueError("a hit has no document contents")
            texts.append(text)
        passages.append(texts)
    return passages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="BM25 retrieval server (Search-R1's API) over a JSON-lines corpus.")
    parser.add_argument("--corpus", default="data/search_corpus.jsonl")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for other hosts).")
    parser.add_argument("--port", type=int, default=8321)
    args = parser.parse_args(argv)
    try:
        index = BM25Index(load_corpus(args.corpus))
        server = make_server(index, args.host, args.port)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"retriever: {len(index.docs)} documents, http://{args.host}:{server.server_address[1]}/retrieve",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
