"""tgrpo: GRPO in one torchrun world, vLLM rollout ranks and DeepSpeed ZeRO-3 policy ranks, no Ray."""
