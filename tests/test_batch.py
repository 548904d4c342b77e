"""Micro-batches: the plan (every sample once, the same number of micro-batches on every rank, the token budget, the
balance) and the tensors. Packed and padded micro-batches give the same per-token logprobs, loss and gradients as
each other and as one sequence at a time, for every loss type, with tool-masked and truncated samples mixed in."""
import random

import pytest
import torch
from torch.testing import assert_close

from tgrpo import algorithm, batch
from tgrpo.policy import modeling
from tgrpo.batch import Sample
from tgrpo.config import Config
from tgrpo.policy.worker import STATS, micro_loss


def _lengths(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 90) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ranks,mini,budget", [(1, 1, 200), (2, 1, 150), (3, 2, 120), (4, 1, 1000), (2, 2, 60)])
def test_plan_covers_every_sample_once_with_equal_counts_within_budget(seed, ranks, mini, budget):
    lengths = _lengths(seed, 48)
    plan = batch.plan(lengths, ranks, mini, budget, 0)
    assert plan == batch.plan(lengths, ranks, mini, budget, 0)  # every rank computes the same
    seen = []
    for j, per_rank in enumerate(plan.micro):
        assert len(per_rank) == ranks
        assert len({len(micro) for micro in per_rank}) == 1, "every rank runs as many micro-batches"
        size = len(lengths) // mini
        in_mini = sorted(i for micro in per_rank for mb in micro for i in mb)
        assert in_mini == list(range(j * size, (j + 1) * size)), "a mini-batch is consecutive samples"
        for micro in per_rank:
            for mb in micro:
                assert sum(lengths[i] for i in mb) <= budget or len(mb) == 1
        loads = [sum(lengths[i] for micro in [rank] for mb in micro for i in mb) for rank in per_rank]
        assert max(loads) - min(loads) <= max(lengths), "ranks get balanced token shares"
        seen += in_mini
    assert sorted(seen) == list(range(len(lengths)))


def test_plan_long_sequence_alone_and_sequence_mode():
    plan = batch.plan([10, 500, 10, 10], 1, 1, 100, 0)
    assert [500 in [[10, 500, 10, 10][i] for i in mb] and len(mb) == 1 or 1 not in mb for mb in plan.micro[0][0]]
    assert [1] in plan.micro[0][0]
    # max_tokens 0: micro_batch_size sequences per micro-batch, each rank a contiguous slice
    plan = batch.plan([5] * 16, 2, 2, 0, 2)
    assert plan.micro == [[[[0, 1], [2, 3]], [[4, 5], [6, 7]]], [[[8, 9], [10, 11]], [[12, 13], [14, 15]]]]


def test_plan_gives_fillers_where_a_rank_has_fewer_samples():
    plan = batch.plan([50, 50, 50], 2, 1, 60, 0)  # 2 samples on one rank need 2 micro-batches; the other has 1
    counts = [len(micro) for micro in plan.micro[0]]
    assert counts == [2, 2] and [] in plan.micro[0][1] + plan.micro[0][0]


def _model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=modeling.register(), dtype=torch.float32)
    return model.double().float()  # the same weights, initialised once


def _samples() -> list[Sample]:
    rng = random.Random(3)
    out = []
    for k in range(11):
        p, c = rng.randint(1, 9), rng.randint(1, 14)
        mask = None
        if k % 4 == 1:  # a multi-turn episode: a tool's tokens in the middle
            mask = [1] * c
            for t in range(c // 3, 2 * c // 3):
                mask[t] = 0
        out.append(Sample([rng.randrange(40) for _ in range(p)], [rng.randrange(40) for _ in range(c)],
                          [-rng.uniform(0.5, 4) for _ in range(c)], truncated=k % 3 == 2, completion_mask=mask,
                          advantage=rng.uniform(-1.5, 1.5), ref_logprobs=[-rng.uniform(0.5, 4) for _ in range(c)]))
    return out


def _one_at_a_time(model, s: Sample, temperature: float) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(s.prompt_ids) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_packed_and_padded_micro_batches_give_the_same_logprobs_loss_and_gradients(loss_type):
    cfg = Config(loss_type=loss_type, mask_truncated_completions=True, beta=0.05, tis_cap=2.0, temperature=0.7,
                 max_completion_length=14, max_tokens_per_micro_batch=40, epsilon_high=0.28)
    samples = _samples()
    plan = batch.plan([s.length for s in samples], 1, 1, cfg.max_tokens_per_micro_batch, 0)
    micro = plan.micro[0]
    assert len(micro[0]) >= 3  # several micro-batches, some with several sequences
    weights = batch.loss_weights(samples, micro, loss_type, mask_truncated=True, max_completion_length=14)[0]
    results = {}
    for packed in (True, False):
        model = _model()
        logps, total, stats = [], 0.0, torch.zeros(len(STATS), dtype=torch.float64)
        for indices, w in zip(micro[0], weights):
            mb = batch.build([samples[i] for i in indices], torch.device("cpu"), packed=packed, pad_id=0,
                             mask_truncated=True, loss_weights=w)
            share, sums, _ = micro_loss(model, mb, cfg)
            share.backward()
            total += float(share.detach())
            stats += sums
            with torch.no_grad():
                logps += batch.split(modeling.token_logprobs(model, mb, cfg.temperature)[0], mb.lengths)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        order = [i for indices in micro[0] for i in indices]
        results[packed] = (dict(zip(order, logps)), total, grads, stats)
    (lp_a, loss_a, g_a, s_a), (lp_b, loss_b, g_b, s_b) = results[True], results[False]
    reference = _model()
    for i, s in enumerate(samples):
        expect = _one_at_a_time(reference, s, cfg.temperature)
        assert_close(torch.tensor(lp_a[i], dtype=torch.float64), expect, atol=2e-5, rtol=0)
        assert_close(torch.tensor(lp_b[i], dtype=torch.float64), expect, atol=2e-5, rtol=0)
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and loss_a != 0.0
    assert_close(s_a, s_b, atol=1e-4, rtol=1e-5)
    for name in g_a:
        assert_close(g_a[name], g_b[name], atol=1e-6, rtol=1e-4)
    assert max(g.abs().max() for g in g_a.values()) > 1e-4


def test_bnpo_averages_over_micro_batches_with_samples_only():
    """Three samples over two ranks with a budget that fits one sample a micro-batch: rank 0 runs two micro-batches,
    rank 1 one and a filler. bnpo is the mean over the three real micro-batches of their token means."""
    samples = [Sample([1], [2] * 6, [0.0] * 6), Sample([1], [2] * 5, [0.0] * 5), Sample([1], [2] * 4, [0.0] * 4)]
    micro = batch.plan([s.length for s in samples], 2, 1, 7, 0).micro[0]
    assert sorted(len(mb) for rank in micro for mb in rank) == [0, 1, 1, 1]  # one filler
    weights = batch.loss_weights(samples, micro, "bnpo", mask_truncated=False, max_completion_length=6)
    for rank, rank_weights in zip(micro, weights):
        for mb, w in zip(rank, rank_weights):
            if mb:
                assert w == [pytest.approx(1 / (samples[mb[0]].counted_tokens(False) * 3))]
    # a per-token loss of 1 everywhere: every micro-batch's token mean is 1, so the loss is 1
    assert sum(w[0] * samples[mb[0]].counted_tokens(False) for rank, ws in zip(micro, weights)
               for mb, w in zip(rank, ws) if mb) == pytest.approx(1.0)


def test_one_rule_for_counted_tokens():
    s = Sample([1], [2, 3, 4, 5], [0.0] * 4, truncated=True, completion_mask=[1, 0, 0, 1])
    assert s.loss_mask(False) == [1, 0, 0, 1] and s.counted_tokens(False) == 2
    assert s.loss_mask(True) == [0, 0, 0, 0] and s.counted_tokens(True) == 0
    assert s.model_mask == [1, 0, 0, 1]  # mismatch is still measured on the model's tokens
    plain = Sample([1], [2, 3], [0.0, 0.0])
    assert plain.loss_mask(True) == [1, 1] and plain.model_tokens == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: flash varlen attention")
def test_on_gpu_packed_flash_attention_matches_one_sequence_at_a_time():
    """bf16 on the GPU: packed micro-batches through torch's flash varlen kernel against each sequence alone
    (SDPA), logprobs and gradients; the chunked float32 log-softmax against a full one of the same logits."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    assert modeling._varlen_attn is not None, "torch has no flash varlen attention here"
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=modeling.register(),
                                             dtype=torch.bfloat16).cuda()
    samples = _samples()
    mb = batch.build(samples, torch.device("cuda"), packed=True, pad_id=0)
    logits = modeling.logits_at_targets(model, mb)
    logp, _ = algorithm.token_logprobs(logits, mb.targets)
    full = torch.log_softmax(logits.float(), -1).gather(-1, mb.targets[:, None]).squeeze(-1)
    assert (logp - full).abs().max().item() < 1e-5
    (logp * mb.advantages).sum().backward()
    packed_grads = [p.grad.float().clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.cat([_alone_cuda(model, s) for s in samples])
    assert (logp - alone.float()).abs().max().item() < 0.05  # bf16 kernels differ in rounding only
    (alone.float() * mb.advantages).sum().backward()
    for a, p in zip(packed_grads, model.parameters()):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), p.grad.float().flatten(), dim=0)
        assert cos > 0.99, cos


def _alone_cuda(model, s: Sample) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.completion_ids], device="cuda")
    logits = model(input_ids=ids, use_cache=False).logits[0, len(s.prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.completion_ids, device="cuda")[:, None]).squeeze(-1)
