"""The memory plan (tgrpo/job/memory.py): the estimate against hand-computed bytes, the parameter count against a real
model, and a job too large for this host stopped in one line at pre-flight, before any engine starts."""
import os
import sys

import pytest
import torch

from helpers import ROOT, check, run
from tgrpo.job import memory
from tgrpo.config import Config, ConfigError
from tgrpo.job.placement import Placement

SHAPE = memory.ModelShape(params=1_000_000_000, hidden=1000, intermediate=4000, layers=10, vocab=50000)
GB = 1e9


def plan(device="cuda", width=2, gpu_total=100 * GB, world=1, prompt_length=None, activations=True, **fields):
    cfg = Config(**{"colocate": True, "rollout_ranks": "all", "policy_ranks": "all", "prompts_per_step": 64,
                    "max_prompt_length": 256, "max_completion_length": 768, "max_tokens_per_micro_batch": 8192,
                    **fields})
    return memory.estimate(cfg, Placement.from_config(cfg, world), SHAPE, device=device, width=width,
                           gpu_total=gpu_total, prompt_length=prompt_length, activations=activations)


def test_zero2_one_rank_bf16_by_hand():
    p = plan()  # zero_stage auto: 2 on one colocated GPU
    t = p.training
    assert t["weights"] == 2 * GB and t["gradients"] == 2 * GB
    assert t["optimizer states"] == 16 * GB  # fp32 master weights, two moments, the fp32 gradient partition
    per_token_layer = memory.ACT_PER_HIDDEN * 1000 + memory.ACT_PER_INTERMEDIATE * 4000
    assert t["activations"] == 8192 * per_token_layer * 10 * 2
    assert t["logits"] == 2 * 8192 * 50000 * 2
    # colocated: the engine's half of the GPU beside the policy's states while generating, or the training peak
    generating = 2 * GB + 16 * GB + 50 * GB
    training = sum(t.values()) + memory.ENGINE_ASLEEP
    assert p.gpu_total == pytest.approx(max(generating, training) + 2 * memory.CUDA_CONTEXT)
    assert p.host == {"processes": memory.PROCESS_HOST["cuda"] + memory.ENGINE_HOST["cuda"]}


def test_zero3_shards_weights_gradients_and_states_over_the_policy_ranks():
    cfg = Config(rollout_ranks="0-0", policy_ranks="1-4", prompts_per_step=8, max_tokens_per_micro_batch=4096)
    placement = Placement.from_config(cfg, 5)
    assert placement.zero_stage == 3
    t = memory.estimate(cfg, placement, SHAPE, device="cuda", width=2, gpu_total=100 * GB).training
    assert (t["weights"], t["gradients"], t["optimizer states"]) == (0.5 * GB, 0.5 * GB, 4 * GB)
    cfg.zero_stage = 1  # only the optimizer states are sharded
    t = memory.estimate(cfg, Placement.from_config(cfg, 5), SHAPE, device="cuda", width=2, gpu_total=100 * GB).training
    assert (t["weights"], t["gradients"], t["optimizer states"]) == (2 * GB, 2 * GB, 4 * GB)


def test_offload_moves_the_optimizer_to_the_host():
    p = plan(offload_optimizer=True)
    assert "optimizer states" not in p.training
    # ~16 bytes a parameter, pinned on the host, with DeepSpeed's allowance for its buffers and copies
    assert p.host["optimizer states (offloaded)"] == 16 * GB * memory.OFFLOAD_BUFFER
    assert p.training["gradients"] == memory.REDUCE_BUCKET * 2  # reduced a bucket at a time to the host


def test_token_budget_reference_critic_and_checkpointing():
    base = plan().training
    assert plan(max_tokens_per_micro_batch=4096).training["activations"] == base["activations"] / 2
    # without a budget: micro_batch_size whole sequences, at most a rank's share of the step
    assert memory.micro_batch_tokens(Config(max_tokens_per_micro_batch=0, micro_batch_size=4,
                                            max_prompt_length=100, max_completion_length=100), 2) == 800
    assert plan(beta=0.1).training["reference"] == 2 * GB
    gae = plan(advantage_estimator="gae").training
    assert gae["critic optimizer states"] == 16 * GB and gae["critic gradients"] == 2 * GB
    assert plan(gradient_checkpointing=True).training["activations"] < base["activations"] / 4
    # the data's longest prompt instead of max_prompt_length, when the pre-flight has read it
    whole = dict(max_tokens_per_micro_batch=0, micro_batch_size=2)  # two whole sequences a micro-batch
    assert plan(**whole).training["activations"] == base["activations"] * 2 * (256 + 768) / 8192
    assert plan(**whole, prompt_length=32).training["activations"] == base["activations"] * 2 * (32 + 768) / 8192
    static = plan(activations=False).training  # what every rank checks: nothing that depends on the sequences
    assert "activations" not in static and "logits" not in static and static["optimizer states"] == 16 * GB


def test_cpu_runs_hold_everything_in_host_memory():
    cfg = Config()  # the default: 1 engine + 2 policy ranks on one host
    placement = Placement.from_config(cfg, 3)
    p = memory.estimate(cfg, placement, SHAPE, device="cpu", width=4)
    assert p.gpu == {}
    # fp32: weights 4 + optimizer moments 8 bytes a parameter, sharded by ZeRO-3 over 2 ranks, on each of the 2
    assert p.host["policy optimizer states"] == 2 * 8 * GB / 2
    assert p.host["policy weights"] == 2 * 4 * GB / 2
    assert p.host["vLLM engines"] == GB * 4 + cfg.vllm_cpu_kvcache_gib * memory.GiB


def test_model_shape_counts_the_real_parameters(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for tied in (True, False):
        config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
        model = Qwen2ForCausalLM(config)
        model.save_pretrained(tmp_path / str(tied))
        shape = memory.model_shape(str(tmp_path / str(tied)))
        assert shape.params == sum(p.numel() for p in model.parameters())
        assert (shape.hidden, shape.intermediate, shape.layers, shape.vocab) == (64, 96, 2, 300)


def test_a_frozen_vision_tower_has_no_gradients_or_optimizer_states(tmp_path):
    """Qwen2.5-VL-3B's shape: the tower (encoder and merger, 0.67B of 3.75B) counted apart; with
    freeze_vision_tower only the language model's parameters have gradients and optimizer states (the H100 bench's
    pre-flight counted 60.1 GB of states for a frozen tower before this)."""
    from transformers import Qwen2_5_VLConfig

    from tgrpo.tiny import RANDOM_VL_SHAPES

    text, vision, _ = RANDOM_VL_SHAPES["vl-3b"]
    Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, patch_size=14, spatial_merge_size=2,
                                                          temporal_patch_size=2)).save_pretrained(tmp_path)
    shape = memory.model_shape(str(tmp_path))
    assert shape.params == 3_754_622_976 and shape.vision == 668_684_288  # bench/step.py's counts of vl-3b
    cfg = dict(colocate=True, rollout_ranks="all", policy_ranks="all", max_tokens_per_micro_batch=8192)
    trained, frozen = (memory.estimate(Config(**cfg, freeze_vision_tower=f), Placement.from_config(Config(**cfg), 1),
                                       shape, device="cuda", width=2, gpu_total=80 * GB).training
                       for f in (False, True))
    assert trained["optimizer states"] == 16 * shape.params
    assert frozen["optimizer states"] == 16 * (shape.params - shape.vision)
    assert frozen["gradients"] == 2 * (shape.params - shape.vision)
    assert frozen["weights"] == trained["weights"] == 2 * shape.params  # the frozen tower's weights still load


def test_reward_models_and_the_judge_are_counted_where_they_sit():
    """A reward model on the policy GPU is resident while it scores (the policy's states stay, its training
    activations do not) and waits in host memory otherwise; on reward ranks of its own it is its GPU's whole load;
    on CPU every copy is host memory. A judge rank's GPU holds its engine's share."""
    rm = 8_000_000_000
    base = dict(rollout_ranks="0-0", policy_ranks="1-1", reward_funcs=["math"], reward_weights=[1.0],
                max_tokens_per_micro_batch=4096, vllm_gpu_memory_utilization=0.2)
    on_policy = Config(**base)
    p = memory.estimate(on_policy, Placement.from_config(on_policy, 2), SHAPE, device="cuda", width=2,
                        gpu_total=80 * GB, reward_params=rm)
    assert p.gpu["reward models"] == 2 * rm and p.host["reward models (offloaded)"] == 2 * rm
    own = Config(**{**base, "reward_ranks": "2-3"})
    placement = Placement.from_config(own, 4)
    p = memory.estimate(own, placement, SHAPE, device="cuda", width=2, gpu_total=80 * GB, reward_params=rm)
    assert "reward models" not in p.gpu  # the policy's GPU is busier than a 16 GB reward model's
    p = memory.estimate(own, placement, SHAPE, device="cuda", width=2, gpu_total=80 * GB, reward_params=10 * rm)
    assert p.gpu["reward models"] == 20 * rm and "reward models (offloaded)" not in p.host
    p = memory.estimate(own, placement, SHAPE, device="cpu", width=4, reward_params=rm)
    assert p.host["reward models"] == 2 * 4 * rm  # two reward ranks, a float32 copy each
    judged = Config(**{**base, "judge_ranks": "2-2"})
    p = memory.estimate(judged, Placement.from_config(judged, 3), SHAPE, device="cuda", width=2, gpu_total=200 * GB,
                        judge_params=rm)
    assert p.gpu["judge's vLLM engine"] == judged.judge_gpu_memory_utilization * 200 * GB


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory):
    """A model folder of Qwen2.5-7B's shape: its config.json, a tokenizer, and a one-tensor weight file in place of
    its weights (the pre-flight reads only the headers of weight files; the memory plan counts from config.json)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    from tgrpo.tiny import RANDOM_SHAPES, ensure_tiny_model

    folder = tmp_path_factory.mktemp("seven-b")
    Qwen2Config(**RANDOM_SHAPES["7b"]).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_tiny_model(os.path.join(ROOT, ".cache"))).save_pretrained(folder)
    save_file({"lm_head.weight": torch.zeros(1)}, os.path.join(folder, "model.safetensors"))
    return str(folder)


def test_a_model_too_large_for_this_host_is_one_line(seven_b, tmp_path):
    """7.6B parameters in fp32 on CPU ranks: ~16 bytes each, over this host's memory."""
    total, free = memory.host_memory()
    assert 16 * 7.6e9 > total, "this host is large enough to hold a 7B policy: the test proves nothing here"
    with pytest.raises(ConfigError, match=r"this host's ranks need ~\d+ GB of memory .*; this host has \d+ GiB, "
                                          r"\d+ free: .*\(memory_check false starts anyway\)") as e:
        check(Config(model=seven_b, output_dir=str(tmp_path / "out")), 3)
    assert "\n" not in str(e.value)
    check(Config(model=seven_b, output_dir=str(tmp_path / "out"), memory_check=False), 3)  # a warning only


@pytest.mark.slow
def test_node_sh_stops_a_job_that_cannot_fit_before_any_engine(seven_b, tmp_path):
    out = tmp_path / "out"
    proc = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--model", seven_b, "--output_dir", str(out)],
               timeout=300, env={"MASTER_PORT": "0", "PYTHON": sys.executable})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GB of memory" in lines[0], proc.stderr
    assert not out.exists() or not any(out.rglob("*.log")), "the job went past pre-flight"


# Peaks measured on one H200 (125 GiB host), random Qwen2.5-1.5B colocated, 32 x 8 x 512 fixed lengths, ZeRO-2
# (bench/README.md): the policy's max_memory_allocated, and the host's used memory over the job's life.
MEASURED_H200 = {"training": 76.35, "training offloaded": 56.59, "host offloaded": 44.9}


def test_the_estimate_is_within_15_percent_of_the_h200_peaks(tmp_path):
    from transformers import Qwen2Config

    from tgrpo.tiny import RANDOM_SHAPES

    Qwen2Config(**RANDOM_SHAPES["1.5b"]).save_pretrained(tmp_path)
    shape = memory.model_shape(str(tmp_path))
    cfg = Config(colocate=True, rollout_ranks="all", policy_ranks="all", prompts_per_step=32,
                 max_completion_length=512)
    placement = Placement.from_config(cfg, 1)
    on_gpu = dict(device="cuda", width=2, gpu_total=140.4 * memory.GiB, prompt_length=40)
    trained = memory.estimate(cfg, placement, shape, **on_gpu)
    cfg.offload_optimizer = True
    offloaded = memory.estimate(cfg, placement, shape, **on_gpu)
    estimates = {"training": sum(trained.training.values()), "training offloaded": sum(offloaded.training.values()),
                 "host offloaded": offloaded.host_total}
    for name, measured in MEASURED_H200.items():
        assert abs(estimates[name] / memory.GiB / measured - 1) < 0.15, (name, estimates[name] / memory.GiB)


def test_a_7b_policy_with_its_optimizer_offloaded_does_not_fit_a_125_gib_host(seven_b):
    """The bench's 7B colocated run was SIGKILLed on such a host a minute after its weights loaded."""
    cfg = Config(colocate=True, rollout_ranks="all", policy_ranks="all", offload_optimizer=True,
                 max_tokens_per_micro_batch=8192, prompts_per_step=16, max_completion_length=512)
    plan = memory.estimate(cfg, Placement.from_config(cfg, 1), memory.model_shape(seven_b), device="cuda", width=2,
                           gpu_total=140.4 * memory.GiB, activations=False)
    assert plan.host_total > 125 * memory.GiB > 16 * 7.6e9  # its bytes alone would fit; with DeepSpeed's buffers not
    assert plan.gpu_total < 140.4 * memory.GiB  # the GPU holds it: the host is what stops it
