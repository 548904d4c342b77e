"""Multi-turn search episodes: a real training run (torchrun, vLLM, ZeRO-3) against the bundled BM25 retriever started
by launch/retriever.sh; tool tokens masked; tool metrics in tensorboard; a slow and a dead retriever handled as
configured."""
import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests
import torch

from helpers import ROOT, free_port, run, torchrun
from tgrpo import algorithm, batch, search_protocol
from tgrpo.batch import Sample
from helpers import check
from tgrpo.config import ConfigError, load_config
from tgrpo.rollout.worker import kl_into_rewards

STEPS = 4
SLOW_S, TIMEOUT_S = 15.0, 6.0  # a timeout a loaded CI machine's BM25 answers within (1 s failed other chunks there)


def test_query_extraction_and_information_block():
    assert search_protocol.extract_query("I should look. <search> capital of Asease </search>") == "capital of Asease"
    assert search_protocol.extract_query("<search>a</search> then <search>b</search>") == "b"
    assert search_protocol.extract_query("no call </search>") == ""  # a closed call without an opening: empty query
    assert search_protocol.extract_query("<search>a</search> and more text") is None  # not a call it ended on
    assert search_protocol.extract_query("<answer>x</answer>") is None
    block = search_protocol.format_information(["first passage ", "second"])
    assert block == "\n\n<information>Doc 1: first passage\nDoc 2: second</information>\n\n"


def _sample(mask, logprobs, ref):
    ids = list(range(10, 10 + len(mask)))
    return Sample([1, 2], ids, logprobs, completion_mask=mask, reward=1.0, advantage=0.5, ref_logprobs=ref)


def test_tool_tokens_count_in_no_loss_and_no_kl():
    mask = [1, 1, 0, 0, 0, 1]
    s = _sample(mask, [-1.0, -2.0, 0.0, 0.0, 0.0, -0.5], [-1.5, -2.0, -9.0, -9.0, -9.0, -0.5])
    plain = Sample([1], [10, 11], [-1.0, -1.0], reward=1.0, advantage=0.5, ref_logprobs=[0.0, 0.0])
    for packed in (True, False):
        mb = batch.build([s, plain], torch.device("cpu"), packed=packed, pad_id=0)
        assert mb.loss_mask.tolist() == mask + [1, 1] and mb.model_mask.tolist() == mask + [1, 1]
        # even a wild logprob on a tool token gives zero loss and zero gradient there
        logp = torch.tensor([-1.0, -2.0, -50.0, 3.0, -7.0, -0.5, -1.0, -1.0], requires_grad=True)
        loss, _ = algorithm.policy_loss(logp, mb.rollout_logp, mb.advantages, mb.loss_mask, epsilon_low=0.2,
                                        epsilon_high=0.2, ref_logp=torch.zeros(8), beta=0.1)
        loss.sum().backward()
        assert loss[2:5].abs().sum() == 0 and logp.grad[2:5].abs().sum() == 0
        assert logp.grad[[0, 1, 5, 6, 7]].abs().sum() > 0
    kl_into_rewards([s, _sample(mask, [-1.0] * 6, [-1.0] * 6)], beta=1.0)
    assert s.reward_parts["kl_penalty"] == pytest.approx(-0.5)  # only the model's tokens: (-1 - -1.5)


def test_retriever_options_are_checked_before_start():
    for args, words in [(["--retriever_url", "localhost:8321"], "is not an http(s):// URL"),
                        (["--retriever_url", "http://127.0.0.1:1", "--max_turns", "1"], "max_turns=1 leaves no turn"),
                        (["--retriever_topk", "0"], "retriever_topk must be in 1..100"),
                        (["--retriever_on_failure", "skip"], "invalid choice")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            check(load_config(["--config", "configs/search.yaml", *args]), 3)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """The bundled BM25 server, started and stopped by the script a user runs on each node."""
    logs = tmp_path_factory.mktemp("retriever")
    env = {"RETRIEVER_PORT": str(free_port()), "LOG_DIR": str(logs), "PYTHON": sys.executable}
    started = run(["bash", "launch/retriever.sh", "start"], timeout=120, env=env)
    assert started.returncode == 0, started.stderr
    yield f"http://127.0.0.1:{env['RETRIEVER_PORT']}"
    run(["bash", "launch/retriever.sh", "stop"], timeout=30, env=env)


class SlowOnce(BaseHTTPRequestHandler):
    """In front of the real retriever: passes requests on, but holds the second one past the client's timeout (the
    first is the trainer's start-up check), so one chunk of searches fails mid-run."""
    upstream = ""
    count = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            SlowOnce.count += 1
            number = SlowOnce.count
        if number == 2:
            time.sleep(SLOW_S)
        reply = requests.post(self.upstream + self.path, data=body, timeout=10,
                              headers={"Content-Type": "application/json"})
        try:
            self.send_response(reply.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.content)))
            self.end_headers()
            self.wfile.write(reply.content)
        except OSError:  # the client gave up on the slow one
            pass


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, retriever):
    SlowOnce.upstream = retriever
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), SlowOnce)
    threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
    out = tmp_path_factory.mktemp("search")
    result = torchrun(["train_grpo.py", "--config", "configs/search.yaml", "--output_dir", str(out),
                       "--retriever_url", f"http://127.0.0.1:{proxy.server_address[1]}", "--max_steps", str(STEPS),
                       "--prompts_per_step", "8", "--eval_steps", str(STEPS), "--eval_max_prompts", "8",
                       "--eval_k", "2", "--retriever_batch_size", "16", "--retriever_retries", "0",
                       "--retriever_timeout_s", str(TIMEOUT_S), "--retriever_on_failure", "empty",
                       "--num_samples_to_log", "64"], timeout=900)
    proxy.shutdown()
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    return out, metrics, samples, result


@pytest.mark.slow
@pytest.mark.xdist_group("search")  # one worker runs the tests of the shared run
def test_episodes_search_read_and_answer(search_run):
    _, metrics, samples, _ = search_run
    assert len(metrics) == STEPS
    assert all(m["tool/calls"] > 0 and m["tool/turns_mean"] > 1.0 for m in metrics), metrics
    called = [s for s in samples if s["tool_calls"] > 0]
    assert len(called) > len(samples) / 2
    # the retriever's passages reached the model: the gold answer stands in what it read, in the episodes of the
    # first step (the warmed-up model's own queries; later steps' queries move with the updates)
    found = [s for s in called if "(search failed)" not in s["completion"] and s["step"] == 1]
    print("step-1 episodes with the answer in what they read:", sum(s["answer"] in s["completion"] for s in found),
          "of", len(found))
    assert sum(s["answer"] in s["completion"] for s in found) > len(found) / 2
    assert sum(m["reward/em"] for m in metrics) > 0  # some episodes answered right from what they read


@pytest.mark.slow
@pytest.mark.xdist_group("search")  # one worker runs the tests of the shared run
def test_tool_tokens_are_masked_in_the_logged_samples(search_run):
    from transformers import AutoTokenizer

    from tgrpo.tiny import SEARCH_NAME

    _, _, samples, _ = search_run
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, ".cache", SEARCH_NAME))
    for s in samples:
        ids, mask = s["completion_ids"], s["completion_mask"]
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        runs, start = [], 0  # maximal runs of equal mask values, decoded
        for i in range(1, len(ids) + 1):
            if i == len(ids) or mask[i] != mask[start]:
                runs.append((tokenizer.decode(ids[start:i]), "model" if mask[start] else "tool"))
                start = i
        merged = []
        for seg in s["segments"]:
            if merged and merged[-1][1] == seg["source"]:
                merged[-1] = (merged[-1][0] + seg["text"], seg["source"])
            else:
                merged.append((seg["text"], seg["source"]))
        assert [source for _, source in runs] == [source for _, source in merged]
        for (text, source), (logged, _) in zip(runs, merged):
            if source == "tool":  # exactly the information blocks are masked, nothing the model wrote
                # (the retriever's own text may quote the tag: its reply to an empty query says how to search)
                assert text == logged and text.startswith("\n\n<information>")
                assert "<search>" not in text.replace(search_protocol.EMPTY_QUERY, "")
            else:
                assert "<information>" not in text
        assert sum(1 for _, source in runs if source == "tool") == s["tool_calls"] or s["truncated"]


@pytest.mark.slow
@pytest.mark.xdist_group("search")  # one worker runs the tests of the shared run
def test_tool_metrics_reach_tensorboard(search_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _, _ = search_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("tool/turns_mean", "tool/calls", "tool/calls_mean", "tool/search_failures", "reward/em", "accuracy",
                "completion/model_tokens_mean", "tool/response_tokens_mean", "time/tool_s", "eval/pass@1"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("tool/calls")] == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.xdist_group("search")  # one worker runs the tests of the shared run
def test_a_slow_retriever_fails_searches_and_the_run_goes_on_as_configured(search_run):
    _, metrics, _, result = search_run
    failed = sum(m["tool/search_failures"] for m in metrics)
    assert failed == 16, failed  # the one held chunk: 16 queries (retriever_batch_size), nothing else
    assert "16 searches failed; their episodes read '(search failed)'" in result.stdout + result.stderr


@pytest.fixture
def dead_url():
    """A port held but never listening: connections are refused (a port merely free could be taken meanwhile, e.g.
    by torchrun's rendezvous, and answer with silence)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.mark.slow
def test_a_dead_retriever_stops_the_run_in_one_line_before_any_engine_starts(tmp_path, dead_url):
    result = torchrun(["train_grpo.py", "--config", "configs/search.yaml", "--output_dir", str(tmp_path),
                       "--retriever_url", dead_url, "--retriever_retries", "1"], timeout=300)
    assert result.returncode != 0, result.stderr[-3000:]  # rank 0 exits 2; torchrun reports a failed child
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and "retriever http://127.0.0.1:" in ours[0], result.stderr[-3000:]
    assert "failed after 2 attempt(s): ConnectionError" in ours[0] and "launch/retriever.sh start" in ours[0]
    assert "EngineCore" not in result.stdout + result.stderr


@pytest.mark.slow
def test_node_sh_checks_the_retriever_before_torchrun_starts(tmp_path, dead_url):
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--retriever_url", dead_url,
                  "--retriever_retries", "0", "--output_dir", str(tmp_path)],
                 timeout=300, env={"PYTHON": sys.executable, "CONFIG": "configs/search.yaml",
                                   "MASTER_PORT": str(free_port())})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: retriever http://127.0.0.1:"), result.stderr
    assert "failed after 1 attempt(s)" in lines[0] and "torch.distributed" not in result.stdout + result.stderr
