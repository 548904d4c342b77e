"""The run's one typed config: a YAML file plus command-line overrides, help text on every field, validation.

    python train_grpo.py --config configs/default.yaml --learning_rate 1e-4 --max_steps 20

The config describes values: defaults, help, types, and the rules between values (`Config.check`). It imports no
other tgrpo module but the errors. Checks that touch the world (the placement against the ranks launched, files, the
model, the data rows, a checkpoint to resume, user reward modules) are `tgrpo.job.checks.check_job`, which node.sh's
pre-flight and every rank run before any process group, engine or model starts. A problem is one `ConfigError`
line that names the field and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from tgrpo.errors import ConfigError

__all__ = ["Config", "ConfigError", "build_parser", "load_config"]


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- model -----------------------------------------------------------------------------------------------
    model: str = _f("tiny", "Local Hugging Face model folder (config.json, weights, tokenizer), or 'tiny' for the "
                    "embedded tiny Qwen2 model ('tiny-search': the one of the multi-turn search example; 'tiny-vl': "
                    "the tiny Qwen2-VL of the vision-language example), built "
                    "into cache_dir on first use.")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "Weights dtype for the policy, reference and vLLM. auto: bfloat16 on GPU, float32 on CPU.")
    cache_dir: str = _f(".cache", "Where the embedded tiny model and tokenizer are built.")

    # --- data ------------------------------------------------------------------------------------------------
    train_data: str = _f("data/arith_train.json", "Training prompts: a .json/.jsonl/.parquet file or a datasets "
                         "save_to_disk folder of rows {messages: [...], answer: ...} (chatml; 'conversations' too).")
    eval_data: str = _f("", "Held-out prompts in the same formats, evaluated every eval_steps; empty for none.")
    eval_steps: int = _f(0, "Evaluate every this many steps (and after the last); 0 turns evaluation off.")
    eval_k: int = _f(4, "Samples per eval prompt at the rollout temperature for mean@k (greedy pass@1 always).")
    eval_max_prompts: int = _f(256, "Evaluate on at most this many eval prompts (the first ones).")
    prompt_column: str = _f("messages", "Column holding the chat messages of the prompt.")
    answer_column: str = _f("answer", "Column holding the reference answer the rewards compare against.")
    system_prompt: str = _f("Solve the problem. Put only the final answer inside <answer></answer>.",
                            "System message put before each prompt that has none; empty string for none.")
    max_prompt_length: int = _f(256, "Prompts longer than this many tokens are dropped (with a count); a prompt "
                                "whose image tokens alone exceed it is refused, naming the row.")
    image_column: str = _f("images", "Vision-language models: the column holding each row's images (a list, or one "
                           "image): paths relative to the data file or absolute, image bytes, or datasets.Image "
                           "values; <image> in the prompt's text marks where each goes. A missing 'images' falls "
                           "back to 'image'. Images inside OpenAI-style content lists need no column.")
    min_pixels: int = _f(0, "Vision-language models: the fewest pixels an image is resized to (Qwen2-VL's "
                         "min_pixels, e.g. 3136 = 56*56); 0: the processor's own setting.")
    max_pixels: int = _f(0, "Vision-language models: the most pixels an image is resized to (Qwen2-VL's "
                         "max_pixels, e.g. 200704 = 448*448); 0: the processor's own setting.")

    # --- placement -------------------------------------------------------------------------------------------
    rollout_ranks: str = _f("0-0", "Closed range(s) of global ranks whose GPUs hold vLLM engines, e.g. '0-1', "
                            "'0,2-3' or 'all'.")
    policy_ranks: str = _f("1-2", "Closed range(s) of global ranks that train the policy with DeepSpeed ZeRO-3.")
    reference_ranks: str = _f("", "Ranks of their own for the frozen reference model (beta > 0), ZeRO-3 over them; "
                              "empty keeps the reference on the policy ranks.")
    colocate: bool = _f(False, "Every rank both rolls out and trains (rollout_ranks = policy_ranks = 'all'); on GPU "
                        "vLLM sleeps while the policy trains. False: split placement, each rank one role.")
    rollout_tensor_parallel_size: int = _f(1, "GPUs per vLLM engine: each engine spans this many consecutive "
                                           "rollout ranks of one node, the first of which drives it.")
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "Collective backend: auto picks nccl with GPUs, else gloo.")
    dist_timeout_s: int = _f(600, "Timeout of every collective and of start-up, in seconds: a rank that never "
                             "joins or a peer that died ends the job after this long.")

    # --- rollout ---------------------------------------------------------------------------------------------
    prompts_per_step: int = _f(16, "Prompts per step over all rollout ranks.")
    num_generations: int = _f(8, "Completions sampled per prompt (the GRPO group size; 1 is valid with "
                              "advantage_estimator gae).")
    max_completion_length: int = _f(32, "Most new tokens per completion (with a retriever: per episode, the "
                                    "model's and the tool's tokens together).")
    temperature: float = _f(1.0, "Sampling temperature of the rollout (must be > 0: groups need diversity).")
    top_p: float = _f(1.0, "Nucleus sampling of the rollout. Below 1, vLLM's sampling logprobs are renormalised over "
                           "the nucleus while the trainer's cover the whole vocabulary: tis_cap (and so "
                           "max_staleness) cannot be used, and mismatch/* also measure that difference.")
    vllm_gpu_memory_utilization: float = _f(0.5, "Share of GPU memory a vLLM engine may take (GPU only).")
    vllm_cpu_kvcache_gib: int = _f(1, "KV cache size of a CPU vLLM engine, in GiB (CPU only).")
    vllm_enforce_eager: Optional[bool] = _f(
        None, "Run vLLM's model eagerly: no torch.compile, no CUDA graphs (faster start, slower decode on GPU). "
        "Unset: off on GPU, on with vLLM's CPU backend, where compiling costs 10-20 s a start and gains nothing.")
    vllm_enable_prefix_caching: bool = _f(True, "Reuse the KV cache of shared prefixes (a prompt's n samples, "
                                          "multi-turn episodes); reset after every weight update.")
    vllm_enable_chunked_prefill: Optional[bool] = _f(
        None, "Split long prefills into chunks scheduled beside decodes (vLLM's default). Unset: on, except with "
        "per-request seeds on the CPU backend, which cannot rewind a request's generator after a chunk.")
    vllm_max_num_seqs: int = _f(0, "Most sequences a vLLM engine decodes at once; 0: its share of a step's "
                                "samples (prompts_per_step / engines * num_generations), at least 256.")
    vllm_max_num_batched_tokens: int = _f(0, "Most tokens per vLLM engine step; 0: vLLM's default.")
    vllm_sleep_level: int = _f(2, "Colocated on GPU, while the policy trains: 2 frees the engine's weights and KV "
                               "cache (the sync reloads the weights anyway), 1 keeps a copy of the weights in CPU "
                               "memory and copies them back on waking.")
    sampling_seeds: Literal["auto", "on", "off"] = _f(
        "auto", "A seed per request, derived from (seed, step, prompt): a resumed run then samples exactly what the "
        "uninterrupted one did where runs are bit-exact (the CPU backend). vLLM samples seeded requests one at a "
        "time: on an H200 (1.5B, 512 sequences) seeds cost 15-22%% of generation throughput. auto: on with the CPU "
        "backend, off on GPU, where batch-dependent kernels make samples differ between runs anyway.")

    # --- multi-turn tools ------------------------------------------------------------------------------------
    retriever_url: str = _f("", "Retrieval server (Search-R1's POST /retrieve API; `bash launch/retriever.sh start` "
                            "runs the bundled BM25 one on each node). Set: episodes are multi-turn, the model "
                            "searches with <search>query</search> and reads <information>...</information> "
                            "(tool tokens count in no loss); empty: one turn.")
    retriever_topk: int = _f(3, "Passages per search.")
    retriever_timeout_s: float = _f(10.0, "Timeout of one retriever request, in seconds.")
    retriever_retries: int = _f(2, "Retries of a failed retriever request (with backoff) before giving up.")
    retriever_max_concurrency: int = _f(8, "Retriever requests in flight at once, per rollout rank.")
    retriever_batch_size: int = _f(32, "Queries per retriever request.")
    retriever_on_failure: Literal["fail", "empty"] = _f(
        "fail", "When the retriever stays down or slow: fail the run (one line naming it), or give those searches "
        "a '(search failed)' passage, count them (tool/search_failures) and go on.")
    max_turns: int = _f(4, "With retriever_url: most generations per episode; each search result starts the next.")
    max_tool_response_length: int = _f(256, "Most tokens of one information block shown to the model; the rest is "
                                       "cut.")

    # --- rewards ---------------------------------------------------------------------------------------------
    reward_funcs: list[str] = _f(["math", "format"], "Rewards to sum: 'math', 'format', 'em' (exact match of the "
                                 "<answer>), 'remote' (the HTTP service "
                                 "at reward_url), 'module:function' (your f(completion, answer) -> float, or TRL's "
                                 "f(prompts, completions, **columns) on a batch), a reward model's folder (or "
                                 "'tiny-rm'; see reward_ranks) or 'judge' (judge_model).")
    reward_weights: list[float] = _f([1.0, 0.2], "Weight of each reward in reward_funcs.")
    reward_url: str = _f("", "URL of a remote reward service for 'remote': POST {prompts, completions, answers} "
                         "-> {scores}.")
    reward_timeout_s: float = _f(30.0, "Timeout of one remote reward request, in seconds.")
    reward_retries: int = _f(3, "Retries of a failed remote reward request (with backoff) before giving up.")
    reward_max_concurrency: int = _f(8, "Remote reward requests in flight at once.")
    reward_batch_size: int = _f(64, "Completions per remote reward request.")
    reward_on_failure: Literal["fail", "zero"] = _f("fail", "When the remote service stays down: fail the run, "
                                                    "or score zero and count it (reward/remote_failures).")
    reward_workers: int = _f(4, "Threads that score local rewards, so slow checks overlap.")
    reward_ranks: str = _f("", "Ranks of their own for the reward models named in reward_funcs (a model folder of an "
                           "...ForSequenceClassification with one label), a whole copy on each, each scoring a share "
                           "of the step's batch; empty: on the policy ranks, offloaded to the host while the policy "
                           "trains (on GPU).")
    reward_model_normalize: Literal["none", "running"] = _f(
        "none", "A reward model's scores as they come, or standardised by the running mean and std of every score "
        "it gave so far (kept in checkpoints).")
    reward_model_batch_tokens: int = _f(8192, "Most tokens (padding included) in one forward of a reward model.")
    reward_model_max_length: int = _f(4096, "Longest reward-model input in its own tokens; longer ones keep their "
                                      "last tokens (the completion) and are counted (reward/model_truncated).")
    judge_model: str = _f("", "The 'judge' reward: a causal LM folder (or 'tiny-judge') served by a vLLM engine on "
                          "judge_ranks, frozen, never synced.")
    judge_ranks: str = _f("", "Ranks of their own for the judge's vLLM engines (one engine per rank), each judging "
                          "a share of the step's batch.")
    judge_template: str = _f(
        "Question: {prompt}\nReference answer: {answer}\nResponse: {completion}\nIs the response's tagged answer "
        "correct? Answer yes or no.", "The judge's user message: {prompt} (the prompt's text), {completion}, "
        "{answer} and any other column of the row by name; sent through the judge's chat template.")
    judge_parser: Literal["verdict", "score"] = _f(
        "verdict", "verdict: the probability of the first verdict token against the second, read from the judge's "
        "logprobs at its first token (one token generated); score: a number out of the judge's text ('Score: 7/10' "
        "-> 0.7, '8' -> 8 / judge_score_max), clamped to [0, 1].")
    judge_verdict_tokens: list[str] = _f(["yes", "no"], "judge_parser verdict: the token meaning 'good', then the "
                                         "one meaning 'bad'; each one token of the judge's tokenizer.")
    judge_score_max: float = _f(10.0, "judge_parser score: what a bare number is out of.")
    judge_max_tokens: int = _f(64, "judge_parser score: most tokens of the judge's answer.")
    judge_on_failure: Literal["fail", "zero"] = _f(
        "zero", "A judge answer with no score in it (or neither verdict token among its top logprobs): score it 0 "
        "and count it (reward/judge_failures), or stop the run.")
    judge_gpu_memory_utilization: float = _f(0.85, "Share of a judge rank's GPU for its vLLM engine.")
    score_while_generating: Optional[bool] = _f(
        None, "Score each prompt's group on the reward threads as soon as its completions are finished, while the "
        "engine generates the rest; reward models and the judge too (sent to their ranks as groups finish, or on a "
        "colocated rank's GPU beside its engine). Unset: on with GPU engines; off with vLLM's CPU backend, whose "
        "engine needs the cores the reward workers would take (see bench/README.md).")

    # --- algorithm -------------------------------------------------------------------------------------------
    advantage_estimator: Literal["grpo", "gae"] = _f(
        "grpo", "grpo: each completion's reward against its group's (no critic). gae: PPO with a critic, a value "
        "head on a causal LM trained beside the policy; per-token rewards (the outcome on the last model token, "
        "the KL penalty on every model token with kl_in_reward), GAE over model tokens, whitened advantages.")
    gamma: float = _f(1.0, "gae: discount per model token.")
    lam: float = _f(1.0, "gae: GAE's lambda (1: returns are Monte-Carlo returns; lower trusts the critic more).")
    critic_model: str = _f("", "gae: the model the critic starts from (a local folder, or 'tiny'); empty: the "
                           "policy's model. Its LM head is replaced by a new scalar value head.")
    critic_ranks: str = _f("", "gae: ranks of their own for the critic (ZeRO over them), like reference_ranks; "
                           "empty keeps it on the policy ranks, as a second engine there.")
    critic_learning_rate: float = _f(1e-5, "gae: AdamW learning rate of the critic.")
    critic_warmup_ratio: float = _f(0.0, "gae: share of max_steps over which the critic's learning rate warms up "
                                    "linearly (verl's critic.optim.lr_warmup_steps_ratio).")
    critic_warmup_steps: int = _f(0, "gae: the first this many steps train the critic alone; the policy keeps its "
                                  "weights (verl's trainer.critic_warmup).")
    value_clip: Optional[float] = _f(0.5, "gae: clip range of the value loss around the values before the update "
                                     "(verl's cliprange_value); unset: no clipping.")
    learning_rate: float = _f(1e-6, "AdamW learning rate of the policy.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _f(
        "constant", "Learning-rate schedule after the warmup (TRL's names): constant, or a linear or cosine decay to "
                    "0 at max_steps. Stepped at every optimizer step, saved in checkpoints; logged as policy/lr.")
    warmup_steps: int = _f(0, "Steps (of max_steps) of linear warmup from 0 to learning_rate; overrides warmup_ratio.")
    warmup_ratio: float = _f(0.0, "Share of max_steps spent in linear warmup (when warmup_steps is 0).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 turns clipping off).")
    epsilon: float = _f(0.2, "Lower clip range of the ratio: clip(r, 1 - epsilon, ...).")
    epsilon_high: Optional[float] = _f(None, "Upper clip range (DAPO clip-higher); defaults to epsilon.")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = _f(
        "dapo", "Loss normaliser: dapo token mean over the batch; grpo per-sequence mean; dr_grpo constant; "
                "bnpo token mean per micro-batch.")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "Divide advantages by the group's reward "
                                                          "std, the batch's, or not at all.")
    dual_clip: Optional[float] = _f(None, "Dual-clip constant c > 1: for negative advantages the loss is capped at "
                                    "-A*c (off when unset).")
    num_iterations: int = _f(1, "Optimisation passes over each step's batch (GRPO's mu); > 1 ratios against the "
                             "logprobs before the first pass.")
    mini_batches: int = _f(1, "Optimizer steps per pass: the step's batch is split into this many mini-batches.")
    beta: float = _f(0.0, "KL coefficient to the frozen reference model; 0 loads no reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k3", "KL estimator used in the loss.")
    kl_in_reward: bool = _f(False, "Subtract beta * KL (k1) from the reward instead of adding beta * KL to the "
                            "loss: summed over the completion (grpo), or on each model token (gae).")
    kl_ctrl: Literal["fixed", "adaptive"] = _f(
        "fixed", "With kl_in_reward, the KL coefficient: fixed at beta, or adaptive from beta toward kl_target (the "
        "PPO controller of Ziegler et al., as verl's algorithm.kl_ctrl); logged as kl_ctrl/coef.")
    kl_target: float = _f(0.1, "kl_ctrl adaptive: the mean KL per token the coefficient steers toward.")
    kl_horizon: int = _f(10000, "kl_ctrl adaptive: samples over which the coefficient may move by 20%%.")
    tis_cap: float = _f(0.0, "Truncated importance sampling: weight each token's loss by min(pi_train/pi_vllm, "
                        "tis_cap) to correct the vLLM/trainer mismatch; 0 turns it off.")
    mask_truncated_completions: bool = _f(False, "Completions cut at max_completion_length count nothing in the "
                                          "loss.")
    overlong_buffer_length: int = _f(0, "DAPO soft overlong penalty: completions longer than max_completion_length "
                                     "minus this lose up to overlong_penalty_factor; 0 turns it off.")
    overlong_penalty_factor: float = _f(1.0, "Largest overlong penalty.")
    dynamic_sampling: bool = _f(False, "Drop groups whose rewards are all equal and sample more prompts until the "
                                "batch is full again (DAPO).")
    max_sampling_rounds: int = _f(4, "With dynamic_sampling: most generation rounds per step before training on "
                                  "what there is.")
    max_tokens_per_micro_batch: int = _f(
        16384, "Token budget of one forward/backward on a policy rank (prompt and completion tokens; verl's "
        "ppo_max_token_len_per_gpu): each rank gets a balanced share of the batch's tokens, packed into as few "
        "micro-batches as keep each under it, the same number on every rank. 0: micro_batch_size sequences each.")
    micro_batch_size: int = _f(8, "With max_tokens_per_micro_batch 0: sequences per forward/backward on each "
                               "policy rank.")
    padding_free: bool = _f(True, "Concatenate a micro-batch's sequences into one row, positions restarting per "
                            "sequence and attention never crossing one (flash varlen attention on GPU). false: "
                            "right-pad them into a [B, L] batch (models with sliding-window attention).")
    freeze_vision_tower: bool = _f(False, "Vision-language models: keep the vision tower (encoder and merger) "
                                   "frozen, out of the optimizer and out of every weight sync (verl's option).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (slower: use it "
                                      "only when a micro-batch's activations do not fit).")
    zero_stage: Literal["auto", 0, 1, 2, 3] = _f(
        "auto", "DeepSpeed ZeRO stage of the policy (and critic). auto: 2 when one policy rank holds the model (the "
        "fastest: on an H200 a 1.5B policy trained at 0.355 MFU with 2 against 0.250 with 3), 3 when the policy is "
        "sharded over several ranks (or sync_mode is partitions). 3 shards parameters, gradients and optimizer "
        "state; 2 keeps whole parameters on every policy rank (weights then sync by sync_mode gather); 1 shards "
        "only the optimizer state; 0 shards nothing.")
    offload_optimizer: bool = _f(False, "Keep the optimizer state (and its step) in CPU memory with DeepSpeed's CPU "
                                 "Adam: a 7B policy then trains on one 141 GB GPU, if the host has ~16 bytes of "
                                 "memory per parameter for it (fp32 master weights, gradients, two moments).")
    # --- LoRA ------------------------------------------------------------------------------------------------
    use_lora: bool = _f(False, "Train a LoRA adapter (peft) on the frozen base instead of every weight: only the "
                        "adapter has gradients and optimizer state, only the adapter's tensors are sent to the "
                        "engines each step (vLLM serves the base with the adapter), checkpoints hold the adapter in "
                        "peft's format. With beta > 0 the reference is the base with the adapter disabled.")
    lora_r: int = _f(16, "LoRA rank (peft's r); the engines serve it with vLLM's max_lora_rank, the smallest of "
                     "vLLM's sizes >= lora_r.")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r.")
    lora_dropout: float = _f(0.0, "Dropout on the adapter's input while training (peft's lora_dropout); vLLM "
                             "samples without it.")
    lora_target_modules: list[str] = _f(["all-linear"], "Modules that get an adapter: peft's names (q_proj, "
                                        "v_proj, ...) or 'all-linear' (every linear layer of the decoder but the "
                                        "output head).")
    save_merged_lora: bool = _f(False, "use_lora: also write the base with the adapter merged into checkpoints' "
                                "merged/ folder (a plain Hugging Face model), besides the adapter.")
    memory_check: bool = _f(True, "Estimate each GPU's and this host's memory before start-up (weights, gradients, "
                            "optimizer states, activations at the token budget, the engine's share) and stop in one "
                            "line when it cannot fit; false: say it once and start anyway.")
    deepspeed_config: str = _f("zero3.json", "DeepSpeed config; its 'auto' values are filled from this config.")

    # --- loop and output -------------------------------------------------------------------------------------
    max_steps: int = _f(30, "GRPO steps to run.")
    seed: int = _f(42, "Seed of data order, sampling and initialisation.")
    output_dir: str = _f("output", "Tensorboard, samples.jsonl and checkpoints go here.")
    save_steps: int = _f(0, "Write a checkpoint (HF model + DeepSpeed state + RNG + step) every this many steps; "
                         "0: only after the last step.")
    save_total_limit: int = _f(3, "Keep the newest this many checkpoints; 0 keeps all.")
    resume: str = _f("", "'auto': continue from the newest complete checkpoint in output_dir (start fresh if there "
                     "is none); a checkpoint folder: continue from it; empty: start fresh.")
    num_samples_to_log: int = _f(4, "Completions written to samples.jsonl per step.")
    overwrite_output_dir: bool = _f(False, "Start over in an output_dir that holds a previous run: its metrics, "
                                           "samples, tensorboard events and checkpoints are deleted. Without it "
                                           "such a run stops (use --resume auto to continue it).")
    hang_report_s: float = _f(120.0, "When a rank is silent (no heartbeat) or one phase of a step lasts longer than "
                                     "this, rank 0 writes output_dir/logs/hang-report.txt (where every rank is, and "
                                     "their Python stacks) and names the ranks in one line; at most 0.8 x "
                                     "dist_timeout_s, so that a frozen rank is named before a collective times out; "
                                     "0 turns the watchdog off.")
    startup_report_s: float = _f(300.0, "A rank still starting (loading the model, building DeepSpeed's ops, starting "
                                        "its engine, loading a checkpoint) after this many seconds is named in one "
                                        "line with what it is doing, its stacks in output_dir/logs (at most 0.8 x "
                                        "dist_timeout_s); 0: never.")
    max_nonfinite_in_a_row: int = _f(3, "An update whose loss or gradient norm is NaN or inf is skipped (the weights "
                                        "stay as they were; counted in nonfinite_updates) and said in one line; this "
                                        "many steps in a row with one stop the run, unsaved (1: stop at the first).")
    report_to: list[str] = _f(["tensorboard"], "Where scalars go besides metrics.jsonl (TRL's option): tensorboard "
                              "(output_dir/tensorboard), wandb (the same scalars and a table of the logged samples "
                              "each step; WANDB_MODE=offline writes output_dir/wandb without network; needs the "
                              "wandb package: WITH_WANDB=1 bash launch/setup.sh), or none.")
    wandb_project: str = _f("tgrpo", "report_to wandb: the project.")
    run_name: str = _f("", "report_to wandb: the run's name; empty: output_dir's folder name.")
    verbose: bool = _f(False, "Show library output (vLLM, DeepSpeed, warnings) on the console too; by default it "
                              "goes to the node's log file only (as TGRPO_VERBOSE=1).")
    sync_bucket_mb: int = _f(1024, "Size of the flat buckets in which weights go from policy to rollout, in MiB.")
    sync_mode: Literal["auto", "partitions", "gather"] = _f(
        "auto", "How weights reach the engines (split placement). partitions: each policy rank broadcasts its "
        "ZeRO-3 shards of a bucket and the engine side joins them (no all-gather; the bytes cross once). gather: "
        "ZeRO-3 gathers each bucket and sync_senders policy ranks broadcast it whole. auto: partitions with "
        "zero_stage 3, gather otherwise.")
    sync_senders: int = _f(1, "sync_mode gather: policy ranks that send weights, each to its share of the rollout "
                           "engines; 1: one broadcast from the first policy rank reaches every engine.")
    max_staleness: int = _f(0, "0: strict on-policy. k >= 1: rollout ranks generate batches up to k steps ahead "
                            "while the policy trains (split placement), and tis_cap corrects for the lag.")
    async_mode: bool = _f(False, "Fully asynchronous training (split placement): engines generate without a break, "
                          "keeping async_groups_in_flight groups in flight; a step trains on the first finished "
                          "groups as soon as there are enough, and new weights reach the engines between two of "
                          "their steps, requests in flight going on with them. max_staleness (>= 1) bounds the lag "
                          "of every token; older groups are dropped and counted (async/dropped_stale).")
    async_groups_in_flight: int = _f(0, "async_mode: prompts' groups each engine keeps in flight or ready (its share "
                                     "of prompts_per_step for a step's worth); 0: twice its share.")
    async_kv_cache: Literal["keep", "recompute"] = _f(
        "keep", "async_mode: what a weight update does to the requests in flight. keep: their KV cache stays, "
        "computed by the older weights, and they go on with the new ones (PipelineRL); recompute: it is dropped and "
        "recomputed by the new weights before they go on (AReaL), at the cost of a prefill of everything in flight.")
    sync_check: bool = _f(False, "After every sync, check that the rollout engine's greedy tokens and "
                          "logprobs equal the policy's on a few prompts; stop the run if not.")
    sync_check_prompts: int = _f(4, "Prompts used by sync_check.")
    sync_check_atol: Optional[float] = _f(None, "Largest allowed |logprob difference| per token in sync_check; "
                                          "unset: 5e-3 in float32 (CPU runs differ by ~1e-6, GPU kernels of a "
                                          "0.5B model by ~1e-3), 1.0 in bfloat16 (single tokens of a correct sync "
                                          "differ by up to ~0.4 there), where the mean difference must also stay "
                                          "under 0.05. Greedy tokens must match exactly only in float32: in bf16 "
                                          "two correct implementations pick different argmaxes where logits are "
                                          "nearly tied.")

    def __post_init__(self) -> None:
        if self.epsilon_high is None:  # resolved when the config is made: every reader sees the value used
            self.epsilon_high = self.epsilon

    def check(self) -> None:
        """The rules between values (ranges, combinations that contradict each other), raised as one ConfigError
        line naming the field and the fix. Checks that need the world (the placement against the ranks launched,
        files, the model, the data, a checkpoint, user reward modules) are tgrpo.job.checks.check_job's."""
        _check(len(self.reward_funcs) == len(self.reward_weights),
               f"reward_funcs has {len(self.reward_funcs)} names but reward_weights has {len(self.reward_weights)}"
               " weights: give one weight per reward")
        _check(self.zero_stage in ("auto", 0, 1, 2, 3), f"zero_stage must be auto, 0, 1, 2 or 3, got "
                                                         f"{self.zero_stage}")
        _check(self.sync_mode != "partitions" or self.zero_stage in ("auto", 3) or self.colocate,
               f"sync_mode partitions sends ZeRO-3 shards, but zero_stage is {self.zero_stage}: set sync_mode gather")
        _check(self.max_tokens_per_micro_batch >= 0, f"max_tokens_per_micro_batch must be >= 0 (0: micro_batch_size "
                                                     f"sequences), got {self.max_tokens_per_micro_batch}")
        _check(self.vllm_sleep_level in (1, 2), f"vllm_sleep_level must be 1 or 2, got {self.vllm_sleep_level}")
        _check(self.vllm_max_num_seqs >= 0 and self.vllm_max_num_batched_tokens >= 0,
               "vllm_max_num_seqs and vllm_max_num_batched_tokens must be >= 0 (0: automatic)")
        _check(self.min_pixels >= 0 and self.max_pixels >= 0, f"min_pixels and max_pixels must be >= 0 (0: the "
               f"processor's own), got {self.min_pixels}, {self.max_pixels}")
        _check(not (self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels),
               f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels}): swap them")
        for name in ("prompts_per_step", "num_generations", "max_completion_length", "micro_batch_size",
                     "max_steps", "max_prompt_length", "sync_bucket_mb", "dist_timeout_s",
                     "rollout_tensor_parallel_size", "num_iterations", "mini_batches", "eval_k",
                     "max_sampling_rounds", "sync_senders"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.num_generations >= 2 or self.advantage_estimator == "gae",
               f"num_generations must be >= 2 with advantage_estimator grpo (advantages compare completions of a "
               f"prompt), got {self.num_generations}; advantage_estimator gae learns a baseline instead")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma must be in (0, 1] and lam in [0, 1], got "
                                                          f"{self.gamma}, {self.lam}")
        _check(self.critic_learning_rate > 0, f"critic_learning_rate must be > 0, got {self.critic_learning_rate}")
        _check(0 <= self.critic_warmup_ratio <= 1, f"critic_warmup_ratio must be in [0, 1], got "
                                                   f"{self.critic_warmup_ratio}")
        _check(0 <= self.critic_warmup_steps < self.max_steps, f"critic_warmup_steps must be in 0..max_steps-1, got "
                                                               f"{self.critic_warmup_steps}")
        _check(self.value_clip is None or self.value_clip > 0, f"value_clip must be > 0 (unset: none), got "
                                                               f"{self.value_clip}")
        _check(self.advantage_estimator == "gae" or not (self.critic_ranks or self.critic_model
                                                         or self.critic_warmup_steps),
               "critic_ranks, critic_model and critic_warmup_steps are for the critic of advantage_estimator gae: "
               "set advantage_estimator gae or leave them unset")
        _check(not (self.dynamic_sampling and self.advantage_estimator == "gae"),
               "dynamic_sampling drops prompts whose group of completions all got the same reward, which is GRPO's "
               "no-signal case; advantage_estimator gae learns from every completion: set dynamic_sampling false")
        _check(self.kl_ctrl == "fixed" or (self.kl_in_reward and self.beta > 0),
               "kl_ctrl adaptive steers the KL penalty in the reward: set kl_in_reward true and beta > 0 (its start)")
        _check(self.kl_target > 0 and self.kl_horizon > 0, f"kl_target and kl_horizon must be > 0, got "
                                                           f"{self.kl_target}, {self.kl_horizon}")
        _check(self.temperature > 0, f"temperature must be > 0 for sampled groups, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(0 <= self.warmup_steps <= self.max_steps, f"warmup_steps must be in 0..max_steps={self.max_steps}, "
                                                         f"got {self.warmup_steps}")
        _check(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        _check(0 <= self.epsilon < 1 and self.epsilon_high >= 0,
               f"epsilon must be in [0, 1) and epsilon_high >= 0, got {self.epsilon}, {self.epsilon_high}")
        _check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        _check(self.save_steps >= 0, f"save_steps must be >= 0, got {self.save_steps}")
        _check(self.save_total_limit >= 0, f"save_total_limit must be >= 0 (0 keeps all), got "
                                           f"{self.save_total_limit}")
        _check(self.hang_report_s >= 0, f"hang_report_s must be >= 0 (0 turns the watchdog off), got "
                                        f"{self.hang_report_s}")
        _check(self.startup_report_s >= 0, f"startup_report_s must be >= 0 (0: never), got {self.startup_report_s}")
        _check(self.max_nonfinite_in_a_row >= 1, f"max_nonfinite_in_a_row must be >= 1 (1: stop at the first NaN/inf "
                                                 f"update), got {self.max_nonfinite_in_a_row}")
        _check(self.lora_r >= 1 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
               f"lora_r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1), got {self.lora_r}, {self.lora_alpha}, "
               f"{self.lora_dropout}")
        _check(self.lora_r <= 512, f"lora_r={self.lora_r} is larger than vLLM serves (max_lora_rank 512): choose "
                                   "lora_r <= 512")
        _check(self.use_lora or not self.save_merged_lora,
               "save_merged_lora is a LoRA option: set use_lora true or leave it unset")
        _check(bool(self.lora_target_modules), "lora_target_modules is empty: name the modules that get an adapter "
                                               "(e.g. q_proj v_proj) or all-linear")
        _check(not (self.resume and self.overwrite_output_dir),
               "resume and overwrite_output_dir contradict each other: continue the run or start it over, not both")
        if self.retriever_url:
            from urllib.parse import urlparse

            url = urlparse(self.retriever_url)
            _check(url.scheme in ("http", "https") and bool(url.netloc),
                   f"retriever_url '{self.retriever_url}' is not an http(s):// URL: give e.g. http://127.0.0.1:8321")
            _check(self.max_turns >= 2, f"max_turns={self.max_turns} leaves no turn to read a search result: set "
                                        "max_turns >= 2 with retriever_url")
        _check(1 <= self.retriever_topk <= 100, f"retriever_topk must be in 1..100, got {self.retriever_topk}")
        _check(self.retriever_timeout_s > 0, f"retriever_timeout_s must be > 0, got {self.retriever_timeout_s}")
        _check(self.retriever_retries >= 0, f"retriever_retries must be >= 0, got {self.retriever_retries}")
        for name in ("retriever_max_concurrency", "retriever_batch_size", "max_turns", "max_tool_response_length"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.eval_steps >= 0, f"eval_steps must be >= 0, got {self.eval_steps}")
        _check(set(self.report_to) <= {"tensorboard", "wandb", "none"} and bool(self.report_to)
               and ("none" not in self.report_to or self.report_to == ["none"]),
               f"report_to must name tensorboard and/or wandb, or be none alone, got {self.report_to}")
        _check(self.dual_clip is None or self.dual_clip > 1, f"dual_clip must be > 1, got {self.dual_clip}")
        _check(self.tis_cap >= 0, f"tis_cap must be >= 0 (0 turns it off), got {self.tis_cap}")
        _check(self.tis_cap == 0 or self.top_p == 1,
               f"tis_cap weighs tokens by pi_trainer / pi_vllm, but with top_p={self.top_p} vLLM's logprobs are "
               "renormalised over the nucleus and the trainer's are not, which biases the weights: set top_p 1.0 or "
               "tis_cap 0")
        _check(self.max_staleness >= 0, f"max_staleness must be >= 0, got {self.max_staleness}")
        _check(not self.max_staleness or not self.colocate,
               "max_staleness > 0 overlaps generation with training on separate ranks, but colocate=true makes "
               "every rank take turns: set max_staleness 0 or use a split placement")
        _check(not self.async_mode or self.max_staleness >= 1,
               "async_mode trains on tokens sampled while earlier steps trained: set max_staleness >= 1 (the largest "
               "lag in updates a token may have; 2 is a good start)")
        _check(not self.async_mode or not self.colocate,
               "async_mode generates while the policy trains, on ranks of their own, but colocate=true makes every "
               "rank take turns: use a split placement (rollout_ranks and policy_ranks)")
        _check(not (self.async_mode and self.use_lora),
               "async_mode with use_lora is not supported yet: requests in flight hold the adapter they started "
               "with, which an in-flight update would remove; set async_mode false (max_staleness k >= 1 overlaps "
               "generation with training batch by batch)")
        _check(self.async_groups_in_flight >= 0,
               f"async_groups_in_flight must be >= 0 (0: twice an engine's share), got {self.async_groups_in_flight}")
        _check(not self.max_staleness or self.tis_cap > 0,
               f"max_staleness={self.max_staleness} trains on samples from older weights: set tis_cap (e.g. 2.0) "
               "so importance sampling corrects the lag")
        _check(0 <= self.overlong_buffer_length < self.max_completion_length,
               f"overlong_buffer_length must be in [0, max_completion_length), got {self.overlong_buffer_length}")
        _check(not self.kl_in_reward or self.beta > 0, "kl_in_reward needs beta > 0 (the KL coefficient)")
        _check(not self.eval_steps or bool(self.eval_data), "eval_steps is set but eval_data is empty: name a "
                                                           "held-out prompt file or set eval_steps 0")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _field_parser(tp):
    """argparse `type`, `nargs` and `choices` for a field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return _field_parser(inner)
    if origin is Literal:  # "2" on the command line is the 2 of Literal["auto", 0, 1, 2, 3]
        return {"type": lambda text: next((a for a in args if str(a) == str(text)), text), "choices": list(args)}
    if origin is list:
        return {"type": args[0], "nargs": "+"}
    if tp is bool:
        return {"type": _parse_bool, "metavar": "BOOL"}
    return {"type": tp}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_grpo.py", allow_abbrev=False,  # "--learning_rat" is a typo, not --learning_rate
        description="GRPO with vLLM rollout ranks and DeepSpeed ZeRO-3 policy ranks in one torchrun world. Values "
        "come from the defaults, then --config YAML, then these flags.",
    )
    parser.add_argument("--config", help="YAML file of field: value pairs.")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f.metadata["help"] + f" (default: "
                            f"{f.default if f.default_factory is dataclasses.MISSING else f.default_factory()})",
                            **_field_parser(hints[f.name]))
    return parser


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then command-line flags. Raises ConfigError on unknown or ill-typed keys."""
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(message))  # one line, not usage + exit
    args = vars(parser.parse_args(argv))
    values: dict = {}
    if args.get("config"):
        path = args.pop("config")
        _check(os.path.isfile(path), f"config file '{path}' does not exist")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        _check(isinstance(loaded, dict), f"config file '{path}' must hold a mapping of field: value")
        values.update(_coerce_yaml(loaded, path))
    args.pop("config", None)
    values.update(args)
    return Config(**values)


def _coerce_yaml(loaded: dict, path: str) -> dict:
    """Type-check YAML values through the same parsers as the command line, so both fail the same way."""
    hints = typing.get_type_hints(Config)
    names = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for key, value in loaded.items():
        _check(key in names, f"unknown field '{key}' in {path}: see python train_grpo.py --help")
        spec = _field_parser(hints[key])
        if value is None:
            _check(type(None) in typing.get_args(hints[key]), f"field '{key}' in {path} is empty: give it a value "
                                                              "or remove the line")
            out[key] = None
            continue
        if isinstance(value, dict) or (isinstance(value, list) and not spec.get("nargs")):
            raise ConfigError(f"field '{key}' in {path} must be a single value, got {type(value).__name__}")
        if spec.get("nargs") and isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise ConfigError(f"field '{key}' in {path} must be a list of plain values")
        try:
            if spec.get("nargs"):
                value = [spec["type"](v) for v in (value if isinstance(value, list) else [value])]
            else:
                value = spec["type"](value)
        except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as e:  # OverflowError: int(inf)
            raise ConfigError(f"field '{key}' in {path}: {e}") from None
        if "choices" in spec:
            _check(value in spec["choices"], f"field '{key}' in {path} must be one of {spec['choices']}, got "
                                             f"'{value}'")
        out[key] = value
    return out
