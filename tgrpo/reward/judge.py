"""An LLM judge: a causal LM served by a frozen vLLM engine (tgrpo.rollout.vllm_engine) on a judge rank of its own,
never synced. Each completion becomes one user message (judge_template filled with the prompt's text, the
completion, the answer and the row's other columns) through the judge's chat template; the score is read

- verdict (cheap, one token): P(good) / (P(good) + P(bad)) of the two judge_verdict_tokens at the judge's first
  token, from its top logprobs;
- score: a number out of the judge's text: 'Score: 7/10' -> 0.7, '8' -> 8 / judge_score_max, clamped to [0, 1].

An answer with no score in it (neither verdict token among the top logprobs; no number) is a failure: scored 0
and counted (judge_on_failure zero), or the run stops (fail)."""
from __future__ import annotations

import math
import re

from tgrpo.reward_spec import prompt_text, template_fields, verdict_ids

TOP_LOGPROBS = 20  # the verdict tokens are looked for among this many at the first position
_SCORE = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?")


def parse_score(text: str, score_max: float) -> float | None:
    """The last number of the judge's text as a score in [0, 1]: 'X/Y' -> X/Y, a bare X -> X / score_max."""
    found = _SCORE.findall(text)
    if not found:
        return None
    value, out_of = found[-1]
    denominator = float(out_of) if out_of else score_max
    if denominator <= 0:
        return None
    return min(1.0, max(0.0, float(value) / denominator))


def verdict_probability(top: dict[int, float], good: int, bad: int) -> float | None:
    """P(good) / (P(good) + P(bad)) from the first token's top logprobs; None if neither is among them."""
    if good not in top and bad not in top:
        return None
    lg, lb = top.get(good, -math.inf), top.get(bad, -math.inf)
    high = max(lg, lb)
    pg, pb = math.exp(lg - high), math.exp(lb - high)
    return pg / (pg + pb)


class Judge:
    def __init__(self, cfg, model_dir: str, dtype: str, tag: str, on_engine_death=None):
        from transformers import AutoTokenizer

        from tgrpo.rollout.vllm_engine import RolloutEngine

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.verdict_ids = (verdict_ids(self.tokenizer, cfg.judge_verdict_tokens, model_dir)
                            if cfg.judge_parser == "verdict" else None)
        self.fields = template_fields(cfg.judge_template)
        self.max_len = judge_max_len(cfg, model_dir)
        self.engine = RolloutEngine(model_dir, dtype=dtype, seed=cfg.seed, max_model_len=self.max_len,
                                    cfg=cfg, tag=tag, on_engine_death=on_engine_death,
                                    gpu_memory_utilization=cfg.judge_gpu_memory_utilization)

    def message(self, prompt, completion: str, answer: str, columns: dict) -> str:
        values = {**{k: v for k, v in (columns or {}).items()}, "prompt": prompt_text(prompt),
                  "completion": completion, "answer": answer}
        return self.cfg.judge_template.format(**{name: values[name] for name in self.fields})

    def encode(self, message: str) -> list[int]:
        chat = [{"role": "user", "content": message}]
        if self.tokenizer.chat_template:
            return list(self.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                                           return_dict=False))
        return self.tokenizer(message)["input_ids"]

    def score(self, prompts: list, completions: list[str], answers: list[str], columns: list[dict],
              seed: int | None = None) -> tuple[list[float], list[bool]]:
        """(one score in [0, 1] per completion, whether its answer held no score: a failure, scored 0)."""
        ids = [self.encode(self.message(p, c, a, col)) for p, c, a, col in zip(prompts, completions, answers, columns)]
        verdict = self.cfg.judge_parser == "verdict"
        room = self.max_len - (1 if verdict else self.cfg.judge_max_tokens)
        fits = [i for i, x in enumerate(ids) if len(x) <= room]  # a longer one has no answer: a failure
        answered = dict(zip(fits, self.engine.judge(
            [ids[i] for i in fits], max_tokens=1 if verdict else self.cfg.judge_max_tokens,
            temperature=1.0 if verdict else 0.0, seed=seed, top_logprobs=TOP_LOGPROBS if verdict else 0)))
        outs = [answered.get(i, ("", {})) for i in range(len(ids))]
        scores, failed = [], []
        for (text, top), completion in zip(outs, completions):
            value = (verdict_probability(top, *self.verdict_ids) if verdict
                     else parse_score(text, self.cfg.judge_score_max))
            if value is None:
                if self.cfg.judge_on_failure == "fail":
                    from tgrpo.rollout.rewards import RewardError

                    raise RewardError(f"the judge's answer {text[:80]!r} to completion {completion[:60]!r} holds no "
                                      f"{'verdict' if verdict else 'score'}: fix judge_template or judge_parser, or "
                                      "set judge_on_failure zero to score such answers 0 and count them")
            failed.append(value is None)
            scores.append(0.0 if value is None else value)
        return scores, failed

    def shutdown(self) -> None:
        self.engine.shutdown()


def judge_max_len(cfg, model_dir: str) -> int:
    """The judge engine's context: the policy's prompt and completion with room for the template and the answer,
    within the judge's own limit."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None) or 1 << 20
    return min(limit, 2 * (cfg.max_prompt_length + cfg.max_completion_length) + 256 + cfg.judge_max_tokens)
