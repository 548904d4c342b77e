"""Time per GRPO step and per phase, beside two ceilings measured in the same run: bare vLLM on the same requests
(generation) and a plain training loop over the same packed micro-batches (training).

One torchrun job starts the engines and models once and runs `--steps` steps strictly on-policy (with --overlap
also `--steps` steps generating one batch ahead, max_staleness 1, split placement only; with --async also `--steps`
steps of the fully asynchronous mode, async_mode true, max_staleness --async_staleness, on the same engines and
models: the continuous rollout (tgrpo.rollout.stream.GroupStream) with in-flight weight updates), the first step of
each mode a warm-up. Every mode reports tokens trained per second (the batch's prompt and completion tokens over the
step's seconds), the mean NVML utilisation of the policy's GPU and of the engine's GPU over its timed steps (idle = 1
- busy; one GPU shared by both with --share_gpu) and the trainer's time/policy_idle_frac; --async adds
async_over_sync and async_over_one_step_off (the tokens-trained ratios, same job) and the async metrics (staleness,
dropped groups, the engine's busy fraction). Then 1 + `--plain_steps` more steps in which the policy's update is a plain loop: the step's
micro-batches through the same DeepSpeed engine with a plain next-token cross-entropy, nothing else (no GRPO loss,
no statistics, no old-logprob pass), timed in the same place of the step as the GRPO update. Last, the rollout
ranks stop their engine and time a fresh vLLM engine with vLLM's own defaults on the requests of the first timed
step. Nothing else is inside a timed span: no checkpoint is written and no evaluation runs. Prints a table and one
JSON line.

    torchrun --nproc_per_node 3 bench/step.py --config configs/default.yaml --steps 4
    torchrun --nproc_per_node 3 bench/step.py --config configs/default.yaml --steps 3 --overlap --async \
        --lengths longtail --max_completion_length 64 --plain_steps 0 --bare_repeats 0

--share_gpu puts every rank of the node on one GPU (split placement on a one-GPU machine): each rank binds GPU 0
(LOCAL_RANK 0) and the weight-sync groups between policy and engine ranks use gloo (NCCL refuses two ranks of one
communicator on one GPU); the policy group stays on the configured backend. A benchmark's workaround, not a trainer
mode: the weights travel through host memory, and the engine and the policy share the GPU's compute.

--random_model 60m|0.5b|1.5b|7b times a Qwen2-shaped model with random weights (built into cache_dir). It never
answers, so the reward is a fixed pseudo-random score of each completion's text (bench/random_rewards.py; every group
has varied rewards, so gradients and updates are real).

--lengths sets every completion's length, generated past any end of turn (vLLM's ignore_eos) to its prompt's budget:
fixed (the default with --random_model): max_completion_length, the work another trainer does in a step of the same
shape; varied: a draw from [max/4, max] per prompt; longtail: max/8, and max for one prompt in ten. Without
--random_model and --lengths, completions end where the model stops. The bare vLLM run gets the same budgets and
ignore_eos. Every phase is also reported as the step's tokens (prompt and completion) per second of that phase.

With --use_lora true (any trainer flag passes through) the policy is a peft adapter on the frozen base: MFU counts
the LoRA step's own FLOPs, (4·N_base + 6·N_adapter)·T (the base's forward, 2 per weight and token, and the backward
through the frozen weights, activation gradients only, 2 more; the adapter's forward, activation and weight
gradients, 6), not 6·N·T, and the table names the formula. The plain loop is the same micro-batches through the same
peft model and DeepSpeed engine (only the adapter trains) with a plain cross-entropy; bare vLLM serves the same
adapter (the policy's after the timed steps, written in peft's format) with LoRA on and vLLM's defaults otherwise.

--random_model vl-3b (tgrpo/tiny.py RANDOM_VL_SHAPES: Qwen2.5-VL-3B's shape, random weights), or any vision-language
model with --images N, times prompts with one image each: bench/vl_data.py draws one distinct --image_size image per
prompt (448 x 448: 256 image tokens, 1,024 tower patches) into a data file of cache_dir, as many prompts as the run
draws, so that no image repeats (vLLM's prefix and processor caches would serve a repeat without its work). Bare vLLM
gets the same requests as the trainer's engine sends them (one image token per image in the ids, the PIL images as
multi_modal_data, the engine's image limits and pixel bounds), warmed up on other prompts and its prefix cache reset
before each timed run (the trainer's engine resets its own at every weight sync). The plain loop runs the same packed
micro-batches, images and mRoPE positions included. MFU counts the vision tower: 6*N_lm*T + 6*N_vision*P, with P the
patches of the step's distinct images (the policy runs a group's shared image through the tower once per micro-batch)
and N_vision the tower's blocks, its merger counted per image token
(spatial_merge_size**2 patches); a frozen tower (freeze_vision_tower, LoRA) counts its forward alone, 2*N_vision*P.
Image tokens, images and patches per step are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = [("time/step_s", "step"), ("time/generate_s", "generate"), ("time/reward_s", "reward"),
          ("time/gather_s", "gather"), ("time/model_reward_s", "rm_wait"), ("time/model_reward_busy_s", "rm_busy"), ("time/values_s", "values"), ("critic/train_s", "critic"),
          ("time/train_s", "train"), ("time/sync_s", "sync")]  # values, critic: advantage_estimator gae
LENGTHS = ("fixed", "varied", "longtail")
LENGTH_WORDS = {"fixed": "every completion max_completion_length tokens",
                "varied": "each prompt's budget drawn from [max/4, max]",
                "longtail": "max/8 tokens, max for one prompt in ten",
                "model": "where the model stops, up to max"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=4, help="Steps per mode, the first of which is a warm-up.")
    parser.add_argument("--random_model", default="", help="Time a random model of this shape (tgrpo/tiny.py "
                        "RANDOM_SHAPES: 60m, 0.5b, 1.5b, 7b) instead of --model.")
    parser.add_argument("--reward_model", default="", help="Also score every completion with a random reward model "
                        "of this shape (tgrpo/tiny.py RANDOM_SHAPES), placed as the trainer places it; rm_wait_s is "
                        "what a step waits for its scores after the gather, rm_busy_s the scoring thread's time.")
    parser.add_argument("--overlap", action="store_true", help="Also time max_staleness 1 (split placement).")
    parser.add_argument("--async", dest="async_", action="store_true", help="Also time async_mode (split placement), "
                        "after the other modes, on the same engines and models.")
    parser.add_argument("--async_staleness", type=int, default=1, help="--async: max_staleness (>= 1).")
    parser.add_argument("--share_gpu", action="store_true", help="Every rank of the node on GPU 0, the weight sync "
                        "over gloo: split placement on a one-GPU machine.")
    parser.add_argument("--lengths", choices=LENGTHS, default=None, help="Completion lengths, each generated to its "
                        "budget: fixed (default with --random_model), varied or longtail. Without it and without "
                        "--random_model the model stops on its own.")
    parser.add_argument("--plain_steps", type=int, default=3, help="Timed steps with the plain loop as the train "
                        "phase (after one warm-up); at least 2, so that their spread is measured; 0 skips the plain "
                        "loop (no train_vs_plain).")
    parser.add_argument("--bare_repeats", type=int, default=2, help="Timed runs of bare vLLM (after a warm-up); 0 "
                        "skips bare vLLM.")
    parser.add_argument("--profile_generation", action="store_true", help="Also time the trainer's engine on the "
                        "same requests with and without per-request seeds.")
    parser.add_argument("--images", type=int, default=-1, help="Prompts with one drawn image each, this many "
                        "(bench/vl_data.py); -1 (default): with a vision-language --random_model as many as the run "
                        "draws, else none (the config's data); 0: the config's data.")
    parser.add_argument("--image_size", type=int, default=448, help="--images: each image's width and height.")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="The GPU's dense bf16 peak for MFU; 0 "
                        "guesses from its name (H100/H200: 989).")
    ours, rest = parser.parse_known_args()
    if ours.steps < 2 or ours.plain_steps == 1 or ours.plain_steps < 0:
        sys.exit("error: --steps must be >= 2 (the first step of each mode is a warm-up), --plain_steps 0 or >= 2 "
                 "(the plain loop's ceiling is a spread of steps, not one)")
    if ours.async_staleness < 1:
        sys.exit("error: --async_staleness must be >= 1")
    if ours.share_gpu:
        share_one_gpu()
    ours.lengths = ours.lengths or ("fixed" if ours.random_model else "model")
    from tgrpo.job import rank_life, trainer
    from tgrpo.config import load_config

    def adjusted(cfg):
        if ours.random_model:
            from tgrpo.tiny import ensure_random_model

            cfg.model = ensure_random_model(cfg.cache_dir, ours.random_model)
            cfg.reward_funcs, cfg.reward_weights = ["bench.random_rewards:reward"], [1.0]
        if ours.reward_model:  # beside the other rewards, where the trainer puts it (reward_ranks, else the policy's)
            from tgrpo.tiny import ensure_random_reward_model

            cfg.reward_funcs = [*cfg.reward_funcs, ensure_random_reward_model(cfg.cache_dir, ours.reward_model)]
            cfg.reward_weights = [*(cfg.reward_weights or [1.0] * (len(cfg.reward_funcs) - 1)), 1.0]
        overlap = ours.overlap and not cfg.colocate
        asynchronous = ours.async_ and not cfg.colocate
        modes = 1 + overlap + asynchronous
        plain = ours.plain_steps + 1 if ours.plain_steps else 0
        cfg.max_steps = modes * ours.steps + plain + 2  # the final save never comes
        cfg.save_steps, cfg.eval_steps = 0, 0
        # validated as the overlapped mode will run; async_mode is switched on for its own steps (body)
        cfg.max_staleness = ours.async_staleness if asynchronous else 1 if overlap else 0
        cfg.tis_cap = cfg.tis_cap or 2.0  # every mode alike
        images = ours.images
        if images < 0:  # auto: with a vision-language random model, as many prompts as the run draws (no repeats)
            images = cfg.prompts_per_step * cfg.max_steps if ours.random_model in _random_vl_shapes() else 0
        if images > 0:  # vision-language prompts, one distinct image each
            from vl_data import ensure_vl_data

            count = images
            cfg.train_data = ensure_vl_data(cfg.cache_dir, count, ours.image_size, cfg.seed)
            cfg.eval_data, cfg.image_column, cfg.prompt_column, cfg.answer_column = "", "images", "messages", "answer"
            # the prompt's image tokens (at most one per 28 x 28 pixels) and its text
            cfg.max_prompt_length = max(cfg.max_prompt_length, (ours.image_size // 28 + 1) ** 2 + 96)
        ours.images = images
        cfg.output_dir = os.path.join(cfg.output_dir, "bench-step")
        cfg.overwrite_output_dir, cfg.resume = True, ""  # the benchmark's own folder, written anew by every run
        return cfg

    def body(cfg, placement, rank):

        from gpu import Busy

        job = trainer.setup(cfg, placement, rank)
        busy = {"train": Busy(), "generate": Busy(), "bare": Busy()}
        last_rollout: list = []
        lengths: list[int] = []  # of every completion this rollout rank generated
        label = {"mode": "sequential"}  # the mode whose steps run now (the image counts' label)
        image_log: list = []  # per train step on a policy rank: its batch's images, image tokens, patches
        image_token = job.policy.vision.image_token_id if job.policy is not None and job.policy.vision else None
        if job.policy is not None:
            job.policy.train_step = busy["train"].during(job.policy.train_step)
            if image_token is not None:
                job.policy.train_step = count_images(job.policy.train_step, image_log, label, image_token)
        if job.worker is not None:
            if ours.lengths != "model":
                job.worker.completion_budget = completion_budget(ours.lengths, cfg.max_completion_length, cfg.seed)
                job.worker.ignore_eos = True
            job.worker.rollout = _keep_last(job.worker.rollout, last_rollout, lengths)
            job.engine.generate = busy["generate"].during(job.engine.generate)
        overlap = ours.overlap and not placement.colocated
        asynchronous = ours.async_ and not placement.colocated  # every rank decides alike (the same placement)
        modes = ([("sequential", 0)] + ([("overlap", 1)] if overlap else [])
                 + ([("async", ours.async_staleness)] if asynchronous else []))
        histories, first = {}, 0
        mine: dict = {}
        for mode, staleness in modes:
            label["mode"] = mode
            if mode == "async":  # trainer.setup's async_mode path, from the step the next run_steps starts at
                cfg.async_mode, cfg.max_staleness = True, staleness
                if job.worker is not None:
                    from tgrpo.rollout.stream import GroupStream

                    job.stream = GroupStream(job.worker, cfg, first, None)
                staleness = 0  # async_mode's steps take the stream's groups, nothing is generated ahead
            warm = trainer.run_steps(job, first, first + 1, staleness)
            for b in busy.values():
                b.readings.clear()  # the warm-up step's readings do not count
            gpu = Busy()  # this rank's GPU (the engine's on a rollout rank) over the mode's timed steps
            gpu.start()
            try:
                histories[mode] = warm + trainer.run_steps(job, first + 1, first + ours.steps, staleness)
            finally:
                gpu.stop()
            mine[f"gpu_busy_{mode}"] = gpu.fraction()
            first += ours.steps
            if mode == "async":  # back to the synchronous path for what follows (every rank alike)
                if job.stream is not None:
                    job.stream.close()
                    job.stream = None
                cfg.async_mode = False
        mine.update({f"busy_{k}": b.fraction() for k, b in busy.items() if k != "bare"})
        # the ceiling of the train phase, timed in the same place of the same steps: the policy's update replaced by
        # a plain loop over the same micro-batches
        if ours.plain_steps:
            label["mode"] = "plain"
            if job.policy is not None:
                job.policy.train_step = plain_train_step(job.policy)
                if image_token is not None:
                    job.policy.train_step = count_images(job.policy.train_step, image_log, label, image_token)
            histories["plain"] = trainer.run_steps(job, first, first + 1 + ours.plain_steps, 0)
        if lengths:  # every step's, warm-ups and plain steps included
            mine.update(length_min=min(lengths), length_max=max(lengths), length_count=len(lengths),
                        length_at_limit=sum(n == cfg.max_completion_length for n in lengths))
        adapter_dir = None
        if cfg.use_lora and ours.bare_repeats:  # bare vLLM serves the policy's adapter: written in peft's format
            adapter_dir = os.path.join(cfg.output_dir, "bench-adapter")
            if job.policy is not None:
                from tgrpo.job.checkpoint import export_adapter

                export_adapter(job.policy.model, job.plan, job.adapter_config, job.model_dir, adapter_dir,
                               is_writer=rank == placement.sync_source)
            rank_life.gather_objects(None, job.groups.data)  # written before any engine reads it
        if job.worker is not None:
            mine.update(measure_generation(job, cfg, ours, busy["bare"], last_rollout[-1] if last_rollout else None,
                                           adapter_dir))
        if job.policy is not None:  # the policy's parameters: every one, and those that train (LoRA: the adapter)
            sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in job.policy.model.parameters()]
            mine.update(n_params=sum(n for n, _ in sizes), n_trainable=sum(n for n, grad in sizes if grad))
            from vl_data import vision_params

            tower = vision_params(job.policy.model)
            if tower is not None:
                mine.update(vision=tower, image_log=image_log)
        everyone = rank_life.gather_objects(mine, job.groups.data)
        trainer.finish(job)
        if rank == 0:
            report(histories, cfg, placement, everyone, ours)

    rank_life.run(lambda: adjusted(load_config(rest)), body)


def _random_vl_shapes() -> dict:
    """tgrpo/tiny.py's vision-language random shapes (none where that tree has none)."""
    from tgrpo import tiny

    return getattr(tiny, "RANDOM_VL_SHAPES", {})


def count_images(train_step, log: list, label: dict, image_token_id: int):
    from vl_data import count_images as counted

    return counted(train_step, log, label, image_token_id)


def share_one_gpu() -> None:
    """--share_gpu: every rank of the node binds GPU 0, and the groups that carry weights from the policy ranks to
    the engine ranks use gloo (NCCL refuses a communicator with two ranks on one GPU). The policy's own group keeps
    the configured backend (one GPU each side of it: a one-rank group here)."""
    from tgrpo.job import placement

    os.environ["LOCAL_RANK"] = "0"
    sync_groups, partition_groups = placement.build_sync_groups, placement.build_partition_groups
    placement.build_sync_groups = lambda p, senders, backend, timeout_s: sync_groups(p, senders, "gloo", timeout_s)
    placement.build_partition_groups = lambda p, backend, timeout_s: partition_groups(p, "gloo", timeout_s)


def _keep_last(rollout, kept: list, lengths: list):
    """The worker's rollout, keeping what its last call returned in kept[-1] and every completion's length."""
    def wrapped(*args, **kwargs):
        kept[:] = [rollout(*args, **kwargs)]
        lengths.extend(len(s.completion_ids) for s in kept[0][0])
        return kept[0]
    return wrapped


def completion_budget(lengths: str, max_tokens: int, seed: int):
    """A prompt's token budget under --lengths; varied and longtail are a fixed draw per prompt from a hash of
    (seed, its tokens), so every run and every trainer's engine and bare vLLM give a prompt the same budget."""
    if lengths == "fixed":
        return lambda prompt: max_tokens
    low = max(1, max_tokens // (4 if lengths == "varied" else 8))

    def budget(prompt) -> int:
        h = zlib.crc32(f"{seed}:{prompt.prompt_ids}".encode())
        if lengths == "varied":
            return low + h % (max_tokens - low + 1)
        return max_tokens if h % 10 == 0 else low
    return budget


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_train_step(policy):
    """A train phase with nothing but the work itself: the step's micro-batches through the same DeepSpeed engine
    with a plain next-token cross-entropy on the completion tokens, one optimizer step per mini-batch. With use_lora
    the engine's model is the peft model (base frozen, the adapter alone has gradients and optimizer state): the
    plain loop is then a plain peft loop on the same micro-batches."""
    import torch.nn.functional as F

    from tgrpo.policy import modeling

    def train_step(samples: list) -> dict:
        t0 = time.perf_counter()
        micro = policy.micro_batches(samples)
        targets = sum(mb.targets.numel() for mini in micro for mb in mini)
        policy.engine.train()
        for mini in micro:
            for mb in mini:
                logits = modeling.logits_at_targets(policy.engine, mb)
                loss = F.cross_entropy(logits.float(), mb.targets, reduction="sum") / targets
                policy.engine.backward(loss, scale_wrt_gas=False)
            policy.engine.step()
        _sync()
        return {"train_s": time.perf_counter() - t0, "micro_batches": float(sum(len(mini) for mini in micro))}
    return train_step


def measure_generation(job, cfg, ours, bare_busy, last_rollout, adapter_dir: str | None = None) -> dict:
    """On a rollout rank after the steps: the trainer's engine with and without seeds (--profile_generation), then
    bare vLLM on the same requests in a fresh engine (adapter_dir: serving that LoRA adapter), and the rewards of the
    last batch scored alone."""
    import torch

    worker, out = job.worker, {}
    prompts = worker.step_prompts(1)  # the first timed step's
    budgets = [worker.completion_budget(p) for p in prompts]
    # what the engine is sent: a vision-language prompt's ids with one token per image, and its images (PIL)
    media = [worker.media(p) for p in prompts]
    ids, images = [m[0] for m in media], ([m[1] for m in media] if worker.vision is not None else None)
    kwargs = dict(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p)
    if ours.profile_generation:
        seeded = job.engine.seeded
        for name, on in (("seeded", True), ("unseeded", False)):
            job.engine.seeded = on
            _sync()
            t0 = time.perf_counter()
            outs = job.engine.generate(ids, max_tokens=budgets, seed=cfg.seed, ignore_eos=worker.ignore_eos,
                                       images=images, **kwargs)
            out[f"engine_{name}_tokens_per_s"] = sum(len(c.token_ids) for g in outs for c in g) / (
                time.perf_counter() - t0)
        job.engine.seeded = seeded
    if last_rollout is not None:  # the rewards of a batch scored on their own, beside what a step waited for them
        samples = last_rollout[0]
        t0 = time.perf_counter()
        worker.scorer.score([s.prompt_text for s in samples], [s.completion_text for s in samples],
                            [s.answer for s in samples])
        out["reward_alone_s"] = time.perf_counter() - t0
        out["reward_completions"] = len(samples)
    job.engine.shutdown()
    if not ours.bare_repeats:
        return out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # colocated: the policy's cached blocks go back to the bare engine
    from tgrpo.job.trainer import dtypes

    runs = bare_generate(job.model_dir, ids, dtype=dtypes(cfg)[0], seed=cfg.seed, max_tokens=budgets,
                         ignore_eos=worker.ignore_eos,
                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, repeats=ours.bare_repeats,
                         during=bare_busy.during, adapter_dir=adapter_dir, lora_r=cfg.lora_r, images=images,
                         vision=_bare_vision(worker), **kwargs)
    out["bare_tokens_per_s"] = statistics.fmean(tokens / seconds for tokens, seconds in runs)
    out["bare_tokens"] = runs[-1][0]
    out["busy_bare"] = bare_busy.fraction()
    return out


def bare_generate(model_dir: str, prompt_ids: list[list[int]], *, dtype: str, seed: int, n: int,
                  max_tokens: list[int], ignore_eos: bool, temperature: float, top_p: float,
                  gpu_memory_utilization: float, repeats: int, during, adapter_dir: str | None = None,
                  lora_r: int = 0, images: list | None = None, vision: dict | None = None) -> list[tuple[int, float]]:
    """The generation ceiling: a fresh vLLM engine with vLLM's own defaults (tgrpo.rollout.vllm_engine.bare_llm), the same
    requests (budgets and ignore_eos as the trainer's engine had them, so both generate the same number of tokens)
    with sampled-token logprobs (which the trainer needs), after a short warm-up. adapter_dir: the engine serves that
    peft adapter (LoRA on, max_lora_rank the smallest of vLLM's sizes >= lora_r, one adapter), every request with
    it. Returns (generated tokens, seconds) of each of `repeats` timed runs; during(fn) wraps the timed calls (the GPU
    busy sampler).

    images (vision-language): each prompt's images (PIL), sent as multi_modal_data beside ids that hold one image
    token per image, as the trainer's engine sends them; vision: {"requests": the timed requests' images, "warm":
    (ids, images) of other prompts for the warm-up, "engine": the engine's image limits and pixel bounds (the
    trainer's, so that images are sized alike)}. The warm-up then runs on those other prompts and the prefix cache is
    reset before each timed run: the trainer's engine resets its own at every weight sync, so it meets every step's
    images and prompts cold, and so does bare vLLM here (its processor cache is vLLM's default and meets repeats only
    from the second timed run)."""
    from vllm import SamplingParams

    from tgrpo.rollout.vllm_engine import _prompt

    prompts = [_prompt(p, i) for p, i in zip(prompt_ids, images or [None] * len(prompt_ids))]
    warm_prompts = [_prompt(p, i) for p, i in zip(*vision["warm"])] if vision else prompts
    extra = vision["engine"] if vision else {}
    if adapter_dir:
        from vllm.lora.request import LoRARequest

        from tgrpo.policy.lora import vllm_max_rank

        engine = _bare_llm(model_dir, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                           enable_lora=True, max_lora_rank=vllm_max_rank(lora_r), max_loras=1, **extra)
        request = {"lora_request": LoRARequest("bench-adapter", 1, adapter_dir)}
    else:
        engine = _bare_llm(model_dir, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization, **extra)
        request = {}
    with engine as llm:
        warm = SamplingParams(n=n, max_tokens=8, temperature=temperature, top_p=top_p, logprobs=0)
        llm.generate(warm_prompts, warm, use_tqdm=False, **request)
        params = [SamplingParams(n=n, max_tokens=m, temperature=temperature, top_p=top_p, logprobs=0,
                                 ignore_eos=ignore_eos) for m in max_tokens]
        generate = during(llm.generate)
        runs = []
        for _ in range(repeats):
            if vision:
                llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outputs = generate(prompts, params, use_tqdm=False, **request)
            runs.append((sum(len(o.token_ids) for out in outputs for o in out.outputs), time.perf_counter() - t0))
        return runs


def _bare_vision(worker) -> dict | None:
    """bare_generate's vision argument on a vision-language rollout rank (None: a text model): the warm-up prompts
    (the warm-up step's, other images than the timed step's) and the engine's image arguments, as the trainer's
    engine has them (RolloutWorker._engine_images)."""
    if worker.vision is None:
        return None
    warm = [worker.media(p) for p in worker.step_prompts(0)]
    images = worker._engine_images()
    engine = {"limit_mm_per_prompt": {"image": max(1, images["per_prompt"]), "video": 0}}
    if images["processor"]:
        engine["mm_processor_kwargs"] = images["processor"]
    return {"warm": ([m[0] for m in warm], [m[1] for m in warm]), "engine": engine}


@contextlib.contextmanager
def _bare_llm(model_dir: str, *, dtype: str, seed: int, gpu_memory_utilization: float, **engine_args):
    """tgrpo.rollout.vllm_engine.bare_llm with these engine arguments (LoRA: enable_lora, max_lora_rank, max_loras;
    vision-language: limit_mm_per_prompt, mm_processor_kwargs): vLLM's defaults otherwise."""
    import torch
    from vllm import LLM

    from tgrpo.rollout.vllm_engine import _without_launcher_env

    on_gpu = torch.cuda.is_available()
    with _without_launcher_env():
        llm = LLM(model=model_dir, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization if on_gpu
                  else 0.1, **engine_args)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def flops_per_token(cfg, n_params: int, n_trainable: int) -> tuple[float, str]:
    """Model FLOPs of one token's forward and backward in the policy's update, and the formula's name. Full
    fine-tuning: 6 N (forward 2 N, activation gradients 2 N, weight gradients 2 N). LoRA: the frozen base's forward
    and activation gradients (4 per weight, no weight gradients) plus the adapter's forward, activation and weight
    gradients (6 per weight): 4 N_base + 6 N_adapter. Attention's own FLOPs, recomputation (gradient checkpointing)
    and the no-grad passes (old logprobs with num_iterations > 1, the reference) are left out: a lower bound."""
    if cfg.use_lora:
        return 4.0 * (n_params - n_trainable) + 6.0 * n_trainable, "(4*N_base + 6*N_adapter)*T (LoRA)"
    return 6.0 * n_params, "6*N*T"


def report(histories: dict, cfg, placement, everyone: list, ours) -> None:
    from tgrpo import console  # the console: a rank's own prints go to the node's log

    def mean(rows, key):
        return statistics.fmean(r.get(key, 0.0) for r in rows)

    def summary(key):  # over the ranks that measured it
        values = [e[key] for e in everyone if e and e.get(key) is not None]
        return statistics.fmean(values) if values else None

    timed = {mode: rows[1:] for mode, rows in histories.items()}
    rows = {mode: {name: mean(steps, key) for key, name in PHASES} for mode, steps in timed.items()}
    samples = cfg.prompts_per_step * cfg.num_generations  # every step's batch (dynamic sampling keeps its size)
    tokens = {mode: mean(steps, "batch/tokens") for mode, steps in timed.items()}
    completion = {mode: samples * mean(steps, "completion/length_mean") for mode, steps in timed.items()}
    # a phase's throughput: the step's prompt and completion tokens over that phase's seconds, step by step
    per_s = {mode: {name: statistics.fmean(r["batch/tokens"] / r[key] for r in steps)
                    for key, name in PHASES if all(r.get(key, 0.0) > 0 for r in steps)}
             for mode, steps in timed.items()}
    lengths = {"min": min((e["length_min"] for e in everyone if e and "length_min" in e), default=None),
               "max": max((e["length_max"] for e in everyone if e and "length_max" in e), default=None)}
    counted = sum(e.get("length_count", 0) for e in everyone if e)
    if counted:
        lengths["completions"] = counted
        lengths["at_limit_fraction"] = sum(e.get("length_at_limit", 0) for e in everyone if e) / counted
    console.say(f"\n{cfg.prompts_per_step} x {cfg.num_generations} x {cfg.max_completion_length}, lengths "
                f"{ours.lengths} ({LENGTH_WORDS[ours.lengths]}): completions of {lengths['min']}-{lengths['max']} "
                f"tokens, {lengths.get('at_limit_fraction', 0):.0%} at the limit; per timed step:")
    console.say(f"{'mode':<12}{'tokens':>9}{'completion':>11}" + "".join(f"{name + '_s':>11}" for _, name in PHASES)
                + f"{'gen tok/s':>11}")
    for mode, steps in timed.items():
        console.say(f"{mode:<12}{tokens[mode]:>9.0f}{completion[mode]:>11.0f}"
                    + "".join(f"{rows[mode][name]:>11.3f}" for _, name in PHASES)
                    + f"{mean(steps, 'throughput/generate_tokens_per_s'):>11.0f}")
        console.say(f"{'  step tokens/s':<32}" + "".join(f"{per_s[mode][name]:>11.0f}" if name in per_s[mode] else
                                                 f"{'-':>11}" for _, name in PHASES))
    seq = timed["sequential"]
    result = {"bench": "step", "model": os.path.basename(cfg.model), "dtype": cfg.dtype,
              "placement": (f"colocated {placement.world_size}" if placement.colocated else
                            f"rollout {cfg.rollout_ranks} policy {cfg.policy_ranks}"),
              "batch": f"{cfg.prompts_per_step}x{cfg.num_generations}x{cfg.max_completion_length}",
              "lengths": ours.lengths, "completion_lengths": lengths,
              "advantage_estimator": cfg.advantage_estimator,
              "zero_stage": placement.zero_stage, "max_tokens_per_micro_batch": cfg.max_tokens_per_micro_batch,
              "timed_steps": len(seq), "phases": rows, "step_s": rows["sequential"]["step"],
              "tokens_per_step": tokens["sequential"], "completion_tokens_per_step": completion["sequential"],
              "tokens_per_s": per_s,
              "micro_batches_per_step": mean(seq, "policy/micro_batches"),
              "completion_tokens_mean": mean(seq, "completion/length_mean"),
              "generate_tokens_per_s": mean(seq, "throughput/generate_tokens_per_s")}

    # generation against bare vLLM (every engine's own bare run, summed)
    bare = [e["bare_tokens_per_s"] for e in everyone if e and "bare_tokens_per_s" in e]
    if bare:
        result["bare_vllm_tokens_per_s"] = sum(bare)
        # the first timed step's requests: with --lengths, as many tokens as that step generated in the trainer
        result["bare_vllm_completion_tokens"] = sum(e["bare_tokens"] for e in everyone if e and "bare_tokens" in e)
        result["generate_vs_bare"] = result["generate_tokens_per_s"] / sum(bare)
    for key in ("busy_generate", "busy_bare", "engine_seeded_tokens_per_s", "engine_unseeded_tokens_per_s",
                "reward_alone_s"):
        if summary(key) is not None:
            result[key.replace("busy_generate", "rollout_busy").replace("busy_bare", "bare_busy")] = summary(key)
    result["reward_exposed_s"] = rows["sequential"]["reward"]
    console.say(f"generation: {result['generate_tokens_per_s']:.0f} tok/s in the trainer" + (
        f", bare vLLM {result['bare_vllm_tokens_per_s']:.0f} tok/s on the same requests: generate_vs_bare "
        f"{result['generate_vs_bare']:.3f}" if bare else "") + (
        f"; GPU busy {result['rollout_busy']:.2f}" + (f" (bare {result['bare_busy']:.2f})" if "bare_busy" in result
                                                        else "")
        if "rollout_busy" in result else ""))
    if "engine_seeded_tokens_per_s" in result:
        console.say(f"trainer's engine on the same requests: seeded {result['engine_seeded_tokens_per_s']:.0f} tok/s, "
              f"unseeded {result['engine_unseeded_tokens_per_s']:.0f} tok/s")
    if "reward_alone_s" in result:
        console.say(f"rewards: {summary('reward_completions'):.0f} completions take {result['reward_alone_s']:.3f} s scored "
              f"alone; a step waited {result['reward_exposed_s']:.3f} s for them after generation")

    # training against the plain loop, and MFU (flops_per_token: 6 N T, with LoRA (4 N_base + 6 N_adapter) T;
    # attention and the extra no-grad passes of num_iterations > 1 or a reference are left out: a lower bound)
    train_steps = [r["batch/tokens"] / r["time/train_s"] for r in seq]
    plain_steps = [r["batch/tokens"] / r["time/train_s"] for r in timed.pop("plain", [])]
    rows.pop("plain", None)
    per_s.pop("plain", None)
    train_tps = statistics.fmean(train_steps)
    plain_tps = statistics.fmean(plain_steps) if plain_steps else None
    result.update(train_tokens_per_s=train_tps, plain_timed_steps=len(plain_steps))
    if plain_tps:
        result.update(plain_tokens_per_s=plain_tps, train_vs_plain=train_tps / plain_tps)
    for name, steps in (("train", train_steps), ("plain", plain_steps)):  # how far one step strays from the mean
        if steps:
            result.update({f"{name}_tokens_per_s_min": min(steps), f"{name}_tokens_per_s_max": max(steps),
                           f"{name}_tokens_per_s_spread": (max(steps) - min(steps)) / statistics.fmean(steps)})
    if summary("busy_train") is not None:
        result["policy_busy"] = summary("busy_train")
    peak = ours.peak_tflops or _guess_peak_tflops()
    n_params = max((e["n_params"] for e in everyone if e and "n_params" in e), default=0)
    n_trainable = max((e["n_trainable"] for e in everyone if e and "n_trainable" in e), default=0)
    per_token, formula = flops_per_token(cfg, n_params, n_trainable)
    per_token_plain = per_token
    tower = next((e["vision"] for e in everyone if e and e.get("vision")), None)
    if tower is not None:  # the vision tower's FLOPs over the image patches it ran on, per token of the step
        per_token, per_token_plain, formula = vision_flops(cfg, tower, n_params, n_trainable, result,
                                                           next(e["image_log"] for e in everyone
                                                                if e and e.get("vision")))
    result.update(n_params=n_params, n_trainable_params=n_trainable, mfu_formula=formula, use_lora=cfg.use_lora)
    if cfg.use_lora:
        result.update(lora_r=cfg.lora_r, bare_vllm_serves_adapter=bool(ours.bare_repeats))
    if peak:
        per_gpu = per_token * cfg.num_iterations / placement.num_policy / 1e12
        result.update(train_tflops_per_gpu=per_gpu * train_tps, train_mfu=per_gpu * train_tps / peak,
                      peak_tflops=peak)
        if tower is not None:  # the language model's share alone, as the text bench counts it
            result["train_mfu_lm_only"] = (result["lm_flops_per_token"] * cfg.num_iterations / placement.num_policy
                                           / 1e12 * train_tps / peak)
        if plain_tps:
            result["plain_mfu"] = per_token_plain / placement.num_policy / 1e12 * plain_tps / peak
    console.say(f"training: {train_tps:.0f} tok/s ({min(train_steps):.0f}-{max(train_steps):.0f} over {len(seq)} "
          f"steps)" + (f", plain loop on the same micro-batches {plain_tps:.0f} tok/s ({min(plain_steps):.0f}-"
          f"{max(plain_steps):.0f} over {len(plain_steps)}): train_vs_plain {result['train_vs_plain']:.3f}"
          if plain_tps else ", no plain loop (--plain_steps 0)") + (
              f"; MFU {result['train_mfu']:.3f}" + (f" (plain {result['plain_mfu']:.3f})" if plain_tps else "")
              + f" of {peak:.0f} TFLOP/s, counting {formula}" if peak else f"; MFU formula {formula} (no GPU peak "
              f"known)") + (f"; GPU busy {result['policy_busy']:.2f}" if "policy_busy" in result else ""))
    for key in ("memory/policy_peak_gib", "memory/device_used_gib", "memory/rollout_device_used_gib"):
        if any(key in r for r in seq):
            result[key] = max(r.get(key, 0.0) for steps in timed.values() for r in steps)
    memory = [f"{key.split('/')[1]} {result[key]:.1f}" for key in ("memory/policy_peak_gib",
              "memory/device_used_gib", "memory/rollout_device_used_gib") if key in result]
    if memory:
        console.say("memory (GiB, the most over the timed steps): " + ", ".join(memory))
    if tower is not None:
        console.say(f"vision: {result['images_per_step']:.0f} images a step in the samples "
                    f"({result['distinct_images_per_step']:.0f} distinct, one per prompt, shared by its "
                    f"{cfg.num_generations} samples and through the tower once), "
                    f"{result['image_tokens_per_step']:.0f} image tokens of "
                    f"{result['tokens_per_step']:.0f}, {result['image_patches_per_step']:.0f} patches; tower "
                    f"{result['n_vision_params'] / 1e6:.1f}M (merger {result['n_merger_params'] / 1e6:.1f}M), LM "
                    f"{result['n_lm_params'] / 1e6:.1f}M: the tower is {result['vision_flops_share']:.1%} of the "
                    f"step's counted FLOPs" + (f"; MFU of the LM alone {result['train_mfu_lm_only']:.3f}"
                                               if "train_mfu_lm_only" in result else ""))
    if "overlap" in timed:
        ovl = rows["overlap"]
        slower = max(ovl["generate"] + ovl["reward"], ovl["train"])
        result.update(overlap_step_s=ovl["step"], overlap_speedup=rows["sequential"]["step"] / ovl["step"],
                      overlap_step_over_slower_phase=ovl["step"] / slower)
        console.say(f"overlap: {ovl['step']:.3f} s a step, {result['overlap_speedup']:.3f} x the sequential step, "
              f"{result['overlap_step_over_slower_phase']:.3f} x its slower phase")
    result["modes"] = mode_summary(timed, placement, everyone, ours)
    if "async" in result["modes"]:
        trained = {mode: m["tokens_trained_per_s"] for mode, m in result["modes"].items()}
        result["async_over_sync"] = trained["async"] / trained["sequential"]
        if "overlap" in trained:
            result["async_over_one_step_off"] = trained["async"] / trained["overlap"]
    say_modes(result, ours)
    console.say(json.dumps(result))


def vision_flops(cfg, tower: dict, n_params: int, n_trainable: int, result: dict, log: list) -> tuple:
    """A vision-language policy's FLOPs per token of the step (the GRPO steps', the plain loop's) and the formula's
    name: the language model's as flops_per_token counts them (6*N_lm*T, LoRA's own with LoRA), plus the tower's
    over the image patches P it ran on: 6 per weight and patch where the tower trains, 2 (its forward alone) where it
    is frozen (freeze_vision_tower, LoRA: nothing needs its gradients). The merger runs once per image token
    (tower["merge"] patches), so its weights count per image token. Fills result with the images, image tokens and
    patches per step (the sequential mode's timed steps) and the tower's sizes and share of the FLOPs. log: one
    policy rank's count_images records (every policy rank gets the step's whole batch)."""
    n_vision, n_merger, merge = tower["n_vision"], tower["n_merger"], tower["merge"]
    n_lm = n_params - n_vision
    lm_per_token, lm_formula = flops_per_token(cfg, n_lm, n_trainable - (n_vision if tower["trainable"] else 0))
    factor = 6 if tower["trainable"] else 2
    per_patch = factor * (n_vision - n_merger + n_merger / merge)

    def timed(mode):  # the mode's records less its warm-up step
        return [r for r in log if r["mode"] == mode][1:]

    def per_token(mode):
        steps = timed(mode)
        tokens, patches = sum(r["tokens"] for r in steps), sum(r["patches"] for r in steps)
        return lm_per_token + per_patch * patches / tokens if tokens else lm_per_token, patches / max(tokens, 1)

    seq, ratio = per_token("sequential")
    plain = per_token("plain")[0] if timed("plain") else seq
    steps = timed("sequential")
    for key in ("images", "distinct_images", "image_tokens", "patches"):
        name = "image_patches" if key == "patches" else key
        result[f"{name}_per_step"] = statistics.fmean(r[key] for r in steps) if steps else 0.0
    result.update(n_vision_params=n_vision, n_merger_params=n_merger, n_lm_params=n_lm,
                  vision_trainable=tower["trainable"], vision_flops_per_patch=per_patch,
                  vision_flops_share=per_patch * ratio / seq, patches_per_token=ratio,
                  lm_flops_per_token=lm_per_token)
    lm_formula = lm_formula.replace("6*N*T", "6*N_lm*T")
    formula = (f"{lm_formula} + {factor}*N_vision*P (P: the distinct images' patches, the merger's weights per "
               f"{merge} patches; {'trained' if tower['trainable'] else 'frozen: its forward alone'})")
    return seq, plain, formula


ASYNC_KEYS = ("staleness/mean", "staleness/max", "async/dropped_stale", "async/engine_busy_frac",
              "async/seqs_in_flight_mean", "async/groups_in_flight", "async/time_to_train_s",
              "async/engine_paused_s", "mismatch/lag0_tokens", "mismatch/lag0_logprob_abs_diff_max")


def mode_summary(timed: dict, placement, everyone: list, ours) -> dict:
    """Per mode over its timed steps: tokens trained per second (every step's prompt and completion tokens over the
    steps' seconds), the policy's and the engine's GPU busy and idle (NVML, mean over the timed steps; the same GPU
    with --share_gpu), the trainer's time/policy_idle_frac, and async_mode's own metrics."""
    out = {}
    for mode, steps in timed.items():
        seconds = sum(r["time/step_s"] for r in steps)
        m = {"timed_steps": len(steps), "step_s": seconds / len(steps),
             "tokens_per_step": statistics.fmean(r["batch/tokens"] for r in steps),
             "tokens_trained_per_s": sum(r["batch/tokens"] for r in steps) / seconds,
             "policy_idle_frac": statistics.fmean(r.get("time/policy_idle_frac", 0.0) for r in steps)}
        for side, ranks in (("policy", placement.policy), ("engine", placement.engine_ranks)):
            busy = [everyone[r].get(f"gpu_busy_{mode}") for r in ranks if everyone[r]]
            busy = [b for b in busy if b is not None]
            if busy:
                m[f"{side}_gpu_busy"] = statistics.fmean(busy)
                m[f"{side}_gpu_idle"] = 1.0 - m[f"{side}_gpu_busy"]
        if ours.share_gpu:
            m["gpu_shared"] = True
        for key in ASYNC_KEYS:
            values = [r[key] for r in steps if key in r]
            if values:
                name = key.replace("/", "_")
                if key == "staleness/max":
                    m[name] = max(values)
                elif key == "async/dropped_stale":
                    m[name] = sum(values)  # over the timed steps
                else:
                    m[name] = statistics.fmean(values)
        out[mode] = m
    return out


def say_modes(result: dict, ours) -> None:
    from tgrpo import console

    shared = " (one GPU shared by both)" if ours.share_gpu else ""
    console.say(f"\nper mode over its timed steps{shared}:")
    console.say(f"{'mode':<12}{'step_s':>9}{'tokens':>10}{'trained tok/s':>15}{'policy GPU idle':>17}"
                f"{'engine GPU idle':>17}{'policy_idle_frac':>18}")

    def fmt(v, width, spec):
        return f"{v:>{width}{spec}}" if v is not None else f"{'-':>{width}}"

    for mode, m in result["modes"].items():
        console.say(f"{mode:<12}{m['step_s']:>9.2f}{m['tokens_per_step']:>10.0f}{m['tokens_trained_per_s']:>15.0f}"
                    + fmt(m.get("policy_gpu_idle"), 17, ".3f") + fmt(m.get("engine_gpu_idle"), 17, ".3f")
                    + f"{m['policy_idle_frac']:>18.3f}")
    if "async" in result["modes"]:
        a = result["modes"]["async"]
        console.say(f"async (max_staleness {ours.async_staleness}): staleness mean {a.get('staleness_mean', 0):.3f} "
                    f"max {a.get('staleness_max', 0):.0f}, dropped_stale {a.get('async_dropped_stale', 0):.0f}, "
                    f"engine busy {a.get('async_engine_busy_frac', 0):.3f}, seqs in flight "
                    f"{a.get('async_seqs_in_flight_mean', 0):.0f}, time to train {a.get('async_time_to_train_s', 0):.2f}"
                    f" s; async_over_sync {result['async_over_sync']:.3f}"
                    + (f", async_over_one_step_off {result['async_over_one_step_off']:.3f}"
                       if "async_over_one_step_off" in result else ""))


def _guess_peak_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else 0.0


if __name__ == "__main__":
    main()
