"""The memory plan: what a job will hold on each GPU and each host, estimated before anything starts, so that a job
that cannot fit stops in one line at pre-flight instead of being killed a minute into its start-up.

    shape = model_shape(model_dir)                    # parameters and widths, from config.json alone
    plan = estimate(cfg, placement, shape, device="cuda", gpu_total=..., local_ranks=range(8))
    plan.gpu, plan.host                               # {component: bytes} on the busiest GPU, on this host

The estimate follows what the trainer allocates: the policy's weights, gradients and AdamW states as ZeRO stores
them (sharded over the policy ranks from the stage that shards them; the states in pinned host memory with
offload_optimizer), the reference and the critic where they live, a micro-batch's activations at the token budget
(transformer layers and the logits at completion positions), the vLLM engine's share of its GPU (colocated: all of
it while generating, a residue while asleep) and each process's own footprint. The activation and residue constants
were fitted to peaks measured on an H200 (bench/README.md: 1.5B and 7B policies, ZeRO-2, bf16).

Nothing here touches torch.distributed; `estimate` is pure and unit-tested on hand-computed numbers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

GiB = 1 << 30

# Saved activations of one token in one decoder layer, in elements of the model's dtype: ~8 hidden-sized tensors
# (norm inputs and outputs, q, k, v, attention output, residuals) and 4 intermediate-sized ones (gate, up, their
# activation and product). Fitted on an H200: 1.5B at 16k tokens, 76.4 GiB peak measured, 79.2 estimated; 7B at 8k
# tokens (optimizer offloaded), 67.6 measured, 64.4 estimated.
ACT_PER_HIDDEN = 8
ACT_PER_INTERMEDIATE = 4
CUDA_CONTEXT = 0.6 * GiB      # a process's CUDA context and kernels (torch, NCCL)
ENGINE_ASLEEP = 2.0 * GiB     # a sleeping vLLM engine: its context, CUDA graphs' pools, what sleep cannot free
# host memory of a rank (Python, torch, transformers, DeepSpeed, vLLM imported; on GPU the CUDA libraries) and of a
# vLLM engine's processes (scheduler, tokenizer, workers), beyond the model bytes counted on their own
PROCESS_HOST = {"cuda": 3.0 * GiB, "cpu": 0.75 * GiB}
ENGINE_HOST = {"cuda": 4.0 * GiB, "cpu": 1.0 * GiB}
REDUCE_BUCKET = 5e8           # elements of DeepSpeed's gradient reduce bucket (deepspeed_engine fills this size)
# Offloaded states take more host memory than their bytes: pinned buffers (torch's pinned allocator rounds up) and
# copies while DeepSpeed builds them. DeepSpeed's own estimator (estimate_zero2_model_states_mem_needs) allows 1.5x;
# measured on an H200's host, a 1.5B policy's job peaked at 44.9 GiB against 41.5 estimated with it (30.0 without).
OFFLOAD_BUFFER = 1.5


@dataclass(frozen=True)
class ModelShape:
    params: int          # every parameter (tied embeddings once)
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    vision: int = 0      # a vision-language model's tower (encoder and merger), counted in params


@dataclass
class MemoryPlan:
    """Estimated bytes by component: on the busiest GPU of the job (empty on CPU), and on this host; `training`
    is what a policy rank's own process holds at its training peak (torch's max_memory_allocated measures it)."""
    gpu: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def model_shape(model_dir: str) -> ModelShape:
    """The model's parameter count (an empty model built on the meta device from config.json: exact for any
    architecture transformers knows, no weights read) and the widths that size its activations."""
    import torch
    from transformers import AutoConfig

    from tgrpo.policy import modeling

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = modeling.load_kwargs(config, "sdpa")[0].from_config(config)  # a vision tower counted too
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    tower = modeling.vision_tower(model)
    text = getattr(config, "text_config", None) or config
    return ModelShape(params=params, hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      layers=text.num_hidden_layers, vocab=text.vocab_size,
                      vision=sum(p.numel() for p in tower.parameters()) if tower is not None else 0)


def micro_batch_tokens(cfg, dp: int, prompt_length: int | None = None) -> int:
    """The most tokens one forward of a policy rank holds: the token budget, or micro_batch_size whole sequences,
    never more than a rank's share of a mini-batch of sequences of prompt_length (default max_prompt_length) and
    max_completion_length tokens."""
    longest = (prompt_length or cfg.max_prompt_length) + cfg.max_completion_length
    share = -(-cfg.prompts_per_step * cfg.num_generations // (dp * cfg.mini_batches)) * longest
    budget = cfg.max_tokens_per_micro_batch or cfg.micro_batch_size * longest
    return max(longest, min(budget, share))


def adapter_params(cfg, shape: ModelShape) -> int:
    """A LoRA adapter's parameters, at most: r x (inputs + outputs) of every linear layer of each decoder layer
    (attention's four taken as hidden x hidden, the MLP's three as hidden x intermediate)."""
    return cfg.lora_r * shape.layers * (4 * 2 * shape.hidden + 3 * (shape.hidden + shape.intermediate))


def _trainable(shape: ModelShape, dp: int, stage: int, width: int, offload: bool, cpu: bool,
               trained: int | None = None, adapter: bool = False) -> tuple[dict, dict]:
    """(device, host) bytes of one rank of a trained model under ZeRO `stage` over dp ranks, with weights of
    `width` bytes (2: bf16 with fp32 master weights, 4: fp32). trained: the parameters that train (default all; a
    LoRA adapter's with adapter true, which adds them to the weights; the model less its frozen vision tower):
    only they have gradients and optimizer states."""
    p = shape.params if trained is None else trained
    shard = lambda n: n / dp  # noqa: E731
    everything = width * (shape.params + (p if adapter else 0))  # the base and, with LoRA, the adapter
    weights = shard(everything) if stage == 3 else everything
    grads = shard(width * p) if stage >= 2 else width * p
    if offload and not cpu:  # reduced a bucket at a time straight into the host's fp32 partition
        grads = min(grads, REDUCE_BUCKET * width)
    # fp32 master weights (bf16 only), AdamW's two moments, and the fp32 gradient partition the optimizer steps
    states = (4 * p if width == 2 else 0) + 8 * p + (4 * p if width == 2 else 0)
    states = shard(states) if stage >= 1 else states
    device = {"weights": weights, "gradients": grads}
    host = {}
    if offload and not cpu:
        host["optimizer states (offloaded)"] = states * OFFLOAD_BUFFER
    else:
        device["optimizer states"] = states
    return device, host


def estimate(cfg, placement, shape: ModelShape, *, device: str, width: int, gpu_total: float = 0.0,
             local_ranks=None, prompt_length: int | None = None, activations: bool = True,
             reward_params: int = 0, judge_params: int = 0) -> MemoryPlan:
    """The plan for this job. device: "cuda" or "cpu" (everything then lives in host memory); width: bytes per
    weight (2 for bf16, 4 for fp32); gpu_total: one GPU's bytes (for the engine's share); local_ranks: the global
    ranks on this host (default: all of them); prompt_length: the longest prompt of the data (default
    max_prompt_length); activations false: what does not depend on the sequences (weights, gradients, optimizer
    states, engines, processes) alone. reward_params: the reward models' parameters (on reward_ranks, else on the
    policy ranks, offloaded to the host while the policy trains); judge_params: the judge's (on judge_ranks)."""
    cpu = device == "cpu"
    local = set(range(placement.world_size) if local_ranks is None else local_ranks)
    stage, dp = placement.zero_stage, placement.num_policy
    plan = MemoryPlan()

    def policy_side() -> tuple[dict, dict, dict]:
        """(static, training-only, host) of a policy rank."""
        # LoRA trains its adapter alone; a frozen vision tower has no gradients or optimizer states
        trained = (adapter_params(cfg, shape) if cfg.use_lora
                   else shape.params - shape.vision if cfg.freeze_vision_tower and shape.vision else None)
        dev, host = _trainable(shape, dp, stage, width, cfg.offload_optimizer, cpu, trained, adapter=cfg.use_lora)
        train = {"gradients": dev.pop("gradients")}
        if cfg.beta > 0 and not placement.reference and not cfg.use_lora:  # LoRA's reference: the adapter disabled
            dev["reference"] = width * shape.params / (dp if stage == 3 else 1)
        if cfg.advantage_estimator == "gae" and not placement.critic:
            cdev, chost = _trainable(shape, dp, stage, width, cfg.offload_optimizer, cpu)
            train["critic gradients"] = cdev.pop("gradients")
            dev.update({f"critic {k}": v for k, v in cdev.items()})
            host.update({f"critic {k}": v for k, v in chost.items()})
        if not activations:
            return dev, train, host
        tokens = micro_batch_tokens(cfg, dp, prompt_length)
        per_layer = ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate
        layers = shape.layers if not cfg.gradient_checkpointing else 2  # checkpointed: a layer's worth + inputs
        train["activations"] = tokens * per_layer * layers * width
        if cfg.gradient_checkpointing:
            train["activations"] += tokens * shape.hidden * shape.layers * width
        train["logits"] = 2 * tokens * shape.vocab * width  # at completion positions, and their gradient
        return dev, train, host

    policy_static, policy_train, policy_host = policy_side()
    plan.training = {**policy_static, **policy_train}
    engine_share = cfg.vllm_gpu_memory_utilization * gpu_total
    if cpu:
        engine_share = cfg.vllm_cpu_kvcache_gib * GiB + width * shape.params

    # the busiest GPU: a colocated one (engine and policy take turns), else a policy GPU or an engine GPU
    if placement.colocated:
        generating = {**policy_static, "vLLM engine (awake)": engine_share}
        training = {**policy_static, **policy_train, "vLLM engine (asleep)": ENGINE_ASLEEP}
        busiest = max(generating, training, key=lambda d: sum(d.values()))
        busiest = {**busiest, "CUDA contexts": 2 * CUDA_CONTEXT}
    else:
        busiest = {**policy_static, **policy_train, "CUDA context": CUDA_CONTEXT}
        if engine_share + CUDA_CONTEXT > sum(busiest.values()):
            busiest = {"vLLM engine": engine_share, "CUDA context": CUDA_CONTEXT}
    rm_bytes = width * reward_params
    if rm_bytes and not placement.reward:  # scoring on a policy GPU: the policy's states stay, training's do not
        scoring = {**policy_static, "reward models": rm_bytes, "CUDA context": CUDA_CONTEXT}
        if placement.colocated:
            streaming = cfg.score_while_generating if cfg.score_while_generating is not None else not cpu
            # scored while the engine generates (tgrpo.job.model_rewards): beside the awake engine
            engine = {"vLLM engine (awake)": engine_share} if streaming else {"vLLM engine (asleep)": ENGINE_ASLEEP}
            scoring = {**policy_static, "reward models": rm_bytes, "CUDA contexts": 2 * CUDA_CONTEXT, **engine}
        busiest = max(busiest, scoring, key=lambda d: sum(d.values()))
    elif rm_bytes and rm_bytes + CUDA_CONTEXT > sum(busiest.values()):
        busiest = {"reward models": rm_bytes, "CUDA context": CUDA_CONTEXT}
    if judge_params and cfg.judge_gpu_memory_utilization * gpu_total + CUDA_CONTEXT > sum(busiest.values()):
        busiest = {"judge's vLLM engine": cfg.judge_gpu_memory_utilization * gpu_total, "CUDA context": CUDA_CONTEXT}
    if not cpu:
        plan.gpu = busiest

    # this host: every local process's own footprint, offloaded optimizer states, sleep level 1's weight copy;
    # on CPU every byte above lives here too
    policy_here = len(local & set(placement.policy))
    engines_here = len(local & set(placement.engine_ranks))
    host = plan.host
    host["processes"] = len(local) * PROCESS_HOST[device] + engines_here * ENGINE_HOST[device]
    for name, value in policy_host.items():
        host[name] = policy_here * value
    if placement.colocated and not cpu and (cfg.vllm_sleep_level == 1 or cfg.use_lora):  # LoRA keeps the base
        host["engine weights kept while asleep"] = engines_here * width * shape.params
    reward_here = len(local & set(placement.reward or (placement.policy if rm_bytes else ())))
    if rm_bytes and (cpu or not placement.reward):  # on the host: CPU runs, and offloaded beside a GPU policy
        host["reward models" if cpu or placement.reward else "reward models (offloaded)"] = reward_here * rm_bytes
    judge_here = len(local & set(placement.judge))
    if judge_params and judge_here:
        host["processes"] += judge_here * ENGINE_HOST[device]
        if cpu:
            host["judge engines"] = judge_here * (cfg.vllm_cpu_kvcache_gib * GiB + width * judge_params)
    if cpu:
        for name, value in {**policy_static, **policy_train}.items():
            host[f"policy {name}"] = policy_here * value
        host["vLLM engines"] = engines_here * engine_share
        reference_here = len(local & set(placement.reference))
        if reference_here:
            host["reference ranks"] = reference_here * width * shape.params
        critic_here = len(local & set(placement.critic))
        if critic_here:
            cdev, _ = _trainable(shape, len(placement.critic), stage, width, False, True)
            host["critic ranks"] = critic_here * sum(cdev.values())
    return plan


def host_memory() -> tuple[float, float]:
    """(total, available) bytes of this host's memory, from /proc/meminfo."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    return float(values["MemTotal"]), float(values.get("MemAvailable", values["MemFree"]))


def gpu_memory() -> float | None:
    """The smallest visible GPU's memory in bytes, through NVML (no CUDA context is made); None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML or no driver: the GPU side goes unchecked
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else list(range(count))
        totals = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total
                  for i in indices if i < count]
        return float(min(totals)) if totals else None
    except Exception:  # noqa: BLE001
        return None
    finally:
        pynvml.nvmlShutdown()


def describe(parts: dict[str, float], top: int = 3) -> str:
    """'weights 3.1 GB, optimizer states 18.5 GB, ...': the largest components first."""
    ranked = sorted(parts.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {value / 1e9:.1f} GB" for name, value in ranked)

