"""Rewards from models, end to end under torchrun (real vLLM engines, real DeepSpeed, the embedded tiny-rm and
tiny-judge): GRPO rewarded by a reward model alone raises its score, with the reward model on a rank of its own
(killed there and resumed by node.sh) and colocated, scored while the engine generates (running normalisation); the
trainer's scores equal the models' own, computed here with transformers on the same texts; the same for the LLM
judge on its vLLM rank (in async_mode each group sent to it as the stream finishes it)."""
import json
import math
import os
import sys

import pytest
import torch

from helpers import ROOT, free_port, killed_and_resumed_run, run
from tgrpo.reward_spec import prompt_text

pytestmark = [pytest.mark.slow]
CACHE = os.path.join(ROOT, ".cache")
STEPS = 20
# first 5 steps vs last 5, half the least rise of 3 seeds (configs/rm.yaml and judge.yaml, 20 steps, seeds 1-3 on the
# 2-core CPU machine): tiny-rm's score (a logit) rose 3.51, 3.80, 3.84; the judge's P(yes) 0.38, 0.39, 0.40
MARGIN = 1.75
JUDGE_MARGIN = 0.19


def _samples(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "samples.jsonl")]


def _rise(values: list[float]) -> tuple[float, float]:
    return sum(values[:5]) / 5, sum(values[-5:]) / 5


def _rm_scores(rows: list[dict]) -> list[float]:
    """tiny-rm's score of each logged sample, by transformers alone (float32, one text at a time)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tgrpo.tiny import ensure_reward_model

    path = ensure_reward_model(CACHE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"] + [{"role": "assistant", "content": row["completion"]}],
                                             tokenize=False)
        with torch.no_grad():
            out.append(model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item())
    return out


@pytest.mark.xdist_group("rm")
def test_reward_model_on_its_own_rank_raises_its_score_and_a_killed_reward_rank_resumes(tmp_path, monkeypatch):
    """configs/rm.yaml as a new user runs it (node.sh), each group sent to the reward rank as it finishes
    (score_while_generating, as on GPU), the reward rank (2) killed with SIGKILL after the step-10 checkpoint: node.sh
    names it, restarts the job, which resumes and finishes with the first attempt's metrics."""
    monkeypatch.setenv("TGRPO_TEST_VICTIM_RANK", "2")
    args = ["train_grpo.py", "--config", "configs/rm.yaml", "--save_steps", "10", "--score_while_generating", "true",
            "--output_dir", str(tmp_path)]
    metrics, first_attempt, console, (kill_after, victim, left_alive, left_shm) = killed_and_resumed_run(
        tmp_path, args[1:], (11, 13))
    named = [line for line in console.splitlines() if line.startswith("error: rank ")]
    assert named and named[0].startswith("error: rank 2 ") and "SIGKILL" in named[0], console[-3000:]
    assert "resumed from" in console and not left_alive and not left_shm
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for theirs in [m for m in first_attempt if m["step"] > 10]:  # the steps run again after the resume
        ours = metrics[theirs["step"] - 1]
        for key in ("reward/mean", "reward/tiny-rm/std", "completion/length_mean", "batch/tokens"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (kill_after, ours["step"], key)
    scores = [m["reward/tiny-rm"] for m in metrics]
    first, last = _rise(scores)
    print("tiny-rm score per step:", [round(s, 3) for s in scores])
    assert last > first + MARGIN, (first, last, scores)
    rows = _samples(tmp_path)
    direct = _rm_scores(rows)
    for row, want in zip(rows, direct):
        assert row["reward_parts"]["tiny-rm"] == pytest.approx(want, abs=1e-4), row
        assert row["reward"] == pytest.approx(want, abs=1e-4)  # the reward model's score alone, weight 1
    assert len({round(x, 3) for x in direct}) > 5  # varied texts, varied scores


def test_reward_model_colocated_scores_while_generating_with_running_normalisation(tmp_path):
    """One colocated rank (engine, policy and reward model): with score_while_generating its groups are scored on
    the scoring thread while its engine generates the rest; reward_model_normalize running standardises the scores
    (the raw mean is logged and rises); a run resumed from the step-7 checkpoint goes on with the same running
    statistics, so its steps 8-14 equal the first run's."""
    def train(out, *extra):
        done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                    str(free_port()), "train_grpo.py", "--config", "configs/rm.yaml", "--reward_ranks", "",
                    "--colocate", "true", "--rollout_ranks", "all", "--policy_ranks", "all",
                    "--score_while_generating", "true", "--reward_model_normalize", "running", "--max_steps", "14",
                    "--save_steps", "7", "--output_dir", str(out), *extra], 900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done, [json.loads(line) for line in open(out / "metrics.jsonl")]

    done, metrics = train(tmp_path / "run")
    raw = [m["reward/tiny-rm/raw_mean"] for m in metrics]
    first, last = _rise(raw)
    print("tiny-rm raw mean per step (colocated, normalised):", [round(s, 3) for s in raw])
    assert last > first + MARGIN, (first, last, raw)
    assert abs(metrics[-1]["reward/mean"]) < 1.5  # standardised: around 0, not the raw logits
    assert all(m["time/model_reward_busy_s"] > 0 for m in metrics)
    assert "ready in" in done.stdout and "colocated" in done.stdout and "reward models on" not in done.stdout
    resumed_run, resumed = train(tmp_path / "resumed", "--resume", str(tmp_path / "run" / "checkpoints" / "step-7"))
    assert "resumed from" in resumed_run.stdout
    assert [m["step"] for m in resumed] == list(range(8, 15))
    for ours in resumed:
        theirs = metrics[ours["step"] - 1]
        for key in ("reward/tiny-rm/raw_mean", "reward/mean", "reward/tiny-rm/std", "completion/length_mean"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), (ours["step"], key)


@pytest.mark.xdist_group("judge")
def test_judge_on_its_own_rank_raises_its_verdict_and_scores_as_the_model_does(tmp_path):
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
                str(free_port()), "train_grpo.py", "--config", "configs/judge.yaml", "--output_dir", str(tmp_path)],
               900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the judge on 1" in done.stdout
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(m["reward/judge_failures"] == 0 for m in metrics)
    verdicts = [m["reward/judge"] for m in metrics]
    first, last = _rise(verdicts)
    print("judge P(yes) per step:", [round(s, 3) for s in verdicts])
    assert last > first + JUDGE_MARGIN, (first, last, verdicts)
    # the judge's verdict as transformers computes it from the same message (float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tgrpo.config import Config
    from tgrpo.tiny import ensure_judge_model

    path = ensure_judge_model(CACHE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
    template = Config().judge_template
    rows = _samples(tmp_path)
    for row in rows:
        message = template.format(prompt=prompt_text(row["messages"]), completion=row["completion"],
                                  answer=row["answer"])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        want = 1 / (1 + math.exp(logp[no].item() - logp[yes].item()))
        assert row["reward_parts"]["judge"] == pytest.approx(want, abs=1e-4), row



def test_a_judge_answer_without_a_score_is_counted_or_stops_the_run(tmp_path):
    """tiny-judge answers yes or no, never a number: with judge_parser score every answer is a failure, scored 0 and
    counted (judge_on_failure zero; in async_mode, groups judged as the stream finishes them, each step counting
    its own), or the run stops with node.sh's one line naming the judge (fail)."""
    args = ["train_grpo.py", "--config", "configs/judge.yaml", "--judge_parser", "score", "--max_steps", "2",
            "--prompts_per_step", "8"]
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
                str(free_port()), *args, "--async_mode", "true", "--max_staleness", "1", "--tis_cap", "2.0",
                "--score_while_generating", "true", "--output_dir", str(tmp_path / "zero")], 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = [json.loads(line) for line in open(tmp_path / "zero" / "metrics.jsonl")]
    assert [m["reward/judge_failures"] for m in metrics] == [64.0, 64.0]
    assert all(m["reward/judge"] == 0.0 for m in metrics)
    env = {"PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    done = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", *args[1:], "--judge_on_failure", "fail",
                "--output_dir", str(tmp_path / "fail")], 600, env=env)
    assert done.returncode != 0
    console = done.stdout + done.stderr
    named = [line for line in console.splitlines() if line.startswith("error: rank ")]  # node.sh's root cause
    assert named and named[-1].startswith("error: rank 2 judge failed: RewardError: the judge's answer"), named
    assert "holds no score" in named[-1] and "judge_on_failure zero" in named[-1]
