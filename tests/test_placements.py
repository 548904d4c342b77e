"""Other placements, each a short real run under torchrun on gloo with the sync check on after every step."""
import json

import pytest
import torch
from helpers import torchrun
from torch.testing import assert_close

from tgrpo.algorithm import group_advantages

pytestmark = pytest.mark.slow  # torchrun jobs: pytest -m "not slow" leaves them out

SHORT = ["train_grpo.py", "--config", "configs/default.yaml", "--max_steps", "3", "--prompts_per_step", "8",
         "--micro_batch_size", "8", "--sync_check", "true"]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_tensor_parallel_engine_and_reference_on_its_own_rank(tmp_path):
    """Ranks 0-1 hold one vLLM engine with tensor parallelism 2 (rank 0 drives it), rank 2 trains, rank 3 holds the
    frozen reference: the engine matches the policy after every sync, and the KL to the reference starts at 0.
    The policy here is ZeRO-2 (whole parameters, weights sent by sync_mode gather, the reference without ZeRO) and
    trains on padded micro-batches of micro_batch_size sequences; the other runs use ZeRO-3, partitions and packed
    token-budget micro-batches."""
    result = torchrun([*SHORT, "--rollout_ranks", "0-1", "--rollout_tensor_parallel_size", "2", "--policy_ranks",
                       "2-2", "--reference_ranks", "3-3", "--beta", "0.05", "--zero_stage", "2",
                       "--padding_free", "false", "--max_tokens_per_micro_batch", "0", "--micro_batch_size", "4",
                       "--output_dir", str(tmp_path)],
                      nproc=4, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = _metrics(tmp_path)
    assert [m["sync_check/passed"] for m in metrics] == [1.0, 1.0, 1.0]
    assert abs(metrics[0]["policy/kl"]) < 1e-6 and metrics[2]["policy/kl"] > 0
    assert [m["policy/micro_batches"] for m in metrics] == [16.0] * 3  # 8 prompts x 8 samples / 4 per micro-batch


def test_colocated_every_rank_rolls_out_and_trains(tmp_path):
    """Two ranks, each a ZeRO-3 shard of the policy, a shard of the reference (beta > 0) and a vLLM engine that
    loads the weights its rank gathers. With scale_rewards batch, the advantages of the two engines' samples are
    divided by the std of the whole step's rewards, as one engine would have them."""
    result = torchrun([*SHORT, "--colocate", "true", "--rollout_ranks", "all", "--policy_ranks", "all",
                       "--beta", "0.05", "--scale_rewards", "batch", "--num_samples_to_log", "64",
                       "--output_dir", str(tmp_path)], nproc=2, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = _metrics(tmp_path)
    assert [m["sync_check/passed"] for m in metrics] == [1.0, 1.0, 1.0]
    assert all(m["policy/grad_norm"] > 0 for m in metrics)
    assert abs(metrics[0]["policy/kl"]) < 1e-6 and metrics[2]["policy/kl"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    for step in (1, 2, 3):
        step_rows = [r for r in rows if r["step"] == step]
        assert len(step_rows) == 64  # 8 prompts x 8 samples, 32 from each engine
        rewards = torch.tensor([r["reward"] for r in step_rows])
        assert_close(torch.tensor([r["advantage"] for r in step_rows]), group_advantages(rewards, 8, "batch"))
