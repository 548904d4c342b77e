"""GRPO maths as pure torch functions: log-probs, advantages, KL estimators, the clipped loss and its normalisers.

Shapes: B sequences, T completion tokens, V vocabulary. `mask` is 1 on completion tokens that count, 0 on padding.
Nothing here talks to other processes: `aggregate_loss` takes the global counts it needs as arguments.
"""
from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log softmax(logits)[token_ids], [B,T,V] x [B,T] -> [B,T] float32.

    One sequence at a time, so only one [T,V] float32 copy of bf16 logits is alive at once (as TRL's
    selective_log_softmax); a full `log_softmax` would materialise a second [B,T,V] tensor.
    """
    rows = []
    for row_logits, row_ids in zip(logits, token_ids):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per token, [B,T,V] -> [B,T] float32, one sequence at a time to bound memory."""
    rows = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(rows)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Reward minus its group's mean, optionally divided by a reward std, [N*G] -> [N*G] float32.

    `rewards` holds consecutive groups of `group_size` completions of one prompt. scale "group" divides by the
    group's (unbiased) std, "batch" by the std of all rewards, "none" not at all (Dr. GRPO). A group whose rewards
    are all equal gets advantage 0 (hence `eps` rather than a division by zero).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale '{scale}': choose from {ADVANTAGE_SCALES}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be flat with a length that is a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (grouped.std() + eps)
    return advantages.view(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy (Schulman, "Approximating KL divergence").

    k1 = log r' with r' = pi/ref (unbiased, can be negative); k2 = (log r')^2 / 2 (low variance, biased);
    k3 = r - log r - 1 with r = ref/pi (unbiased and always >= 0).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        log_r = ref_logp - logp
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"unknown KL estimator '{estimator}': choose from {KL_ESTIMATORS}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss per token, [B,T], and detached per-token stats "ratio", "clipped" (and "kl").

    pg = max(-A r, -A clip(r, 1 - epsilon_low, 1 + epsilon_high)) with r = exp(logp - old_logp) and A the
    sequence's advantage. With `dual_clip` = c > 1, a negative-advantage token's loss is capped at -A c, so one
    huge ratio cannot dominate (verl / OpenRLHF). `is_weights` (truncated importance weights of the rollout engine
    versus the trainer) scale pg; beta * KL(policy || ref) is added when beta != 0 and ref_logp is given.

    Where mask is 0 the log-ratios are zeroed before `exp`, so padding gives exactly 0 loss, 0 gradient and never
    inf/nan, whatever log-probs it holds.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.to(logp.dtype).unsqueeze(-1)

    ratio = torch.exp(torch.where(valid, logp - old_logp, zero))
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if is_weights is not None:
        pg = pg * is_weights.detach()

    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    stats = {"ratio": ratio.detach(), "clipped": clipped.float()}
    loss = pg
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(valid, ref_logp, logp), kl_estimator)
        stats["kl"] = kl.detach()
        if beta != 0:
            loss = loss + beta * kl
    return torch.where(valid, loss, zero), stats


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    total_tokens: int,
    total_seqs: int,
    max_completion_length: int,
    num_micro_batches: int,
) -> Tensor:
    """This micro-batch's share of the global batch loss: the shares of all micro-batches of all ranks sum to it.

    total_tokens (sum of mask), total_seqs and num_micro_batches count the whole global batch, so every normaliser
    is global and summing shares is exact. Loss types as TRL defines them:
      dapo:    sum(l m) / total_tokens                          (token mean over the batch)
      grpo:    sum_i [sum_t (l m)_i / sum_t m_i] / total_seqs   (sequence mean, then mean over sequences)
      dr_grpo: sum(l m) / (total_seqs * max_completion_length)  (constant normaliser, no length bias)
      bnpo:    [sum(l m) / sum(m)] / num_micro_batches          (token mean within a micro-batch, averaged)
    A data-parallel engine that averages gradients over ranks needs the share multiplied by the world size.
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "dapo":
        return masked.sum() / max(1, total_tokens)
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / total_seqs
    if loss_type == "dr_grpo":
        return masked.sum() / (total_seqs * max_completion_length)
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) / num_micro_batches
    raise ValueError(f"unknown loss_type '{loss_type}': choose from {LOSS_TYPES}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is 1 (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def truncated_is_weights(trainer_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """min(pi_trainer / pi_rollout, cap), detached.

    vLLM samples with slightly different numerics than the trainer, so the tokens are off-policy by that mismatch;
    reweighting by the ratio corrects it, and the cap bounds the variance a rare large ratio would bring.
    """
    with torch.no_grad():
        return torch.exp(trainer_logp - rollout_logp).clamp(max=cap)
