"""Overlapped (one-step off-policy) training, a real torchrun/gloo run. Two engines with generation two steps ahead
run in tests/test_options_run.py."""
import json
import os

import pytest

from helpers import ROOT, torchrun

pytestmark = pytest.mark.slow  # torchrun jobs: pytest -m "not slow" leaves them out

STEPS = 25


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_overlapped_run_learns_the_toy_task_and_stays_in_sync(tmp_path):
    """max_staleness 1: each batch was generated while the policy trained on the previous one, with weights one
    update old (tis_cap corrects it). The sync check still passes after every sync, and reward rises as in the
    on-policy run of test_train.py."""
    toy = tmp_path / "toy.json"
    toy.write_text(json.dumps(json.load(open(os.path.join(ROOT, "data", "arith_train.json")))[:16]))
    result = torchrun(["train_grpo.py", "--config", "configs/default.yaml", "--train_data", str(toy),
                       "--prompts_per_step", "16", "--max_steps", str(STEPS), "--max_staleness", "1",
                       "--tis_cap", "2.0", "--sync_check", "true", "--output_dir", str(tmp_path)], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = _metrics(tmp_path)
    assert len(metrics) == STEPS
    assert [m["rollout/staleness"] for m in metrics] == [0] + [1] * (STEPS - 1)
    assert all(m["sync_check/passed"] == 1.0 for m in metrics)
    # samples one update old: vLLM's logprobs now differ from the policy's, which is what tis_cap weighs
    assert max(m["mismatch/logprob_abs_diff_max"] for m in metrics[1:]) > 1e-3
    rewards = [m["reward/mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print("reward curve:", [round(r, 3) for r in rewards])
    assert last > first + 0.1, (first, last, rewards)
