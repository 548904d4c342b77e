"""A vision-language model trained the other ways (issue 36): LoRA and async_mode, short runs of configs/vl.yaml under
torchrun (tests/test_vl.py holds the main run: synchronous, full fine-tuning, killed and resumed)."""
import json
import os

import pytest

from helpers import torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["lora", "async"])
def test_lora_and_async_mode_train_on_image_prompts_in_sync(tmp_path, mode):
    """Short runs of the other ways to train a VL model: LoRA (the adapter on the language model, the tower frozen)
    and async_mode (groups generated without a break, weights updated in flight). After every sync vLLM's logprobs
    on image prompts equal the policy's; a LoRA checkpoint holds the processor beside the adapter and its merged
    model."""
    args = {"lora": ["--use_lora", "true", "--learning_rate", "5e-3", "--save_steps", "3", "--save_merged_lora", "true"],
            "async": ["--async_mode", "true", "--max_staleness", "1", "--tis_cap", "2.0", "--save_steps", "0"]}[mode]
    result = torchrun(["train_grpo.py", "--config", "configs/vl.yaml", "--max_steps", "3", "--eval_steps", "0",
                       "--sync_check", "true", "--output_dir", str(tmp_path), *args], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["sync_check/passed"] == 1.0 and m["sync_check/token_match"] == 1.0, m
    if mode == "lora":
        step = tmp_path / "checkpoints" / "step-3"
        for folder in (step, step / "merged"):
            assert (folder / "processor_config.json").exists(), sorted(os.listdir(folder))
    else:
        assert all("staleness/mean" in m for m in metrics)
