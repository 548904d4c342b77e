"""The rollout rank: its share of the step's prompts -> vLLM completions with logprobs -> rewards -> advantages.

A prompt's whole group is generated on one rollout rank, so advantages are computed here, before the batch
leaves for the policy ranks.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from tgrpo import algorithm, data, rewards
from tgrpo.vllm_engine import RolloutEngine


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    advantage: float
    truncated: bool
    answer: str
    prompt_text: str
    completion_text: str
    reward_parts: dict[str, float] = field(default_factory=dict)
    ref_logprobs: list[float] | None = None  # filled in by reference ranks of their own


class RolloutWorker:
    def __init__(self, cfg, placement, rank: int, model_dir: str):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.index = placement.engine_ranks.index(rank)  # this engine's share of the prompts
        self.num_engines = placement.num_engines
        self.placement = placement
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prompts, self.dropped = data.load_prompts(cfg, self.tokenizer)
        self.model_dir = model_dir
        self.rank = rank
        self.engine: RolloutEngine | None = None

    def start_engine(self, dtype: str) -> None:
        cfg = self.cfg
        self.engine = RolloutEngine(self.model_dir, dtype=dtype, seed=cfg.seed + self.index,
                                    max_model_len=cfg.max_prompt_length + cfg.max_completion_length, cfg=cfg,
                                    tag=f"rank{self.rank}", tensor_parallel_size=self.placement.tensor_parallel,
                                    sleep_mode=self.placement.colocated)

    def step_prompts(self, step: int) -> list[data.Prompt]:
        indices = data.step_indices(len(self.prompts), self.cfg.prompts_per_step, step, self.cfg.seed)
        return [self.prompts[i] for i in data.rank_slice(indices, self.index, self.num_engines)]

    def rollout(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        cfg = self.cfg
        prompts = self.step_prompts(step)
        t0 = time.perf_counter()
        groups = self.engine.generate([p.prompt_ids for p in prompts], n=cfg.num_generations,
                                      max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=_seed(cfg.seed, step, self.index))
        t1 = time.perf_counter()
        completions = [c for group in groups for c in group]
        answers = [p.answer for p in prompts for _ in range(cfg.num_generations)]
        totals, parts = rewards.score([c.text for c in completions], answers, cfg.reward_funcs, cfg.reward_weights)
        advantages = algorithm.group_advantages(torch.tensor(totals), cfg.num_generations, cfg.scale_rewards)
        t2 = time.perf_counter()
        samples = []
        for i, c in enumerate(completions):
            prompt = prompts[i // cfg.num_generations]
            samples.append(Sample(
                prompt.prompt_ids, c.token_ids, c.logprobs, totals[i], float(advantages[i]),
                c.finish_reason == "length", prompt.answer, prompt.prompt_text, c.text,
                {name: values[i] for name, values in parts.items()}))
        tokens = sum(len(c.token_ids) for c in completions)
        return samples, {"generate_s": t1 - t0, "reward_s": t2 - t1, "generated_tokens": tokens}

    def greedy(self, prompt_ids: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens and their logprobs, for the sync check."""
        outs = self.engine.generate(prompt_ids, n=1, max_tokens=self.cfg.max_completion_length, temperature=0.0,
                                    top_p=1.0, seed=None)
        return [(g[0].token_ids, g[0].logprobs) for g in outs]


def _seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of a (run seed, step, rollout rank): a resumed run samples what the uninterrupted one
    would have."""
    return random.Random(f"{seed}-{step}-{index}").randrange(2**30)
