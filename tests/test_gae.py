"""PPO's pieces against independent references on tensors: GAE as the discounted sum of TD errors (no recursion),
over ragged completions with tool-token gaps and truncation; verl's padded-batch GAE where there are no gaps; the
clipped value loss, whitening and the adaptive KL controller by their formulas."""
import random

import pytest
import torch

from tgrpo import algorithm


def _reference_gae(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the model's steps (tool tokens are not steps), V after the end 0."""
    steps = [i for i, m in enumerate(mask) if m]
    r = [rewards[i] for i in steps]
    v = [values[i] for i in steps] + [0.0]
    deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(steps))]
    adv, ret = [0.0] * len(mask), [0.0] * len(mask)
    for k, i in enumerate(steps):
        adv[i] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(steps) - k))
        ret[i] = adv[i] + v[k]
    return adv, ret


def _verl_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """verl's compute_gae_advantage_return (core_algos.py) on a right-padded batch [B, T], before whitening."""
    lastgaelam = 0
    out = []
    length = rewards.shape[-1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages * mask, (advantages + values) * mask


def _episode(rng: random.Random, tools: bool):
    """A completion of model turns with tool blocks between them (mask 0), or one turn."""
    mask = []
    for turn in range(rng.randint(1, 3) if tools else 1):
        if turn:
            mask += [0] * rng.randint(1, 5)
        mask += [1] * rng.randint(1, 7)
    return mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
def test_gae_is_the_discounted_sum_of_td_errors_over_model_tokens(gamma, lam):
    rng = random.Random(0)
    for case in range(200):
        mask = _episode(rng, tools=case % 2 == 0)
        values = [rng.uniform(-1, 1) for _ in mask]
        kl = [rng.uniform(-0.2, 0.5) for _ in mask]
        rewards = algorithm.token_rewards(rng.choice([0.0, 1.0, 1.2]), mask, kl, kl_coef=0.05)
        assert all(r == 0.0 for r, m in zip(rewards, mask) if not m)  # tool tokens earn nothing
        adv, ret = algorithm.gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = _reference_gae(rewards, values, mask, gamma, lam)
        assert adv == pytest.approx(ref_adv, abs=1e-9) and ret == pytest.approx(ref_ret, abs=1e-9)
        assert all(a == 0.0 and r == 0.0 for a, r, m in zip(adv, ret, mask) if not m)


def test_without_tool_gaps_gae_equals_verls_padded_batch():
    """Ragged single-turn completions right-padded into one batch, a truncated one among them: the same advantages
    and returns as verl's padded computation (whose padding values are zero)."""
    rng = random.Random(1)
    lengths = [5, 1, 9, 9, 3]  # 9: cut at the budget, scored all the same
    width = max(lengths)
    rewards, values, mask = (torch.zeros(len(lengths), width, dtype=torch.float64) for _ in range(3))
    ours_adv, ours_ret = [], []
    for b, n in enumerate(lengths):
        m = [1] * n
        v = [rng.uniform(-1, 1) for _ in m]
        r = algorithm.token_rewards(rng.uniform(0, 1), m, [rng.uniform(0, 0.3) for _ in m], kl_coef=0.1)
        rewards[b, :n], values[b, :n], mask[b, :n] = torch.tensor(r), torch.tensor(v), 1.0
        a, ret = algorithm.gae(r, v, m, 1.0, 0.95)
        ours_adv.append(a + [0.0] * (width - n))
        ours_ret.append(ret + [0.0] * (width - n))
    verl_adv, verl_ret = _verl_gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(torch.tensor(ours_adv, dtype=torch.float64), verl_adv)
    torch.testing.assert_close(torch.tensor(ours_ret, dtype=torch.float64), verl_ret)


def test_whitening_and_the_clipped_value_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64) * 3 + 2
    mask = (torch.rand(50, generator=g) > 0.3).double()
    w = algorithm.whiten(x, mask)
    kept = w[mask.bool()]
    assert abs(float(kept.mean())) < 1e-9 and abs(float(kept.std(unbiased=False)) - 1) < 1e-6
    assert torch.all(w[~mask.bool()] == 0)
    v, old, ret = (torch.randn(200, generator=g, dtype=torch.float64) for _ in range(3))
    loss, clipped = algorithm.value_loss(v, old, ret, 0.2)
    for i in range(200):
        vc = old[i] + min(max(v[i] - old[i], -0.2), 0.2)
        expected = 0.5 * max((v[i] - ret[i]) ** 2, (vc - ret[i]) ** 2)
        assert float(loss[i]) == pytest.approx(float(expected))
        assert bool(clipped[i]) == bool((vc - ret[i]) ** 2 > (v[i] - ret[i]) ** 2)
    assert 0 < float(clipped.mean()) < 1
    unclipped, none = algorithm.value_loss(v, old, ret, None)
    torch.testing.assert_close(unclipped, 0.5 * (v - ret) ** 2)
    assert float(none.sum()) == 0


def test_explained_variance():
    g = torch.Generator().manual_seed(2)
    ret = torch.randn(100, generator=g, dtype=torch.float64)
    mask = torch.ones(100, dtype=torch.float64)
    assert algorithm.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert algorithm.explained_variance(torch.full_like(ret, 3.0), ret, mask) == pytest.approx(0.0, abs=1e-9)


def test_the_adaptive_kl_controller_moves_beta_toward_the_target():
    fixed = algorithm.KLController("fixed", 0.01, target=0.1, horizon=100)
    fixed.update(5.0, 64)
    assert fixed.value == 0.01
    ctl = algorithm.KLController("adaptive", 0.01, target=0.1, horizon=1000)
    ctl.update(0.3, 64)  # far above the target: the error is clipped at +0.2
    assert ctl.value == pytest.approx(0.01 * (1 + 0.2 * 64 / 1000))
    ctl.update(0.05, 64)  # half the target: -0.5, clipped at -0.2
    assert ctl.value == pytest.approx(0.01 * (1 + 0.2 * 64 / 1000) * (1 - 0.2 * 64 / 1000))
    before = ctl.value
    ctl.update(0.11, 10)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 10 / 1000))
