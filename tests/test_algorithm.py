"""tgrpo.algorithm against values worked out by hand (the arithmetic is in the comments)."""
import math

import pytest
import torch
from torch.testing import assert_close

from tgrpo.algorithm import (
    aggregate_loss,
    group_advantages,
    kl_penalty,
    masked_mean,
    mismatch_kl,
    policy_loss,
    token_logprobs,
    truncated_is_weights,
)

LN2 = math.log(2.0)  # 0.6931472


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- log-probs and entropy -------------------------------------------------------------------------------------

def test_token_logprobs_uniform_is_log_one_over_v():
    logits = torch.zeros(2, 3, 4)  # V = 4, uniform
    ids = torch.tensor([[0, 1, 2], [3, 3, 0]])
    logp, entropy = token_logprobs(logits, ids, entropy=True)
    assert_close(logp, torch.full((2, 3), math.log(0.25)))  # -1.3862944
    assert_close(entropy, torch.full((2, 3), math.log(4.0)))  # 1.3862944


def test_token_logprobs_hand_example_and_float32_from_bf16():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; logits [ln 3, 0] -> [3/4, 1/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])
    ids = torch.tensor([[1, 1]])
    out, none = token_logprobs(logits, ids)
    assert none is None
    assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))  # [-0.2876821, -1.3862944]
    out_bf16, _ = token_logprobs(logits.bfloat16(), ids)
    assert out_bf16.dtype == torch.float32
    assert_close(out_bf16, out, atol=1e-2, rtol=0)
    # temperature 2: logits [0, ln 3] / 2 -> softmax [1, sqrt 3] / (1 + sqrt 3) -> p(1) = 0.6339746
    hot, _ = token_logprobs(logits[:, :1], ids[:, :1], temperature=2.0)
    assert_close(hot, torch.tensor([[math.log(0.6339746)]]))


def test_entropy_hand_example():
    # p = [1/4, 3/4]: H = 1/4 ln 4 + 3/4 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)
    _, out = token_logprobs(logits, torch.tensor([[0]]), entropy=True)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[0.5623351]]), atol=1e-2, rtol=0)
    _, exact = token_logprobs(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[0]]), entropy=True)
    assert_close(exact, torch.tensor([[0.5623351]]))


@pytest.mark.parametrize("fused,chunk", [(False, 1), (False, 3), (False, 1 << 26), (True, 3), (True, 1 << 26)])
def test_token_logprobs_chunks_match_float64_log_softmax_with_gradient(fused, chunk, monkeypatch):
    """The chunked softmax and the compiled one (GPU's default; here through torch.compile's CPU code), any chunk
    size, with a temperature, against a plain float64 log_softmax: values, entropy and the gradient of a weighted
    sum."""
    import tgrpo.algorithm as algo

    monkeypatch.setattr(algo, "FUSED_CHUNK_ELEMENTS" if fused else "CHUNK_ELEMENTS", chunk * 11)  # rows of V = 11
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 11, generator=g)).requires_grad_()
    ids = torch.randint(0, 11, (7,), generator=g)
    weights = torch.randn(7, generator=g)
    logp, ent = token_logprobs(logits, ids, temperature=0.7, entropy=True, fused=fused)
    assert algo._compiled is not False, "torch.compile failed: the fused path fell back to the chunked one"
    (logp * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref_all = torch.log_softmax(ref_logits / 0.7, -1)
    ref = ref_all.gather(-1, ids[:, None]).squeeze(-1)
    (ref * weights.double()).sum().backward()
    assert_close(logp.double(), ref, atol=1e-5, rtol=0)
    assert_close(ent.double(), -(ref_all.exp() * ref_all).sum(-1).detach(), atol=1e-5, rtol=0)
    assert_close(logits.grad.double(), ref_logits.grad, atol=1e-5, rtol=0)
    assert not ent.requires_grad


# --- advantages ------------------------------------------------------------------------------------------------

# Three groups of 3: [0,1,2] mean 1, centred [-1,0,1], unbiased std sqrt(2/2) = 1;
# [3,3,3] centred 0, std 0; [0,0,6] mean 2, centred [-2,-2,4], unbiased std sqrt(24/2) = sqrt(12) = 3.4641016.
# All nine: mean 18/9 = 2, squared deviations 4+1+0+1+1+1+4+4+16 = 32, unbiased std sqrt(32/8) = 2.
REWARDS = t(0, 1, 2, 3, 3, 3, 0, 0, 6)
CENTRED = t(-1, 0, 1, 0, 0, 0, -2, -2, 4)
EPS = 1e-4


def test_group_advantages_group_scale():
    expected = CENTRED / t(1 + EPS, 1 + EPS, 1 + EPS, EPS, EPS, EPS, *[math.sqrt(12) + EPS] * 3)
    out = group_advantages(REWARDS, 3, "group")
    assert_close(out, expected)
    assert_close(out[6:], t(-0.5773503, -0.5773503, 1.1547005), atol=1e-4, rtol=0)
    assert torch.equal(out[3:6], torch.zeros(3))  # all-equal group -> exactly 0


def test_group_advantages_batch_scale():
    assert_close(group_advantages(REWARDS, 3, "batch"), CENTRED / (2 + EPS))
    assert_close(group_advantages(REWARDS, 3, "batch", eps=0.0), t(-0.5, 0, 0.5, 0, 0, 0, -1, -1, 2))


def test_group_advantages_none_scale():
    assert torch.equal(group_advantages(REWARDS, 3, "none"), CENTRED)


def test_batch_scaled_advantages_are_those_of_the_whole_step_whatever_the_engines():
    """Two engines' groups of 4: the step's advantages come from all 16 rewards (6 ones: std
    sqrt(16 * 0.375 * 0.625 / 15) = 0.5), as on one engine; each
    engine's own std (0.5345, 0.4629) would move them by up to 0.12."""
    from tgrpo.batch import Sample
    from tgrpo.rollout.worker import assign_advantages

    engine0, engine1 = [0, 0, 0, 1, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0, 1]
    two = [Sample([1], [2], [0.0], reward=float(r)) for r in engine0 + engine1]  # gathered: engine 0's, then 1's
    assign_advantages(two, 4, "batch")
    one = group_advantages(t(*(engine0 + engine1)), 4, "batch")
    assert_close(t(*[s.advantage for s in two]), one)
    centred = t(-0.25, -0.25, -0.25, 0.75, -0.75, 0.25, 0.25, 0.25,
                -0.25, -0.25, -0.25, 0.75, -0.25, -0.25, -0.25, 0.75)
    assert_close(one, centred / (0.5 + EPS))
    per_engine = torch.cat([group_advantages(t(*engine0), 4, "batch"), group_advantages(t(*engine1), 4, "batch")])
    assert (per_engine - one).abs().max() > 0.1


def test_mismatch_kl_is_the_kl_of_the_rollout_engine_to_the_trainer_on_its_own_tokens():
    """Monte Carlo: 400k tokens drawn from a rollout distribution p far from the trainer's q. The mean of the metric
    is KL(p || q) (exact value from the distributions); the ratio the other way round (r = p / q) is not."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()  # 0.6799; the reversed ratio's expectation: 1.3295
    estimate = mismatch_kl(q.log()[tokens], p.log()[tokens]).mean().item()
    assert estimate == pytest.approx(exact, abs=0.01)
    reversed_ratio = kl_penalty(q.log()[tokens], p.log()[tokens], "k3").mean().item()  # r = p / q
    assert abs(reversed_ratio - exact) > 0.2


def test_group_advantages_errors():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3, "std")
    with pytest.raises(ValueError):
        group_advantages(REWARDS[:8], 3)
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 1)


# --- KL estimators -----------------------------------------------------------------------------------------------

def test_kl_estimators_hand_values():
    logp, ref = t(math.log(0.5), math.log(0.25)), t(math.log(0.25), math.log(0.5))
    # token 0: logp - ref = ln 2; token 1: logp - ref = -ln 2
    assert_close(kl_penalty(logp, ref, "k1"), t(LN2, -LN2))  # [0.6931472, -0.6931472]
    assert_close(kl_penalty(logp, ref, "k2"), t(0.5 * LN2 ** 2, 0.5 * LN2 ** 2))  # 0.2402265 each
    # k3 = exp(ref - logp) - (ref - logp) - 1: 0.5 + ln 2 - 1 = 0.1931472; 2 - ln 2 - 1 = 0.3068528
    assert_close(kl_penalty(logp, ref, "k3"), t(0.1931472, 0.3068528))


def test_kl_estimators_zero_when_equal_and_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 16, generator=g) * 5
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp, estimator), torch.zeros(4, 16))
    ref = -torch.rand(4, 16, generator=g) * 5
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone can go negative
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


# --- policy loss ---------------------------------------------------------------------------------------------------

# Ratios [0.5, 1.0, 1.1, 1.5] plus a padding token, epsilon_low 0.2 -> lower bound 0.8, epsilon_high 0.28 -> 1.28.
# pg = max(-A r, -A clip(r)):
#   A = +2:   [max(-1, -1.6), -2, -2.2, max(-3, -2.56)]          = [-1.0, -2.0, -2.2, -2.56] (high bound clips r=1.5)
#   A = -0.5: [max(0.25, 0.4), 0.5, 0.55, max(0.75, 0.64)]      = [0.4, 0.5, 0.55, 0.75]   (low bound clips r=0.5)
# d pg / d logp = -A r where unclipped, 0 where clipped:
#   A = +2:   [-1.0, -2.0, -2.2, 0];   A = -0.5: [0, 0.5, 0.55, 0.75]
RATIOS = [0.5, 1.0, 1.1, 1.5]


def _clip_case():
    logp = torch.tensor([[math.log(r) for r in RATIOS] + [100.0]] * 2, requires_grad=True)  # exp(100) = inf
    old = torch.zeros(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 2)
    return logp, old, t(2.0, -0.5), mask


def test_policy_loss_clips_low_and_high_with_both_signs():
    logp, old, adv, mask = _clip_case()
    loss, stats = policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    assert_close(loss, torch.tensor([[-1.0, -2.0, -2.2, -2.56, 0.0], [0.4, 0.5, 0.55, 0.75, 0.0]]))
    assert torch.equal(stats["clipped"], torch.tensor([[0.0, 0, 0, 1, 0], [1, 0, 0, 0, 0]]))
    assert_close(stats["ratio"], torch.tensor([RATIOS + [1.0]] * 2))  # padding ratio forced to 1
    assert "kl" not in stats


def test_policy_loss_gradient_zero_where_clipped():
    logp, old, adv, mask = _clip_case()
    loss, _ = policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    loss.sum().backward()
    expected = torch.tensor([[-1.0, -2.0, -2.2, 0.0, 0.0], [0.0, 0.5, 0.55, 0.75, 0.0]])
    assert_close(logp.grad, expected)
    assert torch.isfinite(logp.grad).all()


def test_policy_loss_dual_clip():
    # A = -0.5. r = 5: pg = max(2.5, 0.5 * 1.28) = 2.5, dual clip 3 caps it at 0.5 * 3 = 1.5 (grad 0).
    # r = 2: pg = 1.0 < 1.5, untouched (grad -A r = 1.0). A = +1, r = 5: pg = max(-5, -1.28) = -1.28, untouched.
    logp = torch.tensor([[math.log(5.0), math.log(2.0)], [math.log(5.0), 0.0]], requires_grad=True)
    adv, mask = t(-0.5, 1.0), torch.ones(2, 2)
    loss, stats = policy_loss(logp, torch.zeros(2, 2), adv, mask, epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0)
    assert_close(loss, torch.tensor([[1.5, 1.0], [-1.28, -1.0]]))
    loss.sum().backward()
    assert_close(logp.grad, torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    # without the dual clip the first token keeps its full 2.5
    plain, _ = policy_loss(logp, torch.zeros(2, 2), adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    assert_close(plain[0, 0], torch.tensor(2.5))
    assert torch.equal(stats["clipped"], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError):
        policy_loss(logp, torch.zeros(2, 2), adv, mask, epsilon_low=0.2, epsilon_high=0.28, dual_clip=1.0)


def test_policy_loss_is_weights_and_kl():
    # ratio 1, A = 1 -> pg = -1 per token; is_weights [0.5, 2] -> [-0.5, -2].
    logp = torch.full((1, 2), math.log(0.5), requires_grad=True)
    ref = torch.full((1, 2), math.log(0.25))
    w = torch.tensor([[0.5, 2.0]])
    kw = dict(epsilon_low=0.2, epsilon_high=0.2)
    loss, _ = policy_loss(logp, logp.detach(), t(1.0), torch.ones(1, 2), is_weights=w, **kw)
    assert_close(loss, torch.tensor([[-0.5, -2.0]]))
    # k3(ln .5, ln .25) = 0.1931472 (see above); beta 0.1 adds 0.01931472 after the is_weights scaling
    loss, stats = policy_loss(logp, logp.detach(), t(1.0), torch.ones(1, 2), ref_logp=ref, beta=0.1,
                              is_weights=w, **kw)
    assert_close(loss, torch.tensor([[-0.5 + 0.01931472, -2.0 + 0.01931472]]))
    assert_close(stats["kl"], torch.tensor([[0.1931472, 0.1931472]]))
    # k1 = ln 2 with beta 0.5 -> +0.3465736; beta 0 reports the KL but leaves the loss alone
    loss, _ = policy_loss(logp, logp.detach(), t(0.0), torch.ones(1, 2), ref_logp=ref, beta=0.5, kl_estimator="k1",
                          **kw)
    assert_close(loss, torch.full((1, 2), 0.5 * LN2))
    loss, stats = policy_loss(logp, logp.detach(), t(0.0), torch.ones(1, 2), ref_logp=ref, **kw)
    assert torch.equal(loss, torch.zeros(1, 2))
    assert "kl" in stats


# --- loss aggregation -----------------------------------------------------------------------------------------------

# Four sequences, T = 3 (= max_completion_length); the last one is fully masked.
#   row sums of l*m: 1+2 = 3 (2 tokens), 4+5+6 = 15 (3), 1 (1), 0 (0) -> 19 over 6 tokens, 4 sequences.
L = torch.tensor([[1.0, 2, 3], [4, 5, 6], [1, 1, 1], [2, 4, 6]])
M = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
GLOBAL = dict(total_tokens=6, total_seqs=4, max_completion_length=3)
HAND = {
    "dapo": 19 / 6,                            # 3.1666667
    "grpo": (3 / 2 + 15 / 3 + 1 / 1 + 0) / 4,  # 7.5 / 4 = 1.875
    "dr_grpo": 19 / (4 * 3),                   # 1.5833333
    "bnpo": 19 / 6,                            # one micro-batch: token mean of the batch
}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_aggregate_loss_hand_value(loss_type):
    out = aggregate_loss(L, M, loss_type, num_micro_batches=1, **GLOBAL)
    assert_close(out, torch.tensor(HAND[loss_type]))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("split", [[2, 2], [1, 3], [1, 1, 1, 1]])
def test_aggregate_loss_micro_batch_shares_sum_to_full_batch(loss_type, split):
    shares = [aggregate_loss(l, m, loss_type, num_micro_batches=len(split), **GLOBAL)
              for l, m in zip(L.split(split), M.split(split))]
    assert_close(torch.stack(shares).sum(), torch.tensor(HAND[loss_type]))
    # and on a larger random batch, as a check that the shares add up whatever the numbers
    g = torch.Generator().manual_seed(1)
    l, m = torch.randn(12, 7, generator=g, dtype=torch.float64), (torch.rand(12, 7, generator=g) > 0.3).long()
    glob = dict(total_tokens=int(m.sum()), total_seqs=12, max_completion_length=7)
    full = aggregate_loss(l, m, loss_type, num_micro_batches=1, **glob)
    shares = [aggregate_loss(a, b, loss_type, num_micro_batches=4, **glob) for a, b in zip(l.split(3), m.split(3))]
    assert_close(torch.stack(shares).sum(), full)


def test_aggregate_loss_bnpo_is_mean_of_micro_batch_token_means():
    # micro-batches rows [0,1]: 18 / 5 = 3.6 and rows [2,3]: 1 / 1 = 1 -> (3.6 + 1) / 2 = 2.3 (not the 19/6 of one batch)
    shares = [aggregate_loss(l, m, "bnpo", num_micro_batches=2, **GLOBAL) for l, m in zip(L.split(2), M.split(2))]
    assert_close(shares[0], torch.tensor(1.8))
    assert_close(torch.stack(shares).sum(), torch.tensor(2.3))
    # a micro-batch with no counted token contributes 0 rather than nan
    assert torch.equal(aggregate_loss(L[3:], M[3:], "bnpo", num_micro_batches=4, **GLOBAL), torch.tensor(0.0))


def test_aggregate_loss_unknown_type():
    with pytest.raises(ValueError):
        aggregate_loss(L, M, "sum", num_micro_batches=1, **GLOBAL)


# --- small helpers --------------------------------------------------------------------------------------------------

def test_masked_mean():
    assert torch.equal(masked_mean(t(1, 2, 3, 4), torch.tensor([1, 0, 1, 0])), torch.tensor(2.0))  # (1+3)/2
    assert torch.equal(masked_mean(t(1, 2), torch.tensor([0, 0])), torch.tensor(0.0))


def test_truncated_is_weights():
    trainer = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.3)], requires_grad=True)
    rollout = t(math.log(0.25), math.log(0.5), math.log(0.3))
    w = truncated_is_weights(trainer, rollout, cap=1.5)
    # ratios 2 (capped to 1.5), 0.5, 1
    assert_close(w, t(1.5, 0.5, 1.0))
    assert not w.requires_grad
