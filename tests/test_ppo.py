"""PPO with a critic (advantage_estimator gae) as a real job under torchrun on gloo: it learns the toy task, its
critic learns the returns, a resumed run continues it exactly, and Search-R1's recipe (configs/search_ppo.yaml)
runs with the critic on a rank of its own."""
import glob
import json
import os
import shutil
import sys

import pytest
from helpers import ROOT, free_port, run, torchrun

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
    out = tmp_path_factory.mktemp("ppo")
    result = torchrun(_ppo_toy_run(out), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_ppo_learns_the_toy_task_and_its_critic_the_returns(ppo):
    _, metrics = ppo
    assert len(metrics) == STEPS
    rewards = [m["reward/mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print("reward curve:", [round(r, 3) for r in rewards])
    assert last > first + 0.1, (first, last, rewards)
    losses = [m["critic/value_loss"] for m in metrics]
    variance = [m["critic/explained_variance"] for m in metrics]
    print("value loss:", [round(v, 4) for v in losses], "explained variance:", [round(v, 3) for v in variance])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert sum(variance[-5:]) / 5 > sum(variance[:5]) / 5
    for key in ("critic/clip_fraction", "critic/values_mean", "returns/mean", "returns/std", "advantages/raw_mean",
                "advantages/raw_std", "critic/lr", "kl_ctrl/coef", "kl_ctrl/kl_per_token"):
        assert all(key in m for m in metrics), key
    # the first step trains the critic alone (critic_warmup_steps 1): the policy's update starts at step 2
    assert "policy/loss" not in metrics[0] and "policy/loss" in metrics[1]
    # the adaptive controller moves the coefficient from beta, step by step, toward the KL target
    coefs = [m["kl_ctrl/coef"] for m in metrics]
    assert coefs[0] == 0.001 and len(set(coefs)) > 1


def test_a_resumed_ppo_run_continues_the_uninterrupted_one(ppo, tmp_path):
    """From the uninterrupted run's step-10 checkpoint (policy, critic, KL coefficient, RNG), --resume auto gives
    the same steps 11-25 (fixed seeds, CPU)."""
    out, uninterrupted = ppo
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(out / "checkpoints" / "step-10", resumed / "checkpoints" / "step-10")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in uninterrupted[:10]))
    shutil.copy(out / "toy.json", resumed / "toy.json")
    args = _ppo_toy_run(resumed)
    result = torchrun([*args, "--resume", "auto"], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for ours, theirs in zip(metrics[10:], uninterrupted[10:]):
        for key in ("reward/mean", "completion/length_mean", "kl_ctrl/coef"):
            assert ours[key] == theirs[key], (ours["step"], key)
        for key in ("policy/loss", "critic/value_loss", "critic/values_mean", "returns/mean"):
            assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (ours["step"], key)


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
