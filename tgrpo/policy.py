"""The policy rank: token logprobs of the rollout batch, the clipped GRPO loss, a ZeRO-3 optimizer step.

Every policy rank runs the same number of micro-batches (ZeRO-3 gathers are collectives), which the config's
divisibility check guarantees.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from tgrpo import algorithm, deepspeed_engine


def collate(samples, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded completions: every completion starts at the same column, so the model
    only needs logits for the last C+1 positions. Positions count real tokens only, as vLLM sees them.
    completion_mask is 1 on the tokens that count: the model's own, not padding and not a tool's output."""
    P = max(len(s.prompt_ids) for s in samples)
    C = max(len(s.completion_ids) for s in samples)
    B = len(samples)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    comp_mask = torch.zeros((B, C), dtype=torch.float32)
    rollout_logp = torch.zeros((B, C), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids[i, P - p:P] = torch.tensor(s.prompt_ids)
        ids[i, P:P + c] = torch.tensor(s.completion_ids)
        attn[i, P - p:P + c] = 1
        mask = getattr(s, "completion_mask", None)
        comp_mask[i, :c] = 1 if mask is None else torch.tensor(mask, dtype=torch.float32)
        rollout_logp[i, :c] = torch.tensor(s.rollout_logprobs)
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    extra = {}
    for attr, key in (("ref_logprobs", "ref_logp"), ("old_logprobs", "old_logp")):
        if all(getattr(s, attr, None) is not None for s in samples):
            values = torch.zeros((B, C), dtype=torch.float32)
            for i, s in enumerate(samples):
                values[i, :len(getattr(s, attr))] = torch.tensor(getattr(s, attr))
            extra[key] = values
    extra["truncated"] = torch.tensor([float(getattr(s, "truncated", False)) for s in samples])
    batch = {**extra, "input_ids": ids, "attention_mask": attn, "position_ids": positions, "completion_mask": comp_mask,
             "completion_ids": ids[:, P:], "rollout_logp": rollout_logp,
             "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32)}
    return {k: v.to(device) for k, v in batch.items()}


def forward_logits(model, batch: dict, temperature: float) -> torch.Tensor:
    """Logits predicting each completion token, divided by the sampling temperature as vLLM's were."""
    C = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False)
    return out.logits[:, :-1].float() / temperature


@torch.no_grad()
def sequence_logprobs(model, samples: list, micro_batch_size: int, pad_id: int, device: torch.device,
                      temperature: float) -> list[list[float]]:
    """Each sample's completion token logprobs under model, without gradients."""
    out = []
    for i in range(0, len(samples), micro_batch_size):
        chunk = samples[i:i + micro_batch_size]
        batch = collate(chunk, pad_id, device)
        logp = algorithm.token_logprobs(forward_logits(model, batch, temperature), batch["completion_ids"])
        out.extend(logp[j, :len(s.completion_ids)].tolist() for j, s in enumerate(chunk))
    return out


def _ds_config(cfg, model_dir: str, dtype: torch.dtype, samples_per_rank: int, dp_size: int) -> dict:
    from transformers import AutoConfig

    return deepspeed_engine.load_config(cfg.deepspeed_config, cfg, bf16=dtype == torch.bfloat16,
                                        samples_per_rank=samples_per_rank, dp_size=dp_size,
                                        hidden_size=AutoConfig.from_pretrained(model_dir).hidden_size)


class ReferenceWorker:
    """The frozen reference on ranks of its own: ZeRO-3 over the reference group, logprobs for its slice."""

    def __init__(self, cfg, placement, model_dir: str, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer

        self.cfg, self.device = cfg, device
        per_rank = cfg.prompts_per_step * cfg.num_generations // len(placement.reference)
        ds_config = _ds_config(cfg, model_dir, dtype, per_rank, len(placement.reference))
        self.engine = deepspeed_engine.build_engine(model_dir, ds_config, dtype, trainable=False)
        self.pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0

    def reference_logprobs(self, samples: list) -> list[list[float]]:
        return sequence_logprobs(self.engine, samples, self.cfg.micro_batch_size, self.pad_id, self.device,
                                 self.cfg.temperature)


class PolicyWorker:
    def __init__(self, cfg, placement, groups, model_dir: str, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer

        self.cfg, self.groups, self.device = cfg, groups, device
        self.dp_size = placement.num_policy
        samples_per_rank = cfg.prompts_per_step * cfg.num_generations // self.dp_size
        # one optimizer step per mini-batch: DeepSpeed accumulates over a mini-batch's micro-batches
        ds_config = _ds_config(cfg, model_dir, dtype, samples_per_rank // cfg.mini_batches, self.dp_size)
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.engine = deepspeed_engine.build_engine(
            model_dir, ds_config, dtype, trainable=True, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            gradient_checkpointing=cfg.gradient_checkpointing)
        self.reference = (deepspeed_engine.build_engine(model_dir, ds_config, dtype, trainable=False)
                          if cfg.beta > 0 and not placement.reference else None)
        self.pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def reference_logprobs(self, samples: list) -> list[list[float]]:
        """The frozen reference's logprobs, when it lives on the policy ranks (beta > 0, no reference ranks)."""
        return sequence_logprobs(self.reference, samples, self.cfg.micro_batch_size, self.pad_id, self.device,
                                 self.cfg.temperature)

    def train_step(self, all_samples: list, my_samples: list) -> dict[str, float]:
        """num_iterations passes over this rank's samples, one optimizer step per mini-batch; metrics are reduced
        over every policy rank. all_samples (the whole batch, which every rank has) sizes the loss normalisers."""
        cfg = self.cfg
        t0 = time.perf_counter()
        per_mini = len(my_samples) // cfg.mini_batches
        if cfg.num_iterations > 1 or cfg.mini_batches > 1:
            # ratios are taken against the policy before this step's first update
            self.engine.eval()
            for s, lp in zip(my_samples, sequence_logprobs(self.engine, my_samples, cfg.micro_batch_size, self.pad_id,
                                                           self.device, cfg.temperature)):
                s.old_logprobs = lp
        self.engine.train()
        totals = [self._minibatch_totals(all_samples, j) for j in range(cfg.mini_batches)]
        # token-weighted sums, reduced over the policy group at the end
        names = ["loss", "entropy", "clipped", "kl", "abs_diff", "mismatch_kl", "tokens", "pass_tokens"]
        sums = dict.fromkeys(names, 0.0)
        max_ratio = max_diff = 0.0
        for iteration in range(cfg.num_iterations):
            for j in range(cfg.mini_batches):
                mine = my_samples[j * per_mini:(j + 1) * per_mini]
                micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
                for chunk in micro:
                    stats = self._micro_step(chunk, totals[j], len(micro) * self.dp_size)
                    for key in ("loss", "clipped", "pass_tokens"):
                        sums[key] += stats[key]
                    if iteration == 0:
                        for key in ("entropy", "kl", "abs_diff", "mismatch_kl", "tokens"):
                            sums[key] += stats[key]
                        max_ratio, max_diff = max(max_ratio, stats["max_ratio"]), max(max_diff, stats["max_diff"])
        # on the device: NCCL reduces nothing else
        reduced = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=self.device)
        maxima = torch.tensor([max_ratio, max_diff], dtype=torch.float64, device=self.device)
        dist.all_reduce(reduced, group=self.groups.policy)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.groups.policy)
        r = dict(zip(names, reduced.tolist()))
        tokens, pass_tokens = max(r["tokens"], 1.0), max(r["pass_tokens"], 1.0)
        train_s = time.perf_counter() - t0
        memory = {}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            memory = {"memory/policy_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "memory/device_used_gib": (total - free) / 2**30}
        return {**memory,
            "loss": r["loss"] / (cfg.num_iterations * cfg.mini_batches), "entropy": r["entropy"] / tokens,
            "clip_fraction": r["clipped"] / pass_tokens, "kl": r["kl"] / tokens,
            "grad_norm": deepspeed_engine.grad_norm(self.engine),
            "mismatch/logprob_abs_diff_mean": r["abs_diff"] / tokens, "mismatch/logprob_abs_diff_max": maxima[1].item(),
            "mismatch/kl": r["mismatch_kl"] / tokens, "mismatch/max_ratio": maxima[0].item(),
            "train_s": train_s, "train_tokens_per_s": r["tokens"] / train_s,
        }

    def _minibatch_totals(self, all_samples: list, j: int) -> tuple[int, int]:
        """Counted tokens and sequences of global mini-batch j: the j-th mini-batch of every rank's slice."""
        from tgrpo.data import rank_slice

        tokens = seqs = 0
        for i in range(self.dp_size):
            part = rank_slice(all_samples, i, self.dp_size)
            per_mini = len(part) // self.cfg.mini_batches
            for s in part[j * per_mini:(j + 1) * per_mini]:
                seqs += 1
                if not (self.cfg.mask_truncated_completions and s.truncated):
                    mask = getattr(s, "completion_mask", None)
                    tokens += len(s.completion_ids) if mask is None else sum(mask)
        return max(tokens, 1), seqs

    def _micro_step(self, chunk: list, totals: tuple[int, int], num_micro: int) -> dict[str, float]:
        cfg = self.cfg
        batch = collate(chunk, self.pad_id, self.device)
        mask = batch["completion_mask"]
        if cfg.mask_truncated_completions:
            mask = mask * (1.0 - batch["truncated"])[:, None]
        logits = forward_logits(self.engine, batch, cfg.temperature)
        logp = algorithm.token_logprobs(logits, batch["completion_ids"])
        with torch.no_grad():
            entropy = algorithm.entropy_from_logits(logits)
        del logits
        old_logp = batch.get("old_logp", logp.detach())
        rollout_logp = batch["rollout_logp"]
        is_weights = algorithm.truncated_is_weights(old_logp, rollout_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
        per_token, stats = algorithm.policy_loss(
            logp, old_logp, batch["advantages"], mask, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            dual_clip=cfg.dual_clip, ref_logp=batch.get("ref_logp"), beta=0.0 if cfg.kl_in_reward else cfg.beta,
            kl_estimator=cfg.kl_estimator, is_weights=is_weights)
        share = algorithm.aggregate_loss(per_token, mask, cfg.loss_type, total_tokens=totals[0],
                                         total_seqs=totals[1], max_completion_length=cfg.max_completion_length,
                                         num_micro_batches=num_micro)
        # DeepSpeed divides by the accumulation steps and averages over ranks; the shares already sum to the
        # mini-batch's loss, so undo both.
        self.engine.backward(share * self.grad_accum * self.dp_size)
        self.engine.step()
        with torch.no_grad():
            real = batch["completion_mask"]  # mismatch is measured on every token the model generated
            log_ratio = (old_logp - rollout_logp) * real
            return {
                "loss": float(share), "entropy": float((entropy * mask).sum()),
                "clipped": float((stats["clipped"] * mask).sum()), "pass_tokens": float(mask.sum()),
                "kl": float((stats["kl"] * mask).sum()) if "kl" in stats else 0.0,
                "abs_diff": float(log_ratio.abs().sum()), "max_diff": float(log_ratio.abs().max()),
                "mismatch_kl": float((algorithm.kl_penalty(old_logp, rollout_logp, "k3") * real).sum()),
                "max_ratio": float((torch.exp(log_ratio) * real).max()), "tokens": float(real.sum()),
            }

    @torch.no_grad()
    def score_sequences(self, prompts: list[list[int]], completions: list[list[int]]):
        """Teacher-forced logprobs and argmax tokens of given completions (the sync check's reference)."""
        from types import SimpleNamespace

        self.engine.eval()
        samples = [SimpleNamespace(prompt_ids=p, completion_ids=c, rollout_logprobs=[0.0] * len(c), advantage=0.0)
                   for p, c in zip(prompts, completions)]
        batch = collate(samples, self.pad_id, self.device)
        logits = forward_logits(self.engine, batch, 1.0)
        logp = algorithm.token_logprobs(logits, batch["completion_ids"])
        argmax = logits.argmax(-1)
        return [(argmax[i, :len(c)].tolist(), logp[i, :len(c)].tolist()) for i, c in enumerate(completions)]
