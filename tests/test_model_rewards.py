"""Rewards from models, the parts that need no job: the judge's parsers and template, the running normalisation,
the reward model's batched scores against transformers' own forward of each text alone, and the one-line errors
of bad model-reward settings (checks before any engine starts)."""
import json
import math
import os

import pytest
import torch

from helpers import ROOT, check
from tgrpo.config import Config
from tgrpo.errors import ConfigError
from tgrpo.reward.judge import parse_score, verdict_probability
from tgrpo.reward.model import RunningNorm
from tgrpo.reward_spec import conversation, entries, prompt_text, template_fields

CACHE = os.path.join(ROOT, ".cache")


def test_score_parser_reads_the_last_number_as_judges_write_it():
    assert parse_score("Score: 7/10", 10) == pytest.approx(0.7)
    assert parse_score("I'd give it 8.", 10) == pytest.approx(0.8)
    assert parse_score("Rating 3 out of 5... final: 4/5", 10) == pytest.approx(0.8)  # the last one counts
    assert parse_score("12/10, superb", 10) == 1.0 and parse_score("-3", 10) == 0.0  # clamped
    assert parse_score("no idea", 10) is None and parse_score("1/0", 10) is None


def test_verdict_probability_from_the_first_tokens_logprobs():
    assert verdict_probability({5: math.log(0.6), 9: math.log(0.2), 1: -0.1}, 5, 9) == pytest.approx(0.75)
    assert verdict_probability({5: -0.01}, 5, 9) == 1.0 and verdict_probability({9: -0.01}, 5, 9) == 0.0
    assert verdict_probability({1: -0.01}, 5, 9) is None  # neither verdict among the top: a failure


def test_judge_template_fields_and_bad_templates():
    assert template_fields("Q: {prompt} A: {completion} ({answer}, {difficulty}) {{literal}}") == \
        ["prompt", "completion", "answer", "difficulty"]
    for bad in ("{prompt", "{0}", "{prompt.x}"):
        with pytest.raises(ConfigError, match="judge_template"):
            template_fields(bad)


def test_what_reward_models_and_judges_read_of_a_prompt():
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert conversation(chat, "3") == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "How many?"},
                                       {"role": "assistant", "content": "3"}]
    assert conversation("2+2?", "4")[0] == {"role": "user", "content": "2+2?"}
    assert prompt_text(chat) == "How many?" and prompt_text("2+2?") == "2+2?"


def test_running_normalisation_matches_the_whole_history_and_survives_a_checkpoint():
    values = [[1.0, 2.0, 3.0], [10.0, 0.0], [5.0, 5.0, -2.0]]
    norm, seen = RunningNorm(), []
    for batch in values[:2]:
        out = norm(batch)
        seen += batch
    mean, std = sum(seen) / len(seen), (sum((x - sum(seen) / len(seen)) ** 2 for x in seen) / len(seen)) ** 0.5
    assert out == pytest.approx([(x - mean) / std for x in values[1]])
    resumed = RunningNorm(json.loads(json.dumps(norm.state())))
    assert resumed(values[2]) == pytest.approx(norm(values[2]))


def test_reward_model_batches_score_as_transformers_scores_each_text_alone():
    """tiny-rm (its own tokenizer and chat template, not the policy's): texts of different lengths in token-budget
    batches (right padding) give the logits a plain float32 forward of each text gives."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tgrpo.reward.model import RewardModel
    from tgrpo.tiny import ensure_reward_model

    path = ensure_reward_model(CACHE)
    model = RewardModel(path, torch.device("cpu"), torch.float32, batch_tokens=160, max_length=512)
    prompts = [[{"role": "system", "content": "Solve the problem."}, {"role": "user", "content": f"What is {a} + {b}?"}]
               for a, b in ((1, 2), (30, 4), (7, 7), (2, 19), (5, 0))]
    completions = ["<answer>3</answer>", "The answer is 34, I think, after adding the two numbers.", "14",
                   "<answer>20</answer>", ""]
    scores = model.score(prompts, completions)
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for p, c, got in zip(prompts, completions, scores):
        text = tokenizer.apply_chat_template(conversation(p, c), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            want = plain(**ids).logits[0, 0].item()
        assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # really different texts, different scores


def test_the_scoring_thread_scores_groups_as_they_come_as_the_model_scores_them_at_once():
    """Groups submitted from two threads while the scoring thread works (several groups to a batch, in whatever
    order they come) get, by their keys, exactly the scores the reward model gives the same texts in one call;
    truncated inputs are counted per group; an error on the scoring thread, or on the channel that feeds it, is raised
    by the take that waits."""
    import threading

    from tgrpo.reward.model import RewardModel
    from tgrpo.reward.service import Group, ScoringService
    from tgrpo.tiny import ensure_reward_model

    model = RewardModel(ensure_reward_model(CACHE), torch.device("cpu"), torch.float32, batch_tokens=256,
                        max_length=60)
    groups = [Group((e, p), [{"role": "user", "content": f"What is {p} + {e}?"}],
                    [f"<answer>{p + e + k}</answer>" + " so" * (k * p) for k in range(4)], str(p + e), {})
              for e in range(2) for p in range(6)]
    want, cut = {}, 0
    for g in groups:  # each group alone, in one call
        want[g.key] = model.score([g.prompt] * 4, g.completions)
        cut += sum(model.last_truncated)
    service = ScoringService({"tiny-rm": model}, None, torch.device("cpu"), keep=4)
    feeders = [threading.Thread(target=lambda e=e: [service.submit(g) for g in groups if g.key[0] == e])
               for e in range(2)]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    got, stats = service.take([g.key for g in reversed(groups)])
    for key, scores in want.items():
        assert got[key]["tiny-rm"] == pytest.approx(scores, abs=1e-5), key
    assert stats["truncated"] == cut > 0 and stats["busy_s"] > 0 and stats["judge_failures"] == 0

    class Broken:  # a judge whose engine fails
        def score(self, *args):
            raise RuntimeError("the judge's engine is gone")

    broken = ScoringService({}, Broken(), torch.device("cpu"), keep=4)
    broken.submit(groups[0])
    with pytest.raises(RuntimeError, match="engine is gone"):
        broken.take([groups[0].key])
    # a holder whose channel stopped receiving (its process group went down) fails the take that waits for groups
    # that will never come, at once rather than at the watchdog's limit
    from tgrpo.job.model_rewards import Channel

    channel = Channel(None, 0, senders=[1], receivers=[0])
    channel.listen(service.submit)  # no process group here: its receiving thread fails on its first recv
    channel.thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="stopped receiving"):
        service.take([("never", 0)], channel.check)
    service.close()
    broken.close()


def test_bad_model_reward_settings_are_one_line(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = tmp_path / "causal-lm"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(lm)
    base = dict(model="tiny", rollout_ranks="0-0", policy_ranks="1-1", output_dir=str(tmp_path / "out"))
    cases = [
        (dict(reward_funcs=[str(lm)], reward_weights=[1.0]), 2, "is a Qwen2ForCausalLM, not an ...ForSequence"),
        (dict(reward_funcs=["math"], reward_weights=[1.0], reward_ranks="2-2"), 3, "names no reward model"),
        (dict(reward_funcs=["judge"], reward_weights=[1.0]), 2, "reward 'judge' needs judge_model"),
        (dict(reward_funcs=["judge"], reward_weights=[1.0], judge_model="tiny-judge"), 2, "needs judge_ranks"),
        (dict(reward_funcs=["math"], reward_weights=[1.0], judge_ranks="2-2"), 3, "has no 'judge'"),
        (dict(reward_funcs=["tiny-rm"], reward_weights=[1.0], dynamic_sampling=True), 2, "dynamic_sampling"),
        (dict(reward_funcs=["tiny-rm"], reward_weights=[1.0], reward_ranks="1-1"), 2, "in another role"),
        (dict(reward_funcs=["judge"], reward_weights=[1.0], judge_model=str(tmp_path), judge_ranks="2-2"), 3,
         "is not a model folder"),
        (dict(reward_funcs=["/no/such/rm"], reward_weights=[1.0]), 2, "unknown reward '/no/such/rm'"),
    ]
    for fields, world, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
            check(Config(**{**base, **fields}), world)
        assert "\n" not in str(e.value)
    good = Config(**{**base, "reward_funcs": ["tiny-rm", "format"], "reward_weights": [1.0, 0.5],
                     "reward_ranks": "2-2"})
    assert check(good, 3).reward == (2,)
    assert [(m.name, m.weight, m.index) for m in entries(good)] == [("tiny-rm", 1.0, 0)]


def test_a_judge_template_naming_an_unknown_column_is_one_line(tmp_path):
    from tgrpo import data
    from tgrpo.tiny import ensure_tiny_model

    from transformers import AutoTokenizer

    cfg = Config(reward_funcs=["judge"], reward_weights=[1.0], judge_model="tiny-judge",
                 judge_template="Q: {prompt} A: {completion} Level: {difficulty}")
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(CACHE))
    with pytest.raises(ConfigError, match=r"judge_template names '\{difficulty\}', which is no column"):
        data.load_prompts(cfg, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["causal-lm-as-reward-model", "judge-template-unknown-column", "verdict-not-a-token"])
def test_node_sh_refuses_bad_model_rewards_in_one_line_before_any_engine(tmp_path, case):
    import sys

    from helpers import free_port, run

    if case == "causal-lm-as-reward-model":  # the policy's own folder: a causal LM
        from tgrpo.tiny import ensure_tiny_model

        args, words = ["--reward_funcs", ensure_tiny_model(CACHE), "--reward_weights", "1"], "not an ...ForSequence"
    elif case == "judge-template-unknown-column":
        args = ["--config", "configs/judge.yaml", "--judge_template", "{prompt} {completion} {rubric}"]
        words = "judge_template names '{rubric}', which is no column"
    else:
        args = ["--config", "configs/judge.yaml", "--judge_verdict_tokens", "correct answer", "no"]
        words = "judge verdict word 'correct answer' is"
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", *args, "--output_dir", str(tmp_path / "out")],
                 timeout=600, env={"PYTHON": sys.executable, "MASTER_PORT": str(free_port())})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "EngineCore" not in result.stdout + result.stderr  # nothing started
