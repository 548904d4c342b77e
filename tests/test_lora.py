"""LoRA (use_lora): a peft adapter trained on the frozen base, only the adapter sent to the vLLM engines each step,
checkpoints holding the adapter in peft's format (issue 27).

Unit tests: peft's file names, the config's LoRA checks, the memory plan of an adapter. Then real jobs under
torchrun on gloo (vLLM's CPU engine, DeepSpeed, the tiny model): one shared run of the toy task, a rank of it killed
and the job resumed by node.sh step for step (reward, sync check every step, the checkpoint loaded by peft, vLLM and
transformers), and a run of each placement the shared run does not cover.
"""
import json
import os
import sys

import pytest
import torch

from helpers import ROOT, alive, killed_and_resumed_run, run, shm, start, torchrun
from tgrpo.job import memory
from tgrpo.policy import lora
from tgrpo.config import Config, ConfigError, load_config
from tgrpo.job.placement import Placement
from tgrpo.tiny import ensure_tiny_model

CACHE = os.path.join(ROOT, ".cache")
SYSTEM = Config().system_prompt

# ---------------------------------------------------------------------------------------------------------------
# unit tests (fast)


def _peft_model(modules_to_save=None):
    """peft's model of the tiny model with our default adapter (lora.wrap); with modules_to_save, peft's own
    LoraConfig of ours plus those modules (lora_modules_to_save is no option any more, but file_name still names
    such copies as peft does)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = Config(use_lora=True)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(CACHE), dtype=torch.float32)
    if not modules_to_save:
        return lora.wrap(base, cfg), cfg
    config = lora.peft_config(cfg)
    config.modules_to_save = modules_to_save
    return get_peft_model(base, config), cfg


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_file_names_are_peft_s_own(modules_to_save):
    """Every parameter the adapter trains, renamed by lora.file_name, is exactly the key (and the tensor) that
    peft's get_peft_model_state_dict writes for it: what PeftModel.from_pretrained and vLLM's LoRA loader read.
    Without the renaming ('...q_proj.lora_A.default.weight' kept, or modules_to_save's copy left as
    '...lm_head.modules_to_save.default.weight') the key sets differ and peft would load nothing for those
    tensors."""
    from peft import get_peft_model_state_dict

    model, cfg = _peft_model(modules_to_save)
    peft_state = get_peft_model_state_dict(model)
    ours = {lora.file_name(n): p for n, p in model.named_parameters() if lora.is_adapter(n, p)}
    assert sorted(ours) == sorted(peft_state)
    for name, tensor in peft_state.items():
        assert torch.equal(ours[name], tensor), name
    assert any(".lora_A." in n for n in ours) and any(".lora_B." in n for n in ours)
    assert ("base_model.model.lm_head.weight" in ours) == bool(modules_to_save)
    # the memory plan's adapter count is an upper bound of the real adapter (GQA's k/v are narrower than hidden)
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert 0 < adapter <= memory.adapter_params(cfg, memory.model_shape(ensure_tiny_model(CACHE)))


def test_the_fresh_adapter_is_drawn_from_the_seed():
    """Two policies built with one seed (as two runs, or a run and its restart, build theirs) start from the same
    adapter: lora_A is random (peft's Kaiming init) and lora_B zero. torch's default generator is seeded at random
    in every process, so without seeding the draw two runs with one seed differ from their first update on (the
    loss of step 1 equal, its gradients not), and a killed run cannot be compared with an uninterrupted one."""
    def adapter(seed):
        torch.manual_seed(seed)  # whatever the process's generator holds
        model, _ = _peft_model()
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

    first, second = adapter(123), adapter(456)
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name], second[name]), name
        if ".lora_B." in name:
            assert not first[name].any(), name  # the policy starts as the base
        else:
            assert first[name].abs().max() > 0, name


@pytest.mark.parametrize("argv, words", [
    (["--use_lora", "true", "--lora_r", "0"], "lora_r must be >= 1"),
    (["--use_lora", "true", "--lora_r", "513"], "lora_r <= 512"),
    (["--save_merged_lora", "true"], "save_merged_lora is a LoRA option: set use_lora true"),
    (["--lora_modules_to_save", "lm_head"], "unrecognized arguments: --lora_modules_to_save"),  # no longer an option
])
def test_config_refuses_bad_lora_options_in_one_line(argv, words):
    """As every rank's pre-flight reads them (flags, then Config.check)."""
    with pytest.raises(ConfigError) as e:
        load_config(argv).check()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_the_lora_options():
    cfg = load_config(["--use_lora", "true", "--lora_r", "512", "--save_merged_lora", "true",
                       "--lora_target_modules", "q_proj", "v_proj"])
    cfg.check()
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.save_merged_lora
    assert lora.vllm_max_rank(cfg.lora_r) == 512 and lora.vllm_max_rank(16) == 16 and lora.vllm_max_rank(17) == 32


# Qwen2.5-7B's shape (config.json): 7.62e9 parameters
SHAPE_7B = memory.ModelShape(params=7_615_616_512, hidden=3584, intermediate=18944, layers=28, vocab=152064)


def _plan_7b(**fields):
    cfg = Config(**{"colocate": True, "rollout_ranks": "all", "policy_ranks": "all", "prompts_per_step": 64,
                    "max_prompt_length": 256, "max_completion_length": 768, "max_tokens_per_micro_batch": 8192,
                    **fields})
    return memory.estimate(cfg, Placement.from_config(cfg, 1), SHAPE_7B, device="cuda", width=2,
                           gpu_total=141e9).training


def test_memory_plan_of_a_lora_7b_holds_states_and_gradients_of_the_adapter_alone():
    """A bf16 7B policy on one GPU (ZeRO-2), r=64 on every linear layer: 64 x 28 x (8 x 3584 + 3 x (3584 + 18944))
    = 172.5M adapter parameters (2.3 % of 7.6B). Gradients (2 bytes) and AdamW's states (fp32 master, two moments,
    fp32 gradient partition: 16 bytes) are counted for them alone; the base's weights stay. A plan that counted
    LoRA as full fine-tuning would have 15.2 GB of gradients and 122 GB of states here."""
    adapter = 64 * 28 * (8 * 3584 + 3 * (3584 + 18944))
    assert adapter == 172_490_752 == memory.adapter_params(Config(use_lora=True, lora_r=64), SHAPE_7B)
    full = _plan_7b()
    lora_plan = _plan_7b(use_lora=True, lora_r=64)
    assert full["gradients"] == 2 * SHAPE_7B.params and full["optimizer states"] == 16 * SHAPE_7B.params
    assert lora_plan["gradients"] == 2 * adapter and lora_plan["optimizer states"] == 16 * adapter
    assert lora_plan["weights"] == 2 * (SHAPE_7B.params + adapter)  # the frozen base plus the adapter
    assert lora_plan["optimizer states"] / full["optimizer states"] < 0.025
    assert lora_plan["gradients"] / full["gradients"] < 0.025
    # with beta > 0 the reference is the base with the adapter disabled: no second copy of the weights
    assert "reference" in _plan_7b(beta=0.1) and "reference" not in _plan_7b(use_lora=True, lora_r=64, beta=0.1)


# ---------------------------------------------------------------------------------------------------------------
# the shared run: the toy task with LoRA

STEPS = 20
LR = "5e-3"
# Measured on the 2-core machine (_toy_lora_run's args at 20 steps, torchrun --nproc_per_node 3, seed 1), the reward's
# mean over the first 5 -> last 5 steps: lr 5e-3: 0.266 -> 0.541 with lora_A drawn from the seed (curve 0.21 0.12
# 0.23 0.35 0.42 ... 0.59 0.47 0.53 0.53 0.58), and 0.315 -> 0.630, 0.284 -> 0.611 with two unseeded draws of lora_A;
# lr 1e-2 collapsed: 0.129 -> 0.0 (no reward from step 6 on). So 5e-3, and a margin of about half the smallest rise.
REWARD_MARGIN = 0.15


def _toy_lora_run(out) -> list[str]:
    """test_train's toy task (16 fixed prompts, all every step, 8 samples each), as a LoRA run."""
    toy = out / "toy.json"
    toy.write_text(json.dumps(json.load(open(os.path.join(ROOT, "data", "arith_train.json")))[:16]))
    return ["train_grpo.py", "--config", "configs/default.yaml", "--train_data", str(toy), "--prompts_per_step", "16",
            "--max_steps", str(STEPS), "--save_steps", "10", "--sync_check", "true", "--output_dir", str(out),
            "--use_lora", "true", "--learning_rate", LR, "--save_merged_lora", "true"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The toy LoRA run under launch/node.sh with MAX_RESTARTS=1, and kill -9 of a random rank after a step past the
    step-10 checkpoint: node.sh starts the job again with --resume auto and it finishes by itself. One job for the
    shared-run tests (an uninterrupted run beside it cost CI a second job): what they check holds for the resumed
    run's output. Returns the output folder, the final metrics, the rows the first attempt wrote before it was
    killed, the console, and (kill_after, victim_rank, the job's processes still alive, its /dev/shm files left)."""
    out = tmp_path_factory.mktemp("lora")
    metrics, first_attempt, console, kill = killed_and_resumed_run(out, _toy_lora_run(out)[1:], (11, 13), 600)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    return out, metrics, first_attempt, console, kill


def _prompts(tokenizer, rows: slice = slice(100, 104)) -> list[list[int]]:
    """A few held-back problems of data/arith_train.json (the toy task trains on the first 16), as the trainer's
    prompts: system prompt, user turn, the chat template's generation prompt."""
    data = json.load(open(os.path.join(ROOT, "data", "arith_train.json")))[rows]
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *row["messages"]],
                                           add_generation_prompt=True, tokenize=False) for row in data]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _greedy(model, prompts: list[list[int]], new: int = 16) -> list[list[int]]:
    """transformers' greedy tokens after each prompt, up to and including the end-of-sequence token."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            tokens = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                    do_sample=False)[0, len(ids):].tolist()
            eos = model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [eos])
            out.append(tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))])
    return out


def _completion_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.slow
@pytest.mark.xdist_group("lora")
def test_lora_reward_rises_on_the_toy_task(lora_run):
    """Training only the adapter still learns the toy task. An adapter that never reached vLLM (the engines
    sampling from the base every step) or never trained would leave the reward at the base's ~0.2-0.3."""
    _, metrics, *_ = lora_run
    rewards = [m["reward/mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print("LoRA reward curve:", [round(r, 3) for r in rewards])
    assert last > first + REWARD_MARGIN, (first, last, rewards)


@pytest.mark.slow
@pytest.mark.xdist_group("lora")
def test_lora_every_sync_makes_vllm_match_the_policy_and_the_policy_is_not_the_base(lora_run):
    """After every adapter-only sync vLLM's greedy tokens and logprobs (base + the newest LoRA) equal the policy's
    (peft model under DeepSpeed). That would hold trivially if the adapter stayed zero (base == policy), so the
    saved adapter's lora_B must be non-zero and the trained model's logprobs must differ from the base's far more
    than the sync check's tolerance: an engine that kept serving the base would then fail the check."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics, *_ = lora_run
    for m in metrics:
        assert m["sync_check/passed"] == 1.0, m
        assert m["sync_check/token_match"] == 1.0, m
        assert m["sync_check/max_logprob_diff"] < 1e-3, m
    assert max(m["mismatch/logprob_abs_diff_max"] for m in metrics) < 1e-3
    path = out / "checkpoints" / f"step-{STEPS}"
    tensors = load_file(str(path / lora.WEIGHTS_FILE))
    b = [t for n, t in tensors.items() if ".lora_B." in n]
    assert b and max(t.abs().max().item() for t in b) > 1e-3
    base_dir = ensure_tiny_model(CACHE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prompt = _prompts(tokenizer, slice(100, 101))[0]
    completion = _greedy(base, [prompt])[0]
    before = _completion_logprobs(base, prompt, completion)
    trained = PeftModel.from_pretrained(base, str(path))
    after = _completion_logprobs(trained, prompt, completion)
    print("logprob |trained - base| on the base's greedy completion:", (after - before).abs().max().item())
    assert (after - before).abs().max().item() > 0.1  # 100 x the sync check's 1e-3


@pytest.mark.slow
@pytest.mark.xdist_group("lora")
def test_lora_checkpoint_holds_the_adapter_in_peft_format_and_no_base(lora_run):
    """The checkpoint is peft's adapter folder (adapter_config.json with our r/alpha, adapter_model.safetensors under
    peft's names, the tokenizer) plus DeepSpeed's state of the adapter alone: no model.safetensors at the top, and
    DeepSpeed's files smaller than the base model's weights (a state that held the frozen base, or its optimizer
    states, would be larger than the base itself: 1.6 MB here, ~5 MB of AdamW states)."""
    out, *_ = lora_run
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-10", f"step-{STEPS}"]
    base_bytes = os.path.getsize(os.path.join(ensure_tiny_model(CACHE), "model.safetensors"))
    for step in (10, STEPS):
        path = out / "checkpoints" / f"step-{step}"
        names = set(os.listdir(path))
        assert {lora.CONFIG_FILE, lora.WEIGHTS_FILE, "tokenizer.json", "deepspeed", "merged",
                "trainer_state.json"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, names
        config = json.load(open(path / lora.CONFIG_FILE))
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 32.0)
        assert json.load(open(path / "trainer_state.json"))["use_lora"] is True
        adapter_bytes = os.path.getsize(path / lora.WEIGHTS_FILE)
        assert adapter_bytes < base_bytes / 4, (adapter_bytes, base_bytes)
        ds = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path / "deepspeed") for f in files)
        assert ds < base_bytes, (ds, base_bytes)
    # the adapter's keys are those peft itself writes for this config
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model, _ = _peft_model()
    assert sorted(load_file(str(out / "checkpoints" / f"step-{STEPS}" / lora.WEIGHTS_FILE))) == \
        sorted(get_peft_model_state_dict(model))


VLLM_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    base, adapter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model=base, dtype="float32", max_model_len=256, gpu_memory_utilization=0.1, enforce_eager=True,
              enable_lora=True, max_lora_rank=16, seed=0)
    params = SamplingParams(max_tokens=16, temperature=0)
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    with_lora = llm.generate(inputs, params, lora_request=LoRARequest("grpo", 1, adapter))
    plain = llm.generate(inputs, params)
    print("VLLM-TOKENS " + json.dumps({"lora": [list(o.outputs[0].token_ids) for o in with_lora],
                                       "base": [list(o.outputs[0].token_ids) for o in plain]}))
"""


@pytest.mark.slow
@pytest.mark.xdist_group("lora")
def test_lora_checkpoint_loads_in_peft_vllm_and_merged_in_transformers_with_equal_greedy_tokens(lora_run):
    """The final checkpoint, as a user loads it: PeftModel.from_pretrained on the base, vLLM serving the base with it
    as a LoRA (enable_lora, max_lora_rank 16, LoRARequest of the folder), and merged/ as a plain transformers model.
    All three give the same greedy tokens on held-back prompts (float32), and they differ from the base's on some
    (vLLM ignoring the adapter, or peft loading none of its tensors, would give the base's tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, *_ = lora_run
    path = out / "checkpoints" / f"step-{STEPS}"
    base_dir = ensure_tiny_model(CACHE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(tokenizer)
    # a lone script: the engine in its process (no engine-core process to start, ~10-20 s instead of ~50-80 s here)
    result = run([sys.executable, "-c", VLLM_SCRIPT, base_dir, str(path), json.dumps(prompts)], timeout=300,
                 env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    vllm_out = json.loads(next(line for line in result.stdout.splitlines()
                               if line.startswith("VLLM-TOKENS ")).split(" ", 1)[1])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           str(path))
    peft_tokens = _greedy(peft_model, prompts)
    merged_tokens = _greedy(AutoModelForCausalLM.from_pretrained(path / "merged", dtype=torch.float32), prompts)
    for peft_t, vllm_t, merged_t, base_t in zip(peft_tokens, vllm_out["lora"], merged_tokens, vllm_out["base"]):
        print(repr(tokenizer.decode(peft_t)), "| base:", repr(tokenizer.decode(base_t)))
        assert vllm_t == peft_t, (tokenizer.decode(vllm_t), tokenizer.decode(peft_t))
        assert merged_t == peft_t, (tokenizer.decode(merged_t), tokenizer.decode(peft_t))
    assert vllm_out["lora"] != vllm_out["base"]


@pytest.mark.slow
@pytest.mark.xdist_group("lora")
def test_a_killed_lora_run_is_restarted_by_node_sh_and_resumes_step_for_step(lora_run):
    """The shared LoRA run was killed (kill -9 of a random rank after a step past the step-10 checkpoint): node.sh
    named it and started the job again with --resume auto, which loads the adapter's DeepSpeed state on the base
    loaded again from `model`, and the steps the first attempt ran past the checkpoint, run again, are the same steps
    (fixed seeds, CPU). A resume that lost the adapter (or its optimizer moments) would start step 11 from the base
    (or a fresh AdamW) and its loss, grad norm and rewards would differ."""
    out, metrics, first_attempt, console, (kill_after, victim_rank, left_alive, left_shm) = lora_run
    named = [line for line in console.splitlines() if line.startswith("error: rank ")]
    assert named and named[0].startswith(f"error: rank {victim_rank} ") and "SIGKILL" in named[0], console[-4000:]
    assert "restart 1/1 after exit status" in console and "resumed from" in console
    assert not left_alive, (victim_rank, left_alive)
    assert not left_shm, left_shm
    redone = [m for m in first_attempt if m["step"] > 10]
    assert len(redone) >= kill_after - 10
    assert [m["step"] for m in first_attempt] == list(range(1, len(first_attempt) + 1))
    for theirs in redone:
        ours = metrics[theirs["step"] - 1]
        for key in ("reward/mean", "accuracy", "completion/length_mean", "batch/tokens"):
            assert ours[key] == theirs[key], (kill_after, victim_rank, ours["step"], key, ours[key], theirs[key])
        for key in ("policy/loss", "policy/grad_norm", "policy/entropy", "policy/lr"):
            assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (ours["step"], key)
        assert ours["sync_check/passed"] == 1.0
    assert json.load(open(out / "checkpoints" / f"step-{STEPS}" / "trainer_state.json"))["use_lora"] is True


# ---------------------------------------------------------------------------------------------------------------
# placements the shared run does not cover

SHORT = ["train_grpo.py", "--config", "configs/default.yaml", "--max_steps", "3", "--prompts_per_step", "8",
         "--micro_batch_size", "8", "--sync_check", "true", "--use_lora", "true", "--learning_rate", LR]


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.slow
def test_lora_colocated_with_a_reference_and_a_ppo_critic(tmp_path):
    """Two colocated ranks (each a ZeRO-3 shard of the peft policy and a vLLM engine that gets the adapter its rank
    gathers, no broadcast), beta > 0 (the reference is the policy with its adapter disabled) and PPO
    (advantage_estimator gae, its critic a full model beside the policy). Every step passes the sync check; the KL
    to the reference is 0 before the first update (the adapter starts at zero) and finite and > 0 after it (a
    reference that was the adapted policy itself would keep it 0); the critic's DeepSpeed state holds a whole
    model's optimizer (larger than the base) while the policy's holds the adapter's alone (smaller)."""
    result = torchrun([*SHORT, "--colocate", "true", "--rollout_ranks", "all", "--policy_ranks", "all",
                       "--beta", "0.05", "--advantage_estimator", "gae", "--critic_learning_rate", "1e-3",
                       "--output_dir", str(tmp_path)], nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["sync_check/passed"] == 1.0 and m["sync_check/token_match"] == 1.0, m
        assert m["sync_check/max_logprob_diff"] < 1e-3, m
        assert m["policy/grad_norm"] > 0 and m["critic/grad_norm"] > 0, m
    kl = [m["policy/kl"] for m in metrics]
    assert abs(kl[0]) < 1e-6 and all(0 < k < float("inf") for k in kl[1:]), kl
    path = tmp_path / "checkpoints" / "step-3"
    base_bytes = os.path.getsize(os.path.join(ensure_tiny_model(CACHE), "model.safetensors"))
    assert (path / lora.WEIGHTS_FILE).is_file() and not (path / "model.safetensors").exists()
    assert _dir_bytes(path / "deepspeed") < base_bytes < _dir_bytes(path / "deepspeed-critic")


@pytest.mark.slow
def test_lora_reaches_a_tensor_parallel_engine(tmp_path):
    """Ranks 0-1 hold one vLLM engine with tensor parallelism 2 (vLLM shards each LoRA it builds over both
    workers), ranks 2-3 train the adapter (ZeRO-3): after every adapter-only sync both shards serve the new adapter,
    so the engine's greedy tokens and logprobs equal the policy's. An adapter applied on one shard only (or not
    at all after the first step) fails the check once the adapter is non-zero (steps 2, 3)."""
    result = torchrun([*SHORT, "--rollout_ranks", "0-1", "--rollout_tensor_parallel_size", "2",
                       "--policy_ranks", "2-3", "--output_dir", str(tmp_path)], nproc=4, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["sync_check/passed"] == 1.0 and m["sync_check/token_match"] == 1.0, m
        assert m["sync_check/max_logprob_diff"] < 1e-3, m
    assert all(m["policy/grad_norm"] > 0 for m in metrics)
