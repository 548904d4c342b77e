"""Time per GRPO step with and without overlap (max_staleness 0 vs 1), beside the time of each phase.

One torchrun job starts the engines and models once, runs `--steps` steps strictly on-policy, then `--steps` steps
with rollout generating one batch ahead while the policy trains, and prints a table and one JSON line. The first
step of each mode is a warm-up and is not counted. Any trainer flag may follow (default: the README's run).

    torchrun --nproc_per_node 3 bench/step.py --config configs/default.yaml --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = [("time/step_s", "step"), ("time/generate_s", "generate"), ("time/reward_s", "reward"),
          ("time/train_s", "train"), ("time/sync_s", "sync")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="Steps per mode, the first of which is a warm-up.")
    parser.add_argument("--random_model", default="", help="Time a random model of this shape (tgrpo/tiny.py "
                        "RANDOM_SHAPES: 60m, 0.5b, 1.5b) instead of --model.")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="The GPU's dense bf16 peak for MFU; 0 "
                        "guesses from its name (H100/H200: 989).")
    ours, rest = parser.parse_known_args()
    if ours.steps < 2:
        sys.exit("error: --steps must be >= 2 (the first step of each mode is a warm-up)")
    from tgrpo import trainer

    def adjust(cfg):
        if ours.random_model:
            from tgrpo.tiny import ensure_random_model

            cfg.model = ensure_random_model(cfg.cache_dir, ours.random_model)
        overlap = not cfg.colocate  # colocated ranks take turns: only the sequential mode exists there
        cfg.max_steps = (2 if overlap else 1) * ours.steps
        cfg.max_staleness = 1 if overlap else 0  # validated as the overlapped mode will run
        cfg.tis_cap = cfg.tis_cap or 2.0  # both modes alike
        cfg.output_dir = os.path.join(cfg.output_dir, "bench-step")

    def body(cfg, placement, rank):
        import torch.distributed as dist

        job = trainer.setup(cfg, placement, rank)
        bare = None
        if job.worker is not None:  # bare vLLM on the first step's prompts, same sampling, no logprobs or rewards
            prompts = [p.prompt_ids for p in job.worker.step_prompts(0)]
            kwargs = dict(n=cfg.num_generations, max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                          top_p=cfg.top_p)
            job.engine.generate_bare(prompts, **kwargs)  # warm-up
            bare = job.engine.generate_bare(prompts, **kwargs)
        bares: list = [None] * placement.world_size
        dist.all_gather_object(bares, bare, group=job.groups.data)
        sequential = trainer.run_steps(job, 0, ours.steps, staleness=0)
        overlapped = (trainer.run_steps(job, ours.steps, 2 * ours.steps, staleness=1) if not placement.colocated
                      else [])
        n_params = sum(b.numel for b in job.plan)
        trainer.finish(job)
        if rank == 0:
            report(sequential[1:], overlapped[1:], cfg, placement, [b for b in bares if b], n_params, ours)

    trainer.launch(rest, body, adjust)


def report(sequential: list[dict], overlapped: list[dict], cfg, placement, bares: list, n_params: int,
           ours) -> None:
    def mean(rows, key):
        return statistics.fmean(r.get(key, 0.0) for r in rows)

    runs = [("sequential", sequential)] + ([("overlap", overlapped)] if overlapped else [])
    rows = {mode: {name: mean(steps, key) for key, name in PHASES} for mode, steps in runs}
    print(f"\n{'mode':<12}" + "".join(f"{name + '_s':>12}" for _, name in PHASES) + f"{'gen tok/s':>12}")
    for mode, steps in runs:
        print(f"{mode:<12}" + "".join(f"{rows[mode][name]:>12.3f}" for _, name in PHASES)
              + f"{mean(steps, 'throughput/generate_tokens_per_s'):>12.0f}")
    seq = rows["sequential"]
    result = {"bench": "step", "model": os.path.basename(cfg.model), "dtype": cfg.dtype,
              "placement": (f"colocated {placement.world_size}" if placement.colocated else
                            f"rollout {cfg.rollout_ranks} policy {cfg.policy_ranks}"),
              "steps_per_mode": len(sequential), "sequential_step_s": seq["step"], "phases": rows,
              "generate_tokens_per_s": mean(sequential, "throughput/generate_tokens_per_s")}
    if bares:  # every engine's bare tokens/s, summed, against the trainer's generation phase
        bare_tps = sum(tokens / seconds for tokens, seconds in bares)
        result["bare_vllm_tokens_per_s"] = bare_tps
        result["generate_over_bare_vllm"] = result["generate_tokens_per_s"] / bare_tps
        print(f"generation: {result['generate_tokens_per_s']:.0f} tok/s in the trainer, {bare_tps:.0f} tok/s bare "
              f"vLLM on the same prompts ({result['generate_over_bare_vllm']:.2f})")
    # training FLOPs: 6 * parameters * tokens per pass (forward + backward; attention and the extra no-grad passes
    # of num_iterations > 1 or a reference are left out, so this MFU is a lower bound)
    tokens = mean(sequential, "batch/tokens")
    peak = ours.peak_tflops or _guess_peak_tflops()
    if peak and tokens:
        flops = 6 * n_params * tokens * cfg.num_iterations
        result["train_tflops_per_gpu"] = flops / seq["train"] / placement.num_policy / 1e12
        result["mfu"] = result["train_tflops_per_gpu"] / peak
        result["peak_tflops"] = peak
        print(f"training: {tokens:.0f} tokens a step, {result['train_tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU "
              f"{result['mfu']:.3f} of {peak:.0f} TFLOP/s (6 N T)")
    for key in ("memory/policy_peak_gib", "memory/device_used_gib", "memory/rollout_device_used_gib"):
        if any(key in r for r in sequential):
            result[key] = max(r.get(key, 0.0) for r in sequential + overlapped)
            print(f"{key}: {result[key]:.2f}")
    if overlapped:
        ovl = rows["overlap"]
        slower_own = max(ovl["generate"] + ovl["reward"], ovl["train"])
        slower_seq = max(seq["generate"] + seq["reward"], seq["train"])
        result.update({
            "overlap_step_s": ovl["step"], "speedup": seq["step"] / ovl["step"],
            # the criterion: an overlapped step against the slower of rollout (generate + reward) and train
            "overlap_step_over_slower_phase": ovl["step"] / slower_own,
            "overlap_step_over_slower_phase_sequential_run": ovl["step"] / slower_seq})
        print(f"overlap step / slower phase (same run) = {result['overlap_step_over_slower_phase']:.3f}; against "
              f"the sequential run's phases {result['overlap_step_over_slower_phase_sequential_run']:.3f}; speedup "
              f"{result['speedup']:.3f}")
    print(json.dumps(result))


def _guess_peak_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else 0.0


if __name__ == "__main__":
    main()
