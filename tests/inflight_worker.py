"""An in-flight weight update on a real vLLM engine (tests/test_async.py runs this in its own process).

The engine generates long completions; part way, it is paused between two of its steps (RolloutEngine.pause), new
weights (the model plus noise) are loaded through the trainer's own sync path, and it resumes with the requests in
flight recomputed (`recompute`), then again from the old weights with their KV cache kept (`keep`). Prints one
JSON line, per mode and completion: how many tokens the old weights sampled (generated_so_far at the pause), and the largest
|vLLM logprob - transformers' logprob| of the tokens before that mark (under the old weights) and after it (under
the new weights, teacher-forced on the whole sequence).

    python tests/inflight_worker.py     (both modes, one after the other, on one engine)
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def teacher_forced(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tgrpo import data
    from tgrpo.job import checks
    from tgrpo.sync import weights as sync
    from tgrpo.config import load_config
    from tgrpo.rollout.vllm_engine import RolloutEngine

    cfg = load_config(["--config", "configs/default.yaml", "--dtype", "float32", "--max_completion_length", "192",
                       "--vllm_enable_prefix_caching", "true"])
    model_dir = checks.model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [p.prompt_ids for p in data.load_prompts(cfg, tokenizer)[0][:4]]
    old = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    new = copy.deepcopy(old)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.detach().float().std().clamp(min=1e-3))
    engine = RolloutEngine(model_dir, dtype="float32", seed=cfg.seed, max_model_len=512, cfg=cfg, tag="inflight",
                           max_num_seqs=8)
    plan = sync.model_plan(new, 64 << 20)
    results = {}
    try:
        for mode in ("recompute", "keep"):
            sync.load_colocated(old, plan, engine, torch.device("cpu"))  # each mode starts from the old weights
            done: dict[int, object] = {}
            rids = [engine.submit(p, max_tokens=192, temperature=cfg.temperature, top_p=1.0, seed=100 + i,
                                  ignore_eos=True, on_finish=lambda out, i=i: done.__setitem__(i, out))
                    for i, p in enumerate(prompts)]
            while min(engine.generated_so_far(r) for r in rids) < 24:  # part way: every request has tokens
                engine.pump(wait=True)
            engine.pause()
            marks = [engine.generated_so_far(r) for r in rids]
            sync.load_colocated(new, plan, engine, torch.device("cpu"))
            engine.resume(recompute=mode == "recompute")
            while len(done) < len(prompts):
                engine.pump(wait=True)
            results[mode] = (done, marks)
    finally:
        engine.shutdown()
    rows = {}
    for mode, (done, marks) in results.items():
        rows[mode] = []
        for i, prompt in enumerate(prompts):
            out, mark = done[i], marks[i]
            before = teacher_forced(old, prompt, out.token_ids, cfg.temperature)
            after = teacher_forced(new, prompt, out.token_ids, cfg.temperature)
            rows[mode].append({"tokens": len(out.token_ids), "mark": mark,
                               "old_diff": max(abs(a - b) for a, b in zip(out.logprobs[:mark], before[:mark])),
                               "new_diff": max(abs(a - b) for a, b in zip(out.logprobs[mark:], after[mark:])),
                               "new_vs_old_weights": max(abs(a - b) for a, b in zip(after[mark:], before[mark:]))})
    print("RESULT " + json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
