"""tgrpo's real job beside TRL's GRPOTrainer on the same work, one GPU, colocated, in one call.

    python bench/trl_peer.py compare --model .cache/random-qwen2-v2-1.5b [--steps 5] [--warmup 1]

runs, one after the other on the same card:
  1. tgrpo: `torchrun --nproc_per_node 1 bench/tgrpo_fixed_job.py --config configs/default.yaml --colocate true
     --rollout_ranks all --policy_ranks all --model M --prompts_per_step 32 --max_completion_length 512
     --reward_funcs bench.random_rewards:reward --reward_weights 1.0 ...` (train_grpo.py unchanged, the rollout
     worker's ignore_eos on: every completion 512 tokens), stopped once `--steps` steps are in metrics.jsonl (the
     final checkpoint is not written: that is outside a step);
  2. TRL (pinned: trl==1.14.2) GRPOTrainer, this file's `trl` mode in a process of its own: vLLM colocated
     (use_vllm, vllm_mode colocate, sleep mode on as tgrpo's engine sleeps), the same model, prompts
     (data/arith_train.json with tgrpo's default system prompt), 32 prompts x 8 completions a step, every completion
     512 tokens (vLLM's ignore_eos through generation_kwargs), tgrpo's defaults for the algorithm (beta 0, loss_type
     dapo, epsilon 0.2, rewards scaled by the group's std, temperature 1, top_p 1, no importance-sampling
     correction: tgrpo's tis_cap is 0), configs/default.yaml's learning rate (constant), bf16 autocast over fp32
     master weights (TRL's default: it loads a model named by path in float32), no gradient checkpointing (tgrpo's
     default), AdamW, gradient clipping at 1.0, the same pseudo-random reward (bench/random_rewards.py).

Each run's first `--warmup` steps are left out; the rest (at least 3) are timed. Prints a table and one JSON line
with both step times and trl_over_tgrpo (TRL's step over tgrpo's: above 1 means tgrpo is faster).

What cannot be made equal: micro-batches. tgrpo packs a step's sequences into micro-batches of at most
max_tokens_per_micro_batch tokens (no padding); TRL pads per_device_train_batch_size sequences to the longest in
the micro-batch. --trl_batch picks TRL's sequences per micro-batch (default: as many as tgrpo's token budget holds,
about 552 tokens a sequence here); the table says both.

Other modes:
    python bench/trl_peer.py tgrpo --tree DIR --name NAME --model M [--steps 5] [-- train_grpo flags]
        the real job of a source tree (e.g. an older commit's `git archive`), train_grpo.py as it is there
    python bench/trl_peer.py summary NAME=metrics.jsonl ... [--warmup 1]
        per-step phases (metrics.jsonl's time/* fields) and the timed steps' means
    python bench/trl_peer.py trl --model M --result FILE ...    (what `compare` runs for TRL)
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tgrpo's default system_prompt (tgrpo/config.py), which configs/default.yaml keeps
SYSTEM_PROMPT = "Solve the problem. Put only the final answer inside <answer></answer>."
PROMPTS_PER_STEP, GROUP, LENGTH = 32, 8, 512


# --------------------------------------------------------------------------------------------------------------------
# the reward: bench/random_rewards.py's, in TRL's calling convention
def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))  # conversational


def random_reward(completions, **kwargs) -> list[float]:
    return [zlib.crc32(_text(c).encode()) / 2**32 for c in completions]


# --------------------------------------------------------------------------------------------------------------------
# device facts, read with nvidia-smi (never a CUDA context in the driving process: it would hold GPU memory)
def _smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception as e:  # no GPU here: the CPU dry run
        return f"unknown ({type(e).__name__})"


def gpu_memory_mib() -> int:
    try:
        return int(_smi("memory.total").split()[0])
    except ValueError:
        return 0


def wait_gpu_free(limit_s: float = 90.0) -> None:
    """Until no compute process holds the GPU (a killed job's engine can take seconds to go)."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        try:
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.split()
        except Exception:
            return
        if not apps:
            return
        time.sleep(2)
    print(f"warning: GPU still held by {apps} after {limit_s:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# the real job
def _metrics_rows(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return rows


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (its own session: torchrun, its rank, the engine), SIGKILL if it stays."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything the group left behind (the engine outlives torchrun by a moment)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_tgrpo(tree: str, script: str, flags: list[str], out_dir: str, steps: int, timeout_s: float, log_path: str,
              port: int) -> tuple[list[dict], float]:
    """The job from `tree` (its tgrpo package, its bench.random_rewards), stopped once `steps` steps are logged."""
    tree = os.path.abspath(tree)
    env = dict(os.environ)
    site = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) not in (ROOT, tree)]
    env["PYTHONPATH"] = os.pathsep.join(site + [tree])
    metrics = os.path.join(out_dir, "metrics.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
           script, *flags, "--output_dir", out_dir, "--max_steps", str(steps + 3)]
    print(f"[{time.strftime('%H:%M:%S')}] start in {tree}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None and time.time() - t0 < timeout_s:
                if len(_metrics_rows(metrics)) >= steps:
                    break
                time.sleep(1)
        finally:
            _stop(proc)
    wall = time.time() - t0
    rows = _metrics_rows(metrics)[:steps]
    print(f"[{time.strftime('%H:%M:%S')}] {len(rows)} of {steps} steps logged in {wall:.0f} s "
          f"(exit {proc.returncode}; stopped after the last wanted step)", flush=True)
    wait_gpu_free()
    return rows, wall


def tgrpo_flags(model: str, tokens_per_micro_batch: int, extra: list[str]) -> list[str]:
    flags = ["--config", "configs/default.yaml", "--colocate", "true", "--rollout_ranks", "all", "--policy_ranks",
             "all", "--model", os.path.abspath(model), "--prompts_per_step", str(PROMPTS_PER_STEP),
             "--num_generations", str(GROUP), "--max_completion_length", str(LENGTH),
             "--reward_funcs", "bench.random_rewards:reward", "--reward_weights", "1.0"]
    if tokens_per_micro_batch:
        flags += ["--max_tokens_per_micro_batch", str(tokens_per_micro_batch)]
    return flags + list(extra)


PHASES = [("step", "time/step_s"), ("generate", "time/generate_s"), ("reward wait", "time/reward_s"),
          ("gather", "time/gather_s"), ("train", "time/train_s"), ("sync", "time/sync_s")]


def tgrpo_summary(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:]
    out = {"steps_logged": len(rows), "steps_timed": len(timed),
           "step_s_each": [round(r.get("time/step_s", float("nan")), 3) for r in rows]}
    if not timed:
        return out
    for name, key in PHASES:
        values = [r[key] for r in timed if key in r]
        if values:
            out[f"{name.replace(' ', '_')}_s"] = statistics.fmean(values)
    out["step_s_min"] = min(r["time/step_s"] for r in timed)
    out["step_s_max"] = max(r["time/step_s"] for r in timed)
    for key in ("batch/tokens", "completion/length_mean", "completion/truncated_fraction",
                "throughput/generate_tokens_per_s", "throughput/train_tokens_per_s", "memory/policy_peak_gib",
                "time/policy_idle_frac", "policy/micro_batches"):
        values = [r[key] for r in timed if key in r]
        if values:
            out[key] = statistics.fmean(values)
    if "batch/tokens" in out:
        out["tokens_per_step"] = out["batch/tokens"]
        out["completion_tokens_per_step"] = out.get("completion/length_mean", 0.0) * PROMPTS_PER_STEP * GROUP
    return out


def print_steps(name: str, rows: list[dict], warmup: int) -> None:
    keys = sorted({k for r in rows for k in r if k.startswith("time/")})
    print(f"\n{name}: per step (the first {warmup} a warm-up)")
    print("| step | " + " | ".join(k[5:] for k in keys) + " | tokens | completion mean |")
    print("|---" * (len(keys) + 3) + "|")
    for i, r in enumerate(rows, 1):
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in keys]
        print(f"| {i}{' (warm-up)' if i <= warmup else ''} | " + " | ".join(cells)
              + f" | {r.get('batch/tokens', 0):,.0f} | {r.get('completion/length_mean', 0):.1f} |")


# --------------------------------------------------------------------------------------------------------------------
# TRL, in a process of its own
def trl_main(a) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.generation import vllm_generation as vg

    clock = {"generate": 0.0, "sync": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "completions": 0,
             "at_limit": 0}

    def timed(fn, key):
        def wrapper(self, *args, **kwargs):
            torch.cuda.synchronize()
            t0, sync0 = time.perf_counter(), clock["sync"]
            out = fn(self, *args, **kwargs)
            torch.cuda.synchronize()
            spent = time.perf_counter() - t0
            if key == "generate":
                clock["generate"] += spent - (clock["sync"] - sync0)  # a sync nested in generate counts as sync
                prompt_ids, completion_ids = out[0], out[1]
                clock["prompt_tokens"] += sum(len(p) for p in prompt_ids)
                clock["completion_tokens"] += sum(len(c) for c in completion_ids)
                clock["completions"] += len(completion_ids)
                clock["at_limit"] += sum(len(c) >= a.length for c in completion_ids)
            else:
                clock[key] += spent
            return out
        return wrapper

    vg.VLLMGeneration.generate = timed(vg.VLLMGeneration.generate, "generate")
    vg.VLLMGeneration.sync_weights = timed(vg.VLLMGeneration.sync_weights, "sync")

    steps = []

    class Timer(TrainerCallback):
        """Per optimizer step: begin -> end (generation, scoring, training, the optimizer step), and end -> end."""
        last_end = None

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            for k in clock:
                clock[k] = 0 if isinstance(clock[k], int) else 0.0

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            now = time.perf_counter()
            row = {"step": state.global_step, "begin_to_end_s": now - self.t0,
                   "end_to_end_s": (now - self.last_end) if self.last_end is not None else None,
                   "generate_s": clock["generate"], "sync_s": clock["sync"],
                   "prompt_tokens": clock["prompt_tokens"], "completion_tokens": clock["completion_tokens"],
                   "completions": clock["completions"], "at_limit": clock["at_limit"],
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            row["rest_s"] = row["begin_to_end_s"] - row["generate_s"] - row["sync_s"]
            self.last_end = now
            steps.append(row)
            print("trl step " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                            for k, v in row.items()}), flush=True)

    with open(os.path.join(ROOT, "data", "arith_train.json")) as f:
        rows = json.load(f)
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM_PROMPT}] + r["messages"],
                                  "answer": str(r["answer"])} for r in rows])
    per_step = a.prompts * a.group
    if per_step % a.batch:
        sys.exit(f"--trl_batch {a.batch} must divide a step's {per_step} completions")
    config = GRPOConfig(
        output_dir=a.out, max_steps=a.steps, seed=42, report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=per_step // a.batch,
        num_generations=a.group, max_completion_length=a.length, temperature=1.0, top_p=1.0,
        learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group", num_iterations=1,
        bf16=True, gradient_checkpointing=False,
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=a.vllm_memory, vllm_enable_sleep_mode=True,
        vllm_importance_sampling_correction=False,
        generation_kwargs={"ignore_eos": True} if a.fixed else None,
        log_completions=False, dataloader_num_workers=0, remove_unused_columns=False,
    )
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
          f"{a.prompts} prompts x {a.group}, {per_step // a.batch} micro-batches of {a.batch} sequences, "
          f"ignore_eos {a.fixed}", flush=True)
    t0 = time.time()
    trainer = GRPOTrainer(model=a.model, reward_funcs=[random_reward], args=config, train_dataset=dataset,
                          callbacks=[Timer()])
    ready_s = time.time() - t0
    trainer.train()
    result = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
              "ready_s": ready_s, "steps": steps, "batch": a.batch, "micro_batches": per_step // a.batch,
              "optim": str(config.optim), "model_dtype": str(next(trainer.model.parameters()).dtype),
              "log_history": trainer.state.log_history}
    with open(a.result, "w") as f:
        json.dump(result, f)
    print(f"trl done: {len(steps)} steps, result in {a.result}", flush=True)


def trl_summary(result: dict, warmup: int) -> dict:
    steps = result.get("steps", [])
    timed = steps[warmup:]
    out = {"steps_logged": len(steps), "steps_timed": len(timed),
           "step_s_each": [round(s["end_to_end_s"] or s["begin_to_end_s"], 3) for s in steps],
           "batch": result.get("batch"), "micro_batches": result.get("micro_batches"), "trl": result.get("trl"),
           "model_dtype": result.get("model_dtype"), "optim": result.get("optim"), "ready_s": result.get("ready_s")}
    if not timed:
        return out
    ends = [s["end_to_end_s"] if s["end_to_end_s"] is not None else s["begin_to_end_s"] for s in timed]
    out.update(step_s=statistics.fmean(ends), step_s_min=min(ends), step_s_max=max(ends),
               begin_to_end_s=statistics.fmean(s["begin_to_end_s"] for s in timed),
               generate_s=statistics.fmean(s["generate_s"] for s in timed),
               sync_s=statistics.fmean(s["sync_s"] for s in timed),
               rest_s=statistics.fmean(s["rest_s"] for s in timed),
               tokens_per_step=statistics.fmean(s["prompt_tokens"] + s["completion_tokens"] for s in timed),
               completion_tokens_per_step=statistics.fmean(s["completion_tokens"] for s in timed),
               at_limit_fraction=sum(s["at_limit"] for s in timed) / max(1, sum(s["completions"] for s in timed)),
               peak_gib=max(s["peak_gib"] for s in timed))
    return out


# --------------------------------------------------------------------------------------------------------------------
def run_trl(a, batch: int, timeout_s: float) -> tuple[dict, bool]:
    """This file's trl mode in a process (and session) of its own; its result, and whether it ran out of memory."""
    result_file = os.path.join(a.work, f"trl-result-{batch}.json")
    log_path = os.path.join(a.logs, f"trl-{batch}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "trl", "--model", os.path.abspath(a.model),
           "--steps", str(a.steps), "--batch", str(batch), "--result", result_file,
           "--out", os.path.join(a.work, f"trl-{batch}"), "--lr", str(a.lr), "--vllm_memory", str(a.vllm_memory)]
    if a.natural:
        cmd.append("--natural")
    print(f"[{time.strftime('%H:%M:%S')}] start: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and time.time() - t0 < timeout_s and not os.path.exists(result_file):
                time.sleep(1)
            if proc.poll() is None and os.path.exists(result_file):  # written: give it a moment to exit
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            _stop(proc)
    print(f"[{time.strftime('%H:%M:%S')}] TRL exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
    wait_gpu_free()
    with open(log_path) as f:
        text = f.read()
    try:
        with open(result_file) as f:
            return json.load(f), False
    except FileNotFoundError:  # it stopped early: the steps it printed still count
        steps = [json.loads(line[len("trl step "):]) for line in text.splitlines() if line.startswith("trl step ")]
        return {"steps": steps, "batch": batch, "micro_batches": PROMPTS_PER_STEP * GROUP // batch}, \
            "out of memory" in text.lower() or "OutOfMemoryError" in text


def compare(a, extra: list[str]) -> int:
    os.makedirs(a.work, exist_ok=True)
    mib = gpu_memory_mib()
    card = _smi("name,driver_version,memory.total")
    tokens = a.tgrpo_tokens if a.tgrpo_tokens is not None else (0 if mib > 100_000 else 8192)
    budget = tokens or 16384  # tgrpo's default max_tokens_per_micro_batch
    # the divisor of a step's 256 sequences whose padded micro-batch (~552 tokens a sequence) is nearest tgrpo's budget
    batch = a.trl_batch or min((1, 2, 4, 8, 16, 32, 64, 128, 256), key=lambda b: abs(b * 552 - budget))
    print(f"card: {card}; tgrpo micro-batches of at most {budget} tokens, TRL micro-batches of {batch} sequences",
          flush=True)
    results = {}
    if "tgrpo" in a.runs:
        script = os.path.join(ROOT, "train_grpo.py") if a.natural else os.path.join(ROOT, "bench", "tgrpo_fixed_job.py")
        rows, wall = run_tgrpo(ROOT, script, tgrpo_flags(a.model, tokens, extra),
                               os.path.join(a.work, "tgrpo"), a.steps, a.timeout_s,
                               os.path.join(a.logs, "tgrpo.log"), 29651)
        with open(os.path.join(a.logs, "metrics-tgrpo.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print_steps("tgrpo", rows, a.warmup)
        results["tgrpo"] = {**tgrpo_summary(rows, a.warmup), "wall_s": wall,
                            "max_tokens_per_micro_batch": budget}
    if "trl" in a.runs:
        t_all = time.time()
        limit = a.trl_timeout_s or a.timeout_s
        if a.deadline:  # the device call's end: TRL gets what is left of it
            limit = min(limit, a.deadline - time.time() - 15)
            print(f"TRL gets {limit:.0f} s (what is left before the call's deadline)", flush=True)
        trl_result = {"steps": [], "skipped": f"{limit:.0f} s left"}
        while limit >= 60:
            trl_result, oom = run_trl(a, batch, limit - (time.time() - t_all))
            left = limit - (time.time() - t_all)
            if trl_result["steps"] or not oom or batch <= 4 or left < 200:
                break
            print(f"TRL ran out of GPU memory with {batch} sequences a micro-batch: again with {batch // 2}",
                  flush=True)
            batch //= 2
        results["trl"] = {**trl_summary(trl_result, a.warmup), "wall_s": time.time() - t_all}

    t, r = results.get("tgrpo", {}), results.get("trl", {})

    def cell(d, key, fmt="{:.2f}"):
        return fmt.format(d[key]) if key in d and d[key] is not None else "-"

    lengths = "completions end where the model stops" if a.natural else "every completion at the limit (ignore_eos)"
    print(f"\n{card}, {PROMPTS_PER_STEP} prompts x {GROUP} x {LENGTH} tokens ({lengths}), "
          f"random model {os.path.basename(os.path.abspath(a.model))}, {a.warmup} warm-up step(s) left out")
    print("| trainer | timed steps | step s (mean) | min-max | generate s | sync s | train and rest s "
          "| tokens/step | completion tokens/step | micro-batches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if t:
        rest = t.get("step_s", 0) - t.get("generate_s", 0) - t.get("sync_s", 0) if "step_s" in t else None
        print(f"| tgrpo (train_grpo.py) | {t['steps_timed']} | {cell(t, 'step_s')} | "
              f"{cell(t, 'step_s_min')}-{cell(t, 'step_s_max')} | {cell(t, 'generate_s')} | {cell(t, 'sync_s')} | "
              f"{'-' if rest is None else f'{rest:.2f}'} (train {cell(t, 'train_s')}) | "
              f"{cell(t, 'tokens_per_step', '{:,.0f}')} | {cell(t, 'completion_tokens_per_step', '{:,.0f}')} | "
              f"{cell(t, 'policy/micro_batches', '{:.0f}')} packed, <= {t['max_tokens_per_micro_batch']} tokens |")
    if r:
        print(f"| TRL {r.get('trl')} GRPOTrainer | {r['steps_timed']} | {cell(r, 'step_s')} | "
              f"{cell(r, 'step_s_min')}-{cell(r, 'step_s_max')} | {cell(r, 'generate_s')} | {cell(r, 'sync_s')} | "
              f"{cell(r, 'rest_s')} | {cell(r, 'tokens_per_step', '{:,.0f}')} | "
              f"{cell(r, 'completion_tokens_per_step', '{:,.0f}')} | {r.get('micro_batches')} x {r.get('batch')} "
              f"sequences, padded |")
    ratio = r["step_s"] / t["step_s"] if t.get("step_s") and r.get("step_s") else None
    if ratio:
        print(f"trl_over_tgrpo {ratio:.3f} (TRL's step over tgrpo's: tgrpo {ratio:.2f}x as fast)")
    print(json.dumps({"bench": "trl_peer", "card": card, "date": time.strftime("%Y-%m-%d"),
                      "prompts_per_step": PROMPTS_PER_STEP, "group": GROUP, "max_completion_length": LENGTH,
                      "lengths": "model" if a.natural else "fixed", "warmup": a.warmup,
                      "tgrpo": t, "trl": r, "trl_over_tgrpo": ratio}, default=str))
    return 0 if ratio else 1


def tgrpo_main(a, extra: list[str]) -> int:
    tokens = a.tgrpo_tokens if a.tgrpo_tokens is not None else (0 if gpu_memory_mib() > 100_000 else 8192)
    rows, wall = run_tgrpo(a.tree, os.path.join(os.path.abspath(a.tree), "train_grpo.py"),
                           tgrpo_flags(a.model, tokens, extra), os.path.join(a.work, a.name), a.steps, a.timeout_s,
                           os.path.join(a.logs, f"{a.name}.log"), a.port)
    with open(os.path.join(a.logs, f"metrics-{a.name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print_steps(a.name, rows, a.warmup)
    print(json.dumps({"run": a.name, "tree": os.path.abspath(a.tree), "wall_s": wall,
                      **tgrpo_summary(rows, a.warmup)}))
    return 0 if len(rows) > a.warmup else 1


def summary_main(a) -> int:
    runs = {}
    for spec in a.files:
        name, _, path = spec.partition("=")
        rows = _metrics_rows(path)
        print_steps(name, rows, a.warmup)
        runs[name] = tgrpo_summary(rows, a.warmup)
    print(f"\ntimed steps' means (the first {a.warmup} left out)")
    print("| run | timed steps | step s | min-max | " + " | ".join(n for n, _ in PHASES[1:])
          + " | tokens/step | gen tok/s | train tok/s |")
    print("|---" * (len(PHASES) + 6) + "|")
    for name, s in runs.items():
        if "step_s" not in s:
            print(f"| {name} | 0 | - |")
            continue
        phases = " | ".join(f"{s.get(n.replace(' ', '_') + '_s', float('nan')):.2f}" for n, _ in PHASES[1:])
        print(f"| {name} | {s['steps_timed']} | {s['step_s']:.2f} | {s['step_s_min']:.2f}-{s['step_s_max']:.2f} | "
              f"{phases} | {s.get('tokens_per_step', 0):,.0f} | "
              f"{s.get('throughput/generate_tokens_per_s', 0):,.0f} | {s.get('throughput/train_tokens_per_s', 0):,.0f} |")
    print(json.dumps({"summary": runs}))
    return 0


def main(argv=None) -> int:
    # a timeout's SIGTERM unwinds (the runs' finally blocks stop the jobs' process groups) instead of leaving them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # train_grpo.py flags after --
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    def common(q):
        q.add_argument("--model", required=True, help="the random model's folder (python -m tgrpo.tiny .cache "
                                                      "--random 1.5b)")
        q.add_argument("--steps", type=int, default=5, help="steps each trainer runs (warm-up included)")
        q.add_argument("--warmup", type=int, default=1, help="first steps left out of the means")
        q.add_argument("--work", default="/tmp/trl_peer", help="output folders of the runs")
        q.add_argument("--logs", default=os.environ.get("OUT", "/tmp/trl_peer"), help="logs go here")
        q.add_argument("--timeout_s", type=float, default=420, help="most seconds a run may take, start-up included")
        q.add_argument("--tgrpo_tokens", type=int, default=None, help="tgrpo's max_tokens_per_micro_batch; default: "
                       "its own default (16384) on a card over 100 GB, 8192 on an 80 GB card")

    c = sub.add_parser("compare", help="tgrpo's real job, then TRL, on the same card")
    common(c)
    c.add_argument("--runs", default="tgrpo,trl", help="which of the two to run")
    c.add_argument("--trl_timeout_s", type=float, default=0, help="most seconds for TRL (default: --timeout_s)")
    c.add_argument("--deadline", type=float, default=0, help="epoch seconds by which TRL must have stopped (a device "
                   "call's limit); TRL is skipped when under a minute is left")
    c.add_argument("--trl_batch", type=int, default=0, help="TRL's sequences per micro-batch (default: as many "
                   "552-token sequences as tgrpo's token budget holds)")
    c.add_argument("--lr", type=float, default=5e-4, help="learning rate of both (configs/default.yaml's)")
    c.add_argument("--vllm_memory", type=float, default=0.5, help="TRL's vllm_gpu_memory_utilization (tgrpo's "
                   "default vllm_gpu_memory_utilization is 0.5)")
    c.add_argument("--natural", action="store_true", help="no ignore_eos in either: completions end where the "
                   "model stops (a random model rarely does)")

    g = sub.add_parser("tgrpo", help="the real job of one source tree")
    common(g)
    g.add_argument("--tree", default=ROOT, help="source tree to run (its train_grpo.py and tgrpo package)")
    g.add_argument("--name", required=True)
    g.add_argument("--port", type=int, default=29661)

    s = sub.add_parser("summary", help="per-step phases of metrics.jsonl files")
    s.add_argument("files", nargs="+", metavar="NAME=metrics.jsonl")
    s.add_argument("--warmup", type=int, default=1)

    t = sub.add_parser("trl", help="TRL's GRPOTrainer alone (what compare runs)")
    t.add_argument("--model", required=True)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--prompts", type=int, default=PROMPTS_PER_STEP)
    t.add_argument("--group", type=int, default=GROUP)
    t.add_argument("--length", type=int, default=LENGTH)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--vllm_memory", type=float, default=0.5)
    t.add_argument("--natural", dest="fixed", action="store_false")
    t.add_argument("--result", required=True)
    t.add_argument("--out", default="/tmp/trl_peer/trl")

    a = p.parse_args(argv)
    for folder in (getattr(a, "work", None), getattr(a, "logs", None)):
        if folder:
            os.makedirs(folder, exist_ok=True)
    if a.mode == "compare":
        return compare(a, extra)
    if a.mode == "tgrpo":
        return tgrpo_main(a, extra)
    if a.mode == "summary":
        return summary_main(a)
    trl_main(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
