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
    only needs logits for the last C+1 positions. Positions count real tokens only, as vLLM sees them."""
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
        comp_mask[i, :c] = 1
        rollout_logp[i, :c] = torch.tensor(s.rollout_logprobs)
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    extra = {}
    if all(getattr(s, "ref_logprobs", None) is not None for s in samples):
        ref = torch.zeros((B, C), dtype=torch.float32)
        for i, s in enumerate(samples):
            ref[i, :len(s.ref_logprobs)] = torch.tensor(s.ref_logprobs)
        extra["ref_logp"] = ref
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

    @torch.no_grad()
    def logprobs(self, samples: list) -> list[list[float]]:
        out = []
        size = self.cfg.micro_batch_size
        for i in range(0, len(samples), size):
            chunk = samples[i:i + size]
            batch = collate(chunk, self.pad_id, self.device)
            logp = algorithm.token_logprobs(forward_logits(self.engine, batch, self.cfg.temperature),
                                            batch["completion_ids"])
            out.extend(logp[j, :len(s.completion_ids)].tolist() for j, s in enumerate(chunk))
        return out


class PolicyWorker:
    def __init__(self, cfg, placement, groups, model_dir: str, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer

        self.cfg, self.groups, self.device = cfg, groups, device
        self.dp_size = placement.num_policy
        samples_per_rank = cfg.prompts_per_step * cfg.num_generations // self.dp_size
        ds_config = _ds_config(cfg, model_dir, dtype, samples_per_rank, self.dp_size)
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

    def train_step(self, all_samples: list, my_samples: list) -> dict[str, float]:
        """One optimizer step on this rank's samples; returns metrics averaged over every policy rank."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.engine.train()
        total_tokens = sum(len(s.completion_ids) for s in all_samples)
        micro = [my_samples[i:i + cfg.micro_batch_size] for i in range(0, len(my_samples), cfg.micro_batch_size)]
        num_micro = len(micro) * self.dp_size
        # token sums, reduced over the policy group at the end
        sums = torch.zeros(7, dtype=torch.float64)
        for chunk in micro:
            batch = collate(chunk, self.pad_id, self.device)
            mask = batch["completion_mask"]
            logits = forward_logits(self.engine, batch, cfg.temperature)
            logp = algorithm.token_logprobs(logits, batch["completion_ids"])
            with torch.no_grad():
                entropy = algorithm.entropy_from_logits(logits)
            del logits
            ref_logp = batch.get("ref_logp")
            if ref_logp is None and self.reference is not None:
                with torch.no_grad():
                    ref_logp = algorithm.token_logprobs(forward_logits(self.reference, batch, cfg.temperature),
                                                        batch["completion_ids"])
            per_token, stats = algorithm.policy_loss(
                logp, logp.detach(), batch["advantages"], mask, epsilon_low=cfg.epsilon,
                epsilon_high=cfg.epsilon_high, ref_logp=ref_logp, beta=cfg.beta, kl_estimator=cfg.kl_estimator)
            share = algorithm.aggregate_loss(per_token, mask, cfg.loss_type, total_tokens=total_tokens,
                                             total_seqs=len(all_samples),
                                             max_completion_length=cfg.max_completion_length,
                                             num_micro_batches=num_micro)
            # DeepSpeed divides by the accumulation steps and averages over ranks; the shares already sum to the
            # batch loss, so undo both.
            self.engine.backward(share * self.grad_accum * self.dp_size)
            self.engine.step()
            with torch.no_grad():
                diff = (logp.detach() - batch["rollout_logp"]) * mask
                sums += torch.tensor([
                    float(share), float((entropy * mask).sum()), float((stats["clipped"] * mask).sum()),
                    float((stats["kl"] * mask).sum()) if "kl" in stats else 0.0, float(diff.abs().sum()),
                    float(mask.sum()), float(diff.abs().max())], dtype=torch.float64)
        max_diff = sums[6].clone()
        dist.all_reduce(sums, group=self.groups.policy)
        dist.all_reduce(max_diff, op=dist.ReduceOp.MAX, group=self.groups.policy)
        tokens = float(sums[5])
        train_s = time.perf_counter() - t0
        return {
            "loss": float(sums[0]), "entropy": float(sums[1]) / tokens, "clip_fraction": float(sums[2]) / tokens,
            "kl": float(sums[3]) / tokens, "logprob_mismatch_mean": float(sums[4]) / tokens,
            "logprob_mismatch_max": float(max_diff), "grad_norm": deepspeed_engine.grad_norm(self.engine),
            "train_s": train_s, "train_tokens_per_s": tokens / train_s,
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
