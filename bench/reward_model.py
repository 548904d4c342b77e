"""Reward-model scoring throughput: tgrpo's reward model path against a bare transformers forward of the same batches.

A random reward model of a benchmark shape (tgrpo/tiny.py RANDOM_SHAPES, as a Qwen2ForSequenceClassification with
one label, bfloat16 on a GPU) scores a step's completions as the trainer does (tgrpo.reward.model.RewardModel: each
prompt and completion rendered by the reward model's chat template, tokenized, sorted by length, batched by the
token budget, right-padded, the logit of the last real token). The ceiling is the same padded batches through the
model's forward alone (tensors already on the GPU, no tokenization, no Python per sample). Prompts and completions
are random text of the embedded tokenizer's words (lengths drawn around --prompt_tokens and --completion_tokens, so
the batches really vary); every phase is synchronised before the clock stops; the median of --repeats after one
warm-up. Prints a table and one JSON line.

    python bench/reward_model.py --shape 7b --prompts 32 --num_generations 8 --prompt_tokens 256 \\
        --completion_tokens 512 --batch_tokens 32768
    python bench/reward_model.py --shape 60m --prompts 4 --completion_tokens 64 --repeats 1   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _texts(tokenizer, rng: random.Random, count: int, tokens: int) -> list[str]:
    """count texts of the tokenizer's real words, about `tokens` tokens each (3/4 to 5/4 of it)."""
    words = [w for w in (tokenizer.decode([i]) for i in range(min(len(tokenizer), 500))) if w.strip().isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3 * tokens // 4, 5 * tokens // 4)))
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", help="tgrpo/tiny.py RANDOM_SHAPES: 60m, 0.5b, 1.5b, 7b, ...")
    parser.add_argument("--cache_dir", default=".cache")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--completion_tokens", type=int, default=512)
    parser.add_argument("--batch_tokens", type=int, default=32768, help="reward_model_batch_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak for MFU (0: 989 on H100/H200)")
    args = parser.parse_args()

    import torch

    from tgrpo.reward.model import RewardModel
    from tgrpo.tiny import ensure_random_reward_model

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    t0 = time.perf_counter()
    path = ensure_random_reward_model(args.cache_dir, args.shape)
    built_s = time.perf_counter() - t0
    model = RewardModel(path, device, dtype, args.batch_tokens, max_length=8192)
    rng = random.Random(0)
    questions = _texts(model.tokenizer, rng, args.prompts, args.prompt_tokens)
    prompts = [[{"role": "user", "content": q}] for q in questions for _ in range(args.num_generations)]
    completions = _texts(model.tokenizer, rng, len(prompts), args.completion_tokens)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def ours() -> float:
        sync()
        start = time.perf_counter()
        model.score(prompts, completions)
        sync()
        return time.perf_counter() - start

    # the ceiling's batches: exactly the ones RewardModel.score forms (its encode and batches), on the device
    encoded = [model.encode(p, c) for p, c in zip(prompts, completions)]
    batches = [(ids.to(device), mask.to(device)) for _, ids, mask in model.batches(encoded)]
    padded = sum(ids.numel() for ids, _ in batches)
    tokens = sum(len(e) for e in encoded)

    @torch.no_grad()
    def bare() -> float:
        sync()
        start = time.perf_counter()
        for ids, mask in batches:
            model.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        sync()
        return time.perf_counter() - start

    ours(), bare()  # warm-up: kernels, allocator
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    timed = {"tgrpo": [ours() for _ in range(args.repeats)], "bare": [bare() for _ in range(args.repeats)]}
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    params = sum(p.numel() for p in model.model.parameters())
    peak_tflops = args.peak_tflops or (989.0 if on_gpu and any(n in torch.cuda.get_device_name() for n in
                                                              ("H100", "H200")) else 0.0)
    result = {"bench": "reward_model", "shape": args.shape, "params": params, "device":
              torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": str(dtype).removeprefix("torch."),
              "completions": len(prompts), "tokens": tokens, "padded_tokens": padded, "batches": len(batches),
              "batch_tokens": args.batch_tokens, "built_s": built_s, "peak_gib": peak}
    print(f"{args.shape} reward model ({params / 1e9:.2f}B, {result['dtype']}) on {result['device']}: "
          f"{len(prompts)} completions, {tokens} tokens ({padded} with padding) in {len(batches)} batches of at most "
          f"{args.batch_tokens} tokens")
    print(f"{'path':<8} {'median_s':>9} {'min_s':>8} {'max_s':>8} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name, times in timed.items():
        median = statistics.median(times)
        tflops = 2 * params * tokens / median / 1e12  # forward only, real tokens (padding not counted)
        result[name] = {"median_s": median, "min_s": min(times), "max_s": max(times), "tokens_per_s": tokens / median,
                        "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}
        mfu = f"{tflops / peak_tflops:.3f}" if peak_tflops else "-"
        print(f"{name:<8} {median:>9.3f} {min(times):>8.3f} {max(times):>8.3f} {tokens / median:>10.0f} "
              f"{tflops:>8.1f} {mfu:>6}")
    result["scoring_vs_bare"] = result["tgrpo"]["tokens_per_s"] / result["bare"]["tokens_per_s"]
    print(f"scoring_vs_bare {result['scoring_vs_bare']:.3f} (tgrpo's tokens/s over the bare forward's); peak "
          f"memory {peak:.1f} GiB" if peak is not None else f"scoring_vs_bare {result['scoring_vs_bare']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
