"""The policy rank: the step's batch planned into packed micro-batches, token logprobs, the clipped GRPO loss and one
DeepSpeed step per mini-batch; the frozen reference's logprobs where it lives.

Every rank plans the whole batch the same way (batch.plan): a balanced share of the tokens for each rank and the
same number of micro-batches on each, since ZeRO-3's parameter gathers are collectives. A micro-batch's tensors are
made once per step; the statistics stay on the device and are reduced over the policy group once per step, so the
host never waits on the GPU inside the loop.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from tgrpo import algorithm, batch
from tgrpo.batch import MicroBatch, Sample
from tgrpo.policy import deepspeed_engine, lora, modeling

# token-weighted sums per step; the first pass over the batch counts every statistic, later passes
# (num_iterations > 1) only the first EVERY_PASS, those of the update itself
STATS = ("loss", "clipped", "pass_tokens", "entropy", "kl", "abs_diff", "mismatch_kl", "tokens", "fresh_tokens")
EVERY_PASS = 3


def _plan(samples: list[Sample], cfg, ranks: int, mini_batches: int) -> batch.Plan:
    return batch.plan([s.length for s in samples], ranks, mini_batches, cfg.max_tokens_per_micro_batch,
                      cfg.micro_batch_size)


@torch.no_grad()
def score(model, samples: list[Sample], cfg, ranks: int, index: int, device: torch.device,
          pad_id: int) -> list[tuple[int, list[float]]]:
    """Logprobs of this rank's share of `samples` under `model` (no gradient), as (sample index, logprobs); every
    one of the `ranks` ranks holding the model calls this with the same samples and runs as many forwards."""
    model.eval()
    chosen, parts = [], []
    for indices in _plan(samples, cfg, ranks, 1).rank(index)[0]:
        mb = batch.build([samples[i] for i in indices] or [batch.filler(pad_id)], device,
                         packed=cfg.padding_free, pad_id=pad_id, vision=modeling.vision_inputs(model))
        logp = modeling.token_logprobs(model, mb, cfg.temperature)[0]
        if indices:  # a filler's forward only keeps the collectives in step
            parts.append(logp)
            chosen += indices
    if not parts:
        return []
    return list(zip(chosen, batch.split(torch.cat(parts), [len(samples[i].completion_ids) for i in chosen])))


def micro_loss(model, mb: MicroBatch, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the mini-batch loss (weighted by mb.loss_weight), and its statistics: sums
    in STATS order and the largest ratio and |logprob difference| between trainer and vLLM, on the device."""
    logp, entropy = modeling.token_logprobs(model, mb, cfg.temperature, entropy=True)
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    is_weights = algorithm.truncated_is_weights(old, mb.rollout_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
    per_token, stats = algorithm.policy_loss(
        logp, old, mb.advantages, mb.loss_mask, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        dual_clip=cfg.dual_clip, ref_logp=mb.ref_logp, beta=0.0 if cfg.kl_in_reward else cfg.beta,
        kl_estimator=cfg.kl_estimator, is_weights=is_weights)
    share = (per_token * mb.loss_weight).sum()
    with torch.no_grad():
        mask, real = mb.loss_mask, mb.model_mask  # mismatch is measured on every token the model generated
        # async_mode: the tokens sampled by the weights being trained, whose mismatch is the engine's numerics alone
        fresh = mb.fresh_mask * real if mb.fresh_mask is not None else torch.zeros_like(real)
        log_ratio = (old - mb.rollout_logp) * real
        kl = (stats["kl"] * mask).sum() if "kl" in stats else torch.zeros((), device=mask.device)
        sums = torch.stack([share.detach(), (stats["clipped"] * mask).sum(), mask.sum(), (entropy * mask).sum(),
                            kl, log_ratio.abs().sum(),
                            (algorithm.mismatch_kl(old, mb.rollout_logp) * real).sum(), real.sum(),
                            fresh.sum()])
        peaks = torch.stack([(torch.exp(log_ratio) * real).max(), log_ratio.abs().max(),
                             (log_ratio.abs() * fresh).max()])
    return share, sums.double(), peaks.double()


def _ds_config(cfg, model_dir: str, dtype: torch.dtype, dp_size: int, trainable: bool, zero_stage: int) -> dict:
    from transformers import AutoConfig

    width = AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size  # a VL model's language model's
    return deepspeed_engine.load_config(cfg.deepspeed_config, cfg, zero_stage=zero_stage,
                                        bf16=dtype == torch.bfloat16, dp_size=dp_size, hidden_size=width,
                                        trainable=trainable)


def _pad_id(model_dir: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0


def build_reference(cfg, model_dir: str, dtype: torch.dtype, dp_size: int, zero_stage: int):
    return deepspeed_engine.build_engine(model_dir, _ds_config(cfg, model_dir, dtype, dp_size, False, zero_stage),
                                         dtype, trainable=False, attention=modeling.register())


class ReferenceWorker:
    """The frozen reference on ranks of its own: ZeRO-3 over the reference group, logprobs for its share."""

    def __init__(self, cfg, placement, rank: int, model_dir: str, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device = cfg, device
        self.ranks, self.index = len(placement.reference), placement.reference.index(rank)
        self.engine = build_reference(cfg, model_dir, dtype, self.ranks, placement.zero_stage)
        self.pad_id = _pad_id(model_dir)

    def reference_logprobs(self, samples: list[Sample]) -> list[tuple[int, list[float]]]:
        return score(self.engine, samples, self.cfg, self.ranks, self.index, self.device, self.pad_id)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over the run's optimizer steps (num_iterations x mini_batches a step):
    transformers' schedules under TRL's names, the warmup counted in steps of max_steps."""
    from transformers import get_scheduler

    per_step = cfg.num_iterations * cfg.mini_batches
    total = cfg.max_steps * per_step
    warmup = (cfg.warmup_steps if cfg.warmup_steps else round(cfg.warmup_ratio * cfg.max_steps)) * per_step
    name = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" and warmup else cfg.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


class PolicyWorker:
    def __init__(self, cfg, placement, groups, rank: int, model_dir: str, device: torch.device, dtype: torch.dtype):
        self.cfg, self.groups, self.device = cfg, groups, device
        self.dp_size, self.index = placement.num_policy, placement.policy.index(rank)
        self.engine = deepspeed_engine.build_engine(
            model_dir, _ds_config(cfg, model_dir, dtype, self.dp_size, True, placement.zero_stage), dtype,
            trainable=True,
            attention=modeling.register(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            gradient_checkpointing=cfg.gradient_checkpointing, lr_schedule=lambda opt: lr_schedule(opt, cfg),
            adapter=(lambda model: lora.wrap(model, cfg)) if cfg.use_lora else None,
            freeze_vision_tower=cfg.freeze_vision_tower)
        self.vision = modeling.vision_inputs(self.engine)  # vision-language models: images and mRoPE (None: text)
        # with LoRA the reference is the policy's own base, the adapter disabled: no second copy of the weights
        self.reference = (build_reference(cfg, model_dir, dtype, self.dp_size, placement.zero_stage)
                          if cfg.beta > 0 and not placement.reference and not cfg.use_lora else None)
        self.pad_id = _pad_id(model_dir)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def reference_logprobs(self, samples: list[Sample]) -> list[tuple[int, list[float]]]:
        """The frozen reference's logprobs, when it lives on the policy ranks (beta > 0, no reference ranks): a
        model of its own, or with LoRA the policy with its adapter disabled."""
        if self.reference is None:
            with self.model.disable_adapter():
                return score(self.engine, samples, self.cfg, self.dp_size, self.index, self.device, self.pad_id)
        return score(self.reference, samples, self.cfg, self.dp_size, self.index, self.device, self.pad_id)

    def micro_batches(self, samples: list[Sample]) -> list[list[MicroBatch]]:
        """This rank's micro-batches of each mini-batch of the step, on the device, with their loss weights."""
        cfg = self.cfg
        out = []
        for mini in _plan(samples, cfg, self.dp_size, cfg.mini_batches).micro:
            weights = batch.loss_weights(samples, mini, cfg.loss_type, mask_truncated=cfg.mask_truncated_completions,
                                         max_completion_length=cfg.max_completion_length)[self.index]
            out.append([batch.build([samples[i] for i in indices] or [batch.filler(self.pad_id)], self.device,
                                    packed=cfg.padding_free, pad_id=self.pad_id,
                                    mask_truncated=cfg.mask_truncated_completions, loss_weights=w or [0.0],
                                    vision=self.vision)
                        for indices, w in zip(mini[self.index], weights)])
        return out

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """num_iterations passes over the step's batch (every rank has all of it and trains on its planned share),
        one optimizer step per mini-batch; metrics are reduced over every policy rank. An update whose loss or
        gradient norm is NaN/inf is skipped (deepspeed_engine.step), counted in nonfinite_updates; nonfinite_step
        says whether the step had one (the trainer stops the run after max_nonfinite_in_a_row such steps)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = deepspeed_engine.learning_rate(self.engine)  # what this step's first update uses
        micro = self.micro_batches(samples)
        if cfg.num_iterations > 1 or cfg.mini_batches > 1:
            # ratios are taken against the policy before this step's first update
            self.engine.eval()
            with torch.no_grad():
                for mb in (mb for mini in micro for mb in mini):
                    mb.old_logp = modeling.token_logprobs(self.engine, mb, cfg.temperature)[0]
        self.engine.train()
        sums = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        maxima = torch.zeros(3, dtype=torch.float64, device=self.device)
        later = torch.tensor([1.0] * EVERY_PASS + [0.0] * (len(STATS) - EVERY_PASS), dtype=torch.float64,
                             device=self.device)
        skipped = 0  # updates whose loss or gradient norm was NaN/inf: the same count on every policy rank
        for iteration in range(cfg.num_iterations):
            for mini in micro:
                for mb in mini:
                    stats, peaks = self._micro_step(mb)
                    sums += stats if iteration == 0 else stats * later
                    if iteration == 0:
                        maxima = torch.maximum(maxima, peaks)
                skipped += not deepspeed_engine.step(self.engine)
        dist.all_reduce(sums, group=self.groups.policy)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.groups.policy)
        r = dict(zip(STATS, sums.tolist()))
        max_ratio, max_diff, fresh_diff = maxima.tolist()
        fresh = ({"mismatch/lag0_tokens": r["fresh_tokens"], "mismatch/lag0_logprob_abs_diff_max": fresh_diff}
                 if cfg.async_mode else {})
        tokens, pass_tokens = max(r["tokens"], 1.0), max(r["pass_tokens"], 1.0)
        grad_norm = deepspeed_engine.grad_norm(self.engine)
        train_s = time.perf_counter() - t0
        memory = {}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            memory = {"memory/policy_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "memory/device_used_gib": (total - free) / 2**30}
        return {**memory, **fresh,
                "loss": r["loss"] / (cfg.num_iterations * cfg.mini_batches), "entropy": r["entropy"] / tokens,
                "clip_fraction": r["clipped"] / pass_tokens, "kl": r["kl"] / tokens, "grad_norm": grad_norm,
                "lr": lr,
                "micro_batches": float(sum(len(mini) for mini in micro)),
                "mismatch/logprob_abs_diff_mean": r["abs_diff"] / tokens, "mismatch/logprob_abs_diff_max": max_diff,
                "mismatch/kl": r["mismatch_kl"] / tokens, "mismatch/max_ratio": max_ratio,
                "nonfinite_updates": float(skipped), "nonfinite_step": float(skipped > 0),
                "train_s": train_s, "train_tokens_per_s": r["tokens"] / train_s}

    def _micro_step(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        share, sums, peaks = micro_loss(self.engine, mb, self.cfg)
        # DeepSpeed averages gradients over the policy ranks; the shares already sum to the mini-batch's loss
        deepspeed_engine.backward(self.engine, share * self.dp_size)
        return sums, peaks

    @torch.no_grad()
    def score_sequences(self, prompts: list[list[int]], completions: list[list[int]], images: list | None = None):
        """Teacher-forced logprobs and argmax tokens of given completions (the sync check's reference); every
        policy rank calls this with the same sequences. images: each prompt's batch.Images (vision-language)."""
        self.engine.eval()
        images = images or [None] * len(prompts)
        samples = [Sample(p, c, [0.0] * len(c), images=i) for p, c, i in zip(prompts, completions, images)]
        out: list = [None] * len(samples)
        for indices in _plan(samples, self.cfg, 1, 1).rank(0)[0]:
            mb = batch.build([samples[i] for i in indices], self.device, packed=self.cfg.padding_free,
                             pad_id=self.pad_id, vision=self.vision)
            logits = modeling.logits_at_targets(self.engine, mb)
            logp, _ = algorithm.token_logprobs(logits, mb.targets)
            for i, tokens, values in zip(indices, batch.split(logits.argmax(-1), mb.lengths),
                                         batch.split(logp, mb.lengths)):
                out[i] = ([int(t) for t in tokens], values)
        return out
