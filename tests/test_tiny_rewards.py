"""The embedded reward models of the arithmetic task ('tiny-rm', 'tiny-judge'): each loads with plain transformers
and its own tokenizer, and on held-out prompts prefers a right answer in <answer> tags to a wrong one or an untagged
one, as math_reward does."""
import json
import os
import random

import pytest
import torch

from helpers import ROOT
from tgrpo.rollout.rewards import math_reward
from tgrpo.tiny import DEFAULT_SYSTEM, JUDGE_TEMPLATE, VERDICTS, ensure_model, ensure_tiny_model

CACHE = os.path.join(ROOT, ".cache")


@pytest.fixture(scope="module")
def held_out() -> list[tuple[str, str, str]]:
    """(user text, right answer, a wrong answer) for every row of data/arith_test.json."""
    with open(os.path.join(ROOT, "data", "arith_test.json")) as f:
        rows = json.load(f)
    rng = random.Random(0)
    return [(r["messages"][-1]["content"], r["answer"],
             str(rng.choice([v for v in range(26) if str(v) != r["answer"]]))) for r in rows]


def completions(right: str, wrong: str) -> dict[str, str]:
    return {"right": f"<answer>{right}</answer>", "wrong": f"<answer>{wrong}</answer>", "untagged": right}


def test_completions_are_graded_as_named(held_out):
    for text, right, wrong in held_out[:20]:
        grades = {k: math_reward(c, right) for k, c in completions(right, wrong).items()}
        assert grades == {"right": 1.0, "wrong": 0.0, "untagged": 0.0}


def test_reward_model_scores_right_tagged_answers_highest(held_out):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = ensure_model(CACHE, "tiny-rm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    policy = AutoTokenizer.from_pretrained(ensure_tiny_model(CACHE))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert len(tokenizer) != len(policy) or tokenizer.get_vocab() != policy.get_vocab()

    def scores(kind: str) -> torch.Tensor:
        texts = [tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM},
                                                {"role": "user", "content": text},
                                                {"role": "assistant", "content": completions(right, wrong)[kind]}],
                                               tokenize=False) for text, right, wrong in held_out]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            return model(**batch).logits[:, 0]

    right, wrong, untagged = scores("right"), scores("wrong"), scores("untagged")
    over_wrong, over_untagged = (right > wrong).float().mean().item(), (right > untagged).float().mean().item()
    print(f"tiny-rm: right above wrong {over_wrong:.3f}, above untagged {over_untagged:.3f}")
    # measured 0.575 and 1.0 on these 200 prompts (with the system prompt the trainer's data adds): it learned the
    # tags for sure, right against wrong only a little
    assert over_wrong > 0.5 and over_untagged >= 0.9


def test_judge_says_yes_to_right_tagged_answers_only(held_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_model(CACHE, "tiny-judge")
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    verdicts = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in VERDICTS]
    assert all(len(v) == 1 for v in verdicts)
    yes, no = verdicts[0][0], verdicts[1][0]

    def p_yes(kind: str) -> torch.Tensor:
        texts = [tokenizer.apply_chat_template(
            [{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=text, completion=completions(right, wrong)[kind],
                                                               answer=right)}],
            add_generation_prompt=True, tokenize=False) for text, right, wrong in held_out]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            probs = model(**batch).logits[:, -1].softmax(-1)
        assert (probs[:, yes] + probs[:, no]).min() > 0.9  # the verdict is what it says first
        return probs[:, yes] / (probs[:, yes] + probs[:, no])

    right, wrong, untagged = p_yes("right"), p_yes("wrong"), p_yes("untagged")
    accuracy = {"right": (right > 0.5).float().mean().item(), "wrong": (wrong < 0.5).float().mean().item(),
                "untagged": (untagged < 0.5).float().mean().item(),
                "right above wrong": (right > wrong).float().mean().item()}
    print("tiny-judge:", {k: round(v, 3) for k, v in accuracy.items()})
    # measured right 1.0, wrong 0.56, untagged 1.0, right above wrong 0.65 on these 200 prompts: the tags for sure,
    # right against wrong only a little
    assert accuracy["right"] >= 0.75 and accuracy["untagged"] >= 0.9
    assert accuracy["wrong"] > 0.5 and accuracy["right above wrong"] > 0.55
