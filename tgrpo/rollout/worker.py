"""The rollout rank: its share of the step's prompts -> vLLM completions with logprobs -> rewards.

A prompt's whole group is generated and scored on one rollout rank; advantages are made from the rewards of the
step's whole batch once every engine's share is gathered (assign_advantages), so that they do not depend on the
placement.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from tgrpo import algorithm, console, data, vision
from tgrpo.batch import Images, Sample
from tgrpo.policy import lora
from tgrpo.reward_spec import entries as model_rewards
from tgrpo.rollout import rewards, tools
from tgrpo.rollout.vllm_engine import RolloutEngine


class RolloutWorker:
    def __init__(self, cfg, placement, rank: int, model_dir: str, on_engine_death: Callable[[str], None]):
        """on_engine_death(message): called from the engine watcher's thread when the engine process dies; the job
        says so in one line naming this rank and exits (the rollout side never decides a rank's life)."""
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.index = placement.engine_ranks.index(rank)  # this engine's share of the prompts
        self.num_engines = placement.num_engines
        self.placement = placement
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # vision-language models: the processor that sizes images as the policy sees them (None: a text model)
        self.vision = vision.VisionProcessor.load(model_dir, cfg.min_pixels, cfg.max_pixels)
        self.scorer = rewards.RewardScorer(cfg)
        # a reward function written for TRL gets every column of the row, a reward model the prompt's messages
        rows = self.scorer.wants_rows or bool(model_rewards(cfg))
        self.prompts, self.dropped = data.load_prompts(cfg, self.tokenizer, keep_columns=rows, vision=self.vision)
        self.eval_prompts: list[data.Prompt] = []
        if cfg.eval_data:
            everything, _ = data.load_prompts(cfg, self.tokenizer, cfg.eval_data, limit=cfg.eval_max_prompts, need=1,
                                              keep_columns=rows, vision=self.vision)
            self.eval_prompts = everything[self.index::self.num_engines]
        self.model_dir = model_dir
        self.rank = rank
        self.on_engine_death = on_engine_death
        self.engine: RolloutEngine | None = None
        self.retriever = self._connect_retriever() if cfg.retriever_url else None
        # each prompt's token budget, and whether completions run to it past the end of turn: the benchmarks set
        # both, so that a step's tokens are the ones they chose and not where a model happened to stop
        self.completion_budget = lambda prompt: cfg.max_completion_length
        self.ignore_eos = False
        self.score_while_generating = (cfg.score_while_generating if cfg.score_while_generating is not None
                                       else torch.cuda.is_available())
        # finished_group(samples): set by the job when models score this rank's groups as they finish (their
        # holders' threads, tgrpo.job.model_rewards); called with each prompt's samples, their .group set
        self.finished_group: Callable[[list[Sample]], None] | None = None

    def _connect_retriever(self):
        """Pre-flight, before any engine starts: one search must get an answer, or the run stops with one line
        (retriever_on_failure=fail) or says once that it goes on without results (empty)."""
        from tgrpo.errors import ConfigError
        from tgrpo.rollout.retriever import connect

        retriever, problem = connect(self.cfg)
        if problem and self.cfg.retriever_on_failure == "fail":
            retriever.close()
            raise ConfigError(problem)
        if problem:
            console.warn_once(f"[rank {self.rank} rollout] {problem}; going on, as retriever_on_failure=empty: "
                              "failed searches read '(search failed)'")
        return retriever

    def start_engine(self, dtype: str) -> None:
        cfg = self.cfg
        self.engine = RolloutEngine(self.model_dir, dtype=dtype, seed=cfg.seed + self.index,
                                    max_model_len=cfg.max_prompt_length + cfg.max_completion_length, cfg=cfg,
                                    tag=f"rank{self.rank}", tensor_parallel_size=self.placement.tensor_parallel,
                                    sleep_mode=self.placement.colocated, on_engine_death=self.on_engine_death,
                                    max_num_seqs=self.groups_in_flight() * cfg.num_generations,
                                    lora_rank=lora.vllm_max_rank(cfg.lora_r) if cfg.use_lora else None,
                                    images=self._engine_images())

    def _engine_images(self) -> dict | None:
        """What the engine needs to know of a vision-language model's images (None: a text model)."""
        if self.vision is None:
            return None
        most = max((len(p.images or ()) for p in self.prompts + self.eval_prompts), default=1)
        return {"per_prompt": most, "processor": self.vision.engine_kwargs()}

    def media(self, prompt: data.Prompt) -> tuple[list[int], list | None, Images | None]:
        """What the engine and the policy get of a prompt: the engine's token ids (one token per image, which vLLM
        expands), its images (PIL), and the processor's pixels of them (batch.Images, shared by the prompt's
        samples). A text prompt: its ids, None, None. The image tokens the pixels make are checked against the
        prompt's: images and their tokens never drift apart."""
        if self.vision is None or not prompt.images:
            return prompt.prompt_ids, None, None
        pictures = [ref.open() for ref in prompt.images]
        pixels, grid = self.vision.pixels(pictures)
        made = int((grid.prod(-1) // self.vision.image_processor.merge_size ** 2).sum())
        expected = prompt.prompt_ids.count(self.vision.image_token_id)
        if made != expected:
            raise ValueError(f"the images of prompt '{prompt.prompt_text[:60]}' make {made} image tokens but the "
                             f"prompt holds {expected}: the processor's sizing differs from the data loader's")
        return (self.vision.collapse(prompt.prompt_ids), pictures,
                Images(pixels, grid, [ref.ref() for ref in prompt.images]))

    def groups_in_flight(self) -> int:
        """The most groups the engine has at once: a step's share, or async_mode's groups in flight."""
        share = self.cfg.prompts_per_step // self.num_engines
        return (self.cfg.async_groups_in_flight or 2 * share) if self.cfg.async_mode else share

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
                  "remote_failures": 0, "tool_s": 0.0, "searches": 0, "search_failures": 0}
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

    def _complete(self, prompts: list[data.Prompt], n: int, temperature: float, seed: int | None,
                  on_done=None) -> tuple[list[Sample], dict[str, float]]:
        """n samples per prompt, not yet scored: one generation each, or with a retriever multi-turn episodes.
        on_done(i, samples) gets prompt i's samples as soon as they are finished (single-turn)."""
        cfg = self.cfg
        ids = [p.prompt_ids for p in prompts]
        top_p = cfg.top_p if temperature > 0 else 1.0
        if self.retriever is None:
            t0 = time.perf_counter()
            media = [self.media(p) for p in prompts]

            def sample(i: int, c) -> Sample:
                p = prompts[i]
                return Sample(p.prompt_ids, c.token_ids, c.logprobs, truncated=c.finish_reason == "length",
                              answer=p.answer, prompt_text=p.prompt_text, completion_text=c.text,
                              images=media[i][2], prompt=p.prompt, columns=p.columns)

            done = None if on_done is None else (lambda i, group: on_done(i, [sample(i, c) for c in group]))
            outs = self.engine.generate([m[0] for m in media], n=n,
                                        max_tokens=[self.completion_budget(p) for p in prompts],
                                        temperature=temperature, top_p=top_p, seed=seed, on_done=done,
                                        ignore_eos=self.ignore_eos,
                                        images=[m[1] for m in media] if self.vision is not None else None)
            stats = {"generate_s": time.perf_counter() - t0}
            return [sample(i, c) for i, group in enumerate(outs) for c in group], stats
        groups, stats = tools.run_episodes(
            self.engine, self.tokenizer, self.retriever, ids, n=n, max_tokens=cfg.max_completion_length,
            max_turns=cfg.max_turns, max_tool_tokens=cfg.max_tool_response_length, temperature=temperature,
            top_p=top_p, seed=seed)
        return [Sample(p.prompt_ids, e.ids, e.logprobs, truncated=e.truncated, completion_mask=e.mask,
                       answer=p.answer, prompt_text=p.prompt_text, completion_text=e.text, segments=e.segments,
                       turns=e.turns, tool_calls=e.tool_calls, prompt=p.prompt, columns=p.columns)
                for p, group in zip(prompts, groups) for e in group], stats

    def _generate_groups(self, prompts: list[data.Prompt], step: int, sampling_round: int):
        """Each prompt's group generated, scored and given advantages. With score_while_generating, the local
        rewards of a group are scored on the reward pool as soon as its completions are finished, while the engine
        generates the rest."""
        cfg = self.cfg
        n = cfg.num_generations
        submitted: dict[int, dict] = {}
        handed: set[int] = set()  # groups given to finished_group while the engine generated

        def key(i: int) -> tuple[int, int] | None:  # (engine, position in its stream of prompts), async's numbering;
            # dynamic sampling's extra rounds have none (models, which need it, refuse dynamic sampling)
            return (self.index, step * len(prompts) + i) if sampling_round == 0 else None

        def group_done(i: int, group: list[Sample]) -> None:
            if self.score_while_generating:
                submitted[i] = self.scorer.submit([s.completion_text for s in group], [s.answer for s in group],
                                                  self.rows(group, [prompts[i]] * len(group)))
            if self.finished_group is not None:
                for s in group:
                    s.group = key(i)
                self.finished_group(group)
                handed.add(i)

        streaming = self.score_while_generating or self.finished_group is not None
        samples, stats = self._complete(prompts, n, cfg.temperature, _seed(cfg.seed, step, self.index, sampling_round),
                                        on_done=group_done if streaming else None)
        for j, s in enumerate(samples):
            s.group = key(j // n)
        if self.finished_group is not None:  # multi-turn episodes end together: their groups go now
            for i in range(len(prompts)):
                if i not in handed:
                    self.finished_group(samples[i * n:(i + 1) * n])
        reward_stats = self.score(samples, [submitted[i] for i in range(len(prompts))]
                                  if len(submitted) == len(prompts) else None, [p for p in prompts for _ in range(n)])
        stats = {**stats, **reward_stats, "generated_tokens": sum(s.model_tokens for s in samples)}
        return [samples[i:i + n] for i in range(0, len(samples), n)], stats

    def rows(self, samples: list[Sample], prompts: list[data.Prompt]) -> list[rewards.Row] | None:
        """What a reward function written for TRL gets of each sample besides its text (None: no such function)."""
        if not self.scorer.wants_rows:
            return None
        return [rewards.Row(p.prompt, s.completion_ids, p.columns) for s, p in zip(samples, prompts)]

    def score(self, samples: list[Sample], submitted: list | None = None,
              prompts: list[data.Prompt] | None = None) -> dict[str, float]:
        """Every sample's reward (the weighted rewards and the overlong penalty) and its parts. submitted: the
        scorer's futures of these samples' local rewards, started while generating (else scored now). prompts: each
        sample's (for reward functions written for TRL). Returns reward_s (what scoring adds after generation) and
        remote_failures."""
        cfg = self.cfg
        t1 = time.perf_counter()
        scores, parts, reward_stats = self.scorer.score(
            [s.prompt_text for s in samples], [s.completion_text for s in samples], [s.answer for s in samples],
            submitted=submitted, rows=None if submitted is not None else self.rows(samples, prompts or []),
            images=_image_refs(samples))
        if cfg.overlong_buffer_length > 0:
            parts["overlong"] = [overlong_penalty(len(s.completion_ids), cfg) for s in samples]
            scores = [r + p for r, p in zip(scores, parts["overlong"])]
        for i, s in enumerate(samples):  # advantages come once the step's whole batch is gathered
            s.reward = scores[i]
            s.reward_parts = {name: values[i] for name, values in parts.items()}
        return {"reward_s": time.perf_counter() - t1, "remote_failures": reward_stats.get("remote_failures", 0)}

    def evaluate(self) -> dict[str, float]:
        """Sums over this engine's eval prompts: greedy correct (pass@1), sampled correct (for mean@k), rewards."""
        cfg = self.cfg
        if not self.eval_prompts:
            return {"prompts": 0, "greedy_correct": 0.0, "sampled_correct": 0.0, "greedy_reward": 0.0}
        greedy, _ = self._complete(self.eval_prompts, 1, 0.0, None)
        sampled, _ = self._complete(self.eval_prompts, cfg.eval_k, cfg.temperature,
                                    _seed(cfg.seed, -1, self.index, 0))
        g_scores, g_parts, _ = self.scorer.score([s.prompt_text for s in greedy], [s.completion_text for s in greedy],
                                                 [s.answer for s in greedy], rows=self.rows(greedy, self.eval_prompts),
                                                 images=_image_refs(greedy))
        s_scores, s_parts, _ = self.scorer.score([s.prompt_text for s in sampled],
                                                 [s.completion_text for s in sampled], [s.answer for s in sampled],
                                                 rows=self.rows(sampled, [p for p in self.eval_prompts
                                                                          for _ in range(cfg.eval_k)]),
                                                 images=_image_refs(sampled))
        return {"prompts": len(self.eval_prompts), "greedy_correct": sum(_correct(g_scores, g_parts)),
                "sampled_correct": sum(_correct(s_scores, s_parts)) / cfg.eval_k, "greedy_reward": sum(g_scores)}

    def greedy(self, prompts: list[data.Prompt]) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens and their logprobs, for the sync check."""
        media = [self.media(p) for p in prompts]
        outs = self.engine.generate([m[0] for m in media], n=1, max_tokens=self.cfg.max_completion_length,
                                    temperature=0.0, top_p=1.0, seed=None,
                                    images=[m[1] for m in media] if self.vision is not None else None)
        return [(g[0].token_ids, g[0].logprobs) for g in outs]


def _image_refs(samples: list[Sample]) -> list[list] | None:
    """Each sample's image references, for a remote reward (None: no sample has images)."""
    if not any(s.images is not None for s in samples):
        return None
    return [list(s.images.refs or []) if s.images is not None else [] for s in samples]


def _correct(scores: list[float], parts: dict[str, list[float]]) -> list[float]:
    """A completion is correct if the math (or exact-match) reward says so; without one, if its total reward is
    positive."""
    if (name := rewards.answer_reward(parts)) is not None:
        return [float(v >= 1.0) for v in parts[name]]
    return [float(v > 0) for v in scores]


def overlong_penalty(length: int, cfg) -> float:
    """DAPO's soft overlong punishment: 0 up to max_completion_length - buffer, then falling linearly to
    -overlong_penalty_factor at max_completion_length."""
    start = cfg.max_completion_length - cfg.overlong_buffer_length
    if length <= start:
        return 0.0
    return -min(1.0, (length - start) / cfg.overlong_buffer_length) * cfg.overlong_penalty_factor


def kl_into_rewards(samples: list[Sample], beta: float) -> None:
    """kl_in_reward: reward -= beta * KL(policy || reference) summed over the completion (k1, with the rollout's
    logprobs as the policy's). Advantages are made afterwards (assign_advantages)."""
    for s in samples:
        s.reward_parts["kl_penalty"] = -beta * sum(m * (a - b) for m, a, b in zip(s.model_mask, s.rollout_logprobs,
                                                                                  s.ref_logprobs))
        s.reward += s.reward_parts["kl_penalty"]


def assign_advantages(samples: list[Sample], group_size: int, scale: str) -> None:
    """Every sample's advantage from the rewards of the step's whole batch, as gathered from every engine (groups
    are consecutive runs of group_size): `scale_rewards: batch` divides by the std of all the step's rewards, so
    the advantages do not depend on how many engines generated them."""
    advantages = algorithm.group_advantages(torch.tensor([s.reward for s in samples]), group_size, scale)
    for s, a in zip(samples, advantages.tolist()):
        s.advantage = a


def _seed(seed: int, step: int, index: int, sampling_round: int) -> int:
    """The sampling seed of a (run seed, step, engine, round): a resumed run samples what the uninterrupted one
    would have."""
    return random.Random(f"{seed}-{step}-{index}-{sampling_round}").randrange(2**30)


def assign_gae(samples: list[Sample], gamma: float, lam: float, kl_coef: float, mask_truncated: bool) -> dict:
    """advantage_estimator gae: per-token rewards (the outcome on the last model token, minus kl_coef times each
    model token's k1 KL to the reference when the samples have reference logprobs and kl_coef > 0), GAE over the
    critic's values (Sample.values), returns, and advantages whitened over the step's counted tokens. Every rank
    computes the same from the same samples. Returns the step's statistics of returns and advantages."""
    flat_adv, flat_mask = [], []
    for s in samples:
        mask = s.model_mask
        kl = ([a - b for a, b in zip(s.rollout_logprobs, s.ref_logprobs)]
              if s.ref_logprobs is not None and kl_coef else None)
        rewards = algorithm.token_rewards(s.reward, mask, kl, kl_coef)
        s.token_advantages, s.returns = algorithm.gae(rewards, s.values, mask, gamma, lam)
        flat_adv += s.token_advantages
        flat_mask += s.loss_mask(mask_truncated)
    raw = torch.tensor(flat_adv, dtype=torch.float64)
    counted = torch.tensor(flat_mask, dtype=torch.float64)
    white = algorithm.whiten(raw, counted).tolist()
    start = 0
    for s in samples:
        n = len(s.completion_ids)
        s.token_advantages = white[start:start + n]
        counted_adv = [a for a, m in zip(s.token_advantages, s.model_mask) if m]
        s.advantage = sum(counted_adv) / max(1, len(counted_adv))  # for samples.jsonl
        start += n
    returns = torch.tensor([r for s in samples for r in s.returns], dtype=torch.float64)
    return {"advantages/raw_mean": float(algorithm.masked_mean(raw, counted)),
            "advantages/raw_std": float(algorithm.masked_mean((raw - algorithm.masked_mean(raw, counted)) ** 2,
                                                              counted).sqrt()),
            "returns/mean": float(algorithm.masked_mean(returns, counted)),
            "returns/std": float(algorithm.masked_mean((returns - algorithm.masked_mean(returns, counted)) ** 2,
                                                       counted).sqrt())}


def mean_token_kl(samples: list[Sample]) -> float:
    """The batch's mean k1 KL to the reference per model token (the adaptive KL controller's reading)."""
    total = sum(m * (a - b) for s in samples for m, a, b in zip(s.model_mask, s.rollout_logprobs, s.ref_logprobs))
    return total / max(1, sum(s.model_tokens for s in samples))
