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
        self.eval_prompts: list[data.Prompt] = []
        if cfg.eval_data:
            everything, _ = data.load_prompts(cfg, self.tokenizer, cfg.eval_data, limit=cfg.eval_max_prompts, need=1)
            self.eval_prompts = everything[self.index::self.num_engines]
        self.scorer = rewards.RewardScorer(cfg)
        self.model_dir = model_dir
        self.rank = rank
        self.engine: RolloutEngine | None = None

    def start_engine(self, dtype: str) -> None:
        cfg = self.cfg
        self.engine = RolloutEngine(self.model_dir, dtype=dtype, seed=cfg.seed + self.index,
                                    max_model_len=cfg.max_prompt_length + cfg.max_completion_length, cfg=cfg,
                                    tag=f"rank{self.rank}", tensor_parallel_size=self.placement.tensor_parallel,
                                    sleep_mode=self.placement.colocated, on_engine_death=self._engine_died)

    def _engine_died(self, message: str) -> None:
        """From the engine watcher's thread: one line naming this rank, then exit; torchrun stops the rest."""
        import os

        from tgrpo.distributed import report_error_and_exit

        report_error_and_exit(self.rank, self.placement.role_name(self.rank), RuntimeError(message),
                              os.path.join(self.cfg.output_dir, "logs"))

    def step_prompts(self, step: int, sampling_round: int = 0) -> list[data.Prompt]:
        """This engine's prompts of a step. Extra rounds (dynamic sampling) draw from a stream of their own, so
        the prompts of a step depend only on (seed, step), however many rounds earlier steps took."""
        share = self.cfg.prompts_per_step // self.num_engines
        if sampling_round == 0:
            indices = data.step_indices(len(self.prompts), self.cfg.prompts_per_step, step, self.cfg.seed)
            indices = data.rank_slice(indices, self.index, self.num_engines)
        else:
            rng = random.Random(f"{self.cfg.seed}-{step}-{sampling_round}-{self.index}")
            indices = rng.sample(range(len(self.prompts)), min(share, len(self.prompts)))
        return [self.prompts[i] for i in indices]

    def rollout(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This engine's share of the step's groups. With dynamic sampling, groups whose rewards are all equal
        (no learning signal) are set aside and more prompts sampled; if max_sampling_rounds runs out, set-aside
        groups fill the batch (their advantages are zero), so every step has the same size."""
        cfg = self.cfg
        want = cfg.prompts_per_step // self.num_engines
        kept: list[list[Sample]] = []
        flat: list[list[Sample]] = []
        totals = {"generate_s": 0.0, "reward_s": 0.0, "generated_tokens": 0, "groups_dropped": 0, "rounds": 0,
                  "remote_failures": 0}
        for sampling_round in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            groups, stats = self._generate_groups(self.step_prompts(step, sampling_round), step, sampling_round)
            for key, value in stats.items():
                totals[key] += value
            totals["rounds"] += 1
            for group in groups:
                if cfg.dynamic_sampling and len({s.reward for s in group}) == 1:
                    flat.append(group)
                    totals["groups_dropped"] += 1
                elif len(kept) < want:
                    kept.append(group)
            if len(kept) == want:
                break
        kept.extend(flat[:want - len(kept)])
        if self.engine.on_gpu:
            totals["device_used_gib"] = self.engine.device_used_gib()  # while the engine is awake, KV cache and all
        return [s for group in kept for s in group], totals

    def _generate_groups(self, prompts: list[data.Prompt], step: int, sampling_round: int):
        cfg = self.cfg
        n = cfg.num_generations
        t0 = time.perf_counter()
        outs = self.engine.generate([p.prompt_ids for p in prompts], n=n, max_tokens=cfg.max_completion_length,
                                    temperature=cfg.temperature, top_p=cfg.top_p,
                                    seed=_seed(cfg.seed, step, self.index, sampling_round))
        t1 = time.perf_counter()
        completions = [c for group in outs for c in group]
        owners = [p for p in prompts for _ in range(n)]
        scores, parts, reward_stats = self.scorer.score([p.prompt_text for p in owners],
                                                        [c.text for c in completions], [p.answer for p in owners])
        if cfg.overlong_buffer_length > 0:
            parts["overlong"] = [overlong_penalty(len(c.token_ids), cfg) for c in completions]
            scores = [r + p for r, p in zip(scores, parts["overlong"])]
        advantages = algorithm.group_advantages(torch.tensor(scores), n, cfg.scale_rewards)
        samples = [Sample(p.prompt_ids, c.token_ids, c.logprobs, scores[i], float(advantages[i]),
                          c.finish_reason == "length", p.answer, p.prompt_text, c.text,
                          {name: values[i] for name, values in parts.items()})
                   for i, (p, c) in enumerate(zip(owners, completions))]
        stats = {"generate_s": t1 - t0, "reward_s": time.perf_counter() - t1,
                 "generated_tokens": sum(len(c.token_ids) for c in completions),
                 "remote_failures": reward_stats.get("remote_failures", 0)}
        return [samples[i:i + n] for i in range(0, len(samples), n)], stats

    def evaluate(self) -> dict[str, float]:
        """Sums over this engine's eval prompts: greedy correct (pass@1), sampled correct (for mean@k), rewards."""
        cfg = self.cfg
        if not self.eval_prompts:
            return {"prompts": 0, "greedy_correct": 0.0, "sampled_correct": 0.0, "greedy_reward": 0.0}
        ids = [p.prompt_ids for p in self.eval_prompts]
        greedy = [g[0] for g in self.engine.generate(ids, n=1, max_tokens=cfg.max_completion_length,
                                                      temperature=0.0, top_p=1.0, seed=None)]
        sampled = [c for g in self.engine.generate(ids, n=cfg.eval_k, max_tokens=cfg.max_completion_length,
                                                    temperature=cfg.temperature, top_p=cfg.top_p,
                                                    seed=_seed(cfg.seed, -1, self.index, 0)) for c in g]
        g_scores, g_parts, _ = self.scorer.score([p.prompt_text for p in self.eval_prompts],
                                                 [c.text for c in greedy], [p.answer for p in self.eval_prompts])
        owners = [p for p in self.eval_prompts for _ in range(cfg.eval_k)]
        s_scores, s_parts, _ = self.scorer.score([p.prompt_text for p in owners], [c.text for c in sampled],
                                                 [p.answer for p in owners])
        return {"prompts": len(self.eval_prompts), "greedy_correct": sum(_correct(g_scores, g_parts)),
                "sampled_correct": sum(_correct(s_scores, s_parts)) / cfg.eval_k, "greedy_reward": sum(g_scores)}

    def greedy(self, prompt_ids: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens and their logprobs, for the sync check."""
        outs = self.engine.generate(prompt_ids, n=1, max_tokens=self.cfg.max_completion_length, temperature=0.0,
                                    top_p=1.0, seed=None)
        return [(g[0].token_ids, g[0].logprobs) for g in outs]


def _correct(scores: list[float], parts: dict[str, list[float]]) -> list[float]:
    """A completion is correct if the math reward says so; without one, if its total reward is positive."""
    if "math" in parts:
        return [float(v >= 1.0) for v in parts["math"]]
    return [float(v > 0) for v in scores]


def overlong_penalty(length: int, cfg) -> float:
    """DAPO's soft overlong punishment: 0 up to max_completion_length - buffer, then falling linearly to
    -overlong_penalty_factor at max_completion_length."""
    start = cfg.max_completion_length - cfg.overlong_buffer_length
    if length <= start:
        return 0.0
    return -min(1.0, (length - start) / cfg.overlong_buffer_length) * cfg.overlong_penalty_factor


def kl_into_rewards(samples: list[Sample], beta: float, group_size: int, scale: str) -> None:
    """kl_in_reward: reward -= beta * KL(policy || reference) summed over the completion (k1, with the rollout's
    logprobs as the policy's), then the group advantages again. Groups are consecutive runs of group_size."""
    for s in samples:
        s.reward_parts["kl_penalty"] = -beta * sum(a - b for a, b in zip(s.rollout_logprobs, s.ref_logprobs))
        s.reward += s.reward_parts["kl_penalty"]
    advantages = algorithm.group_advantages(torch.tensor([s.reward for s in samples]), group_size, scale)
    for s, a in zip(samples, advantages.tolist()):
        s.advantage = a


def _seed(seed: int, step: int, index: int, sampling_round: int) -> int:
    """The sampling seed of a (run seed, step, engine, round): a resumed run samples what the uninterrupted one
    would have."""
    return random.Random(f"{seed}-{step}-{index}-{sampling_round}").randrange(2**30)
