"""Multi-turn tool episodes, as Search-R1 trains them: the model writes `<search>query</search>`, the rollout rank
asks the retriever, appends `<information>...</information>` and the model goes on, up to max_turns generations.

Every turn is one batched call to the engine for all episodes still running, then one batched call to the
retriever for all their queries; an episode never waits alone. Sequences are kept as token ids from start to end
(token in, token out): the model's own tokens are exactly what vLLM sampled, with vLLM's logprobs, and the tool's
tokens are the tokenizer's encoding of the information block. `mask` is 1 on the model's tokens and 0 on the
tool's: the loss, the KL and the engine/trainer mismatch count only the 1s.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Protocol

from tgrpo.rollout.vllm_engine import Completion
from tgrpo.search_protocol import EMPTY_QUERY, SEARCH_CLOSE, extract_query, format_information


@dataclass
class Episode:
    prompt_ids: list[int]
    index: int  # its place in the step's episodes, which seeds its turns
    ids: list[int] = field(default_factory=list)  # everything after the prompt: model and tool tokens
    mask: list[int] = field(default_factory=list)  # 1: the model's token, 0: the tool's
    logprobs: list[float] = field(default_factory=list)  # vLLM's for model tokens, 0.0 for tool tokens
    segments: list[tuple[str, int]] = field(default_factory=list)  # (text, 1 model / 0 tool), for the logs
    turns: int = 0
    tool_calls: int = 0
    finish: str = ""  # "stop" (answered or ended), "length" (token budget spent), "max_turns"

    versions: list[int] = field(default_factory=list)  # async_mode: the weights version that produced each token

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    @property
    def truncated(self) -> bool:
        return self.finish == "length"

    def add_turn(self, out: Completion, max_tokens: int, last_turn: bool, versions: list[int] | None = None
                 ) -> str | None:
        """One finished generation appended. Returns the query of the search it ends with, to be answered by
        add_reply; None when the episode has ended (finish says why)."""
        self.ids += out.token_ids
        self.mask += [1] * len(out.token_ids)
        self.logprobs += out.logprobs
        self.versions += versions or []
        self.segments.append((out.text, 1))
        self.turns += 1
        query = extract_query(out.text) if out.finish_reason == "stop" else None
        if out.finish_reason == "length" or len(self.ids) >= max_tokens:
            self.finish = "length"
        elif query is None:
            self.finish = "stop"
        elif last_turn:
            self.finish = "max_turns"  # a search it has no turn left to read
        else:
            return query
        return None

    def add_reply(self, passages: list[str], tokenizer, max_tool_tokens: int, max_tokens: int,
                  version: int | None = None) -> None:
        """The tool's reply to the search of the last turn (its tokens masked out of the loss)."""
        self.tool_calls += 1
        reply = tokenizer(format_information(passages), add_special_tokens=False)["input_ids"][:max_tool_tokens]
        room = max_tokens - len(self.ids)
        if len(reply) >= room:  # no room left to answer after it
            reply, self.finish = reply[:room], "length"
        self.ids += reply
        self.mask += [0] * len(reply)
        self.logprobs += [0.0] * len(reply)
        if version is not None:
            self.versions += [version] * len(reply)
        self.segments.append((tokenizer.decode(reply), 0))


class TurnEngine(Protocol):
    """What the episode loop needs from an engine (tgrpo.rollout.vllm_engine.RolloutEngine): one completion per prompt,
    each with its own token budget and seed, ending at a stop string (kept in the text) or the end of turn."""

    def generate_each(self, prompt_ids: list[list[int]], *, max_tokens: list[int], seeds: list[int | None],
                      temperature: float, top_p: float, stop: list[str]) -> list[Completion]: ...


class Searcher(Protocol):
    """What the episode loop needs from a retriever (tgrpo.rollout.retriever.Retriever): passages per query, in order, and
    a running count of the searches that failed."""
    failures: int

    def search(self, queries: list[str]) -> list[list[str]]: ...


def turn_seed(seed: int | None, episode: int, turn: int) -> int | None:
    """Sampling seed of one turn of one episode: a resumed run samples what the uninterrupted one did."""
    if seed is None:
        return None
    return random.Random(f"{seed}-{episode}-{turn}").randrange(2**30)


def run_episodes(engine: TurnEngine, tokenizer, retriever: Searcher, prompt_ids: list[list[int]], *, n: int, max_tokens: int,
                 max_turns: int, max_tool_tokens: int, temperature: float, top_p: float,
                 seed: int | None) -> tuple[list[list[Episode]], dict[str, float]]:
    """n episodes per prompt; each gets at most max_tokens tokens after its prompt, model and tool tokens together.
    Returns the episodes grouped per prompt and stats (generate_s, tool_s, searches, search_failures)."""
    episodes = [Episode(p, i * n + j) for i, p in enumerate(prompt_ids) for j in range(n)]
    stats = {"generate_s": 0.0, "tool_s": 0.0, "searches": 0, "search_failures": 0}
    active = list(episodes)
    for turn in range(max_turns):
        if not active:
            break
        t0 = time.perf_counter()
        outs = engine.generate_each([ep.prompt_ids + ep.ids for ep in active],
                                    max_tokens=[max_tokens - len(ep.ids) for ep in active],
                                    seeds=[turn_seed(seed, ep.index, turn) for ep in active],
                                    temperature=temperature, top_p=top_p, stop=[SEARCH_CLOSE])
        stats["generate_s"] += time.perf_counter() - t0
        calling: list[tuple[Episode, str]] = []
        for ep, out in zip(active, outs):
            query = ep.add_turn(out, max_tokens, last_turn=turn == max_turns - 1)
            if query is not None:
                calling.append((ep, query))
        t0 = time.perf_counter()
        asked = [(ep, q) for ep, q in calling if q]
        failures_before = retriever.failures
        results = retriever.search([q for _, q in asked]) if asked else []
        stats["searches"] += len(asked)
        stats["search_failures"] += retriever.failures - failures_before
        passages = dict(zip(map(id, (ep for ep, _ in asked)), results))
        for ep, query in calling:
            ep.add_reply(passages.get(id(ep), [EMPTY_QUERY]), tokenizer, max_tool_tokens, max_tokens)
        stats["tool_s"] += time.perf_counter() - t0
        active = [ep for ep in active if not ep.finish]
    return [episodes[i:i + n] for i in range(0, len(episodes), n)], stats
