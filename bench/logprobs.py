"""The token logprobs of one packed micro-batch: forward and backward of `algorithm.token_logprobs` (fused and
chunked, with entropy as the policy step asks) beside torch's own cross-entropy on the same logits (the ceiling:
log-softmax + NLL, no entropy), and each against a float64 log-softmax.

    python bench/logprobs.py --tokens 16384 --vocab 151936        # a 16k-token micro-batch of a Qwen2.5 vocabulary

Prints a table and a JSON line. On CPU use small sizes (--tokens 512 --vocab 32000).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--tokens", type=int, default=16384, help="Completion tokens of the micro-batch.")
    parser.add_argument("--vocab", type=int, default=151936, help="Vocabulary size.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats after one warm-up.")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from tgrpo import algorithm

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    logits = (4 * torch.randn(args.tokens, args.vocab, device=device, generator=g)).to(dtype).requires_grad_()
    ids = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    weights = torch.randn(args.tokens, device=device, generator=g)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def ours(fused: bool):
        def run():
            logp, _ = algorithm.token_logprobs(logits, ids, args.temperature, entropy=True, fused=fused)
            (logp * weights).sum().backward()
            return logp
        return run

    def cross_entropy():
        nll = F.cross_entropy(logits.float() / args.temperature, ids, reduction="none")
        (-nll * weights).sum().backward()
        return -nll

    ref = torch.log_softmax(logits.detach().double() / args.temperature, -1).gather(-1, ids[:, None]).squeeze(-1)
    rows = {}
    for name, fn in (("fused", ours(True)), ("chunked", ours(False)), ("cross_entropy", cross_entropy)):
        logits.grad = None
        out = fn()  # warm-up (the fused path compiles here)
        error = (out.detach().double() - ref).abs().max().item()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            logits.grad = None
            fn()
        sync()
        rows[name] = {"ms": 1e3 * (time.perf_counter() - t0) / args.repeats, "max_abs_error_vs_fp64": error,
                      "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None}
    fell_back = algorithm._compiled is False

    print(f"{args.tokens} tokens x {args.vocab} vocabulary, {dtype}, {device}; forward + backward")
    print(f"{'path':<14}{'ms':>9}{'|err| vs fp64':>15}{'extra GiB':>11}")
    for name, r in rows.items():
        extra = "" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
        print(f"{name:<14}{r['ms']:>9.2f}{r['max_abs_error_vs_fp64']:>15.2e}{extra:>11}")
    if fell_back:
        print("the fused path fell back to the chunked one (torch.compile failed)")
    print(json.dumps({"bench": "logprobs", "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "dtype": str(dtype), "tokens": args.tokens, "vocab": args.vocab, "fused_fell_back": fell_back,
                      "fused_vs_cross_entropy": rows["cross_entropy"]["ms"] / rows["fused"]["ms"], **{
                          f"{k}_{name}": v for name, r in rows.items() for k, v in r.items()}}))


if __name__ == "__main__":
    main()
