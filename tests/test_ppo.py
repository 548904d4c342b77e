"""PPO with a critic (advantage_estimator gae) as a real job under torchrun on gloo: it learns the toy task, its
critic learns the returns, a rank killed mid-run is restarted by node.sh and the job redoes its steps exactly, and
Search-R1's recipe (configs/search_ppo.yaml) runs with the critic on a rank of its own."""
import glob
import json
import os
import random
import sys
import time

import pytest
from helpers import ROOT, JobWatch, alive, finish, free_port, kill_rank_after_step, run, shm, start

pytestmark = pytest.mark.slow  # torchrun jobs: pytest -m "not slow" leaves them out

STEPS = 25


def _ppo_toy_run(out) -> list[str]:
    """The GRPO toy task (16 fixed prompts, 8 samples each), trained by PPO: per-token GAE advantages from a critic
    on the two policy ranks, KL to the reference in the reward under the adaptive controller."""
    toy = out / "toy.json"
    toy.write_text(json.dumps(json.load(open(os.path.join(ROOT, "data", "arith_train.json")))[:16]))
    return ["train_grpo.py", "--config", "configs/default.yaml", "--train_data", str(toy), "--prompts_per_step", "16",
            "--max_steps", str(STEPS), "--save_steps", "10", "--output_dir", str(out),
            "--advantage_estimator", "gae", "--lam", "0.95", "--critic_learning_rate", "1e-3",
            "--critic_warmup_steps", "1", "--beta", "0.001", "--kl_in_reward", "true", "--kl_ctrl", "adaptive",
            "--kl_target", "0.01", "--kl_horizon", "1000"]


@pytest.fixture(scope="module")
def ppo(tmp_path_factory):
    """The toy PPO run under launch/node.sh with MAX_RESTARTS=1, and kill -9 of a random rank at a random step after
    the step-10 checkpoint: node.sh starts the job again with --resume auto and it finishes by itself. Returns the
    output folder, the final metrics and the rows the first attempt wrote before it was killed."""
    out = tmp_path_factory.mktemp("ppo")
    rng = random.Random()
    kill_after, victim_rank = rng.randint(12, 15), rng.randint(0, 2)
    cmd = ["bash", "launch/node.sh", "0", "127.0.0.1", "--", *_ppo_toy_run(out)[1:]]
    env = {"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "1"}
    shm_before = shm()
    proc = start(cmd, env=env, log=str(out / "node.out"))
    with JobWatch(proc) as watch:
        metrics_file = out / "metrics.jsonl"
        everything = kill_rank_after_step(proc, metrics_file, kill_after, victim_rank, watch)
        first_attempt = [json.loads(line) for line in metrics_file.read_text().split("\n")[:-1]]  # whole lines only
        done = finish(proc, 900)
    console = open(out / "node.out").read()
    assert done.returncode == 0, console[-4000:]
    assert "restart 1/1 after exit status" in console and "resumed from" in console, console[-4000:]
    deadline = time.time() + 30  # engine processes notice their rank is gone
    while alive(everything) and time.time() < deadline:
        time.sleep(1)
    assert not alive(everything) and not watch.left(shm_before), watch.left(shm_before)
    print(f"killed rank {victim_rank} after step {kill_after}")
    return out, [json.loads(line) for line in open(metrics_file)], first_attempt


@pytest.mark.xdist_group("ppo")  # one worker runs the tests of the shared run
def test_ppo_learns_the_toy_task_and_its_critic_the_returns(ppo):
    _, metrics, _ = ppo
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # every step once, the restart included
    rewards = [m["reward/mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print("reward curve:", [round(r, 3) for r in rewards])
    assert last > first + 0.1, (first, last, rewards)
    losses = [m["critic/value_loss"] for m in metrics]
    variance = [m["critic/explained_variance"] for m in metrics]
    print("value loss:", [round(v, 4) for v in losses], "explained variance:", [round(v, 3) for v in variance])
    # the critic's raw loss follows the returns' variance, which grows as the rewards move away from 0 toward 0.5;
    # the share of that variance the critic explains is what it learned: the untrained critic's at step 1 (its
    # values were computed before its first update) against the trained one's over the last 10 steps. (The first
    # five steps' mean is no baseline: the critic learns within a step or two, and a step-to-step spread of +-0.1
    # made the comparison of two five-step means fail on a run that learned: seen once in a full suite run on the
    # 2-core machine, 2026-12-08.)
    assert sum(variance[-10:]) / 10 > max(0.05, variance[0] + 0.1), variance
    assert all(v >= 0 for v in losses)
    for key in ("critic/clip_fraction", "critic/values_mean", "returns/mean", "returns/std", "advantages/raw_mean",
                "advantages/raw_std", "critic/lr", "kl_ctrl/coef", "kl_ctrl/kl_per_token"):
        assert all(key in m for m in metrics), key
    # the first step trains the critic alone (critic_warmup_steps 1): the policy's update starts at step 2
    assert "policy/loss" not in metrics[0] and "policy/loss" in metrics[1]
    # the adaptive controller moves the coefficient from beta, step by step, toward the KL target
    coefs = [m["kl_ctrl/coef"] for m in metrics]
    assert coefs[0] == 0.001 and len(set(coefs)) > 1


@pytest.mark.xdist_group("ppo")  # one worker runs the tests of the shared run
def test_a_killed_ppo_run_resumes_and_redoes_its_steps_exactly(ppo):
    """The steps the first attempt ran after its step-10 checkpoint (11 up to the kill), run again by the restarted
    job from that checkpoint (policy, critic, optimizers, KL coefficient, RNG), are the same steps (fixed seeds,
    CPU): rewards and the KL coefficient exactly, losses and values within 1e-5."""
    out, metrics, first_attempt = ppo
    redone = [m for m in first_attempt if m["step"] > 10]
    assert len(redone) >= 2 and [m["step"] for m in first_attempt] == list(range(1, len(first_attempt) + 1))
    for theirs in redone:
        ours = metrics[theirs["step"] - 1]
        for key in ("reward/mean", "completion/length_mean", "kl_ctrl/coef"):
            assert ours[key] == theirs[key], (ours["step"], key)
        for key in ("policy/loss", "critic/value_loss", "critic/values_mean", "returns/mean"):
            if key in theirs:
                assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (ours["step"], key)
    assert os.path.isdir(out / "checkpoints" / "step-20" / "deepspeed-critic")


def test_search_r1s_ppo_recipe_runs_with_the_critic_on_a_rank_of_its_own(tmp_path):
    """configs/search_ppo.yaml (one episode per prompt, critic rank 2, KL in the reward), logging to wandb in
    offline mode as well as tensorboard: the run's wandb file holds the scalars, and a samples table per step."""
    env = {"RETRIEVER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "retriever"), "PYTHON": sys.executable}
    started = run(["bash", "launch/retriever.sh", "start"], timeout=120, env=env)
    assert started.returncode == 0, started.stderr
    try:
        out = tmp_path / "out"
        result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
                      str(free_port()), "train_grpo.py", "--config", "configs/search_ppo.yaml", "--output_dir",
                      str(out), "--retriever_url", f"http://127.0.0.1:{env['RETRIEVER_PORT']}", "--max_steps", "3",
                      "--prompts_per_step", "16", "--eval_steps", "0", "--report_to", "tensorboard", "wandb"],
                     timeout=900, env={"WANDB_MODE": "offline"})
    finally:
        run(["bash", "launch/retriever.sh", "stop"], timeout=30, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "the critic on 1" in result.stdout + result.stderr
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 3 and all(m["tool/calls"] > 0 for m in metrics)
    assert all("critic/value_loss" in m and "kl_ctrl/coef" in m for m in metrics)
    assert os.path.isdir(out / "checkpoints" / "step-3" / "deepspeed-critic")
    assert os.listdir(out / "tensorboard")
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(out / "wandb")
    record = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
    for key in ("reward/mean", "critic/value_loss", "critic/explained_variance", "kl_ctrl/coef", "time/step_s"):
        assert key.encode() in record, key
    tables = sorted(glob.glob(os.path.join(runs[0], "files", "media", "table", "samples_*.table.json")))
    assert len(tables) == 3
    logged = [json.loads(line) for line in open(out / "samples.jsonl")]
    first = json.load(open(tables[0]))
    assert first["columns"][:3] == ["step", "prompt", "completion"]
    assert [row[2] for row in first["data"]] == [s["completion"] for s in logged if s["step"] == 1]
