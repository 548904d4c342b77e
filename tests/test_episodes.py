"""The multi-turn episode loop (tgrpo.rollout.tools.run_episodes) on its own: the real tokenizer of the search example,
the real BM25 retriever over HTTP, and an engine that follows a script per episode through the loop's engine
contract (tools.TurnEngine), so that every way an episode ends is reached on purpose."""
import os
import threading

import pytest

from tgrpo import search_protocol
from tgrpo.rollout import tools
from tgrpo.rollout.retriever import BM25Index, Retriever, load_corpus, make_server
from tgrpo.rollout.vllm_engine import Completion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what the model writes, per episode (by its prompt) and turn
SCRIPTS = {
    "search then answer": ["I look it up. <search>capital of Asease</search> and more after the stop",
                           "<answer>the answer</answer>"],
    "answer at once": ["<answer>42</answer>"],
    "search every turn": ["<search>first query</search>", "<search>second query</search>",
                          "<search>third query</search>"],
    "empty query": ["<search>  </search>", "<answer>none</answer>"],
    "talks too long": ["word " * 400],
}


class ScriptedEngine:
    """tools.TurnEngine: the script's next turn for each sequence (the turn is the number of information blocks
    it holds), cut after the first stop string as vLLM cuts it, and at the token budget ("length")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def generate_each(self, prompt_ids, *, max_tokens, seeds, temperature, top_p, stop):
        self.calls.append(len(prompt_ids))
        outs = []
        for ids, budget in zip(prompt_ids, max_tokens):
            text = self.tokenizer.decode(ids)
            script = next(v for k, v in SCRIPTS.items() if k in text)
            turn_text = script[min(text.count(search_protocol.INFO_OPEN), len(script) - 1)]
            for s in stop:
                if s in turn_text:
                    turn_text = turn_text[:turn_text.index(s) + len(s)]
            tokens = self.tokenizer(turn_text, add_special_tokens=False)["input_ids"]
            finish = "length" if len(tokens) > budget else "stop"
            tokens = tokens[:budget]
            outs.append(Completion(tokens, [-0.5] * len(tokens), self.tokenizer.decode(tokens), finish))
        return outs


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tgrpo.tiny import ensure_search_model

    return AutoTokenizer.from_pretrained(ensure_search_model(os.path.join(ROOT, ".cache")))


@pytest.fixture(scope="module")
def retriever():
    httpd = make_server(BM25Index(load_corpus(os.path.join(ROOT, "data", "search_corpus.jsonl"))))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    client = Retriever(f"http://127.0.0.1:{httpd.server_address[1]}", topk=2)
    yield client
    client.close()
    httpd.shutdown()


def _run(tokenizer, retriever, names, **kwargs):
    prompts = [tokenizer(f"Question: {name}?", add_special_tokens=False)["input_ids"] for name in names]
    options = dict(n=2, max_tokens=160, max_turns=3, max_tool_tokens=64, temperature=1.0, top_p=1.0, seed=7)
    options.update(kwargs)
    engine = ScriptedEngine(tokenizer)
    groups, stats = tools.run_episodes(engine, tokenizer, retriever, prompts, **options)
    return engine, groups, stats


def test_every_way_an_episode_ends(tokenizer, retriever):
    engine, groups, stats = _run(tokenizer, retriever, list(SCRIPTS), max_tokens=400)
    assert [len(g) for g in groups] == [2] * len(SCRIPTS)  # n episodes per prompt, in prompt order
    by_name = {name: group[0] for name, group in zip(SCRIPTS, groups)}
    for group in groups:
        for ep in group:
            assert len(ep.ids) == len(ep.mask) == len(ep.logprobs) <= 400
            assert all(lp == (-0.5 if m else 0.0) for lp, m in zip(ep.logprobs, ep.mask))  # vLLM's on model tokens
            assert ep.text == "".join(t for t, _ in ep.segments)
    searched = by_name["search then answer"]
    assert (searched.finish, searched.turns, searched.tool_calls) == ("stop", 2, 1)
    first_turn = tokenizer("I look it up. <search>capital of Asease</search>", add_special_tokens=False)["input_ids"]
    info = tokenizer(search_protocol.format_information(retriever.search(["capital of Asease"])[0]),
                     add_special_tokens=False)["input_ids"][:64]
    # the model's tokens, then the real retriever's passages as tool tokens (mask 0), then the model again
    assert searched.ids[:len(first_turn)] == first_turn and searched.mask[:len(first_turn)] == [1] * len(first_turn)
    assert searched.ids[len(first_turn):len(first_turn) + len(info)] == info
    assert searched.mask == [1] * len(first_turn) + [0] * len(info) + [1] * (len(searched.ids) - len(first_turn)
                                                                            - len(info))
    assert "and more after the stop" not in searched.text
    assert searched.text.endswith("<answer>the answer</answer>")
    assert (by_name["answer at once"].finish, by_name["answer at once"].turns) == ("stop", 1)
    assert set(by_name["answer at once"].mask) == {1}
    looping = by_name["search every turn"]
    assert (looping.finish, looping.turns, looping.tool_calls) == ("max_turns", 3, 2)  # no turn left for a third
    empty = by_name["empty query"]
    assert empty.tool_calls == 1 and search_protocol.EMPTY_QUERY in empty.text and empty.finish == "stop"
    long = by_name["talks too long"]
    assert (long.finish, long.turns, len(long.ids), set(long.mask)) == ("length", 1, 400, {1})
    assert long.truncated and not searched.truncated
    # one batched engine call per turn for the episodes still running; empty queries never reach the retriever
    assert engine.calls == [10, 6, 2]
    assert stats["searches"] == 2 * (1 + 2) and stats["search_failures"] == 0


def test_tool_replies_are_cut_to_the_budgets(tokenizer, retriever):
    _, groups, _ = _run(tokenizer, retriever, ["search then answer"], max_tool_tokens=5)
    ep = groups[0][0]
    assert ep.mask.count(0) == 5  # max_tool_tokens
    first_turn = len(tokenizer("I look it up. <search>capital of Asease</search>", add_special_tokens=False)[
        "input_ids"])
    _, groups, _ = _run(tokenizer, retriever, ["search then answer"], max_tokens=first_turn + 3)
    ep = groups[0][0]  # the information block does not fit: cut at the budget, and the episode ends there
    assert (ep.finish, len(ep.ids), ep.mask) == ("length", first_turn + 3, [1] * first_turn + [0] * 3)


def test_a_dead_retriever_gives_counted_placeholders(tokenizer):
    import socket

    with socket.socket() as held:  # a port held but never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        dead = Retriever(f"http://127.0.0.1:{held.getsockname()[1]}", retries=0, timeout_s=1, on_failure="empty")
        _, groups, stats = _run(tokenizer, dead, ["search then answer"])
    assert stats["search_failures"] == 2 and stats["searches"] == 2
    assert all(Retriever.FAILED in ep.text and ep.finish == "stop" for ep in groups[0])


def test_turn_seeds_are_fixed_per_episode_and_turn():
    assert tools.turn_seed(None, 3, 1) is None
    assert tools.turn_seed(5, 3, 1) == tools.turn_seed(5, 3, 1)
    assert len({tools.turn_seed(5, e, t) for e in range(4) for t in range(3)}) == 12
