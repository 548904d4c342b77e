"""Rewards from models within a step: who holds the reward models and the judge, and how their scores reach every
rank. After the step's samples are gathered, each holder scores a balanced share (the reward models on
reward_ranks, else on the policy ranks; the judge on judge_ranks), the scores are gathered to every rank, and every
rank adds the weighted scores to each sample's reward alike (running normalisation included), before advantages."""
from __future__ import annotations

import math
import time

import torch

from tgrpo import reward_spec as reward
from tgrpo.reward.model import RunningNorm
from tgrpo.job import rank_life
from tgrpo.job.placement import JUDGE, POLICY, REWARD


def start(cfg, placement, rank: int, device: torch.device, dtype: torch.dtype, dtype_name: str,
          on_engine_death=None) -> tuple[dict, object]:
    """({name: RewardModel} this rank holds, its Judge or None)."""
    models, judge = {}, None
    roles = placement.roles(rank)
    entries = reward.entries(cfg)
    holds_models = REWARD in roles or (POLICY in roles and not placement.reward)
    if holds_models:
        from tgrpo.reward.model import RewardModel

        for m in entries:
            if m.entry != reward.JUDGE:
                models[m.name] = RewardModel(reward.resolve(cfg, m.entry), device, dtype, cfg.reward_model_batch_tokens,
                                             cfg.reward_model_max_length, offload=POLICY in roles)
    if JUDGE in roles:
        from tgrpo.reward.judge import Judge

        judge = Judge(cfg, reward.judge_dir(cfg), dtype_name, tag=f"judge{rank}", on_engine_death=on_engine_death)
    return models, judge


def norms(cfg, state: dict | None = None) -> dict:
    """reward_model_normalize running: a RunningNorm per reward model (the judge's scores are already in [0, 1])."""
    if cfg.reward_model_normalize != "running":
        return {}
    return {m.name: RunningNorm((state or {}).get(m.name)) for m in reward.entries(cfg)
            if m.entry != reward.JUDGE}


def attach(job, samples: list, wait) -> dict:
    """Score the gathered samples with the models, add each weighted score to their rewards (every rank alike).
    wait(): the step's barrier that keeps async engines moving while the holders compute. Returns metrics."""
    cfg, placement, rank = job.cfg, job.placement, job.rank
    entries = reward.entries(cfg)
    if not entries:
        return {}
    t0 = time.perf_counter()
    mine: dict = {}
    stats = {"judge_failures": 0, "truncated": 0}
    holders = placement.reward or placement.policy
    if job.reward_models:
        share = list(range(holders.index(rank), len(samples), len(holders)))
        for name, model in job.reward_models.items():
            model.truncated = 0
            mine[name] = (share, model.score([_prompt(samples[i]) for i in share],
                                             [samples[i].completion_text for i in share]))
            stats["truncated"] += model.truncated
    if job.judge is not None:
        share = list(range(placement.judge.index(rank), len(samples), len(placement.judge)))
        scores, failures = job.judge.score([_prompt(samples[i]) for i in share],
                                           [samples[i].completion_text for i in share],
                                           [samples[i].answer for i in share], [samples[i].columns for i in share])
        mine[reward.JUDGE] = (share, scores)
        stats["judge_failures"] += failures
    if cfg.async_mode:
        wait()  # the engines generate while the holders score
    everyone = rank_life.gather_objects((mine, stats), job.groups.data)
    raw = {m.name: [math.nan] * len(samples) for m in entries}
    for part, _ in everyone:
        for name, (share, scores) in part.items():
            for i, value in zip(share, scores):
                raw[name][i] = value
    out = {"time/model_reward_s": time.perf_counter() - t0,
           "reward/judge_failures": float(sum(s["judge_failures"] for _, s in everyone)),
           "reward/model_truncated": float(sum(s["truncated"] for _, s in everyone))}
    for m in entries:
        values = raw[m.name]
        if m.name in job.reward_norms:
            out[f"reward/{m.name}/raw_mean"] = sum(values) / max(1, len(values))
            values = job.reward_norms[m.name](values)
        for s, value in zip(samples, values):
            s.reward_parts[m.name] = value
            s.reward += m.weight * value
    return out


def _prompt(sample):
    """The prompt as the dataset gave it (kept by the rollout ranks when models score), else its rendered text."""
    return sample.prompt if sample.prompt is not None else sample.prompt_text
