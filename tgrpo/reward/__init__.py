"""Rewards from models, scored after the step's samples are gathered: model (a sequence-classification reward
model with its own tokenizer and chat template, transformers, token-budget batches; the running normalisation of its
scores) and judge (an LLM judge on a frozen vLLM engine of a judge rank; its verdict and score parsers). Which
reward_funcs entries are models is the shared leaf tgrpo.reward_spec; tgrpo.job.model_rewards places and calls them.

May import: tgrpo.rollout (the vLLM engine: every vLLM call lives in tgrpo.rollout.vllm_engine), tgrpo.sync,
tgrpo.policy and the shared leaves. Never tgrpo.job.
"""
