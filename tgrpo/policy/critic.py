"""The critic of PPO (advantage_estimator: gae): a causal LM with a scalar value head (transformers'
AutoModelForTokenClassification with one label, as verl builds it), initialised from critic_model, trained with
DeepSpeed (ZeRO-3 by default) on the ranks that hold it: the policy ranks (its second engine there) or
critic_ranks of its own.

Each step, every rank holding it scores its share of the batch (the value of the state before each completion
token: the position whose logits would predict that token), every rank gets all the values, advantages and
returns are made from them everywhere alike (rollout.assign_gae), and the critic trains on the returns with the
clipped value loss, one optimizer step per mini-batch, as the policy does.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from tgrpo import algorithm, batch
from tgrpo.batch import MicroBatch, Sample
from tgrpo.policy import deepspeed_engine, modeling

STATS = ("loss", "clipped", "tokens", "values", "returns", "returns_sq", "errors", "errors_sq")


def value_schedule(optimizer: torch.optim.Optimizer, cfg):
    """critic_learning_rate with a linear warmup over critic_warmup_ratio of the run's optimizer steps, then
    constant (verl's critic.optim.lr_warmup_steps_ratio)."""
    from transformers import get_scheduler

    per_step = cfg.num_iterations * cfg.mini_batches
    warmup = round(cfg.critic_warmup_ratio * cfg.max_steps) * per_step
    return get_scheduler("constant_with_warmup" if warmup else "constant", optimizer, num_warmup_steps=warmup)


def values_at_targets(model, mb: MicroBatch) -> torch.Tensor:
    """The value head at the positions predicting each completion token, [N] float32."""
    return modeling.head_at_targets(model, mb)[:, 0].float()


class CriticWorker:
    def __init__(self, cfg, ranks: tuple[int, ...], group, rank: int, model_dir: str, device: torch.device,
                 dtype: torch.dtype, zero_stage: int):
        self.cfg, self.group, self.device = cfg, group, device
        self.ranks, self.index = len(ranks), ranks.index(rank)
        ds = deepspeed_engine.load_config(cfg.deepspeed_config, cfg, zero_stage=zero_stage, bf16=dtype == torch.bfloat16,
                                          dp_size=self.ranks, hidden_size=_hidden_size(model_dir), trainable=True)
        self.engine = deepspeed_engine.build_engine(
            model_dir, ds, dtype, trainable=True, attention=modeling.register(), lr=cfg.critic_learning_rate,
            weight_decay=cfg.weight_decay, gradient_checkpointing=cfg.gradient_checkpointing,
            lr_schedule=lambda opt: value_schedule(opt, cfg), value_head=True)
        self.vision = modeling.vision_inputs(self.engine)  # vision-language models: images and mRoPE (None: text)
        from transformers import AutoTokenizer

        self.pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0

    def _plan(self, samples: list[Sample], mini_batches: int) -> batch.Plan:
        return batch.plan([s.length for s in samples], self.ranks, mini_batches, self.cfg.max_tokens_per_micro_batch,
                          self.cfg.micro_batch_size)

    @torch.no_grad()
    def values(self, samples: list[Sample]) -> list[tuple[int, list[float]]]:
        """The values of this rank's share of the batch, (sample index, one value per completion token)."""
        self.engine.eval()
        chosen, parts = [], []
        for indices in self._plan(samples, 1).rank(self.index)[0]:
            mb = batch.build([samples[i] for i in indices] or [batch.filler(self.pad_id)], self.device,
                             packed=self.cfg.padding_free, pad_id=self.pad_id, vision=self.vision)
            v = values_at_targets(self.engine, mb)
            if indices:
                parts.append(v)
                chosen += indices
        if not parts:
            return []
        return list(zip(chosen, batch.split(torch.cat(parts), [len(samples[i].completion_ids) for i in chosen])))

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """num_iterations passes of mini_batches optimizer steps on the clipped value loss (token mean over each
        mini-batch's counted tokens); metrics reduced over the critic's ranks."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = deepspeed_engine.learning_rate(self.engine)
        micro = []
        for mini in self._plan(samples, cfg.mini_batches).micro:
            weights = batch.loss_weights(samples, mini, "dapo", mask_truncated=cfg.mask_truncated_completions,
                                         max_completion_length=cfg.max_completion_length)[self.index]
            micro.append([batch.build([samples[i] for i in indices] or [batch.filler(self.pad_id)], self.device,
                                      packed=cfg.padding_free, pad_id=self.pad_id,
                                      mask_truncated=cfg.mask_truncated_completions, loss_weights=w or [0.0],
                                      vision=self.vision)
                          for indices, w in zip(mini[self.index], weights)])
        self.engine.train()
        sums = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        skipped = 0  # updates whose loss or gradient norm was NaN/inf, as the policy counts them
        for iteration in range(cfg.num_iterations):
            for mini in micro:
                for mb in mini:
                    v = values_at_targets(self.engine, mb)
                    per_token, clipped = algorithm.value_loss(v, mb.old_values, mb.returns, cfg.value_clip)
                    share = (per_token * mb.loss_weight).sum()
                    deepspeed_engine.backward(self.engine, share * self.ranks)
                    if iteration == 0:
                        with torch.no_grad():
                            m, err = mb.loss_mask, (mb.returns - mb.old_values)
                            sums += torch.stack([share.detach(), (clipped * m).sum(), m.sum(),
                                                 (mb.old_values * m).sum(), (mb.returns * m).sum(),
                                                 (mb.returns ** 2 * m).sum(), (err * m).sum(),
                                                 (err ** 2 * m).sum()]).double()
                skipped += not deepspeed_engine.step(self.engine)
        dist.all_reduce(sums, group=self.group)
        r = dict(zip(STATS, sums.tolist()))
        n = max(r["tokens"], 1.0)
        var_returns = r["returns_sq"] / n - (r["returns"] / n) ** 2
        var_errors = r["errors_sq"] / n - (r["errors"] / n) ** 2
        return {"critic/value_loss": r["loss"] / cfg.mini_batches, "critic/clip_fraction": r["clipped"] / n,
                "critic/values_mean": r["values"] / n, "critic/returns_mean": r["returns"] / n,
                "critic/returns_std": max(var_returns, 0.0) ** 0.5,
                "critic/explained_variance": 1.0 - var_errors / var_returns if var_returns > 0 else 0.0,
                "critic/grad_norm": deepspeed_engine.grad_norm(self.engine), "critic/lr": lr,
                "critic/nonfinite_updates": float(skipped), "critic/nonfinite_step": float(skipped > 0),
                "critic/train_s": time.perf_counter() - t0}


def _hidden_size(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size
