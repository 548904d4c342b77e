"""GRPO maths as pure torch functions: log-probs, advantages, KL estimators, the clipped loss and its normalisers.

Shapes: B sequences, T completion tokens, V vocabulary ([B,T] tensors may also be the flat [N] completion tokens of
a packed micro-batch). `mask` is 1 on completion tokens that count, 0 elsewhere. Nothing here talks to other
processes: the loss normalisers take the global counts they need as arguments.
"""
from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")


CHUNK_ELEMENTS = 1 << 26  # float32 elements of one row chunk of logits (256 MiB): bounds the softmax's memory
FUSED_CHUNK_ELEMENTS = 1 << 28  # logits elements per call of the compiled kernels (their float32 stays in registers)


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0,
                   entropy: bool = False, fused: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature)[token_ids] and, if asked, the softmax's entropy (no gradient),
    [..., V] x [...] -> [...] float32.

    Two ways to the same numbers, neither making the batch's full-vocabulary float32 logits (16k tokens x 152k
    vocabulary would be 10 GB, twice):
    - fused (default on GPU): torch.compile'd kernels read the logits' rows once or twice per pass, the float32
      softmax staying in registers; the backward writes the gradient of the logits in one pass;
    - chunked (CPU, or if compiling fails): a float32 copy of a chunk of rows at a time, worked on in place.
    """
    shape = token_ids.shape
    flat, ids = logits.reshape(-1, logits.shape[-1]), token_ids.reshape(-1)
    if fused is None:
        fused = logits.is_cuda and _compiled is not False
    out = None
    if fused:
        out = _fused(flat, ids, 1.0 / temperature, entropy)
    if out is None:
        out = _SelectedLogSoftmax.apply(flat, ids, 1.0 / temperature, entropy, False)
    logp, ent = out
    return logp.view(shape), (ent.view(shape) if entropy else None)


_compiled = None  # the compiled (forward, backward) once made; False when compiling failed here


def _fused(logits: Tensor, ids: Tensor, inv_temp: float, entropy: bool):
    """The fused path, or None (after one warning) where torch.compile cannot build its kernels."""
    global _compiled
    if _compiled is None:
        _compiled = (torch.compile(_fused_forward, dynamic=True), torch.compile(_fused_backward, dynamic=True))
    try:
        return _SelectedLogSoftmax.apply(logits, ids, inv_temp, entropy, True)
    except Exception as e:  # noqa: BLE001 - a missing compiler or an unsupported device: the chunked path is exact
        if _compiled is False or not _is_compile_error(e):
            raise
        _compiled = False
        import warnings

        warnings.warn(f"torch.compile could not build the fused log-softmax ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using the chunked one, slower on GPU")
        return None


def _is_compile_error(e: Exception) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")) or isinstance(
        e, (OSError, ImportError, RuntimeError)) and "compile" in str(e).lower()


def _fused_forward(logits: Tensor, ids: Tensor, inv_temp: float, entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    x = logits.float() * inv_temp
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, ids[:, None]).squeeze(-1) - lse
    if not entropy:
        return logp, lse, lse.new_empty(0)
    ent = lse - (torch.exp(x - lse[:, None]) * x).sum(-1)  # H = -sum p log p = lse - sum p x
    return logp, lse, ent


def _fused_backward(logits: Tensor, ids: Tensor, lse: Tensor, grad_logp: Tensor, inv_temp: float) -> Tensor:
    x = logits.float() * inv_temp
    onehot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == ids[:, None]
    d = (onehot.float() - torch.exp(x - lse[:, None])) * (grad_logp[:, None] * inv_temp)
    return d.to(logits.dtype)


def _eager_forward(logits: Tensor, ids: Tensor, inv_temp: float, entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The chunked path's forward of a chunk: one float32 copy of its rows, worked on in place."""
    x = _scaled(logits, inv_temp)
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, ids[:, None]).squeeze(-1) - lse
    if not entropy:
        return logp, lse, lse.new_empty(0)
    x.sub_(lse[:, None])  # H = -sum(p log p), log p = x - lse
    return logp, lse, -torch.bmm(x.exp().unsqueeze(1), x.unsqueeze(2)).view(-1)


def _eager_backward(logits: Tensor, ids: Tensor, lse: Tensor, grad_logp: Tensor, inv_temp: float) -> Tensor:
    # d logp / d x = onehot(id) - softmax(x), and x = logits * inv_temp
    g = grad_logp[:, None]
    d = _scaled(logits, inv_temp).sub_(lse[:, None]).exp_().mul_(-g)
    d.scatter_add_(-1, ids[:, None], g)
    return d.mul_(inv_temp) if inv_temp != 1.0 else d


class _SelectedLogSoftmax(torch.autograd.Function):
    """Row chunks through a forward and a backward kernel: the compiled ones (fused, FUSED_CHUNK_ELEMENTS a chunk,
    bounding memory even where the compiler keeps a float32 intermediate) or the eager in-place ones (CHUNK_ELEMENTS
    float32 values a chunk). Either reads the logits a few times per pass, as a fused cross-entropy would."""

    @staticmethod
    def _kernels(fused: bool):
        return (*_compiled, FUSED_CHUNK_ELEMENTS) if fused else (_eager_forward, _eager_backward, CHUNK_ELEMENTS)

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, inv_temp: float, entropy: bool, fused: bool):
        forward, _, elements = _SelectedLogSoftmax._kernels(fused)
        rows = max(1, elements // logits.shape[-1])
        parts = [forward(logits[s:s + rows], ids[s:s + rows], inv_temp, entropy)
                 for s in range(0, logits.shape[0], rows)]
        logp, lse, ent = (torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts))
        ctx.save_for_backward(logits, ids, lse)
        ctx.inv_temp, ctx.fused = inv_temp, fused
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        _, backward, elements = _SelectedLogSoftmax._kernels(ctx.fused)
        logits, ids, lse = ctx.saved_tensors
        rows = max(1, elements // logits.shape[-1])
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            grad[s:s + rows] = backward(logits[s:s + rows], ids[s:s + rows], lse[s:s + rows],
                                        grad_logp[s:s + rows].contiguous(), ctx.inv_temp)
        return grad, None, None, None, None


def _scaled(logits: Tensor, inv_temp: float) -> Tensor:
    """A float32 copy of logits * inv_temp, safe to change in place."""
    x = logits.to(torch.float32, copy=True)
    return x.mul_(inv_temp) if inv_temp != 1.0 else x


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
    sequence's advantage (per sequence [B], or per token, shaped as logp). With `dual_clip` = c > 1, a negative-advantage token's loss is capped at -A c, so one
    huge ratio cannot dominate (verl / OpenRLHF). `is_weights` (truncated importance weights of the rollout engine
    versus the trainer) scale pg; beta * KL(policy || ref) is added when beta != 0 and ref_logp is given.

    Where mask is 0 the log-ratios are zeroed before `exp`, so padding gives exactly 0 loss, 0 gradient and never
    inf/nan, whatever log-probs it holds.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.to(logp.dtype)
    if adv.dim() < logp.dim():  # one advantage per sequence: the same for each of its tokens
        adv = adv.unsqueeze(-1)

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


def token_loss_weights(loss_type: str, counts: list[int], *, total_tokens: int, total_seqs: int,
                       max_completion_length: int, num_micro_batches: int) -> list[float]:
    """The weight of each counted token of each sequence of one micro-batch (counts: its counted tokens per
    sequence), such that sum(loss * mask * weight) over every micro-batch of every rank is the batch's loss.

    total_tokens, total_seqs and num_micro_batches count the whole global batch, so every normaliser is global and
    the micro-batches' shares add up exactly whatever the packing. Loss types as TRL defines them:
      dapo:    sum(l m) / total_tokens                          (token mean over the batch)
      grpo:    sum_i [sum_t (l m)_i / sum_t m_i] / total_seqs   (sequence mean, then mean over sequences)
      dr_grpo: sum(l m) / (total_seqs * max_completion_length)  (constant normaliser, no length bias)
      bnpo:    [sum(l m) / sum(m)] / num_micro_batches          (token mean within a micro-batch, averaged)
    """
    if loss_type == "dapo":
        return [1.0 / max(1, total_tokens)] * len(counts)
    if loss_type == "grpo":
        return [1.0 / (max(1, c) * total_seqs) for c in counts]
    if loss_type == "dr_grpo":
        return [1.0 / (total_seqs * max_completion_length)] * len(counts)
    if loss_type == "bnpo":
        return [1.0 / (max(1, sum(counts)) * num_micro_batches)] * len(counts)
    raise ValueError(f"unknown loss_type '{loss_type}': choose from {LOSS_TYPES}")


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
    """This [B,T] micro-batch's share of the global batch loss (token_loss_weights): the shares of all
    micro-batches of all ranks sum to it. A data-parallel engine that averages gradients over ranks needs the share
    multiplied by the world size."""
    mask = mask.to(per_token_loss.dtype)
    counts = [int(c) for c in mask.sum(-1).tolist()]
    weights = token_loss_weights(loss_type, counts, total_tokens=total_tokens, total_seqs=total_seqs,
                                 max_completion_length=max_completion_length, num_micro_batches=num_micro_batches)
    w = torch.tensor(weights, dtype=per_token_loss.dtype, device=per_token_loss.device)
    return (per_token_loss * mask * w.unsqueeze(-1)).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is 1 (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def mismatch_kl(trainer_logp: Tensor, rollout_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_rollout || pi_trainer) from tokens that the rollout engine sampled:
    r - log r - 1 with r = pi_trainer / pi_rollout (E_rollout[r] = 1, so its mean is the KL; verl's rollout-correction
    metrics use the same)."""
    log_r = trainer_logp - rollout_logp
    return torch.exp(log_r) - log_r - 1


def truncated_is_weights(trainer_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """min(pi_trainer / pi_rollout, cap), detached.

    vLLM samples with slightly different numerics than the trainer, so the tokens are off-policy by that mismatch;
    reweighting by the ratio corrects it, and the cap bounds the variance a rare large ratio would bring.
    """
    with torch.no_grad():
        return torch.exp(trainer_logp - rollout_logp).clamp(max=cap)


# --- PPO with a critic (advantage_estimator: gae) ----------------------------------------------------------------

def token_rewards(reward: float, model_mask: list[int], kl: list[float] | None = None,
                  kl_coef: float = 0.0) -> list[float]:
    """A completion's per-token rewards: the outcome reward on its last model token, minus kl_coef times each model
    token's KL to the reference (k1, when kl is given); tool tokens get none."""
    out = [0.0] * len(model_mask)
    if kl is not None and kl_coef:
        out = [-kl_coef * k * m for k, m in zip(kl, model_mask)]
    last = max((i for i, m in enumerate(model_mask) if m), default=None)
    if last is not None:
        out[last] += reward
    return out


def gae(rewards: list[float], values: list[float], model_mask: list[int], gamma: float,
        lam: float) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one completion's model tokens (Schulman et al. 2016): with d_t =
    r_t + gamma V_{t+1} - V_t, A_t = d_t + gamma lam A_{t+1}, and returns R_t = A_t + V_t; the value after the last
    model token is 0. The recursion runs over the model's tokens only: a tool's tokens between two turns are
    skipped (the next model token is the next step), not zeroed into it. Tool tokens get advantage and return 0."""
    steps = [i for i, m in enumerate(model_mask) if m]
    advantages, returns = [0.0] * len(model_mask), [0.0] * len(model_mask)
    running, next_value = 0.0, 0.0
    for i in reversed(steps):
        delta = rewards[i] + gamma * next_value - values[i]
        running = delta + gamma * lam * running
        advantages[i], returns[i] = running, running + values[i]
        next_value = values[i]
    return advantages, returns


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalisation); the rest stay 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per token, 0.5 max((V - R)^2, (V_clipped - R)^2) with V_clipped = V_old +
    clip(V - V_old, -clip, clip), and whether the clipped term was the larger (the clip fraction)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(values)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1.0 - var_d / var_r) if float(var_r) > 0 else 0.0


class KLController:
    """The coefficient of the KL penalty in the reward. fixed: beta throughout. adaptive (Ziegler et al. 2019, as
    in verl and TRL's PPO): after each step, with the batch's mean KL per token, beta *= 1 + clip(kl / target - 1,
    -0.2, 0.2) * n / horizon, n the step's samples."""

    def __init__(self, kind: str, beta: float, target: float, horizon: int):
        self.kind, self.value, self.target, self.horizon = kind, beta, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.kind != "adaptive":
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
