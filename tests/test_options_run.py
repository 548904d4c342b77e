"""The algorithm options together in one real run (2 rollout engines + 2 policy ranks): evaluation every 2 steps,
several passes and mini-batches, dual clip, truncated importance sampling, truncation masking, overlong penalty,
dynamic sampling, the KL in the reward and a reward function written for TRL, with generation two steps ahead
(max_staleness 2) and each policy rank's ZeRO-3 shards reaching both engines (sync_mode partitions), checked after
every sync. Each option's numbers are checked in tests/test_algorithm.py; this checks that they run together and
reach tensorboard."""
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import torchrun

pytestmark = pytest.mark.slow  # torchrun jobs: pytest -m "not slow" leaves them out


TRL_REWARD = "tests.reward_fixtures:trl_answer_in_completion"  # written for TRL: a batch, columns by name, None


def test_options_run_together_and_eval_reaches_tensorboard(tmp_path):
    result = torchrun(["train_grpo.py", "--config", "configs/default.yaml", "--max_steps", "4", "--prompts_per_step",
                       "8", "--micro_batch_size", "4", "--loss_type", "grpo", "--num_iterations", "2",
                       "--mini_batches", "2", "--dual_clip", "3", "--tis_cap", "2", "--mask_truncated_completions",
                       "true", "--overlong_buffer_length", "4", "--dynamic_sampling", "true", "--beta", "0.02",
                       "--kl_in_reward", "true", "--eval_data", "data/arith_test.json", "--eval_steps", "2",
                       "--eval_max_prompts", "24", "--eval_k", "2", "--rollout_ranks", "0-1", "--policy_ranks", "2-3",
                       "--max_staleness", "2", "--sync_check", "true", "--output_dir", str(tmp_path),
                       "--reward_funcs", "math", "format", TRL_REWARD, "--reward_weights", "1.0", "0.2", "0.5",
                       "--num_samples_to_log", "64"],
                      nproc=4, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "eval after step 2:" in result.stderr + result.stdout
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(metrics) == 4
    assert [m["sync_check/passed"] for m in metrics] == [1.0] * 4
    assert [m["rollout/staleness"] for m in metrics] == [0, 1, 2, 2]
    assert all(0 <= m["policy/clip_fraction"] <= 1 and m["mismatch/max_ratio"] > 0 for m in metrics)
    assert all("reward/kl_penalty" in m and "reward/overlong" in m and "rollout/groups_dropped" in m for m in metrics)
    # the reward function written for TRL ran unchanged beside the builtins: its mean and spread over the samples
    # it applies to, and None (NaN in the parts) where it does not (prompts over 40 characters), left out of the total
    assert all(0 <= m[f"reward/{TRL_REWARD}"] <= 1 and f"reward/{TRL_REWARD}/std" in m for m in metrics)
    logged = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    parts = [row["reward_parts"][TRL_REWARD] for row in logged]
    assert any(math.isnan(v) for v in parts) and any(not math.isnan(v) for v in parts), parts
    for row in logged:
        applies = not math.isnan(row["reward_parts"][TRL_REWARD])
        expected = sum(w * row["reward_parts"][n] for n, w in (("math", 1.0), ("format", 0.2), (TRL_REWARD, 0.5))
                       if n != TRL_REWARD or applies) + row["reward_parts"]["kl_penalty"] + row["reward_parts"]["overlong"]
        assert abs(row["reward"] - expected) < 1e-6, row
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for tag in ("eval/pass@1", "eval/mean@2", "eval/greedy_reward_mean"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag
    assert 0 <= acc.Scalars("eval/pass@1")[-1].value <= 1
