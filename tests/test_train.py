"""The real job under torchrun on gloo: 1 vLLM rollout rank + 2 DeepSpeed ZeRO-3 policy ranks, the tiny model.

One fixed-seed run is shared by these tests (start-up dominates on CPU), under launch/node.sh, with a rank killed
part way and the job restarted from its checkpoint. It runs with sync_check on, so after every sync the rollout
engine's greedy tokens and logprobs are compared with the policy's own.
"""
import json
import os
import sys

import pytest

from helpers import ROOT, alive, killed_and_resumed_run, run, shm, start
from tgrpo.config import Config
from tgrpo.tiny import tiny_model_dir

# torchrun jobs: pytest -m "not slow" leaves them out; one xdist worker runs them all (they share the run)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

STEPS = 25
# vLLM in a script of its own, as a user loads a checkpoint, with the engine in that process: no engine-core process
# to start (~10-20 s instead of ~50-80 s on 2 busy cores). The job's engines need theirs (inside a torchrun world an
# in-process engine hangs), a lone script does not.
VLLM_ALONE = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PROMPT = [{"role": "system", "content": Config().system_prompt}, {"role": "user", "content": "What is 2 + 3?"}]


def _toy_run(out) -> list[str]:
    """The learnable toy task: 16 fixed arithmetic prompts, all of them every step, 8 samples each."""
    toy = out / "toy.json"
    toy.write_text(json.dumps(json.load(open(os.path.join(ROOT, "data", "arith_train.json")))[:16]))
    return ["train_grpo.py", "--config", "configs/default.yaml", "--train_data", str(toy), "--prompts_per_step", "16",
            "--max_steps", str(STEPS), "--save_steps", "10", "--sync_check", "true", "--output_dir", str(out),
            "--lr_scheduler_type", "linear", "--warmup_steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The toy run under launch/node.sh with MAX_RESTARTS=1, and kill -9 of a random rank at a random step after the
    step-10 checkpoint: node.sh starts the job again with --resume auto and it finishes by itself. One job for every
    test here (an uninterrupted run beside it cost CI a 25-step job): what the others check holds for the resumed
    run's output, and the steps the first attempt ran past the checkpoint are those the resumed job ran again.
    Returns the output folder, the final metrics, the rows the first attempt wrote before it was killed, the console,
    and (kill_after, victim_rank, the job's processes still alive, its /dev/shm files left)."""
    out = tmp_path_factory.mktemp("run")
    return (out, *killed_and_resumed_run(out, _toy_run(out)[1:], (11, 17)))


def test_every_sync_makes_vllm_match_the_policy(trained):
    _, metrics, *_ = trained
    assert len(metrics) == STEPS
    for m in metrics:
        assert m["sync_check/token_match"] == 1.0, m
        assert m["sync_check/max_logprob_diff"] < 1e-3, m
    # vLLM's sampling logprobs equal the trainer's on the very tokens it sampled, every step
    assert max(m["mismatch/logprob_abs_diff_max"] for m in metrics) < 1e-3


def test_policy_moved_away_from_the_initial_weights(trained):
    """The sync check would pass trivially if nothing trained: the saved policy must differ from the start."""
    from safetensors.torch import load_file

    out, *_ = trained
    start = load_file(os.path.join(tiny_model_dir(os.path.join(ROOT, ".cache")), "model.safetensors"))
    end = load_file(str(out / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))
    assert start.keys() == end.keys()
    moved = max((start[k] - end[k]).abs().max().item() for k in start)
    assert moved > 1e-3


def test_reward_rises_on_the_toy_task(trained):
    _, metrics, *_ = trained
    rewards = [m["reward/mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print("reward curve:", [round(r, 3) for r in rewards])
    assert last > first + 0.1, (first, last, rewards)


def test_learning_rate_follows_its_schedule(trained):
    """Linear warmup over 2 steps from 0, then a linear decay to 0 at step 25 (transformers' schedule, one optimizer
    step per step here): policy/lr is the rate each step's update used."""
    _, metrics, *_ = trained
    lr = 5e-4
    expected = [0.0, lr / 2] + [lr * (STEPS - k) / (STEPS - 2) for k in range(2, STEPS)]
    assert [m["policy/lr"] for m in metrics] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_outputs_tensorboard_samples_and_progress(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _, console, _ = trained
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("reward/mean", "reward/std", "accuracy", "policy/kl", "policy/clip_fraction", "policy/entropy",
                "completion/length_mean", "time/generate_s", "time/reward_s", "time/train_s", "time/sync_s",
                "throughput/generate_tokens_per_s", "throughput/train_tokens_per_s"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("reward/mean")] == list(range(1, STEPS + 1))  # the redone steps once
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert samples and {"prompt", "completion", "answer", "reward"} <= samples[0].keys()
    assert f"{STEPS}/{STEPS}" in console  # rank 0's progress bar, on the console
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-10", "step-20", f"step-{STEPS}"]


def test_checkpoint_loads_in_transformers_and_generates(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, *_ = trained
    path = out / "checkpoints" / f"step-{STEPS}"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert len(generated) > 0
    assert "<answer>" in tokenizer.decode(generated, skip_special_tokens=True)


def test_checkpoint_loads_in_vllm(trained):
    out, *_ = trained
    script = ("import json, sys\nfrom vllm import LLM, SamplingParams\n"
              "if __name__ == '__main__':\n"
              "    llm = LLM(model=sys.argv[1], dtype='float32', max_model_len=256, gpu_memory_utilization=0.1, enforce_eager=True)\n"
              "    o = llm.chat(json.loads(sys.argv[2]), SamplingParams(max_tokens=12, temperature=0))\n"
              "    print('VLLM-TEXT', repr(o[0].outputs[0].text))\n")
    result = run([sys.executable, "-c", script, str(out / "checkpoints" / f"step-{STEPS}"), json.dumps(PROMPT)],
                 timeout=300, env=VLLM_ALONE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VLLM-TEXT" in result.stdout and "<answer>" in result.stdout



def test_a_killed_rank_is_named_and_node_sh_restarts_the_job_step_for_step(trained):
    """The shared run was killed (kill -9 of a random rank at a random step after the step-10 checkpoint): node.sh
    named the killed rank in one line, started the job again with --resume auto, and it finished by itself with exit
    status 0. Every step's metrics row is there exactly once, and the steps the first attempt ran past the
    checkpoint, run again by the resumed job, are the same steps (fixed seeds, CPU); no process of the job (vLLM
    engines included) and nothing in /dev/shm is left behind."""
    out, metrics, first_attempt, console, (kill_after, victim_rank, left_alive, left_shm) = trained
    named = [line for line in console.splitlines() if line.startswith("error: rank ")]
    assert named and named[0].startswith(f"error: rank {victim_rank} ") and "SIGKILL" in named[0], console[-4000:]
    assert "restart 1/1 after exit status" in console and "resumed from" in console
    left = {pid: open(f"/proc/{pid}/cmdline", "rb").read()[:120] for pid in left_alive}
    assert not left, (victim_rank, left)
    assert not left_shm, left_shm  # weight buffers, vLLM's segments: none left
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # steps after the checkpoint were dropped
    redone = [m for m in first_attempt if m["step"] > 10]
    assert len(redone) >= kill_after - 10
    assert [m["step"] for m in first_attempt] == list(range(1, len(first_attempt) + 1))
    for theirs in redone:
        ours = metrics[theirs["step"] - 1]
        for key in ("reward/mean", "accuracy", "completion/length_mean", "batch/tokens"):
            assert ours[key] == theirs[key], (kill_after, victim_rank, ours["step"], key, ours[key], theirs[key])
        for key in ("policy/loss", "policy/grad_norm", "policy/entropy", "policy/lr"):
            assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (ours["step"], key)
    # save_total_limit 3 keeps the newest three; all complete
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-10", "step-20", f"step-{STEPS}"]
